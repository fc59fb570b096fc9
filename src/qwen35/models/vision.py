"""The Qwen3.5 vision tower (`model.visual`) and the image side of multimodal RoPE.

A ViT over 16x16 patches (each image counted twice along a temporal patch of 2): a linear patch embedding, a
learned 48x48 position grid resampled bilinearly (align_corners) to each image, 2-D rotary attention inside
each image, pre-LN blocks, then a merger that folds every 2x2 block of patches into one token of the text width.
Patch rows arrive merge-block major (the processor orders them), so the merger only regroups 4 consecutive rows.
Parameter names are the reference's under `model.visual.`; the math follows transformers 5.23's
`Qwen3_5VisionModel` and `get_rope_index`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.config import MAX_LAYERS, MAX_WIDTH, ConfigError, Int, Real

ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu,
               "silu": F.silu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


_SIDE = Int(1, 1 << 10)
# Type and range of each number (depth bounded: it sizes the blocks built before any weight is read).
VISION_FIELDS = MappingProxyType({
    "depth": Int(1, MAX_LAYERS), "hidden_size": Int(1, MAX_WIDTH), "intermediate_size": Int(1, MAX_WIDTH),
    "num_heads": Int(1, 1 << 12), "out_hidden_size": Int(1, MAX_WIDTH), "in_channels": Int(1, 16),
    "patch_size": _SIDE, "temporal_patch_size": _SIDE, "spatial_merge_size": _SIDE,
    "num_position_embeddings": Int(1, 1 << 24), "rope_theta": Real(0.0)})


@dataclass(frozen=True)
class VisionConfig:
    """`vision_config` of a checkpoint; defaults are the reference class defaults."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    @property
    def patch_dim(self) -> int:
        """Values per pixel row: channels x temporal patch x patch x patch (1536 for the real models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @classmethod
    def from_dict(cls, raw: dict[str, Any], text_hidden: int) -> "VisionConfig":
        def get(name: str, default: Any = None) -> Any:
            if name not in raw and default is None:
                raise ConfigError(f"config field 'vision_config.{name}' is missing; the official configs set it")
            return raw.get(name, default)

        if raw.get("deepstack_visual_indexes"):
            raise ConfigError(f"config field 'vision_config.deepstack_visual_indexes' = "
                              f"{raw['deepstack_visual_indexes']!r} is not supported: Qwen3.5 has no DeepStack ([])")
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") != "axial":
            raise ConfigError(f"config field 'vision_config.rope_parameters.rope_type' = {rope['rope_type']!r} is "
                              "not supported: only 'axial'")
        config = cls(depth=get("depth"), hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
                     num_heads=get("num_heads"), out_hidden_size=get("out_hidden_size", text_hidden),
                     in_channels=get("in_channels", 3), patch_size=get("patch_size", 16),
                     temporal_patch_size=get("temporal_patch_size", 2),
                     spatial_merge_size=get("spatial_merge_size", 2),
                     num_position_embeddings=get("num_position_embeddings", 2304),
                     hidden_act=get("hidden_act", "gelu_pytorch_tanh"),
                     rope_theta=rope.get("rope_theta", 10000.0))
        config.validate(text_hidden)
        return config

    def validate(self, text_hidden: int) -> None:
        for name, check in VISION_FIELDS.items():
            check(f"vision_config.{name}", getattr(self, name))
        if self.hidden_size % self.num_heads or self.head_dim % 4:
            raise ConfigError(f"config field 'vision_config.num_heads' = {self.num_heads}: hidden_size "
                              f"({self.hidden_size}) / num_heads must be a multiple of 4 (2-D rotary halves)")
        if self.grid_side ** 2 != self.num_position_embeddings:
            raise ConfigError(f"config field 'vision_config.num_position_embeddings' = "
                              f"{self.num_position_embeddings}: must be a square (a side x side grid)")
        if self.out_hidden_size != text_hidden:
            raise ConfigError(f"config field 'vision_config.out_hidden_size' = {self.out_hidden_size}: must equal "
                              f"the text hidden_size ({text_hidden})")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"config field 'vision_config.hidden_act' = {self.hidden_act!r}: one of "
                              f"{sorted(ACTIVATIONS)}")


@dataclass(frozen=True)
class ImageInputs:
    """What the text model needs for a prompt with images: merged image tokens and M-RoPE positions.

    features (n_image_tokens, H) replace the `<|image_pad|>` embeddings in order; positions (3, T) are the prompt's
    (t, h, w) positions; rope_delta (max position + 1 - T) shifts every later token, so decoding continues right.
    """

    features: torch.Tensor
    positions: torch.Tensor
    rope_delta: int
    digests: tuple[str, ...] = ()  # one per image, of its pixels: what a prefix snapshot is keyed on
    tokens: tuple[int, ...] = ()  # one per image, its `<|image_pad|>` count: what usage reports it cost


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = (2, 16, 16), applied as the linear map it is on flattened patches."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        kernel = (c.temporal_patch_size, c.patch_size, c.patch_size)
        self.proj = nn.Conv3d(c.in_channels, c.hidden_size, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.proj.weight.dtype), self.proj.weight.flatten(1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=True)  # [q | k | v], each head-major
        self.proj = nn.Linear(c.hidden_size, c.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # (N, heads, dh) each
        q, k = _rotate(q, *rope), _rotate(k, *rope)
        out = []
        for qi, ki, vi in zip(*(t.transpose(0, 1).split(lengths, dim=1) for t in (q, k, v))):
            out.append(F.scaled_dot_product_attention(qi[None], ki[None], vi[None])[0])  # bidirectional, per image
        return self.proj(torch.cat(out, dim=1).transpose(0, 1).reshape(n, -1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE over the whole head dim, in fp32, cast back."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]).to(x.dtype)


class VisionMLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(c.hidden_size, c.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=True)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.attn = VisionAttention(c)
        self.mlp = VisionMLP(c)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm per patch, then each 2x2 block (4 consecutive rows) -> fc1 -> exact GELU -> fc2 (text width)."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        self.merged = c.hidden_size * c.spatial_merge_size ** 2
        self.norm = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, self.merged, bias=True)
        self.linear_fc2 = nn.Linear(self.merged, c.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(self.norm(x).view(-1, self.merged))))


class VisionModel(nn.Module):
    """pixel rows (N, patch_dim) of images with grids (t, gh, gw) -> image tokens (N / merge^2, text hidden)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config)

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        c = self.config
        expected = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape != (expected, c.patch_dim):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; grids {grids} need "
                             f"({expected}, {c.patch_dim})")
        rows, cols = _patch_coordinates(grids, c.spatial_merge_size, pixel_values.device)
        x = self.patch_embed(pixel_values)
        x = x + self._grid_embedding(rows, cols, grids).to(x.dtype)
        rope = self._rope(rows, cols)
        lengths = [h * w for t, h, w in grids for _ in range(t)]  # attention stays inside one frame
        for block in self.blocks:
            x = block(x, rope, lengths)
        return self.merger(x)

    def _grid_embedding(self, rows: torch.Tensor, cols: torch.Tensor, grids: list[tuple[int, int, int]]):
        """The learned side x side grid, bilinearly resampled (align_corners=True) to each image's (gh, gw)."""
        side = self.config.grid_side
        heights = torch.tensor([h for t, h, w in grids for _ in range(t * h * w)], device=rows.device)
        widths = torch.tensor([w for t, h, w in grids for _ in range(t * h * w)], device=rows.device)
        r_taps, r_weights = _taps(rows, heights, side)
        c_taps, c_weights = _taps(cols, widths, side)
        index = (r_taps[:, :, None] * side + c_taps[:, None, :]).flatten(1)  # (N, 4)
        weight = (r_weights[:, :, None] * c_weights[:, None, :]).flatten(1)
        return (self.pos_embed(index) * weight[:, :, None]).sum(1)

    def _rope(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (N, dh): angles [row * inv, col * inv] (dh/4 each), duplicated for rotate-half."""
        half = self.config.head_dim // 2
        inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float, device=rows.device) / half))
        angles = torch.cat([rows[:, None].float() * inv, cols[:, None].float() * inv], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def _patch_coordinates(grids: list[tuple[int, int, int]], merge: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of every patch row in merge-block-major order, repeated per temporal slice."""
    rows, cols = [], []
    for t, h, w in grids:
        r, c = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        rows.append(r.reshape(shape).transpose(1, 2).flatten().repeat(t))
        cols.append(c.reshape(shape).transpose(1, 2).flatten().repeat(t))
    return torch.cat(rows), torch.cat(cols)


def _taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two bilinear taps into a `side`-long axis for target `index` of an axis of `size` (align_corners=True)."""
    src = index.float() * (side - 1) / (size - 1).clamp(min=1)
    floor = src.floor()
    offsets = torch.arange(2, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    return taps, (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)


def mrope_positions(input_ids: list[int], grids: list[tuple[int, int, int]], image_token_id: int,
                    merge: int) -> tuple[torch.Tensor, int]:
    """(3, T) M-RoPE positions of one prompt and its rope delta (the reference's `get_rope_index`).

    A text token takes `cur` on all three axes and advances it by one. The k-th run of image tokens (gh*gw/merge^2
    of them) takes (cur, cur + r, cur + c) for merged token (r, c), then cur advances by max(gh, gw) / merge.
    """
    sizes = [t * (h // merge) * (w // merge) for t, h, w in grids]
    if sum(1 for i in input_ids if i == image_token_id) != sum(sizes):
        raise ValueError(f"the prompt has {sum(1 for i in input_ids if i == image_token_id)} image tokens but the "
                         f"images need {sum(sizes)} ({sizes}); expand each image placeholder to its token count")
    out = torch.empty(3, len(input_ids), dtype=torch.long)
    cur = i = image = 0
    while i < len(input_ids):
        if input_ids[i] != image_token_id:
            out[:, i] = cur
            cur, i = cur + 1, i + 1
            continue
        t, h, w = grids[image]
        gh, gw = h // merge, w // merge
        tt, rr, cc = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        out[:, i:i + sizes[image]] = torch.stack([tt.flatten(), rr.flatten(), cc.flatten()]) + cur
        cur += max(gh, gw)
        i += sizes[image]
        image += 1
    return out, int(out.max()) + 1 - len(input_ids)
