"""Images through the Python API and the CLI, on a tiny random vision-language checkpoint with a real tokenizer."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import qwen35
import qwen35.api as api
from qwen35.vision import ImageError

tf = pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")
from test_vision_model import make_vl_reference  # noqa: E402  (needs transformers)

NANO = Path(qwen35.__file__).parent / "assets" / "nano"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random VL model using the built-in tokenizer (whose <|image_pad|> is 12267), saved by transformers."""
    tok = qwen35.load(None).tokenizer
    ids = {name: tok.token_to_id(name) for name in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")}
    ref = make_vl_reference(vocab=tok.vocab_size, image=ids["<|image_pad|>"], start=ids["<|vision_start|>"],
                            end=ids["<|vision_end|>"])
    path = tmp_path_factory.mktemp("vl-api")
    ref.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(NANO / name, path / name)
    (path / "preprocessor_config.json").write_text('{"size": {"shortest_edge": 4096, "longest_edge": 40000}}')
    Image.fromarray(skdata.chelsea()).save(path / "cat.png")
    return path, ref


def record_tokens(monkeypatch) -> list[int]:
    seen: list[int] = []
    real = api.run

    def recording(*args, **kwargs):
        for event in real(*args, **kwargs):
            seen.append(event.token)
            yield event

    monkeypatch.setattr(api, "run", recording)
    return seen


def test_image_chat_matches_reference_generate(checkpoint, monkeypatch):
    path, ref = checkpoint
    m = qwen35.load(path, dtype="float32")
    assert m.vision is not None and m.processor.max_pixels == 40000
    cat = Image.open(path / "cat.png")
    messages = [{"role": "user", "content": [{"type": "image", "image": cat}, {"type": "text", "text": "What is it?"}]}]
    tokens = record_tokens(monkeypatch)
    reply = m.chat(messages, enable_thinking=False, temperature=0, repetition_penalty=1.0, max_tokens=16,
                   ignore_eos=True)

    prompt = m.tokenizer.encode(m.chat_prompt(messages, enable_thinking=False))
    pix = tf.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": 4096, "longest_edge": 40000})(cat, return_tensors="pt")
    n = int(pix["image_grid_thw"].prod()) // 4
    k = prompt.index(m.config.image_token_id)
    ids = prompt[:k] + [m.config.image_token_id] * n + prompt[k + 1:]
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([ids]), pixel_values=pix["pixel_values"],
                           image_grid_thw=pix["image_grid_thw"],
                           mm_token_type_ids=torch.tensor([[int(i == m.config.image_token_id) for i in ids]]),
                           max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert reply.prompt_tokens == len(ids) and reply.completion_tokens == 16
    assert tokens == out[0, len(ids):].tolist()


def test_vision_tower_loads_with_the_first_image(checkpoint, monkeypatch):
    """Text-only use never holds the tower (0.67 GB at 4B): `load` only notes it; the first image reads it."""
    path, _ = checkpoint
    calls = []
    real = api.load_vision
    monkeypatch.setattr(api, "load_vision", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = qwen35.load(path, dtype="float32")
    m.chat([{"role": "user", "content": "hi"}], max_tokens=2)
    assert not calls and m.processor is not None
    m.chat([{"role": "user", "content": [{"type": "image", "image": str(path / "cat.png")}]}], max_tokens=2)
    assert calls == [1] and m.vision is not None and calls == [1]  # loaded once, then kept


def test_image_sources_agree(checkpoint, monkeypatch):
    """A PIL image, a file path and an OpenAI data: URL of the same PNG give the same reply."""
    path, _ = checkpoint
    m = qwen35.load(path, dtype="float32")
    data = "data:image/png;base64," + base64.b64encode((path / "cat.png").read_bytes()).decode()
    replies = []
    for part in ({"type": "image", "image": Image.open(path / "cat.png")},
                 {"type": "image", "image": str(path / "cat.png")},
                 {"type": "image_url", "image_url": {"url": data}}):
        messages = [{"role": "user", "content": [part, {"type": "text", "text": "Describe."}]}]
        replies.append(m.chat(messages, temperature=0, max_tokens=6, ignore_eos=True))
    assert replies[0].text == replies[1].text == replies[2].text
    assert replies[0].cached_tokens == 0 and replies[1].cached_tokens == replies[2].cached_tokens > 0  # same pixels


def test_later_turns_encode_only_their_new_images(checkpoint):
    """The tower runs once per image: a later turn resends the first image, found by its pixels; the reply
    equals that of a model that encodes both afresh."""
    path, _ = checkpoint
    m = qwen35.load(path, dtype="float32")
    encoded: list[int] = []
    real = m.vision.forward
    m.vision.forward = lambda pixels, grids: encoded.append(len(grids)) or real(pixels, grids)
    cat, coffee = Image.open(path / "cat.png"), Image.fromarray(skdata.coffee())
    first = [{"role": "user", "content": [{"type": "image", "image": cat}, {"type": "text", "text": "What is it?"}]}]
    reply = m.chat(first, temperature=0, max_tokens=4, ignore_eos=True)
    later = first + [{"role": "assistant", "content": reply.text},
                     {"role": "user", "content": [{"type": "image", "image": coffee}, {"type": "text", "text": "This?"}]}]
    warm = m.chat(later, temperature=0, max_tokens=6, ignore_eos=True)
    cold = qwen35.load(path, dtype="float32", cache_ram=0).chat(later, temperature=0, max_tokens=6, ignore_eos=True)
    assert encoded == [1, 1]  # the cat, then the coffee alone
    assert warm.cached_tokens > 0 and warm.text == cold.text


def test_bad_images_and_text_models_fail_clearly(checkpoint, default_model):
    path, _ = checkpoint
    m = qwen35.load(path, dtype="float32")
    truncated = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(truncated, format="PNG")
    for image, message in ((truncated.getvalue()[:2000], "truncated"), (str(path / "missing.png"), "does not exist"),
                           ("http://169.254.169.254/x.png", "remote image URLs are disabled")):
        with pytest.raises(ImageError, match=message):
            m.chat([{"role": "user", "content": [{"type": "image", "image": image}]}], max_tokens=2)
    assert m.chat([{"role": "user", "content": "still fine?"}], max_tokens=2).completion_tokens == 2
    with pytest.raises(ImageError, match="no vision tower"):
        default_model.chat([{"role": "user", "content": [{"type": "image", "image": str(path / "cat.png")}]}])


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen35", *args], input=stdin, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "120"}, timeout=120)


def test_cli_image_flag_and_command(checkpoint, in_process):
    path, _ = checkpoint
    common = ("chat", "-m", str(path), "--dtype", "float32", "--temperature", "0", "--max-tokens", "4", "--ignore-eos")
    out = cli(*common, "-p", "What is it?", "--image", str(path / "cat.png"))  # the real command, in its own process
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    out = in_process(*common, "-p", "What is it?", "--image", str(path / "nope.png"))  # the same `main`, here
    assert out.returncode == 2 and "image 1" in out.stderr and "does not exist" in out.stderr
    out = in_process(*common, stdin=f"/image {path / 'nope.png'}\nhi\n/image {path / 'cat.png'}\nWhat is it?\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert "image attached" in out.stdout and "does not exist" in out.stdout


def test_max_image_tokens_reaches_the_processor(checkpoint):
    """load's cap is the processor's: the cat (35 tokens under this checkpoint's max_pixels) costs 6 under a cap of
    8, both in the prompt and in what `prepare_chat` reports."""
    path, _ = checkpoint
    messages = [{"role": "user", "content": [{"type": "image", "image": str(path / "cat.png")}, {"type": "text",
                                                                                                 "text": "Hi"}]}]
    for cap, tokens in ((8, 6), (0, 35)):
        m = qwen35.load(path, dtype="float32", max_image_tokens=cap)
        prompt = m.prepare_chat(messages)
        assert m.processor.max_image_tokens == cap and prompt.images.tokens == (tokens,)
        assert prompt.ids.count(m.config.image_token_id) == tokens
    with pytest.raises(ValueError, match="max_image_tokens=3 is below the 4 tokens"):
        qwen35.load(path, dtype="float32", max_image_tokens=3)


def test_max_image_tokens_flag_reaches_the_processor(checkpoint, in_process, monkeypatch):
    path, _ = checkpoint
    loaded: list = []
    real = api.load
    monkeypatch.setattr(api, "load", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    monkeypatch.setattr("qwen35.server.serve.serve", lambda settings, load, *a, **k: load())
    common = ("-m", str(path), "--dtype", "float32")
    out = in_process("chat", *common, "--max-image-tokens", "8", "--max-tokens", "2", "-p", "Hi", "--image",
                     str(path / "cat.png"))
    assert out.returncode == 0, out.stderr
    out = in_process("serve", *common, "--port", "0", "--max-image-tokens", "16")
    assert out.returncode == 0, out.stderr
    out = in_process("serve", *common, "--port", "0")
    assert [m.processor.max_image_tokens for m in loaded] == [8, 16, 1280]
    out = in_process("chat", "--max-image-tokens", "-3", "-p", "Hi")
    assert out.returncode == 2 and "'-3' is not a token count: give 0 (no cap) or more" in out.stderr
