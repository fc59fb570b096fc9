"""Turn an image reference into a decoded Pillow image, within limits (reliability.md, "Media" and table E).

Sources: a Pillow image, raw bytes, a `data:image/...;base64,` URL, a local path or `file://` URL (only inside
`ImagePolicy.local_dir`, after resolving symlinks and `..`), or an http(s) URL (off unless `allow_remote`; then
DNS is resolved once, every address must be public, the connection is pinned to it, redirects are re-checked hop
by hop, and the body is streamed under a byte cap and a deadline). Every image is opened with a format allowlist
and its pixel count is checked from the header before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urljoin, urlsplit

from PIL import Image

MIME_FORMATS = {"image/jpeg": "JPEG", "image/jpg": "JPEG", "image/png": "PNG", "image/webp": "WEBP",
                "image/gif": "GIF"}
Resolver = Callable[[str, int], list[str]]


class ImageError(ValueError):
    """An image that cannot be used; the message says what was wrong and what to do instead."""


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from and how big they may be."""

    max_bytes: int = 20 * 1024 * 1024  # encoded size, streamed (remote) or checked up front
    max_pixels: int = 64_000_000  # width x height from the header, checked before decoding
    max_images: int = 8  # per request
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF")
    local_dir: Path | None = None  # local files only under this directory (None: no local files)
    allow_remote: bool = False  # http(s) URLs
    allowed_domains: tuple[str, ...] = ()  # with allow_remote: these hosts and their subdomains (empty: any)
    timeout: float = 5.0  # seconds for a whole remote download (connect: at most 3)
    max_redirects: int = 3


def load_image(source: Any, policy: ImagePolicy, resolve: Resolver | None = None) -> Image.Image:
    """A Pillow image (not yet converted to RGB) from any accepted source; ImageError otherwise."""
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, policy)
        return source
    if isinstance(source, (bytes, bytearray)):
        return decode_image(bytes(source), policy)
    if isinstance(source, Path):
        return decode_image(read_local(source, policy), policy)
    if not isinstance(source, str) or not source:
        raise ImageError(f"an image must be a path, a URL, bytes or a PIL image, got {type(source).__name__}")
    scheme = urlsplit(source).scheme.lower() if ":" in source[:12] else ""
    if scheme == "data":
        return decode_image(read_data_url(source, policy), policy)
    if scheme in ("http", "https"):
        return decode_image(fetch_remote(source, policy, resolve or resolve_host), policy)
    if scheme == "file":
        return decode_image(read_local(Path(urlsplit(source).path), policy), policy)
    if len(scheme) > 1:  # one letter is a Windows drive
        raise ImageError(f"image URL scheme '{scheme}:' is not supported; use a data: URL, http(s) or a file path")
    return decode_image(read_local(Path(source), policy), policy)


