"""Media parts in chat messages: images are fetched and checked here, everything else is refused.

Images go through `qwen35.vision` under the server's `ImagePolicy` (reliability.md rows 27-36: data: URLs, local
files only under --allowed-local-media-path, remote URLs only with --allow-remote-media and the SSRF rules, byte
and pixel caps, a format allowlist, a count cap); any failure is a 400 that names the image.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from qwen35.api import Qwen35
from qwen35.server.errors import APIError
from qwen35.tokenizer.tokenizer import part_type
from qwen35.vision import ImageError, ImagePolicy, image_sources, load_images

MEDIA_PART_TYPES = ("image_url", "image", "input_image", "video", "video_url", "input_audio", "audio")
IMAGE_PART_TYPES = ("image_url", "image")


def load_media(messages: list[Any], qwen: Qwen35, policy: ImagePolicy) -> list[Image.Image]:
    """The decoded images of the chat, in template order; 400 for other media, a text-only model or a bad image."""
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part_type(part)  # a part without "type" is read by its keys, as the template reads it
            if kind in MEDIA_PART_TYPES and (kind not in IMAGE_PART_TYPES or qwen.vision is None):
                what = ("images are not supported by this model (it has no vision tower)" if kind in IMAGE_PART_TYPES
                        else "this media type is not supported (images only)")
                raise APIError(400, f"messages[{i}].content[{j}] is a {kind!r} part: {what}; send text parts "
                               "only", f"messages[{i}].content[{j}]")
    try:
        return load_images(image_sources(messages), policy)
    except ImageError as e:
        raise APIError(400, str(e), "messages") from None
