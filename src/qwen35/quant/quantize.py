"""Apply weight-only quantization to a built model, from outside (the model file knows nothing about it).

Large linears (attention, DeltaNet projections, MLPs, experts; the MTP head's `fc` and layer alike) become
Int8Linear / Int4Linear; the tiny ones (`in_proj_a`, `in_proj_b`, the router, the shared-expert gate), norms, the
conv, `A_log` and `dt_bias` stay in full precision. Optionally the head and embedding become int8 or int4 too (one
shared table when they are tied).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.models.qwen3_5 import Experts, Qwen35Model
from qwen35.quant.linear import (Int4Linear, StoredTable, gather_on_huge_pages, int4_quantize, int8_quantize,
                                make_linear)

SMALL = ("in_proj_a", "in_proj_b", "gate", "shared_expert_gate")  # a handful of outputs: not worth it
METHOD = "qwen35-weight-only"


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 64
    head: int = 0  # bits of the LM head and the embedding: 0 keeps them full precision (True reads as 8)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits={self.bits} is not supported: use 8 or 4")
        if self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"group_size={self.group_size} is not supported: use 32, 64, 128 or 256")
        if isinstance(self.head, bool):  # older checkpoints: a flag for int8 (checked by type: 1 == True)
            object.__setattr__(self, "head", 8 if self.head else 0)
        if self.head not in (0, 4, 8):
            raise ValueError(f"head={self.head!r} is not supported: use 0 (full precision), 8 or 4 bits")

    def to_dict(self) -> dict:
        return {"quant_method": METHOD, **asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict) -> "QuantConfig":
        if raw.get("quant_method") != METHOD:
            raise ValueError(f"quantization_config.quant_method={raw.get('quant_method')!r} is not supported: "
                             f"only {METHOD!r} (written by `qwen35 quantize`)")
        return cls(bits=raw.get("bits", 4), group_size=raw.get("group_size", 64), head=raw.get("head") or 0)


def quantize_parts(weight: torch.Tensor, cfg: QuantConfig, dtype: torch.dtype,
                   bits: int | None = None) -> dict[str, torch.Tensor]:
    """One (N, K) weight -> its stored parts at `bits` (default: the body's); int4 falls back to int8 where the
    kernel's shape rules fail."""
    if (bits or cfg.bits) == 4 and Int4Linear.supports(*weight.shape, cfg.group_size):
        return int4_quantize(weight, cfg.group_size, dtype)
    return int8_quantize(weight, dtype)


def quantize_weight(weight: torch.Tensor, cfg: QuantConfig, dtype: torch.dtype) -> nn.Module:
    return make_linear(quantize_parts(weight, cfg, dtype), cfg.group_size)


class QuantExperts(nn.Module):
    """Routed experts with quantized weights; same call as `Experts`."""

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module]):
        super().__init__()
        self.gate_up, self.down = nn.ModuleList(gate_up), nn.ModuleList(down)

    def forward(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in index.unique().tolist():
            token, slot = torch.where(index == e)
            gate, up = self.gate_up[e](x[token]).chunk(2, dim=-1)
            y = self.down[e](F.silu(gate) * up) * weight[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


class QuantEmbedding(nn.Module):
    """Lookups in a quantized table: the tied head's (no second copy) or its own `StoredTable`."""

    def __init__(self, table: nn.Module):
        super().__init__()
        self.table = table

    @property
    def weight(self) -> torch.Tensor:  # dtype/device probes only
        return next(t for t in self.table.buffers() if t.is_floating_point())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids.reshape(-1)).view(*ids.shape, -1)


def _large(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and name != "lm_head" and name.rsplit(".", 1)[-1] not in SMALL


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def quantize(model, bits: int = 4, group_size: int = 64, head: int | bool = 0):
    """Quantize a `Qwen35Model` (or the `qwen35.load` handle holding one) in place and return it."""
    if not isinstance(model, Qwen35Model):
        quantize(model.model, bits, group_size, head)
        return model
    cfg = QuantConfig(bits, group_size, head)
    dtype = model.embed_tokens.weight.dtype  # the activation dtype: scales match it
    for name, module in list(model.named_modules()):
        if _large(name, module):
            _set(model, name, quantize_weight(module.weight, cfg, dtype))
        elif isinstance(module, Experts):
            _set(model, name, QuantExperts([quantize_weight(w, cfg, dtype) for w in module.gate_up_proj],
                                           [quantize_weight(w, cfg, dtype) for w in module.down_proj]))
    if cfg.head:
        tied = model.config.tie_word_embeddings
        model.lm_head = make_linear(quantize_parts(model.lm_head.weight, cfg, dtype, cfg.head), group_size, tied)
        model.embed_tokens = QuantEmbedding(model.lm_head if tied else StoredTable(
            quantize_parts(model.embed_tokens.weight, cfg, dtype, cfg.head), group_size))
    model.quantization = cfg
    gather_on_huge_pages(model)
    model.decode_step.reset()
    if model.mtp is not None:
        model.mtp.decode_step.reset()
    return model
