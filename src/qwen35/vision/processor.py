"""The Qwen3.5 image processor: a decoded image -> patch rows for the vision tower, as the reference makes them.

Matches transformers' PIL backend (`Qwen2VLImageProcessorPil`): RGB (alpha composited on white), `smart_resize` to
multiples of patch x merge (32) within [min_pixels, max_pixels], bicubic resize in Pillow, x/255, (x - mean)/std,
then patches ordered merge-block major, each flattened (channel, temporal, y, x) with the frame repeated along the
temporal patch. Each image becomes (h/32) x (w/32) `<|image_pad|>` tokens.

One addition: `max_image_tokens` caps those tokens per image (the official max_pixels lets one photo cost up to
16,384), by resizing an image over the cap as smart_resize would under a lower max_pixels; an image under it is
resized exactly as the reference resizes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from qwen35.vision.fetch import ImageError

QWEN35_DEFAULTS = {"min_pixels": 65536, "max_pixels": 16777216, "image_mean": (0.5, 0.5, 0.5),
                   "image_std": (0.5, 0.5, 0.5)}  # the official preprocessor_config.json values
MAX_ASPECT = 200
DEFAULT_MAX_IMAGE_TOKENS = 1280  # as other local runtimes cap it: uncapped, a 4000x3000 photo is 11,750 tokens


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: torch.Tensor  # (t * gh * gw, C * temporal * patch * patch) float32
    grid: tuple[int, int, int]  # (t, gh, gw) in patches
    num_tokens: int  # merged tokens = <|image_pad|> copies in the prompt


@dataclass(frozen=True)
class ImageProcessor:
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = QWEN35_DEFAULTS["min_pixels"]
    max_pixels: int = QWEN35_DEFAULTS["max_pixels"]
    image_mean: tuple[float, ...] = QWEN35_DEFAULTS["image_mean"]
    image_std: tuple[float, ...] = QWEN35_DEFAULTS["image_std"]
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    max_image_tokens: int | None = DEFAULT_MAX_IMAGE_TOKENS  # per image; 0 or None: no cap (the reference)

    def __post_init__(self) -> None:
        cap = self.max_image_tokens
        if cap is not None and (not isinstance(cap, int) or cap < 0):
            raise ValueError(f"max_image_tokens={cap!r} is invalid: give the most tokens one image may cost "
                             f"({DEFAULT_MAX_IMAGE_TOKENS} by default), or 0 for no cap")
        least = -(-self.min_pixels // self.factor ** 2)  # what min_pixels gives the smallest image
        if cap and cap < least:
            raise ValueError(f"max_image_tokens={cap} is below the {least} tokens this checkpoint gives even the "
                             f"smallest image (min_pixels {self.min_pixels}); give at least {least}, or 0 for no cap")

    @classmethod
    def from_config(cls, raw: dict[str, Any], vision: Any = None,
                    max_image_tokens: int | None = DEFAULT_MAX_IMAGE_TOKENS) -> "ImageProcessor":
        """From a checkpoint's `preprocessor_config.json` (and its vision config for patch/merge sizes).

        Top-level `min_pixels`/`max_pixels` win over `size`'s `shortest_edge`/`longest_edge`, as in transformers'
        `Qwen2VLImageProcessor`, which overwrites `size` with them (a config may carry both, disagreeing).
        """
        size = raw.get("size") or {}
        out = cls(patch_size=raw.get("patch_size", getattr(vision, "patch_size", 16)),
                  temporal_patch_size=raw.get("temporal_patch_size", getattr(vision, "temporal_patch_size", 2)),
                  merge_size=raw.get("merge_size", getattr(vision, "spatial_merge_size", 2)),
                  min_pixels=_bound(raw, "min_pixels", size, "shortest_edge"),
                  max_pixels=_bound(raw, "max_pixels", size, "longest_edge"),
                  image_mean=tuple(raw.get("image_mean", QWEN35_DEFAULTS["image_mean"])),
                  image_std=tuple(raw.get("image_std", QWEN35_DEFAULTS["image_std"])),
                  rescale_factor=raw.get("rescale_factor", 1 / 255), resample=raw.get("resample", 3),
                  max_image_tokens=max_image_tokens)
        if not 0 < out.min_pixels <= out.max_pixels:
            raise ValueError(f"preprocessor size: need 0 < shortest_edge ({out.min_pixels}) <= longest_edge "
                             f"({out.max_pixels}) (min/max pixels)")
        return out

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """`smart_resize`: the nearest multiples of 32 keeping the aspect ratio, inside the pixel bounds. An image
        that would exceed `max_image_tokens` is shrunk instead by smart_resize's own rule under max_pixels =
        cap x 32²; where that rule holds one side at 32 (aspect ratio over the cap), the other is cut to cap x 32."""
        if min(height, width) <= 0:
            raise ImageError(f"the image is {width}x{height} pixels: it has no pixels")
        if max(height, width) / min(height, width) > MAX_ASPECT:
            raise ImageError(f"the image is {width}x{height} pixels: the aspect ratio must be at most {MAX_ASPECT}")
        f, cap = self.factor, self.max_image_tokens
        h, w = self._smart_resize(height, width)
        if cap and (h // f) * (w // f) > cap:
            h, w = _downscale(height, width, f, min(self.max_pixels, cap * f * f))
            h, w = min(h, cap * f), min(w, cap * f)
        return h, w

    def _smart_resize(self, height: int, width: int) -> tuple[int, int]:
        """The reference's `smart_resize`, within [min_pixels, max_pixels]."""
        f = self.factor
        h, w = round(height / f) * f, round(width / f) * f
        if h * w > self.max_pixels:
            h, w = _downscale(height, width, f, self.max_pixels)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
        return h, w

    def num_tokens(self, height: int, width: int) -> int:
        """`<|image_pad|>` tokens an image of this size becomes (known before decoding its pixels)."""
        h, w = self.target_size(height, width)
        return (h // self.factor) * (w // self.factor)

    def __call__(self, image: Image.Image) -> ProcessedImage:
        image = to_rgb(image)
        h, w = self.target_size(image.height, image.width)
        pixels = np.asarray(image.resize((w, h), resample=self.resample))  # (h, w, 3) uint8
        x = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = (x - np.array(self.image_mean, dtype=np.float32)) / np.array(self.image_std, dtype=np.float32)
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = h // p, w // p
        x = x.transpose(2, 0, 1).reshape(3, gh // m, m, p, gw // m, m, p)
        x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (block row, block col, in row, in col, C, y, x)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # the frame, twice in time
        rows = torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, 3 * t * p * p))
        return ProcessedImage(rows, (1, gh, gw), (gh // m) * (gw // m))


def _downscale(height: int, width: int, factor: int, max_pixels: int) -> tuple[int, int]:
    """smart_resize's shrinking branch: multiples of factor (at least one) in the aspect ratio, within max_pixels."""
    beta = math.sqrt(height * width / max_pixels)
    return (max(factor, math.floor(height / beta / factor) * factor),
            max(factor, math.floor(width / beta / factor) * factor))


def _bound(raw: dict[str, Any], flat: str, size: dict[str, Any], edge: str) -> int:
    """A pixel bound: the top-level key when set (not null), else `size[edge]`, else the Qwen3.5 default."""
    value = raw.get(flat)
    return value if value is not None else size.get(edge, QWEN35_DEFAULTS[flat])


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; images with transparency are composited onto white first (the reference's convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
