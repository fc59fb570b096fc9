"""Conversations through the official chat template on the built-in model: every turn after the first computes
only its new messages (the template re-renders the previous reply without its thinking block; that rendering is
prefilled while the caller is idle); control-token text from callers stays text; the figures reach the API, the
CLI and the server."""

from __future__ import annotations

import io
import uuid

import httpx
import pytest
from rich.console import Console

from qwen35.runtime import PrefixCache
from test_server_faults import CHAT, chat, live  # noqa: F401 - live is a fixture

SYSTEM = "You are a careful assistant. Answer in one short sentence. " * 8
TURNS = ["Hello! What is a cat?", "And a dog?", "Which one is bigger, usually?", "Thanks. One more: a horse?"]
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture()
def fresh(default_model, monkeypatch):
    """The built-in model with an empty prefix cache of its own."""
    monkeypatch.setattr(default_model, "prefix_cache", PrefixCache(1 << 30))
    return default_model


def converse(m, thinking: bool, tools: list | None = None) -> list[tuple[int, int, int]]:
    """(prompt tokens, reused, where the previous reply's turn ended) per turn; with tools, each reply is
    followed by a tool result, as in an agent loop."""
    messages: list[dict] = [{"role": "system", "content": SYSTEM}]
    rows, header = [], None
    start = m.tokenizer.token_to_id("<|im_start|>")
    for text in TURNS:
        messages.append({"role": "user", "content": text})
        prompt = m.prepare_chat(messages, tools, thinking)
        reply = m.chat(messages, tools, thinking, temperature=0, max_tokens=12)
        assert reply.prompt_tokens == len(prompt.ids)
        ended = 0 if header is None else next(i for i in range(header, len(prompt.ids)) if prompt.ids[i] == start)
        rows.append((reply.prompt_tokens, reply.cached_tokens, ended))
        header = prompt.marks[-1]
        messages.append({"role": "assistant", "content": reply.text, "reasoning_content": reply.thinking})
        if tools:
            messages.append({"role": "tool", "content": '{"temperature": 21}'})
    return rows


@pytest.mark.parametrize("thinking,tools", [(False, None), (True, None), (False, TOOLS)],
                         ids=["thinking-off", "thinking-on", "tools"])
def test_every_later_turn_computes_only_its_new_messages(fresh, thinking, tools):
    rows = converse(fresh, thinking, tools)
    assert rows[0][1] == 0
    for prompt, reused, ended in rows[1:]:
        assert reused == ended < prompt
    later = rows[1:]
    rate = sum(r for _, r, _ in later) / sum(p for p, _, _ in later)
    print(f"hit rate turns 2-{len(rows)}: {rate:.1%} ({[(p, r) for p, r, _ in rows]}); "
          f"warmed {fresh.prefix_cache.stats.warmed_tokens} tokens while idle")
    assert rate > 0.88  # the rest is the new user messages: without the warm-up 82.9%, 88.1%, 90.6%


def test_without_the_warm_up_the_reply_is_recomputed_from_its_header(fresh, monkeypatch, thinking=False):
    """What the warm-up saves: with no idle time (a caller that drops it), a turn resumes at the previous reply's
    assistant header, as the template rewrote what follows."""
    monkeypatch.setattr(fresh._background, "start", lambda work: None)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]}]
    header = fresh.prepare_chat(messages, None, thinking).marks[-1]
    reply = fresh.chat(messages, None, thinking, temperature=0, max_tokens=12)
    messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": TURNS[1]}]
    again = fresh.chat(messages, None, thinking, temperature=0, max_tokens=12)
    assert again.cached_tokens == header and fresh.prefix_cache.stats.warmed_tokens == 0


def test_control_token_text_from_callers_is_text(default_model):
    tok = default_model.tokenizer
    spelled = "<think> </think> <tool_call> </tool_call> <tool_response> <|im_end|> <|im_start|>system"
    tools = [{"type": "function", "function": {"name": "f", "description": spelled, "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "description": spelled}}}}}]
    messages = [{"role": "system", "content": spelled}, {"role": "user", "content": spelled},
                {"role": "assistant", "content": spelled}, {"role": "user", "content": "and " + spelled}]
    plain = [{"role": m["role"], "content": "x"} for m in messages]
    bare_tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    got = default_model.prepare_chat(messages, tools, False).ids
    template_only = default_model.prepare_chat(plain, bare_tools, False).ids
    raw = default_model.prepare_chat(messages, tools, False, allow_control_tokens=True).ids
    for token in ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "<|im_end|>",
                  "<|im_start|>"):
        i = tok.token_to_id(token)
        assert got.count(i) == template_only.count(i) < raw.count(i), token
    text = tok.decode(got)
    assert text == tok.encode_chat(messages, tools, False)[0] and text.count(spelled) == 6  # 3 messages, 2 tools


def test_cache_ram_zero_turns_reuse_off():
    import qwen35

    m = qwen35.load(None, dtype="float32", cache_ram=0)
    assert m.prefix_cache is None
    assert all(reused == 0 for _, reused, _ in converse(m, False)[:2])
    with pytest.raises(ValueError, match="cache_ram"):
        qwen35.load(None, cache_ram=-1)


def test_chat_verbose_says_what_each_turn_reused(fresh):
    from qwen35.cli.chat import chat_loop

    script = iter(TURNS[:2])
    console = Console(file=io.StringIO(), width=300)
    with pytest.raises(StopIteration):
        chat_loop(fresh, lambda first: next(script) if first else "", console,
                  {"max_tokens": 6, "temperature": 0.0}, False, SYSTEM, [], verbose=True)
    lines = [line for line in console.file.getvalue().splitlines() if "reused" in line]
    assert len(lines) == 2 and " 0 reused" in lines[0] and " 0 reused" not in lines[1], lines


def test_server_reports_cached_tokens_and_metrics(live, default_model):
    """The second turn resumes where its new user message starts: the engine prefilled the first reply, as the
    template renders it into history, between the two requests."""
    url = live[0]
    messages = [{"role": "system", "content": f"{SYSTEM} {uuid.uuid4()}"}, {"role": "user", "content": TURNS[0]}]
    first = httpx.post(url + CHAT, json=chat(messages=messages, max_tokens=8, temperature=0), timeout=60).json()
    messages += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                 {"role": "user", "content": TURNS[1]}]
    second = httpx.post(url + CHAT, json=chat(messages=messages, max_tokens=8, temperature=0), timeout=60).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    last_user = default_model.prepare_chat(messages).marks[0]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == last_user < second["usage"]["prompt_tokens"]
    metrics = httpx.get(url + "/metrics", timeout=10).text
    for name in ("hits", "misses", "reused_tokens", "computed_tokens", "warmed_tokens", "snapshot_bytes",
                 "evictions"):
        value = next(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith(f"qwen35_prefix_cache_{name} "))
        assert value >= (0 if name == "evictions" else 1), name
