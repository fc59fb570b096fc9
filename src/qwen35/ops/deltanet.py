"""Gated DeltaNet's token mixer, everything between its input projections and out_proj: one fused native call
per token for a decode step, or a few tokens continuing a sequence, where the CPU kernels run, else the model's
own PyTorch math (the reference)."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

from qwen35.cache import DeltaCache
from qwen35.ops.cpu import fast_path

STEPWISE = 16  # up to this many tokens continuing a sequence run token by token on the fused step, a short turn
# or tool result resuming from a snapshot: a 0.8B forward of 16 tokens 159 ms against 170 on the chunked rule, of 24
# tokens 213 against 204 (2-core AVX2)
Mix = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, DeltaCache | None], torch.Tensor]


def gated_deltanet_mix(qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                       cache: DeltaCache | None, conv_weight: torch.Tensor, A_log: torch.Tensor,
                       dt_bias: torch.Tensor, norm_weight: torch.Tensor, eps: float, plain: Mix,
                       keep: bool = False) -> torch.Tensor:
    """Projections (B, T, width) -> (B, T, Hv*dv), the cache advanced. Up to STEPWISE tokens that continue a
    sequence (a recurrent state exists) run fused on the CPU kernels, token by token; anything else is
    `plain(qkv, z, b, a, cache)`, the same math in PyTorch. `keep`: the states before the step are appended to
    `cache.trail` (a speculative verify pass), the fused step writing its state to a new buffer."""
    batch, t, _ = qkv.shape
    stepwise = t == 1 or (t <= STEPWISE and not keep)  # `keep` keeps one state: a verify pass steps itself
    if stepwise and cache is not None and cache.state is not None and (k := fast_path(qkv)) is not None:
        steps = [deltanet_decode(k, *(x[:, j].contiguous() for x in (qkv, z, b, a)), conv_weight, A_log, dt_bias,
                                 norm_weight, eps, cache, keep) for j in range(t)]
        return torch.stack(steps, dim=1)
    if keep:
        cache.trail.append((cache.conv.clone(), cache.state.clone()))
    return plain(qkv, z, b, a, cache)


def deltanet_decode(k: ModuleType, qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                    conv_weight: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, norm_weight: torch.Tensor,
                    eps: float, cache: DeltaCache, keep: bool = False) -> torch.Tensor:
    """One token of the mixer, fused (see the .cpp): inputs are (B, width) projections; the cache's conv history
    and recurrent state are updated in place, so they must be contiguous (`keep`: the state goes to a new
    buffer and the old one, with a copy of the conv history, to `cache.trail`)."""
    if not cache.conv.is_contiguous():
        cache.conv = cache.conv.contiguous()
    if not cache.state.is_contiguous():
        cache.state = cache.state.contiguous()
    new = torch.empty_like(cache.state) if keep else None  # None: the state is updated in place
    if keep:
        cache.trail.append((cache.conv.clone(), cache.state))
    o = k.deltanet_decode(qkv, z, b, a, cache.conv, conv_weight, A_log, dt_bias, cache.state, new, norm_weight, eps)
    if new is not None:
        cache.state = new
    return o
