"""The fast ops agree with their step-by-step references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen35.ops import causal_conv1d, chunk_gated_delta_rule, recurrent_gated_delta_rule
from qwen35.ops.conv import causal_conv1d_reference


def _inputs(b=2, t=150, hk=2, hv=4, dk=16, dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(b, t, hk, dk, generator=g), dim=-1) * dk ** -0.5
    k = torch.nn.functional.normalize(torch.randn(b, t, hk, dk, generator=g), dim=-1)
    v = torch.randn(b, t, hv, dv, generator=g)
    decay = -torch.rand(b, t, hv, generator=g) * 2  # log decay in [-2, 0]
    beta = torch.rand(b, t, hv, generator=g)
    return q, k, v, decay, beta


@pytest.mark.parametrize("t", [1, 5, 64, 150])
@pytest.mark.parametrize("grouped", [False, True])
def test_chunked_delta_rule_matches_recurrent(t, grouped):
    q, k, v, g, beta = _inputs(t=t, hk=2 if grouped else 4)
    state0 = torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(1)) * 0.1
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, state0)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, state0)
    assert s.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=2e-5, rtol=1e-4)


def test_chunked_delta_rule_splits_anywhere():
    """State carried across calls: two calls of 37 + 113 steps equal one call of 150."""
    q, k, v, g, beta = _inputs()
    o_full, s_full = chunk_gated_delta_rule(q, k, v, g, beta)
    o1, s1 = chunk_gated_delta_rule(q[:, :37], k[:, :37], v[:, :37], g[:, :37], beta[:, :37])
    o2, s2 = chunk_gated_delta_rule(q[:, 37:], k[:, 37:], v[:, 37:], g[:, 37:], beta[:, 37:], s1)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o_full, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(s2, s_full, atol=2e-5, rtol=1e-4)


def test_chunked_delta_rule_is_differentiable():
    q, k, v, g, beta = (x.requires_grad_() for x in _inputs(t=80))
    o, s = chunk_gated_delta_rule(q, k, v, g, beta)
    (o.square().sum() + s.sum()).backward()
    for x in (q, k, v, g, beta):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_chunk_size_does_not_change_result():
    q, k, v, g, beta = _inputs(t=100)
    o64, _ = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=64)
    o16, _ = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=16)
    torch.testing.assert_close(o16, o64, atol=2e-5, rtol=1e-4)


def test_causal_conv_matches_reference_with_carried_state():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 30, 12, generator=g), torch.randn(12, 4, generator=g)
    y_ref, s_ref = causal_conv1d_reference(x, w, None)
    y, s = causal_conv1d(x, w, None)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s, s_ref)
    parts, state = [], None
    for a, b in [(0, 1), (1, 9), (9, 10), (10, 30)]:  # one step at a time and in odd pieces
        y_part, state = causal_conv1d(x[:, a:b], w, state)
        parts.append(y_part)
    torch.testing.assert_close(torch.cat(parts, 1), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, s_ref)
    # the carried state owns its few columns: a view would keep the whole chunk's input alive in the cache
    assert s.untyped_storage().nbytes() == s.numel() * s.element_size()


@pytest.mark.parametrize("native", [True, False])
def test_bf16_conv_rounds_once_whether_or_not_the_cpu_has_bf16(monkeypatch, native):
    """Without bf16 hardware the conv runs in fp32 (oneDNN's emulated bf16 one was 150x slower): the result is the
    fp32 conv rounded once to bf16, closer to exact than the bf16 conv, and a split sequence gives the same bits."""
    import qwen35.ops.conv as conv
    import qwen35.ops.cpu as cpu

    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 30, 48, generator=g).bfloat16(), torch.randn(48, 4, generator=g)
    y, state = conv.causal_conv1d(x, w, None)
    exact, _ = causal_conv1d_reference(x.double(), w.double(), None)
    assert y.dtype == torch.bfloat16 and (y.double() - exact).abs().max() < 0.04
    if not native:
        assert torch.equal(y, torch.nn.functional.silu(_fp32_conv(x, w).bfloat16()))
    y1, s1 = conv.causal_conv1d(x[:, :7], w, None)
    y2, s2 = conv.causal_conv1d(x[:, 7:], w, s1)
    assert torch.equal(torch.cat([y1, y2], 1), y) and torch.equal(s2, state)


def _fp32_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The conv alone (no SiLU) in fp32 from a zero state, written as shifted sums."""
    xf = torch.nn.functional.pad(x.float(), (0, 0, w.shape[1] - 1, 0))
    t = x.shape[1]
    return sum(xf[:, j:j + t] * w[:, j] for j in range(w.shape[1]))


def test_decode_products_stay_on_the_gemv_kernels_at_any_batch(monkeypatch):
    """Batch invariance, on any CPU: a decode step's products, (B, 1, K) with B above GEMV_ROWS, go to the
    streaming kernel in blocks of at most GEMV_ROWS rows (which computes a row alike in any block), and its norms
    to the fused kernel past NORM_ROWS; a prefill's rows still go to GEMM. A stand-in records the calls."""
    import types

    import qwen35.ops.cpu as cpu

    calls: list[tuple[str, int]] = []
    fake = types.SimpleNamespace(
        linear_bf16=lambda x, w: calls.append(("gemv", x.shape[0])) or torch.nn.functional.linear(x, w),
        rms_norm=lambda x, w, eps, offset: calls.append(("norm", x.shape[0]))
        or cpu.rms_norm_reference(x, w, eps, offset))
    monkeypatch.setattr(cpu, "fast_path", lambda x: fake)
    w, x = torch.randn(24, 32).bfloat16(), torch.randn(40, 1, 32).bfloat16()
    with torch.inference_mode():
        out = cpu.linear(x, w)
        assert calls == [("gemv", 16), ("gemv", 16), ("gemv", 8)] and out.shape == (40, 1, 24)
        assert torch.equal(out, torch.nn.functional.linear(x, w))
        calls.clear()
        cpu.linear(x.view(1, 40, 32), w)  # a 40-token prefill: GEMM
        assert calls == []
        cpu.rms_norm(torch.randn(40, 1, 8, 32).bfloat16(), torch.zeros(32).bfloat16(), 1e-6)  # q_norm of 40 rows
        cpu.rms_norm(torch.randn(1, 400, 32).bfloat16(), torch.zeros(32).bfloat16(), 1e-6)  # a long prefill
        assert calls == [("norm", 320)]


def test_bf16_prefill_products_without_bf16_hardware_run_in_fp32(monkeypatch):
    """Where oneDNN would emulate bf16 GEMM, prefill rows go through fp32 (weights a tile of rows at a time) and are
    rounded once: within one bf16 rounding of the fp32 product, tiled or not; decode rows keep bf16's own path."""
    import qwen35.ops.cpu as cpu

    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 40, 128, generator=g).bfloat16(), (torch.randn(200, 128, generator=g) / 8).bfloat16()
    exact = x.float() @ w.float().T
    untiled = cpu.linear(x, w)
    monkeypatch.setattr(cpu, "FP32_TILE_ROWS", 64)
    tiled = cpu.linear(x, w)
    for out in (untiled, tiled):
        assert out.dtype == torch.bfloat16 and out.shape == (2, 40, 200)
        assert ((out.float() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()
    calls, real = [], cpu.linear_in_fp32
    monkeypatch.setattr(cpu, "linear_in_fp32", lambda *a: calls.append(a[0].shape) or real(*a))
    cpu.linear(x[:, :1], w)
    cpu.linear(x, w)
    assert calls == [x.shape]  # the prefill rows, not the decode ones


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t,s", [(5, 40), (64, 1000), (40, 41)])
def test_a_chunk_after_a_history_attends_causally_without_a_mask(dtype, t, s):
    """mask None with T < S keys: each query sees the history and its own chunk up to itself, as SDPA with the
    explicit (bottom-right) causal mask computes it - here as two flash passes merged, no (T x S) mask built."""
    from qwen35.ops import attention as attn

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, t, 64, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, s + 9, 64, generator=g).to(dtype)[:, :, :s] for _ in range(2))  # views, as cached
    mask = torch.ones(t, s, dtype=torch.bool).tril(s - t)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    out = attn.attention(q, k, v, None)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.float() - ref).abs().max() < (2e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_query_attention_gets_the_same_bits_behind_any_padding(monkeypatch, dtype):
    """A decode query's output does not depend on how many masked pad keys its batch puts before its own keys
    (without the kernels too): plain and speculative decoding of a sequence then agree bit for bit."""
    from qwen35.ops import attention as attn

    monkeypatch.setattr(attn, "fast_path", lambda x: None)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 32, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, 37, 32, generator=g).to(dtype) for _ in range(2))
    alone = attn.attention(q, k, v, None)
    for pads in (1, 5, 19):
        kp, vp = (torch.cat([torch.randn(1, 2, pads, 32, generator=g).to(dtype), x], dim=2) for x in (k, v))
        mask = torch.ones(2, 1, 1, pads + 37, dtype=torch.bool)
        mask[0, ..., :pads] = False  # row 0: this sequence behind pads; row 1: a batch-mate using every key
        out = attn.attention(q.expand(2, -1, -1, -1), kp.expand(2, -1, -1, -1), vp.expand(2, -1, -1, -1), mask)
        assert torch.equal(out[:1], alone)
        assert torch.allclose(out[1:].float(), attn.attention(q, kp, vp, None).float(), atol=1e-2)
