"""qwen35's CPU kernels against their plain PyTorch references (skipped where the CPU lacks AVX-512 BF16)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qwen35
import qwen35.ops.cpu as cpu
from qwen35.cache import make_cache
from qwen35.generate import prefill
from qwen35.quant.linear import dequantize, int4_quantize, int8_quantize, make_linear

pytestmark = pytest.mark.skipif("avx512_bf16" not in cpu._cpu_flags(), reason="qwen35 CPU kernels need AVX-512 BF16")


def test_kernels_build_here():
    """On a CPU that has AVX-512 BF16 the kernels must build: a failed build would silently skip nothing else."""
    assert cpu.kernels() is not None


def ulps(ref: torch.Tensor) -> float:
    """A few bf16 rounding steps of the output's scale: the products are exact, the sums are fp32."""
    return 4 * ref.abs().max().item() * 2 ** -8


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 16])
@pytest.mark.parametrize("n, k", [(37, 64), (256, 1000), (130, 96)])
def test_bf16_gemv_matches_float_product(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n)
    x, w = torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
    ref = x.float() @ w.float().T
    got = cpu.kernels().linear_bf16(x, w).float()
    assert (got - ref).abs().max().item() <= ulps(ref)


@pytest.mark.parametrize("m", [1, 3, 16, 40])  # 40 rows: the tiled prefill path
@pytest.mark.parametrize("bits, group", [(8, 0), (4, 32), (4, 64), (4, 128)])
def test_quantized_layers_match_dequantized_reference(m, bits, group):
    g = torch.Generator().manual_seed(bits + group + m)
    w, x = torch.randn(96, 256, generator=g), torch.randn(m, 256, generator=g).bfloat16()
    parts = int8_quantize(w, torch.bfloat16) if bits == 8 else int4_quantize(w, group, torch.bfloat16)
    layer = make_linear(parts, group)
    assert bits == 8 or layer.own_kernel
    ref = x.float() @ dequantize(parts, group).T
    assert (layer(x).float() - ref).abs().max().item() <= ulps(ref)


def test_rms_norm_matches_reference():
    x, w = torch.randn(5, 300).bfloat16(), torch.randn(300).bfloat16() * 0.1
    for offset in (1.0, 0.0):
        ref = cpu.rms_norm_reference(x, w, 1e-6, offset).float()
        got = cpu.kernels().rms_norm(x, w, 1e-6, offset).float()
        assert (got - ref).abs().max().item() <= ulps(ref)


def test_fused_decode_follows_the_plain_model(monkeypatch):
    """bf16 nano model, batch of 2: prefill + 24 decode steps on the kernels vs PyTorch's ops, same tokens fed."""
    model = qwen35.load(None, dtype="bfloat16", device="cpu").model
    g = torch.Generator().manual_seed(0)
    ids, steps = torch.randint(0, 1000, (2, 9), generator=g), torch.randint(0, 1000, (24, 2, 1), generator=g)

    def run(kernels_on: bool) -> torch.Tensor:
        if not kernels_on:
            monkeypatch.setattr(cpu, "kernels", lambda: None)
        cache = make_cache(model.config, 2)
        with torch.inference_mode():
            logits = [prefill(model, ids, cache)] + [model(step, cache)[:, -1] for step in steps]
        monkeypatch.undo()
        return torch.stack(logits).float()

    fast, plain = run(True), run(False)
    diff = (fast - plain).abs().amax(-1)
    assert diff.max().item() < 0.3  # logits of magnitude ~10: a few bf16 steps
    top2 = plain.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * diff  # greedy choices these differences cannot flip
    assert clear.sum() > 30 and torch.equal(fast.argmax(-1)[clear], plain.argmax(-1)[clear])


def test_training_never_uses_the_kernels(monkeypatch):
    layer = cpu.Linear(64, 16, bias=False).bfloat16()
    x = torch.randn(1, 64, dtype=torch.bfloat16, requires_grad=True)
    used = []
    monkeypatch.setattr(cpu, "kernels", lambda: used.append(1) or None)
    y = layer(x)
    y.float().sum().backward()
    assert not used and x.grad is not None and layer.weight.grad is not None
    with torch.no_grad():
        layer(x)
    assert used  # inference asks for them