def decode_image(data: bytes, policy: ImagePolicy) -> Image.Image:
    """Open with the format allowlist, check the header's size, then decode every pixel (so errors surface now)."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    if len(data) > policy.max_bytes:
        raise ImageError(f"the image is {len(data)} bytes; the limit is {policy.max_bytes}")
    try:
        image = Image.open(io.BytesIO(data), formats=list(policy.formats))
    except Image.DecompressionBombError as e:
        raise ImageError(f"the image declares too many pixels ({e}); the limit is {policy.max_pixels}") from None
    except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ImageError(f"not an image in an accepted format ({', '.join(policy.formats)}), or its header is "
                         "corrupt") from None
    _check_pixels(image.width, image.height, policy)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"the {image.format} image is truncated or corrupt ({e})") from None
    return image


def _check_pixels(width: int, height: int, policy: ImagePolicy) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"the image is {width}x{height}: it has no pixels")
    if width * height > policy.max_pixels:
        raise ImageError(f"the image is {width}x{height} = {width * height} pixels; the limit is "
                         f"{policy.max_pixels} (resize it first)")


def read_data_url(url: str, policy: ImagePolicy) -> bytes:
    """Bytes of `data:image/<png|jpeg|webp|gif>;base64,...`, size-checked before decoding the base64."""
    header, sep, payload = url.partition(",")
    meta = header[5:].split(";")
    if not sep or meta[-1].lower() != "base64":
        raise ImageError("a data: URL must look like data:image/png;base64,<data>")
    mime = meta[0].strip().lower()
    if MIME_FORMATS.get(mime) not in policy.formats:
        raise ImageError(f"data: URL type {mime!r} is not accepted; use one of "
                         f"{sorted(m for m, f in MIME_FORMATS.items() if f in policy.formats)}")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise ImageError(f"the data: URL holds about {len(payload) * 3 // 4} bytes; the limit is {policy.max_bytes}")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"the data: URL is not valid base64 ({e})") from None


def read_local(path: Path, policy: ImagePolicy) -> bytes:
    """A file inside `policy.local_dir` (symlinks and `..` resolved before the containment check)."""
    if policy.local_dir is None:
        raise ImageError("local image files are not allowed here; send the image as a data: URL "
                         "(a server enables a directory with --allowed-local-media-path)")
    root = Path(policy.local_dir).resolve()
    real = path.expanduser().resolve()  # a relative path is relative to the current directory
    if not real.is_relative_to(root):
        raise ImageError(f"image path {str(path)!r} is outside the allowed directory {str(root)!r}")
    if not real.is_file():
        raise ImageError(f"image file {str(path)!r} does not exist or is not a file")
    size = real.stat().st_size
    if size > policy.max_bytes:
        raise ImageError(f"image file {str(path)!r} is {size} bytes; the limit is {policy.max_bytes}")
    return real.read_bytes()


def resolve_host(host: str, port: int) -> list[str]:
    """Every address DNS gives for host (resolved once; the download is pinned to the first)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ImageError(f"image URL host {host!r} cannot be resolved ({e})") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public(address: str) -> bool:
    """False for loopback, private (RFC 1918, ULA), link-local (incl. 169.254.169.254), multicast, reserved,
    unspecified and other non-global addresses, also when wrapped in IPv4-mapped IPv6."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local
                                 or ip.is_private or ip.is_unspecified)


def check_url(url: str, policy: ImagePolicy, resolve: Resolver) -> tuple[str, str, int, str]:
    """Apply the SSRF rules to one hop: (scheme, host, port, pinned address) or ImageError."""
    if not policy.allow_remote:
        raise ImageError("remote image URLs are disabled; send the image as a data: URL (a server enables "
                         "http(s) downloads with --allow-remote-media)")
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in ("http", "https") or not host:
        raise ImageError(f"media URL not allowed: {url!r} (only http(s) URLs with a host)")
    if parts.username or parts.password:
        raise ImageError("media URL not allowed: credentials in the URL")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise ImageError(f"media URL not allowed: bad port in {url!r}") from None
    if policy.allowed_domains and not any(host == d or host.endswith("." + d) for d in policy.allowed_domains):
        raise ImageError(f"media URL not allowed: host {host!r} is not in the allowed domains")
    addresses = resolve(host, port)
    bad = [a for a in addresses if not is_public(a)]
    if not addresses or bad:
        raise ImageError(f"media URL not allowed: {host!r} resolves to a non-public address {bad[:1]}")
    return scheme, host, port, addresses[0]


def fetch_remote(url: str, policy: ImagePolicy, resolve: Resolver = resolve_host) -> bytes:
    """Download an image over http(s) under the SSRF rules, the byte cap and the deadline."""
    import httpx

    deadline = time.monotonic() + policy.timeout
    port0 = None
    for _ in range(policy.max_redirects + 1):
        scheme, host, port, address = check_url(url, policy, resolve)
        if port0 is not None and port != port0:
            raise ImageError("media URL not allowed: a redirect changed the port")
        port0 = port
        parts = urlsplit(url)
        pinned = parts._replace(netloc=f"[{address}]:{port}" if ":" in address else f"{address}:{port}").geturl()
        headers = {"Host": host if parts.port is None else f"{host}:{port}", "Accept": "image/*"}
        timeout = httpx.Timeout(policy.timeout, connect=min(3.0, policy.timeout))
        try:
            with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
                with client.stream("GET", pinned, headers=headers,
                                   extensions={"sni_hostname": host} if scheme == "https" else {}) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise ImageError(f"image URL returned HTTP {response.status_code}")
                    length = response.headers.get("content-length")
                    if length and length.isdigit() and int(length) > policy.max_bytes:
                        raise ImageError(f"the image is {length} bytes; the limit is {policy.max_bytes}")
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > policy.max_bytes:
                            raise ImageError(f"the image is over the limit of {policy.max_bytes} bytes")
                        if time.monotonic() > deadline:
                            raise ImageError(f"the image download took over {policy.timeout} s")
                    return bytes(body)
        except httpx.HTTPError as e:
            raise ImageError(f"image download failed ({type(e).__name__}: {e})") from None
    raise ImageError(f"image URL redirected more than {policy.max_redirects} times")
