"""The Python API on the built-in default model: streaming is the primitive, replies fold the stream."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qwen35
import qwen35.api as api
from qwen35.api import Piece, fold
from qwen35.runtime import Event

USER = [{"role": "user", "content": "Hello, how are you?"}]


def test_public_api_is_small():
    assert set(qwen35.__all__) == {"load", "quantize", "Qwen35", "Reply", "Piece", "SamplingParams"}


def test_chat_is_the_folded_stream(default_model):
    kwargs = dict(temperature=0.8, seed=3, max_tokens=24, enable_thinking=False)
    pieces = list(default_model.stream_chat(USER, **kwargs))
    reply = default_model.chat(USER, **kwargs)
    assert dataclasses.replace(reply, cached_tokens=0) == dataclasses.replace(fold(pieces), cached_tokens=0)
    assert reply.cached_tokens > 0  # the second call resumed from the first one's snapshot
    assert pieces[-1].finish_reason in ("stop", "length") and pieces[-1].completion_tokens == reply.completion_tokens
    assert reply.prompt_tokens == len(default_model.tokenizer.encode(default_model.chat_prompt(USER, enable_thinking=False)))
    assert 1 <= reply.completion_tokens <= 24


def test_same_seed_same_text_and_max_tokens_gives_length(default_model):
    a = default_model.generate("Once upon a time", temperature=1.0, seed=11, max_tokens=16)
    b = default_model.generate("Once upon a time", temperature=1.0, seed=11, max_tokens=16)
    assert a == b
    if a.finish_reason == "length":
        assert a.completion_tokens == 16


def test_logits_full_forward(default_model):
    ids = default_model.tokenizer.encode("The capital of France is")
    out = default_model.logits(ids)
    assert out.shape == (len(ids), default_model.config.vocab_size) and out.dtype == torch.float32
    batch = default_model.logits([ids, ids])
    torch.testing.assert_close(batch[1], out)


def _scripted(monkeypatch, text: str, model):
    """Make generation emit the tokens of `text` (a stand-in model whose output we know)."""
    ids = model.tokenizer.encode(text)

    def fake(_model, request, eos_ids, limit, prefix_cache=None, background=None, **_):
        for token in ids[: request.params.max_tokens]:
            yield Event("0", token)
            if token in eos_ids:
                return

    monkeypatch.setattr(api, "run", fake)
    return ids


def test_thinking_and_answer_are_kept_apart(monkeypatch, default_model):
    _scripted(monkeypatch, "Let me think.\nOK 😀 done.\n</think>\n\nBonjour 你好!<|im_end|>", default_model)
    reply = default_model.chat(USER, enable_thinking=True)
    assert reply.thinking == "Let me think.\nOK 😀 done."
    assert reply.text == "Bonjour 你好!"
    assert reply.finish_reason == "stop"


def test_stop_strings_end_the_reply(monkeypatch, default_model):
    _scripted(monkeypatch, "one two ### three<|im_end|>", default_model)
    reply = default_model.chat(USER, enable_thinking=False, stop=["###"])
    assert reply.text == "one two " and reply.finish_reason == "stop"


def test_eos_stops_and_is_not_shown(monkeypatch, default_model):
    _scripted(monkeypatch, "fine<|endoftext|>never shown", default_model)
    reply = default_model.generate("x")
    assert reply.text == "fine" and reply.finish_reason == "stop"


def test_tool_calls_are_parsed(monkeypatch, default_model):
    call = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call><|im_end|>")
    _scripted(monkeypatch, call, default_model)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    reply = default_model.chat(USER, tools=tools, enable_thinking=False)
    assert reply.tool_calls == [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]


def test_fold_requires_a_finished_stream():
    with pytest.raises(AssertionError):
        fold([Piece("answer", "x")])


def test_ignore_eos_runs_to_max_tokens(default_model):
    reply = default_model.chat(USER, temperature=0, max_tokens=300, ignore_eos=True, enable_thinking=False)
    assert reply.finish_reason == "length" and reply.completion_tokens == 300
