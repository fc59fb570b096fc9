"""Weight-only quantized linear layers on PyTorch's packed CPU kernels (int8 per channel, int4 per group).

Stored form (what checkpoints hold, portable): int8 `qweight` (N, K) + `scales` (N,); int4 `qweight` (N, K/2)
uint8 with two 4-bit values per byte (low nibble = even column), `scales` and `zeros` (N, K/G), where
w = (q - 8) * scale + zero. The kernels' own packed layouts are derived from that at load time, never saved.
Each layer has `dequantize()`: the plain reference the fast path is tested against.
"""

from __future__ import annotations

import torch
from torch import nn


def int8_quantize(weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Symmetric per output channel: w = q * scale, q in [-127, 127]."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
    return {"qweight": torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), "scales": scales.to(dtype)}


def int4_quantize(weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Asymmetric groups of `group_size` along K: w = (q - 8) * scale + zero, q in [0, 15], nibble-packed."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-10)
    q = torch.round((w - lo[..., None]) / scales[..., None]).clamp(0, 15).reshape(n, k)
    return {"qweight": pack_nibbles(q), "scales": scales.to(dtype), "zeros": (lo + 8 * scales).to(dtype)}


def dequantize(parts: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """The plain reference: stored parts -> fp32 (N, K) weight."""
    if "zeros" not in parts:
        return parts["qweight"].float() * parts["scales"].float()[:, None]
    q = unpack_nibbles(parts["qweight"]).float()
    n = q.shape[0]
    w = (q.reshape(n, -1, group_size) - 8) * parts["scales"].float()[..., None] + parts["zeros"].float()[..., None]
    return w.reshape(n, -1)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8, low nibble first."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) int32 in [0, 15]."""
    low, high = packed & 15, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


class Int8Linear(nn.Module):
    """y = x (q * scale)^T with int8 weights per output channel; `aten._weight_int8pack_mm`."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales.to(x.dtype))
        return out.reshape(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """y = x W^T with 4-bit grouped weights; `aten._weight_int4pack_mm_for_cpu`.

    Holds only the kernel's own tiled layout and its (K/G, N, 2) scale/zero table, built once from the
    portable stored parts (which are not kept: no second copy of the weights in memory).
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int):
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.group_size = group_size
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(qweight), 1))
        self.register_buffer("scales_zeros", torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous())

    @staticmethod
    def supports(out_features: int, in_features: int, group_size: int) -> bool:
        return out_features % 16 == 0 and in_features % group_size == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size,
                                                           self.scales_zeros.to(x.dtype))
        return out.reshape(*x.shape[:-1], self.out_features)


def make_linear(parts: dict[str, torch.Tensor], group_size: int) -> nn.Module:
    """The kernel-backed layer for stored parts (int4 when `zeros` is present)."""
    if "zeros" in parts:
        return Int4Linear(parts["qweight"], parts["scales"], parts["zeros"], group_size)
    return Int8Linear(parts["qweight"], parts["scales"])
