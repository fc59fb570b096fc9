"""A chat's image parts -> what the text model needs: expanded prompt ids and `ImageInputs`.

The chat template renders each image part as `<|vision_start|><|image_pad|><|vision_end|>`; `prepare` expands
each `<|image_pad|>` to the image's token count, runs the vision tower and computes the M-RoPE positions. The
server, the Python API and the CLI all go through `image_sources` + `load_images` + `prepare`.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from qwen35.models.vision import ImageInputs, VisionModel, mrope_positions
from qwen35.vision.fetch import ImageError, ImagePolicy, Resolver, load_image
from qwen35.vision.processor import ImageProcessor


def image_sources(messages: Sequence[Any]) -> list[Any]:
    """The image of every image part, in the order the chat template renders them.

    Accepted parts: OpenAI `{"type": "image_url", "image_url": {"url": URL}}` (or a bare URL string) and
    `{"type": "image", "image": path | URL | bytes | PIL image}`; as in the template, parts are found by their
    keys, so the "type" may be left out.
    """
    found = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "video" or "video" in part:
                raise ImageError(f"messages[{i}].content[{j}]: videos are not supported; send frames as images")
            if kind == "image_url" or "image_url" in part:
                ref = part.get("image_url")
                ref = ref.get("url") if isinstance(ref, dict) else ref
            elif kind == "image" or "image" in part:
                ref = part.get("image")
            else:
                continue
            if ref is None or ref == "":
                raise ImageError(f"messages[{i}].content[{j}] is an image part without an image; use "
                                 "{'type': 'image_url', 'image_url': {'url': ...}} or {'type': 'image', 'image': ...}")
            found.append(ref)
    return found


def load_images(sources: Sequence[Any], policy: ImagePolicy, resolve: Resolver | None = None) -> list[Image.Image]:
    """Decode every source under the policy; the count cap comes first so nothing is fetched for nothing."""
    if len(sources) > policy.max_images:
        raise ImageError(f"At most {policy.max_images} image(s) may be provided in one prompt; got {len(sources)}.")
    images = []
    for k, source in enumerate(sources):
        try:
            images.append(load_image(source, policy, resolve))
        except ImageError as e:
            raise ImageError(f"image {k + 1}: {e}") from None
    return images


class EncodedImages:
    """Vision-tower outputs by pixel digest, least recently used out past `max_bytes`. A conversation sends its
    images again every turn; the prefix cache spares the text model, this spares the tower. Thread-safe."""

    def __init__(self, max_bytes: int = 128 << 20):
        self.max_bytes, self.nbytes = max_bytes, 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str) -> torch.Tensor | None:
        with self._lock:
            if digest in self._items:
                self._items.move_to_end(digest)
            return self._items.get(digest)

    def put(self, digest: str, features: torch.Tensor) -> None:
        size = features.nbytes
        with self._lock:
            if size > self.max_bytes or digest in self._items:
                return
            self._items[digest], self.nbytes = features, self.nbytes + size
            while self.nbytes > self.max_bytes:
                self.nbytes -= self._items.popitem(last=False)[1].nbytes


@torch.inference_mode()
def prepare(prompt_ids: Sequence[int], images: Sequence[Image.Image], processor: ImageProcessor,
            vision: VisionModel, image_token_id: int, context: int | None = None,
            encoded: EncodedImages | None = None) -> tuple[list[int], ImageInputs]:
    """Expand each `<|image_pad|>` of prompt_ids to its image's token count and encode the images.

    `context` (the model's length limit) is checked on the expanded length before the tower runs; images found
    in `encoded` (by pixel digest) are not encoded again.
    """
    if vision is None:
        raise ImageError("this checkpoint has no vision tower (no model.visual.* weights), so it cannot take "
                         "images; use an official Qwen3.5 checkpoint such as Qwen/Qwen3.5-0.8B")
    pads = [k for k, t in enumerate(prompt_ids) if t == image_token_id]
    if len(pads) != len(images):
        raise ImageError(f"the prompt has {len(pads)} image placeholder(s) but {len(images)} image(s) were given")
    processed = [processor(image) for image in images]
    ids: list[int] = []
    last = 0
    for k, item in zip(pads, processed):
        ids += list(prompt_ids[last:k]) + [image_token_id] * item.num_tokens
        last = k + 1
    ids += list(prompt_ids[last:])
    if context is not None and len(ids) >= context:
        raise ImageError(f"the prompt is {len(ids)} tokens with its images "
                         f"({sum(p.num_tokens for p in processed)} image tokens); this model's context is {context} "
                         "tokens. Send fewer or smaller images")
    grids = [item.grid for item in processed]
    digests = [_digest(item.pixel_values) for item in processed]
    known = [None if encoded is None else encoded.get(d) for d in digests]
    todo = [k for k, f in enumerate(known) if f is None]
    if todo:
        pixels = torch.cat([processed[k].pixel_values for k in todo]).to(vision.pos_embed.weight.device)
        fresh = vision(pixels, [grids[k] for k in todo]).split([processed[k].num_tokens for k in todo])
        for k, f in zip(todo, fresh):
            known[k] = f
            if encoded is not None:
                encoded.put(digests[k], f.clone())  # alone: a view would hold the whole batch's features
    positions, delta = mrope_positions(ids, grids, image_token_id, vision.config.spatial_merge_size)
    return ids, ImageInputs(torch.cat(known), positions, delta, tuple(digests), tuple(p.num_tokens for p in processed))


def _digest(pixels: torch.Tensor) -> str:
    """The image's identity for prefix reuse: a hash of its processed pixels (size included)."""
    data = pixels.detach().float().contiguous().cpu()
    return hashlib.blake2b(str(tuple(data.shape)).encode() + data.numpy().tobytes(), digest_size=16).hexdigest()
