"""The memory planner: the bytes a model needs at a context length, before anything is loaded.

Weights (as loaded: full precision, or the stored int8/int4 parts and their scales), K/V (one layer in four, at 16
or 8 bits with a scale per token and head), the fixed Gated DeltaNet state per sequence, the prefill's activation
peak (one chunk: projections, MLP, the last token's logits), the prefix snapshot budget and the runtime itself
(Python, PyTorch, the tokenizer). `qwen35 info --context N` prints it; `load(context=...)` caps a context that
does not fit what the machine has free.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from qwen35.config import ModelConfig
from qwen35.quant.quantize import QuantConfig

RUNTIME = 515 << 20  # Python, PyTorch and the 248K-token tokenizer: RSS before the weights, measured on Linux
KV_SCALE_BYTES = 4  # 8-bit K/V: one fp32 scale per token, head and tensor (K, V)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of each part (`total` adds them) for `batch` sequences of `context` tokens."""

    context: int
    batch: int
    kv_bits: int
    weights: int
    kv: int
    states: int
    prefill: int
    snapshots: int
    runtime: int = RUNTIME

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.states + self.prefill + self.snapshots + self.runtime

    def parts(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("context", "batch", "kv_bits")}


def kv_bytes_per_token(config: ModelConfig, kv_bits: int = 16, draft: bool = False) -> int:
    """K and V of every full-attention layer for one token (8 bits: plus an fp32 scale per head); `draft`: and
    the MTP head's layer (speculative decoding)."""
    if kv_bits not in (8, 16):
        raise ValueError(f"kv_bits={kv_bits} is not supported: use 16 (bf16) or 8")
    layers = config.layer_types.count("full_attention") + (config.mtp_num_hidden_layers if draft else 0)
    heads = layers * 2 * config.num_key_value_heads
    return heads * (config.head_dim * kv_bits // 8 + (KV_SCALE_BYTES if kv_bits == 8 else 0))


def state_bytes(config: ModelConfig, dtype_bytes: int = 2) -> int:
    """One sequence's Gated DeltaNet layers: fp32 recurrent state and the short conv's history."""
    linear = config.layer_types.count("linear_attention")
    channels = (2 * config.linear_num_key_heads * config.linear_key_head_dim
                + config.linear_num_value_heads * config.linear_value_head_dim)
    recurrent = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
    return linear * (recurrent + channels * (config.linear_conv_kernel_dim - 1) * dtype_bytes)


def _stored(shape: tuple[int, ...], bits: int, group: int, dtype_bytes: int) -> int:
    """Bytes of one (N, K) weight stored at `bits` (int4 falls back to int8 where its kernel cannot run)."""
    n, k = shape
    if bits == 4 and n % 16 == 0 and k % group == 0:
        return n * k // 2 + 2 * n * (k // group) * dtype_bytes
    return n * k + n * dtype_bytes


def weight_bytes(config: ModelConfig, dtype_bytes: int = 2, quant: QuantConfig | None = None) -> int:
    """The text model's weights as loaded, the MTP head's included when the config has one (the vision tower loads
    with the first image and is not counted)."""
    from qwen35.models import Qwen35Model
    from qwen35.quant.checkpoint import _quantized_modules

    with torch.device("meta"):
        model = Qwen35Model(config)
    params = dict(model.named_parameters())
    if quant is None:
        return sum(p.numel() for p in params.values()) * dtype_bytes
    quantized = _quantized_modules(config, quant)
    if config.tie_word_embeddings and "lm_head" in quantized:
        quantized.add("embed_tokens")  # one table, stored once as the head's rows
    total = 0
    for name, p in params.items():
        module, _, leaf = name.rpartition(".")
        head = module in ("lm_head", "embed_tokens")
        if leaf == "weight" and module in quantized:
            total += _stored(tuple(p.shape), quant.head if head else quant.bits, quant.group_size, dtype_bytes)
        elif p.ndim == 3 and f"{module}.0.gate_proj" in quantized:  # MoE experts: (E, N, K) per tensor
            total += p.shape[0] * _stored(tuple(p.shape[1:]), quant.bits, quant.group_size, dtype_bytes)
        else:
            total += p.numel() * dtype_bytes
    return total


def prefill_bytes(config: ModelConfig, chunk: int, dtype_bytes: int = 2) -> int:
    """The activation peak of one prefill chunk, whatever the context: the widest projections and the MLP for
    `chunk` tokens (a few live at once; attention against the history builds no (chunk x context) mask or scores:
    `ops.attention.attention_after`) and one token's fp32 logits."""
    inner = config.moe_intermediate_size * config.num_experts_per_tok if config.is_moe else config.intermediate_size
    widest = max(3 * inner, 2 * config.num_attention_heads * config.head_dim + 2 * config.num_key_value_heads
                 * config.head_dim, 4 * config.hidden_size)
    return chunk * (widest + 4 * config.hidden_size) * max(dtype_bytes, 4) + config.vocab_size * 4


def plan(config: ModelConfig, context: int | None = None, batch: int = 1, dtype_bytes: int = 2,
         quant: QuantConfig | None = None, kv_bits: int = 16, prefill_chunk: int | None = None,
         snapshot_bytes: int = 0, weights: int | None = None, draft: bool = False) -> MemoryPlan:
    """The plan of a model at `context` tokens (default: the model's own) for `batch` sequences; `weights`: bytes
    already known (a loaded model's), else computed from the config; `draft`: with speculative decoding (the
    MTP head's K/V)."""
    from qwen35.runtime.prefill import prefill_chunk_size

    context = config.max_position_embeddings if context is None else context
    if not 1 <= context <= config.max_position_embeddings:
        raise ValueError(f"context={context} is invalid: this model reads 1 to {config.max_position_embeddings} "
                         "tokens")
    chunk = prefill_chunk or prefill_chunk_size(config)
    weights = weight_bytes(config, dtype_bytes, quant) if weights is None else weights
    from qwen35.ops.attention import KV_BLOCK
    from qwen35.ops.cpu import avx512_build

    prefill = prefill_bytes(config, chunk, dtype_bytes)
    # the 8-bit attention's dequantized blocks, KV_BLOCK keys and values in fp32 at most, where the prefill
    # kernel (which dequantizes 64 keys into its own scratch) does not take the chunk: see ops.attention
    if kv_bits == 8 and not (dtype_bytes == 2 and config.head_dim % 64 == 0 and avx512_build()):
        prefill += 2 * config.num_key_value_heads * KV_BLOCK * config.head_dim * 4
    return MemoryPlan(context, batch, kv_bits, weights,
                      batch * (context + 1) * kv_bytes_per_token(config, kv_bits, draft),
                      batch * state_bytes(config, dtype_bytes), prefill, snapshot_bytes)


def available_memory() -> int:
    """Bytes the OS can give without swapping (Linux MemAvailable; elsewhere free physical pages)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fitting_context(make: Callable[[int], MemoryPlan], limit: int, budget: int) -> int:
    """The longest context in [1, limit] whose plan (`make(context)`) fits `budget` bytes; 0 when none does."""
    if make(limit).total <= budget:
        return limit
    lo, hi = 0, limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if make(mid).total <= budget else (lo, mid)
    return lo


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB" if n >= 2**20 else \
        f"{math.ceil(n / 1024)} KiB"
