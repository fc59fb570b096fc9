"""The gated delta rule: the recurrence of Gated DeltaNet layers.

State S (B, Hv, dk, dv) in fp32. Per value head and step t (decay first, then the delta-rule write, then the read):
    S <- exp(g_t) * S;   S <- S + k_t (beta_t (v_t - S^T k_t))^T;   o_t = S^T q_t
`recurrent_gated_delta_rule` is that loop (the reference, and the decode path);
`chunk_gated_delta_rule` is the same map computed 64 steps at a time with matmuls (the prefill path).
Inputs: q, k (B, T, Hk, dk) already L2-normalised and q scaled by dk^-1/2; v (B, T, Hv, dv);
g (log decay, <= 0) and beta (B, T, Hv). Value head h reads key head h // (Hv / Hk).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _prepare(q, k, v, g, beta):
    """Expand key heads to value heads and move to (B, H, T, d) fp32."""
    group = v.shape[2] // k.shape[2]
    if group > 1:
        q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    return tuple(x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
                 for x in (q, k, v, g, beta))


def recurrent_gated_delta_rule(q, k, v, g, beta,
                               state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token reference. Returns (o (B, T, Hv, dv) in v's dtype, final state (B, Hv, dk, dv) fp32)."""
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    b, h, t, dk = k.shape
    s = q.new_zeros(b, h, dk, v.shape[-1]) if state is None else state.float()
    out = torch.empty_like(v)
    for i in range(t):
        k_i = k[:, :, i, None, :]  # (B, H, 1, dk)
        s = s * g[:, :, i].exp()[..., None, None]
        pred = k_i @ s  # (B, H, 1, dv): what the decayed state predicts for this key
        s = s + k_i.transpose(-1, -2) @ (beta[:, :, i, None, None] * (v[:, :, i, None, :] - pred))
        out[:, :, i] = (q[:, :, i, None, :] @ s)[:, :, 0]
    return out.transpose(1, 2).to(out_dtype), s


def chunk_gated_delta_rule(q, k, v, g, beta, state: torch.Tensor | None = None,
                           chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked (WY / UT-transform) form of the same recurrence; differentiable, fp32 throughout.

    Per chunk with local cumulative log-decay G and D_ij = exp(G_i - G_j) (j <= i):
      A = strict_lower((beta K) K^T * D);  U = (I + A)^-1 beta V;  W = (I + A)^-1 (beta K exp(G))
      V' = U - W S;  O = (Q exp(G)) S + ((Q K^T) * D) V';  S <- exp(G_last) S + (K exp(G_last - G))^T V'
    """
    out_dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    b, h, t, dk = k.shape
    dv = v.shape[-1]
    pad = (-t) % chunk_size
    if pad:  # zero beta and g on pads: they neither write nor decay the state
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (t + pad) // chunk_size
    q, k, v = (x.reshape(b, h, n, chunk_size, -1) for x in (q, k, v))
    g, beta = (x.reshape(b, h, n, chunk_size) for x in (g, beta))

    cum = g.cumsum(-1)  # (B, H, N, C)
    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf")).exp()  # D, zero above diag
    k_beta = k * beta[..., None]
    a = (k_beta @ k.transpose(-1, -2)) * decay  # read as I + A: the solver takes the strict lower part, unit diagonal
    rhs = torch.cat([v * beta[..., None], k_beta * cum.exp()[..., None]], dim=-1)
    del v, k_beta  # here and below: each (B, H, T, d) fp32 temporary goes as soon as it is used (prefill memory)
    u, w = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True).split([dv, dk], dim=-1)
    del a, rhs
    scores = (q @ k.transpose(-1, -2)) * decay  # diagonal included
    del decay
    q_decayed = q * cum.exp()[..., None]
    k_to_end = k * (cum[..., -1:] - cum).exp()[..., None]
    del q, k
    chunk_decay = cum[..., -1].exp()[..., None, None]  # (B, H, N, 1, 1)

    s = u.new_zeros(b, h, dk, dv) if state is None else state.float()
    out = u.new_empty(b, h, n, chunk_size, dv)
    for i in range(n):
        v_new = u[:, :, i] - w[:, :, i] @ s
        out[:, :, i] = q_decayed[:, :, i] @ s + scores[:, :, i] @ v_new
        s = s * chunk_decay[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(b, h, n * chunk_size, dv)[:, :, :t]
    return out.transpose(1, 2).to(out_dtype), s
