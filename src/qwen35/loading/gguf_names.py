"""Our parameter names <-> llama.cpp's GGUF tensor names, and the tensor transforms its converter applies.

The names come from `gguf.get_tensor_name_map`, the table llama.cpp's converter itself maps Hugging Face names
through, so they cannot drift from it. The converter (`conversion/qwen.py`) also changes some values, undone here
on load and redone on export:

* `A_log` is stored as `ssm_a = -exp(A_log)`; `dt_bias` is named `ssm_dt.bias`;
* the depthwise conv (C, 1, K) is stored squeezed, (C, K);
* every RMSNorm1p weight (decoder norms, final norm, q/k norms, the MTP norms) is stored with its +1 offset applied
  (the DeltaNet gated norm `ssm_norm` is stored as it is);
* with fewer key heads than value heads, the value heads are reordered from grouped by key head
  [k0: v0 v1 | k1: v0 v1] to tiled [v0: k0 k1 | v1: k0 k1] in every tensor that has them (the value rows of
  `attn_qkv` and of the conv, `attn_gate`, `ssm_alpha`, `ssm_beta`, `ssm_a`, `ssm_dt`, and the columns of
  `ssm_out`);
* the MTP head is block `num_hidden_layers` (`nextn.eh_proj`, `nextn.enorm`, `nextn.hnorm`,
  `nextn.shared_head.norm` and an ordinary full-attention layer).
"""

from __future__ import annotations

import torch
from torch import nn

from qwen35.config import ModelConfig
from qwen35.models import Qwen35Model
from qwen35.models.qwen3_5 import Experts

MTP_TOP = {"mtp.fc.weight": "NEXTN_EH_PROJ", "mtp.pre_fc_norm_embedding.weight": "NEXTN_ENORM",
           "mtp.pre_fc_norm_hidden.weight": "NEXTN_HNORM", "mtp.norm.weight": "NEXTN_SHARED_HEAD_NORM"}
EXPERT_PARTS = ("gate", "up", "down", "gate_up")  # blk.N.ffn_{part}_exps.weight
EXPERT_MARK = "#"  # ours for an expert tensor: "layers.3.mlp.experts#gate"


def hf_name(ours: str, layers: int) -> str:
    """Our name -> the Hugging Face name llama.cpp's converter maps (the MTP layer renumbered as it does)."""
    if ours.startswith("mtp.layers."):
        index, rest = ours.removeprefix("mtp.layers.").split(".", 1)
        return f"model.layers.{layers + int(index)}.{rest}"
    if ours == "lm_head.weight":
        return ours
    return "model." + ours.replace("linear_attn.dt_bias", "linear_attn.dt_proj.bias")


def name_map(model: Qwen35Model, arch: str) -> dict[str, str]:
    """GGUF name -> our parameter name for every parameter of `model` (a meta-device model is enough); routed
    experts map to `prefix#gate|up|down|gate_up` (stored per projection, all experts in one tensor)."""
    import gguf

    config = model.config
    layers = config.num_hidden_layers
    enum = {"qwen35": gguf.MODEL_ARCH.QWEN35, "qwen35moe": gguf.MODEL_ARCH.QWEN35MOE}[arch]
    table = gguf.get_tensor_name_map(enum, layers + config.mtp_num_hidden_layers)
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            block = layers + int(name.split(".")[2]) if name.startswith("mtp.") else int(name.split(".")[1])
            for part in EXPERT_PARTS:
                out[f"blk.{block}.ffn_{part}_exps.weight"] = f"{name}{EXPERT_MARK}{part}"
    for name, _ in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            continue
        if name in MTP_TOP:  # not in the name map's table: the converter formats these names itself
            out[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[MTP_TOP[name]]].format(bid=layers) + ".weight"] = name
            continue
        mapped = table.get_name(hf_name(name, layers), try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise KeyError(f"llama.cpp's tensor map has no name for {name}")
        out[mapped] = name
    if not config.tie_word_embeddings:
        out["output.weight"] = "lm_head.weight"
    return out


def is_offset_norm(ours: str) -> bool:
    """RMSNorm1p weights, stored by llama.cpp with +1 applied (the DeltaNet gated norm is not one; the MTP head's
    pre-fc norms are, under their renamed `enorm`/`hnorm`)."""
    return (ours.endswith("norm.weight") and not ours.endswith("linear_attn.norm.weight")) or ours in MTP_TOP and \
        "norm" in ours


def v_permutation(config: ModelConfig, ours: str, to_gguf: bool) -> tuple[int, torch.Tensor] | None:
    """(dim, index) such that `tensor.index_select(dim, index)` converts between our grouped value-head order and
    llama.cpp's tiled order, or None where the tensor has no value heads or the orders are the same."""
    nk, nv = config.linear_num_key_heads, config.linear_num_value_heads
    if nk == nv or ".linear_attn." not in ours:
        return None
    r, dv = nv // nk, config.linear_value_head_dim
    leaf = ours.rsplit(".linear_attn.", 1)[1]
    head = {"in_proj_qkv.weight": dv, "conv1d.weight": dv, "in_proj_z.weight": dv, "out_proj.weight": dv,
            "in_proj_a.weight": 1, "in_proj_b.weight": 1, "A_log": 1, "dt_bias": 1}.get(leaf)
    if head is None:
        return None
    tiled = torch.arange(nv * head).view(nk, r, head).transpose(0, 1).reshape(-1)  # gguf[i] = ours[tiled[i]]
    index = tiled if to_gguf else torch.argsort(tiled)
    if leaf in ("in_proj_qkv.weight", "conv1d.weight"):  # only the value rows, after q and k
        qk = 2 * nk * config.linear_key_head_dim
        index = torch.cat([torch.arange(qk), qk + index])
    return (1 if leaf == "out_proj.weight" else 0), index


def from_gguf(ours: str, w: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """A dense tensor as stored by llama.cpp (fp32, numpy order) -> ours (fp32, our shape)."""
    if perm := v_permutation(config, ours, to_gguf=False):
        w = w.index_select(*perm)
    if ours.endswith("A_log"):
        w = torch.log(-w)
    elif ours.endswith("linear_attn.conv1d.weight"):
        w = w.unsqueeze(1)
    elif is_offset_norm(ours):
        w = w - 1
    return w


def to_gguf(ours: str, w: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Ours (fp32) -> as llama.cpp's converter stores it; the inverse of `from_gguf`."""
    if ours.endswith("A_log"):
        w = -torch.exp(w)
    elif ours.endswith("linear_attn.conv1d.weight"):
        w = w.squeeze(1)
    elif is_offset_norm(ours):
        w = w + 1
    if perm := v_permutation(config, ours, to_gguf=True):
        w = w.index_select(*perm)
    return w


def large_linears(model: nn.Module) -> set[str]:
    """Our weight names that qwen35's quantization turns into int8/int4 layers (as `quant.quantize` picks them)."""
    from qwen35.quant.quantize import _large

    return {f"{n}.weight" for n, m in model.named_modules() if _large(n, m)}
