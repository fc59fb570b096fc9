"""Softmax attention with grouped K/V heads: one query token on the CPU kernels, anything else through SDPA."""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from qwen35.ops.cpu import fast_path


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """q (B, Hq, T, D) against k, v (B, Hkv, S, D) -> (B, Hq, T, D); mask (B, 1, T, S) bool, or None: causal when
    the keys are the queries' own (a prefill from empty), else all keys. A decode step's single query goes to the
    fused kernel where the CPU kernels run; the reference is `F.scaled_dot_product_attention`."""
    t = q.shape[2]
    if t == 1 and (kernels := fast_path(q)) is not None:
        return attention_decode(kernels, q, k, v, mask)
    causal = mask is None and t > 1 and k.shape[2] == t
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)


def attention_decode(k: ModuleType, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """One query per sequence, q (B, Hq, 1, D), against the cache's key/value (B, Hkv, S, D), fused (see the
    .cpp); mask (B, 1, 1, S) bool or None. Reference: `F.scaled_dot_product_attention(..., enable_gqa=True)`."""
    b, hq, _, d = q.shape
    valid = None if mask is None else mask.reshape(b, -1).contiguous()
    return k.attention_decode(q.reshape(b, hq, d).contiguous(), key, value, valid, d ** -0.5).view(b, hq, 1, d)
