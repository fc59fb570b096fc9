"""Softmax attention with grouped K/V heads: one query token on the CPU kernels, a causal prefill chunk in flash
passes (no mask built), anything else through SDPA."""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from qwen35.cache import QuantKV
from qwen35.ops.cpu import fast_path


KV_BLOCK = 4096  # the most 8-bit keys (and values) dequantized at once (0.8B: 8 MiB of K and V in bf16, 16 in fp32)
SCORE_BLOCK = 1 << 21  # fp32 scores per K/V head computed at once over an 8-bit cache (8 MiB): keys per block =
# this / (queries x group), at most KV_BLOCK, so temporaries stay at a few MiB whatever the context


def attention(q: torch.Tensor, k: torch.Tensor | QuantKV, v: torch.Tensor | QuantKV,
              mask: torch.Tensor | None) -> torch.Tensor:
    """q (B, Hq, T, D) against k, v (B, Hkv, S, D) -> (B, Hq, T, D); mask (B, 1, T, S) bool, or None: causal, the
    queries being the last T of the S keys (a prefill from empty, a chunk continuing a history, a decode step's
    one query seeing every key). A decode step's single query goes to the fused kernel where the CPU kernels run
    (16- or 8-bit K/V), a causal chunk to the prefill kernel where it runs (`prefill_kernels`), else a causal
    chunk after a history, or over 8-bit K/V (`QuantKV`), to `attention_after`;
    other 8-bit K/V to `attention_8bit`; the reference is `F.scaled_dot_product_attention`."""
    t = q.shape[2]
    if t == 1 and (kernels := fast_path(q)) is not None:
        return attention_decode(kernels, q, k, v, mask)
    if mask is None and t > 1 and (kernels := prefill_kernels(q)) is not None:
        return attention_prefill(kernels, q, k, v)
    if mask is None and t > 1 and (isinstance(k, QuantKV) or t < k.shape[2]):
        return attention_after(q, k, v)
    if isinstance(k, QuantKV):
        return attention_8bit(q, k, v, mask)
    if t == 1 and mask is not None:
        return attention_rows(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1, enable_gqa=True)


def prefill_kernels(q: torch.Tensor) -> ModuleType | None:
    """The kernels where a causal chunk may take their prefill attention (kernels/prefill_attention.cpp): bf16
    queries, head_dim a multiple of 64, an AVX-512 BF16 build, eager (not under torch.compile)."""
    if q.shape[-1] % 64 or torch.compiler.is_compiling():
        return None
    kernels = fast_path(q)
    return kernels if kernels is not None and kernels.isa() == "avx512" else None


def attention_prefill(k: ModuleType, q: torch.Tensor, key: torch.Tensor | QuantKV,
                      value: torch.Tensor | QuantKV) -> torch.Tensor:
    """T queries that are the last T of the keys, causal, over 16-bit or 8-bit K/V (read as stored, dequantized
    256 keys at a time in the kernel), on AMX tiles where the CPU has them. A 512-query chunk of the 0.8B's layer
    on 2 Zen 4 cores: 61 ms against 105 through PyTorch's flash attention at 4K keys, 553 against 879 at 32K; on a
    2-core Xeon, 23 ms on AMX tiles against 99 on vdpbf16ps at 4K. Reference: `attention_after`."""
    scales = (None, None)
    if isinstance(key, QuantKV):
        key, value, scales = key.q, value.q, (key.scale, value.scale)
    return k.attention_prefill(q, key, value, q.shape[-1] ** -0.5, *scales, True)


def attention_after(q: torch.Tensor, k: torch.Tensor | QuantKV, v: torch.Tensor | QuantKV) -> torch.Tensor:
    """T queries that are the last T of S keys, causal: on the CPU flash passes merged by their log-sum-exp (the
    history unmasked, the chunk's own keys causal), so no (T x S) mask is ever built: SDPA turns a boolean one
    into a float copy, 5 bytes per query and key, 80 MiB a layer for a 512-token chunk at 32K. 8-bit K/V
    (`QuantKV`) goes KV_BLOCK keys a pass, each block dequantized to the queries' dtype just before it (no copy of
    the whole history). Elsewhere, and as the reference: SDPA with that mask (`attention_8bit` for 8-bit K/V)."""
    t, s = q.shape[2], k_length(k)
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if q.device.type != "cpu" or flash is None:
        if isinstance(k, QuantKV):
            return attention_8bit(q, k, v, None)
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    past = s - t
    step = KV_BLOCK if isinstance(k, QuantKV) else max(past, 1)
    parts = [(a, min(a + step, past), False) for a in range(0, past, step)] + [(past, s, True)]
    out = lse = None
    for start, end, causal in parts:
        o, part_lse = flash(q, _span(k, start, end, q.dtype), _span(v, start, end, q.dtype), is_causal=causal)
        if out is None:
            out, lse = o.float(), part_lse
            continue
        top = torch.maximum(lse, part_lse)
        w_out, w_part = (lse - top).exp_()[..., None], (part_lse - top).exp_()[..., None]
        total = w_out + w_part
        out = (out * w_out + o.float() * w_part) / total
        lse = top + total.log().squeeze(-1)
    return out.to(q.dtype)


