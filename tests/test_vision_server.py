"""Images through the OpenAI-compatible server: data: URLs work, bad images are 400s and the server stays healthy."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import replace

import httpx
import pytest
from PIL import Image

import qwen35

pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")
from test_server import running_server  # noqa: E402
from test_vision_api import checkpoint  # noqa: E402,F401  (the tiny vision-language checkpoint fixture)

from qwen35.server import ServerSettings  # noqa: E402
from qwen35.vision import ImagePolicy  # noqa: E402

MODEL = "tiny-vl"


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def claims_size(width: int, height: int) -> bytes:
    data = bytearray(png(Image.new("RGB", (4, 4))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def body(*urls: str, max_tokens: int = 8) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "What is it?"}]
    return {"model": MODEL, "messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens,
            "temperature": 0, "repetition_penalty": 1.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def live(checkpoint):  # noqa: F811
    path, _ = checkpoint
    model = qwen35.load(path, dtype="float32")
    media = path / "media"
    media.mkdir(exist_ok=True)
    (media / "cat.png").write_bytes((path / "cat.png").read_bytes())
    settings = ServerSettings(model_name=MODEL, images=ImagePolicy(local_dir=media, max_images=3))
    with running_server(settings, lambda: model) as (url, _):
        yield url, model, path


def post(url: str, payload: dict) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=payload, timeout=120)


def test_data_url_image_chat_equals_the_python_api(live):
    url, model, path = live
    cat = data_url((path / "cat.png").read_bytes())
    r = post(url, body(cat))
    assert r.status_code == 200, r.text
    reply = model.chat(body(cat)["messages"], temperature=0, repetition_penalty=1.0, max_tokens=8, ignore_eos=True)
    out = r.json()
    assert out["choices"][0]["message"]["content"] == reply.text
    assert out["usage"]["prompt_tokens"] == reply.prompt_tokens > 40  # the image's tokens (about 36) count
    two = post(url, body(cat, f"file://{path / 'media' / 'cat.png'}"))  # and a file under the allowed directory
    assert two.status_code == 200 and two.json()["usage"]["prompt_tokens"] > reply.prompt_tokens


def usage_of(url: str, payload: dict, stream: bool) -> dict:
    if not stream:
        r = post(url, payload)
        assert r.status_code == 200, r.text
        return r.json()["usage"]
    r = post(url, {**payload, "stream": True, "stream_options": {"include_usage": True}})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return chunks[-1]["usage"]


@pytest.mark.parametrize("stream", [False, True])
def test_usage_reports_what_each_image_cost(live, monkeypatch, stream):
    """The sum in prompt_tokens_details.image_tokens, each image in image_tokens_per_image (prompt order); a lower
    cap on the model's processor shows in both, and a text-only chat's usage has neither."""
    url, model, path = live
    cat, wide = (data_url((path / "cat.png").read_bytes()),
                 data_url(png(Image.fromarray(skdata.coffee()).resize((1000, 100)))))
    usage = usage_of(url, body(cat, wide), stream)
    assert usage["prompt_tokens_details"]["image_tokens"] == 35 + 19 and usage["image_tokens_per_image"] == [35, 19]
    monkeypatch.setattr(model, "processor", replace(model.processor, max_image_tokens=8))
    capped = usage_of(url, body(cat, wide), stream)
    assert capped["image_tokens_per_image"] == [6, 8] and capped["prompt_tokens_details"]["image_tokens"] == 14
    assert usage["prompt_tokens"] - capped["prompt_tokens"] == 54 - 14
    text = usage_of(url, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, stream)
    assert "image_tokens" not in text["prompt_tokens_details"] and "image_tokens_per_image" not in text


@pytest.mark.parametrize("urls,message", [
    ([data_url(png(Image.fromarray(skdata.astronaut()))[:3000])], "truncated"),
    ([data_url(claims_size(30000, 30000))], "pixels"),
    ([data_url(png(Image.fromarray(skdata.chelsea()), "TIFF"))], "accepted format"),
    ([data_url(png(Image.fromarray(skdata.chelsea()), "TIFF"), "image/tiff")], "not accepted"),
    (["data:image/png;base64,"], "empty"),
    (["data:image/png;base64,!!notbase64"], "base64"),
    (["http://169.254.169.254/latest/meta-data/"], "remote image URLs are disabled"),
    (["file:///etc/passwd"], "outside the allowed directory"),
    (["ftp://example.com/x.png"], "scheme 'ftp:'"),
    (["data:image/png;base64,AAAA"] * 4, "At most 3 image"),
])
def test_bad_images_are_400_and_the_server_stays_healthy(live, urls, message):
    url = live[0]
    r = post(url, body(*urls))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["param"] == "messages"
    assert httpx.get(url + "/health").status_code == 200
    ok = post(url, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200
