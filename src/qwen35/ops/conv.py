"""Depthwise causal convolution with a carried state (the short conv of Gated DeltaNet)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen35.ops.cpu import compute_dtype


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor,
                  state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(causal depthwise conv) over time, continuing from `state`.

    x: (B, T, C) pre-conv channels, time-major as the projection writes them; weight: (C, K) with weight[:, K-1]
    on the current step; state: (B, C, K-1) the previous K-1 inputs (zeros at a sequence start), or None.
    Returns (y (B, T, C) in x's dtype, new_state (B, C, K-1)). Splitting a sequence anywhere gives the same y.
    The rows go to oneDNN's depthwise conv as a channels-last (NHWC) image of height 1, which it reads and writes
    in this layout: `F.conv1d` on (B, C, T) needed a transposing copy in and left q/k/v strided (0.8B prefill
    512, alternated in one process: 222-229 -> 237-247 tok/s), and K shifted multiply-adds in fp32 took 8 ms a
    layer in the model against ~1.5 for this. Same output as both, bit for bit. Where the CPU has no bf16
    hardware the conv runs in fp32 (oneDNN's emulated bf16 depthwise conv took 62 ms a decode step on 2 AVX2
    cores, fp32 0.4 ms) and rounds once to bf16 before the SiLU, as the bf16 conv does.
    """
    b, t, c = x.shape
    width = weight.shape[1]
    if state is None:
        state = x.new_zeros(b, c, width - 1)
    full = torch.cat([state.transpose(1, 2).to(x.dtype), x], dim=1)  # (B, K-1+T, C)
    dtype = compute_dtype(x)
    image = full.unsqueeze(1).permute(0, 3, 1, 2).to(dtype)  # (B, C, 1, K-1+T), channels-last strides: no copy
    y = F.conv2d(image, weight.to(dtype)[:, None, None, :], groups=c).permute(0, 2, 3, 1).reshape(b, t, c)
    y = y.to(x.dtype)
    # a copy: a view of `full` would keep the whole chunk's input alive in the cache (200 MB at 4B, 512 tokens)
    return F.silu(y), full[:, t:].transpose(1, 2).contiguous()


def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor,
                            state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-by-step form of `causal_conv1d`, written as the equation: y_t = silu(sum_j w[:, j] * x_{t-K+1+j})."""
    width = weight.shape[1]
    hist = x.new_zeros(x.shape[0], x.shape[2], width - 1) if state is None else state.to(x.dtype)
    ys = []
    for t in range(x.shape[1]):
        window = torch.cat([hist, x[:, t, :, None]], dim=-1)  # (B, C, K)
        ys.append(F.silu((window * weight).sum(-1)))
        hist = window[:, :, 1:]
    return torch.stack(ys, dim=1), hist