def _span(x: torch.Tensor | QuantKV, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Slots [start, end) of a key or value history, 8-bit ones dequantized to `dtype`."""
    if isinstance(x, QuantKV):
        return QuantKV(x.q[:, :, start:end], x.scale[:, :, start:end]).dequantize(dtype)
    return x[:, :, start:end]


def k_length(k: torch.Tensor | QuantKV) -> int:
    """Slots of a key history, 16- or 8-bit."""
    return (k.q if isinstance(k, QuantKV) else k).shape[2]


def attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per sequence where the kernels do not run: each row against its own valid keys, unmasked, as
    the kernel computes it. SDPA's masked reduction rounds with the number of masked keys, so a sequence's bits
    changed with the padding its batch put before it (a decode beside other sequences, a speculative verify
    pass after a batch-mate finished: seen on AVX2)."""
    rows = []
    for r in range(q.shape[0]):
        valid = mask[r].reshape(-1).nonzero().flatten()
        span = len(valid) > 0 and int(valid[-1]) - int(valid[0]) + 1 == len(valid)  # left pads only: a slice
        keys = slice(int(valid[0]), int(valid[-1]) + 1) if span else valid
        rows.append(F.scaled_dot_product_attention(q[r:r + 1], k[r:r + 1, :, keys], v[r:r + 1, :, keys],
                                                   enable_gqa=True))
    return torch.cat(rows)


def attention_decode(k: ModuleType, q: torch.Tensor, key: torch.Tensor | QuantKV, value: torch.Tensor | QuantKV,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """One query per sequence, q (B, Hq, 1, D), against the cache's key/value (B, Hkv, S, D), 16-bit or 8-bit
    (read as stored), fused (see kernels/attention.cpp); mask (B, 1, 1, S) bool or None. Reference:
    `F.scaled_dot_product_attention(..., enable_gqa=True)`; for 8-bit K/V `attention_8bit`."""
    b, hq, _, d = q.shape
    valid = None if mask is None else mask.reshape(b, -1).contiguous()
    scales = (None, None)
    if isinstance(key, QuantKV):  # int8 rows and their scales, as stored
        key, value, scales = key.q, value.q, (key.scale, value.scale)
    return k.attention_decode(q.reshape(b, hq, d).contiguous(), key, value, valid, d ** -0.5,
                              *scales).view(b, hq, 1, d)


def attention_8bit(q: torch.Tensor, k: QuantKV, v: QuantKV, mask: torch.Tensor | None,
                   block: int | None = None) -> torch.Tensor:
    """`attention` over 8-bit K/V, `block` keys at a time (default: SCORE_BLOCK scores per head, at most KV_BLOCK
    keys) with an online softmax (fp32), so no full-precision copy of a long history is ever made. Reference:
    `attention` on `k.dequantize()`, `v.dequantize()`."""
    b, hq, t, d = q.shape
    hkv, s = k.q.shape[1], k.q.shape[2]
    g = hq // hkv
    block = block or min(KV_BLOCK, max(256, SCORE_BLOCK // (g * t)))
    past = s - t  # mask None: query i sees keys up to past + i
    queries = q.float().reshape(b, hkv, g * t, d) * d ** -0.5  # query heads grouped under their K/V head
    top = torch.full((b, hkv, g * t, 1), float("-inf"), device=q.device)
    total = torch.zeros(b, hkv, g * t, 1, device=q.device)
    out = torch.zeros(b, hkv, g * t, d, device=q.device)
    for start in range(0, s, block):
        end = min(start + block, s)
        scores = queries @ QuantKV(k.q[:, :, start:end], k.scale[:, :, start:end]).dequantize().transpose(-1, -2)
        keep = None
        if mask is not None:  # (B, 1, T, S) -> the same for every head of a group
            keep = mask[..., start:end].expand(b, 1, t, end - start).unsqueeze(2)
        elif end - 1 > past:  # keys after the first query's own: causal, (T, keys) built per block
            keep = torch.arange(start, end, device=q.device) <= torch.arange(past, s, device=q.device)[:, None]
        if keep is not None:
            scores = scores.view(b, hkv, g, t, -1).masked_fill(~keep, float("-inf")).view(b, hkv, g * t, -1)
        new_top = torch.maximum(top, scores.amax(-1, keepdim=True))
        safe = torch.where(torch.isinf(new_top), torch.zeros_like(new_top), new_top)  # rows with no key yet
        weights = torch.exp(scores - safe)
        rescale = torch.exp(top - safe)
        total = total * rescale + weights.sum(-1, keepdim=True)
        out = out * rescale + weights @ QuantKV(v.q[:, :, start:end], v.scale[:, :, start:end]).dequantize()
        top = new_top
    out = torch.where(total > 0, out / total.clamp(min=1e-30), torch.zeros_like(out))
    return out.view(b, hq, t, d).to(q.dtype)
