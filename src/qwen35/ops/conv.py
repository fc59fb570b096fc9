"""Depthwise causal convolution with a carried state (the short conv of Gated DeltaNet)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor,
                  state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(causal depthwise conv) over time, continuing from `state`.

    x: (B, C, T) pre-conv channels; weight: (C, K) with weight[:, K-1] on the current step;
    state: (B, C, K-1) the previous K-1 inputs (zeros at a sequence start), or None for zeros.
    Returns (y (B, C, T), new_state (B, C, K-1)). Splitting a sequence anywhere gives the same y.
    """
    width = weight.shape[1]
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[1], width - 1)
    full = torch.cat([state.to(x.dtype), x], dim=-1)  # (B, C, K-1+T)
    if x.shape[-1] == 1:  # decode: one window, a multiply-add is far cheaper than a conv kernel launch
        y = (full.to(weight.dtype) * weight).sum(-1, keepdim=True)
    else:
        y = F.conv1d(full.to(weight.dtype), weight.unsqueeze(1), groups=x.shape[1])
    # a copy: a view of `full` would keep the whole chunk's input alive in the cache (200 MB at 4B, 512 tokens)
    return F.silu(y).to(x.dtype), full[:, :, full.shape[-1] - (width - 1):].clone()


def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor,
                            state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-by-step form of `causal_conv1d`, written as the equation: y_t = silu(sum_j w[:, j] * x_{t-K+1+j})."""
    width = weight.shape[1]
    hist = x.new_zeros(x.shape[0], x.shape[1], width - 1) if state is None else state.to(x.dtype)
    ys = []
    for t in range(x.shape[-1]):
        window = torch.cat([hist, x[:, :, t:t + 1]], dim=-1)  # (B, C, K)
        ys.append(F.silu((window * weight).sum(-1)))
        hist = window[:, :, 1:]
    return torch.stack(ys, dim=-1), hist
