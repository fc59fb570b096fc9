"""A decode token through all layers in one native call (`kernels/decode.cpp`), where the CPU kernels run; also
a speculative verify pass of a few tokens per sequence (their linears on all rows at once, the mixers token by token).

The plan holds each layer's weights (the same tensors as the model: in-place updates are seen). It covers the
dense models whose linears all run on qwen35's decode kernels; anything else, and any step it cannot take (an
empty recurrent state, a padded token, more rows than the GEMV kernels take), goes layer by layer in Python,
which is the reference: the results are bit-identical.
"""

from __future__ import annotations

from copy import deepcopy
from types import ModuleType

import torch
from torch import nn

from qwen35.cache import KVCache, LayerCache, ModelCache
from qwen35.ops.cpu import GEMV_ROWS, fast_path


class NativeDecode:
    """A `Qwen35Model`'s decode step (its `decode_layers`, and its verify passes), or its MTP head's (drafts): one
    token per sequence through every layer in one native call where the CPU kernels take it, else
    `model.run_layers`; bit-identical either way.

    The plan is built on first use and holds the weight tensors: `reset` after the weights or modules change.
    It holds the model, which holds it: a cycle, which the garbage collector frees and `copy.deepcopy` of the
    model carries over to the copy (a weak reference would leave a copy running the original's layers). A copy
    starts without a plan: the native one cannot be copied, and holds the original's weights.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.plan: object = None  # None until first built, False where none applies

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn_mask: torch.Tensor | None,
                 pad_mask: torch.Tensor | None, cache: ModelCache | list[LayerCache]) -> torch.Tensor:
        if pad_mask is None and (k := fast_path(x)) is not None and not torch.is_grad_enabled() \
                and not torch.compiler.is_compiling():
            if self.plan is None:
                self.plan = build_plan(k, self.model) or False
            layers = cache.layers if isinstance(cache, ModelCache) else cache
            if self.plan and (out := run_plan(self.plan, x, rope, attn_mask, layers)) is not None:
                return out
        return self.model.run_layers(x, rope, attn_mask, pad_mask, cache)

    def reset(self) -> None:
        """Forget the plan: the next step builds one from the model as it is then."""
        self.plan = None

    def __deepcopy__(self, memo: dict) -> "NativeDecode":
        copy = memo[id(self)] = NativeDecode.__new__(NativeDecode)  # first: the model copied next refers back
        copy.model, copy.plan = deepcopy(self.model, memo), None
        return copy


def build_plan(k: ModuleType, model: nn.Module) -> object | None:
    """The plan of `model` (a `Qwen35Model`), or None when a layer is not on the decode kernels."""
    config = model.config
    if config.is_moe:
        return None
    plan = k.DecodePlan(config.rms_norm_eps)
    for layer in model.layers:
        mlp = layer.mlp
        weights = {"input_layernorm": layer.input_layernorm.weight,
                   "post_attention_layernorm": layer.post_attention_layernorm.weight}
        linears = {"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": mlp.down_proj}
        if layer.layer_type == "linear_attention":
            m = layer.linear_attn
            weights |= {"conv1d": m.conv1d.weight.squeeze(1), "A_log": m.A_log, "dt_bias": m.dt_bias,
                        "norm": m.norm.weight}
            names = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
        else:
            m = layer.self_attn
            weights |= {"q_norm": m.q_norm.weight, "k_norm": m.k_norm.weight}
            names = ("q_proj", "k_proj", "v_proj", "o_proj")
        linears |= {name: getattr(m, name) for name in names}
        operands = {name: _operands(lin) for name, lin in linears.items()}
        bf16 = all(w.dtype == torch.bfloat16 for name, w in weights.items() if name not in ("A_log", "dt_bias"))
        if not bf16 or any(v is None for v in operands.values()):
            return None
        if layer.layer_type == "linear_attention":
            plan.add_deltanet(weights, operands)
        else:
            plan.add_attention(weights, operands, m.n_heads, m.n_kv, m.head_dim)
    return plan


def _operands(linear: nn.Module) -> tuple[int, int, list[torch.Tensor]] | None:
    """What the plan calls a linear with: (kind, group size, tensors), or None if it is not on the kernels."""
    get = getattr(linear, "decode_operands", None)
    return get() if get is not None else None


def run_plan(plan, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn_mask: torch.Tensor | None,
             caches: list[LayerCache]) -> torch.Tensor | None:
    """x (B, T, H) -> the last layer's output (B, T, H), the layers' caches advanced by T tokens; None (nothing
    done) when this step is not one the plan takes. T > 1: a verify pass (`ModelCache.track`: each DeltaNet
    layer's trail gets its states before tokens 1..T-1, as the layer-by-layer path records them) or the MTP
    head's catch-up (attention only: each query against the keys up to its own)."""
    b, t = x.shape[:2]
    if b * t > GEMV_ROWS:
        return None
    state, lengths, scales, kv, delta = [], [], [], [], []
    none = torch.empty(0)
    for layer in caches:
        if isinstance(layer, KVCache):
            state += [layer.k, layer.v]
            scales += [layer.k_scale, layer.v_scale] if layer.bits == 8 else [none, none]
            lengths.append(layer.length)
            kv.append(layer)
        elif layer.state is None or (t > 1 and layer.trail is None):  # no state yet (prefill sets it up), or
            return None  # several tokens outside a verify pass, whose states would have nowhere to go
        else:
            layer.conv, layer.state = layer.conv.contiguous(), layer.state.contiguous()  # updated in place
            state += [layer.conv, layer.state]
            scales += [none, none]
            lengths.append(0)
            delta.append(layer)
    valid = None if attn_mask is None else attn_mask.reshape(b, t, -1).contiguous()
    out, kept = plan.run(x.reshape(b * t, -1), *rope, valid, state, lengths, scales)
    for layer in kv:
        layer.length += t
    if t > 1:
        per_layer = 2 * (t - 1) + 1
        for i, layer in enumerate(delta):
            mine = kept[i * per_layer:(i + 1) * per_layer]
            layer.trail += list(zip(mine[0:-1:2], mine[1:-1:2]))
            layer.state = mine[-1]
    return out.view(b, t, -1)
