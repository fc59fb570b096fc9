"""The image processor against transformers' PIL processor on real photographs, and image loading under limits."""

from __future__ import annotations

import base64
import io
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
from PIL import Image

from qwen35.vision import ImageError, ImagePolicy, ImageProcessor, image_sources, load_image, load_images
from qwen35.vision.fetch import check_url, is_public
from qwen35.vision.processor import DEFAULT_MAX_IMAGE_TOKENS

skdata = pytest.importorskip("skimage.data")
tf_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

# (scikit-image photo, resize to (w, h) or None): square, landscape, portrait, grey, tiny, very wide, above max
PHOTOS = [("astronaut", None), ("coffee", None), ("chelsea", (123, 457)), ("camera", None), ("rocket", (1000, 300)),
          ("hubble_deep_field", None), ("immunohistochemistry", (40, 33)), ("coffee", (3000, 20)), ("retina", None)]


def reference_processor(**size):
    return tf_pil.Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                           image_std=[0.5] * 3, size=size or {"shortest_edge": 65536,
                                                                              "longest_edge": 16777216})


def photo(name, size=None):
    image = Image.fromarray(getattr(skdata, name)())
    return image.resize(size) if size else image


UNCAPPED = ImageProcessor(max_image_tokens=0)  # the reference's sizes
CAPPED_PIXELS = DEFAULT_MAX_IMAGE_TOKENS * 32 * 32  # the max_pixels the default cap amounts to


@pytest.mark.parametrize("name,size", PHOTOS)
def test_processor_matches_reference_on_photos(name, size):
    image = photo(name, size)
    ref = reference_processor()(image, return_tensors="np")
    ours = UNCAPPED(image)
    assert ours.grid == tuple(ref["image_grid_thw"][0].tolist())
    assert ours.num_tokens == ref["pixel_values"].shape[0] // 4 == UNCAPPED.num_tokens(image.height, image.width)
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    assert np.abs(ours.pixel_values.numpy() - ref["pixel_values"]).max() == 0.0


@pytest.mark.parametrize("name,size", PHOTOS + [("coffee", (4000, 3000))])
def test_capped_processor_is_the_reference_under_a_lower_max_pixels(name, size):
    """Over the cap (retina, a 12 MP photo) an image is what transformers makes of it under max_pixels = cap x 32²;
    under it, it is byte for byte what it was without the cap."""
    image = photo(name, size)
    ours, uncapped = ImageProcessor()(image), UNCAPPED(image)
    ref = reference_processor(shortest_edge=65536, longest_edge=CAPPED_PIXELS)(image, return_tensors="np")
    assert ours.grid == tuple(ref["image_grid_thw"][0].tolist()) and ours.num_tokens <= DEFAULT_MAX_IMAGE_TOKENS
    assert ours.pixel_values.numpy().tobytes() == ref["pixel_values"].astype(np.float32).tobytes()
    if uncapped.num_tokens <= DEFAULT_MAX_IMAGE_TOKENS:
        assert ours.pixel_values.numpy().tobytes() == uncapped.pixel_values.numpy().tobytes()
    else:
        assert name in ("retina", "coffee") and ours.num_tokens < uncapped.num_tokens


def test_a_12_megapixel_photo_costs_at_most_the_cap():
    assert (UNCAPPED.num_tokens(3000, 4000), UNCAPPED.num_tokens(3024, 4032)) == (11750, 11844)
    assert ImageProcessor().target_size(3000, 4000) == (960, 1312)  # 30 x 41 = 1,230 tokens
    assert ImageProcessor().num_tokens(3024, 4032) == 1230 and ImageProcessor().num_tokens(4096, 4096) == 1225


@pytest.mark.parametrize("cap", [64, 100, 199, 256, 1280, 5000])
def test_cap_holds_at_any_size_and_aspect_ratio(cap):
    """The cap holds for large, tiny and 200:1 images; where the reference's rule under max_pixels = cap x 32²
    keeps to it (no side held at 32, no min_pixels rounding up), the size is transformers' smart_resize's."""
    p, rng = ImageProcessor(max_image_tokens=cap), np.random.default_rng(cap)
    sizes = [(3000, 4000), (4096, 4096), (20000, 100), (32, 6400), (40, 7999), (7999, 40), (10, 10), (30, 100),
             (1, 200), (64_000, 1000)] + [tuple(int(v) for v in rng.integers(1, 9000, 2)) for _ in range(300)]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        gh, gw = p.target_size(h, w)
        assert gh % 32 == gw % 32 == 0 and gh >= 32 and gw >= 32, (h, w)
        assert (gh // 32) * (gw // 32) == p.num_tokens(h, w) <= cap, (h, w, gh, gw)
        ref, lowered = (tf_pil.smart_resize(h, w, 32, 65536, bound) for bound in (16777216, cap * 1024))
        if (ref[0] // 32) * (ref[1] // 32) <= cap:
            assert (gh, gw) == ref, (h, w)  # under the cap: unchanged
        elif (lowered[0] // 32) * (lowered[1] // 32) <= cap:
            assert (gh, gw) == lowered, (h, w)


def test_cap_off_and_bad_caps():
    assert ImageProcessor(max_image_tokens=None).target_size(4096, 4096) == UNCAPPED.target_size(4096, 4096) == (
        4096, 4096)
    assert ImageProcessor.from_config({}, max_image_tokens=300).max_image_tokens == 300
    assert ImageProcessor.from_config({}).max_image_tokens == DEFAULT_MAX_IMAGE_TOKENS == 1280
    for cap, message in ((-1, "max_image_tokens=-1 is invalid.*or 0 for no cap"), (1.5, "invalid"),
                         (63, "below the 64 tokens.*min_pixels 65536.*at least 64")):
        with pytest.raises(ValueError, match=message):
            ImageProcessor(max_image_tokens=cap)


def test_processor_max_pixels_and_odd_modes_match_reference():
    """A lower max_pixels (as a laptop would set), transparency, palette and 16-bit grey images."""
    small = ImageProcessor(min_pixels=4096, max_pixels=200_000)
    ref = reference_processor(shortest_edge=4096, longest_edge=200_000)
    rgba = np.dstack([skdata.astronaut(), np.linspace(0, 255, 512 * 512).reshape(512, 512).astype(np.uint8)])
    for image in (photo("retina"), Image.fromarray(rgba), photo("chelsea").convert("P"), photo("camera").convert("I;16")):
        expected = ref(image, return_tensors="np")["pixel_values"]
        got = small(image).pixel_values.numpy()
        assert got.shape == expected.shape and got.shape[0] * 256 <= 200_000
        assert np.abs(got - expected).max() == 0.0


def test_processor_reads_preprocessor_config():
    p = ImageProcessor.from_config({"size": {"shortest_edge": 1024, "longest_edge": 4096}, "patch_size": 16})
    assert (p.min_pixels, p.max_pixels, p.target_size(500, 500)) == (1024, 4096, (64, 64))
    with pytest.raises(ValueError, match="shortest_edge"):
        ImageProcessor.from_config({"size": {"shortest_edge": 10, "longest_edge": 5}})
    with pytest.raises(ImageError, match="aspect ratio"):
        ImageProcessor().target_size(10, 2500)


# -- loading under limits ---------------------------------------------------------------------------------------
def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A small valid PNG whose header then claims width x height (CRC fixed, so only the size is a lie)."""
    data = bytearray(encoded(Image.new("RGB", (4, 4), "red")))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def test_data_url_and_bytes_decode():
    image = photo("chelsea")
    got = load_image(data_url(encoded(image, "JPEG"), "image/jpeg"), ImagePolicy())
    assert got.size == image.size and got.format == "JPEG"
    assert load_image(encoded(image), ImagePolicy()).size == image.size


@pytest.mark.parametrize("raw,message", [
    (b"", "empty"),
    (encoded(photo("astronaut"))[:3000], "truncated"),
    (png_with_size(30000, 30000), "pixels"),
    (png_with_size(0, 0), "accepted format|no pixels"),
    (encoded(photo("chelsea"), "TIFF"), "accepted format"),
    (encoded(photo("chelsea"), "BMP"), "accepted format"),
    (b"<html>not an image</html>", "accepted format"),
])
def test_bad_images_give_clear_errors(raw, message):
    with pytest.raises(ImageError, match=message):
        load_image(raw, ImagePolicy())


def test_pixel_cap_is_checked_before_decoding(monkeypatch):
    from PIL import ImageFile

    raw = png_with_size(5000, 3000)

    def no_decode(self):
        raise AssertionError("decoded a too-large image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(ImageError, match="5000x3000"):
        load_image(raw, ImagePolicy(max_pixels=10_000_000))


@pytest.mark.parametrize("url,message", [
    ("data:image/tiff;base64,AAAA", "not accepted"),
    ("data:text/html;base64,AAAA", "not accepted"),
    ("data:image/png;base64,@@notbase64@@", "base64"),
    ("data:image/png,rawbytes", "data:image/png;base64"),
    ("ftp://example.com/a.png", "scheme 'ftp:'"),
    ("gopher://example.com/a.png", "scheme 'gopher:'"),
])
def test_bad_urls_are_refused(url, message):
    with pytest.raises(ImageError, match=message):
        load_image(url, ImagePolicy(allow_remote=True))


def test_byte_cap_applies_to_data_urls_and_files(tmp_path):
    raw = encoded(photo("astronaut"))
    with pytest.raises(ImageError, match="limit"):
        load_image(data_url(raw), ImagePolicy(max_bytes=len(raw) // 2))
    (tmp_path / "a.png").write_bytes(raw)
    with pytest.raises(ImageError, match="limit"):
        load_image(str(tmp_path / "a.png"), ImagePolicy(local_dir=tmp_path, max_bytes=1000))


def test_local_files_only_inside_the_allowed_directory(tmp_path):
    media, outside = tmp_path / "media", tmp_path / "secret"
    media.mkdir(), outside.mkdir()
    (media / "ok.png").write_bytes(encoded(photo("chelsea")))
    (outside / "x.png").write_bytes(encoded(photo("chelsea")))
    (media / "link.png").symlink_to(outside / "x.png")
    policy = ImagePolicy(local_dir=media)
    assert load_image(str(media / "ok.png"), policy).size == (451, 300)
    assert load_image(f"file://{media / 'ok.png'}", policy).size == (451, 300)
    for bad in (str(media / ".." / "secret" / "x.png"), str(media / "link.png"), "file:///etc/passwd",
                "file://../x.jpg"):
        with pytest.raises(ImageError, match="outside the allowed directory"):
            load_image(bad, policy)
    with pytest.raises(ImageError, match="not allowed here"):
        load_image(str(media / "ok.png"), ImagePolicy())
    with pytest.raises(ImageError, match="does not exist"):
        load_image(str(media / "nope.png"), policy)


def test_remote_urls_are_off_by_default_and_private_hosts_refused():
    with pytest.raises(ImageError, match="remote image URLs are disabled"):
        load_image("https://example.com/cat.png", ImagePolicy())
    policy = ImagePolicy(allow_remote=True)
    for url in ("http://169.254.169.254/latest/meta-data", "http://127.0.0.1:8080/a.png", "http://10.0.0.5/a.png",
                "http://[::1]/a.png", "http://[::ffff:127.0.0.1]/a.png", "http://localhost/a.png",
                "http://0.0.0.0/a.png", "http://user:pw@example.com/a.png"):
        with pytest.raises(ImageError, match="media URL not allowed"):
            load_image(url, policy)
    fake_dns = {"evil.example": ["93.184.216.34", "192.168.1.1"]}  # one private answer is enough to refuse
    with pytest.raises(ImageError, match="non-public"):
        check_url("https://evil.example/a.png", policy, lambda host, port: fake_dns[host])
    with pytest.raises(ImageError, match="allowed domains"):
        check_url("https://other.example/a.png", ImagePolicy(allow_remote=True, allowed_domains=("img.example",)),
                  lambda host, port: ["93.184.216.34"])
    assert check_url("https://cdn.img.example/a.png", ImagePolicy(allow_remote=True, allowed_domains=("img.example",)),
                     lambda host, port: ["93.184.216.34"])[3] == "93.184.216.34"
    assert is_public("93.184.216.34") and not is_public("100.64.0.1") and not is_public("fd00:ec2::254")


def test_ssrf_server_on_loopback_is_never_contacted():
    """An HTTP server on 127.0.0.1 that would record any request: the download must refuse before connecting."""
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(ImageError, match="media URL not allowed"):
            load_image(f"http://127.0.0.1:{server.server_port}/x.png", ImagePolicy(allow_remote=True))
    finally:
        server.shutdown()
    assert hits == []


def test_image_parts_and_count_cap():
    pil = photo("chelsea")
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "compare"},
                                             {"type": "image_url", "image_url": {"url": data_url(encoded(pil))}},
                                             {"type": "image", "image": pil}]}]
    sources = image_sources(messages)
    assert len(sources) == 2 and sources[1] is pil
    assert [im.size for im in load_images(sources, ImagePolicy())] == [(451, 300)] * 2
    with pytest.raises(ImageError, match="At most 1 image"):
        load_images(sources, ImagePolicy(max_images=1))
    with pytest.raises(ImageError, match="videos are not supported"):
        image_sources([{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]}])
    with pytest.raises(ImageError, match="without an image"):
        image_sources([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}])
