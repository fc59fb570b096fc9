"""qwen35's CPU kernels against their plain PyTorch references (skipped where the CPU lacks AVX2 and FMA)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import qwen35
import qwen35.ops.cpu as cpu
import qwen35.quant.linear as qlinear
from qwen35.cache import make_cache
from qwen35.runtime import Engine, Request, Scheduler
from qwen35.runtime.prefill import prefill
from qwen35.runtime.speculative import Speculator
from qwen35.sampling import SamplingParams
from qwen35.cache import quantize_kv
from qwen35.ops.attention import attention_8bit, attention_decode
from qwen35.ops.gated_delta import chunk_gated_delta_rule, recurrent_gated_delta_rule
from qwen35.ops.build import build_dir
from qwen35.quant.linear import dequantize, int4_quantize, int8_activations, int8_quantize, make_linear

pytestmark = pytest.mark.skipif(not cpu.cpu_supported(), reason="qwen35 CPU kernels need AVX2 and FMA")


def test_kernels_build_here():
    """On a CPU that has AVX2 or AVX-512 BF16 the kernels must build: a failed build would silently skip nothing
    else."""
    assert cpu.kernels() is not None


def test_a_killed_build_does_not_block_later_loads():
    """torch's lock file, left behind when a first-use build is killed (Ctrl-C), must not hang every later load."""
    assert cpu.kernels() is not None
    (build_dir() / "lock").touch()
    done = subprocess.run([sys.executable, "-c", "from qwen35.ops import cpu; assert cpu.kernels() is not None"],
                          timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (build_dir() / "lock").exists()


def test_built_kernels_load_without_running_ninja(tmp_path):
    """Once built, the kernels load in seconds whichever ninja PATH has first (here one that fails and leaves a
    mark): before, each start ran PATH's ninja, and another version of it rebuilt everything (minutes)."""
    assert cpu.kernels() is not None
    mark = tmp_path / "ninja-ran"
    (tmp_path / "ninja").write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
    (tmp_path / "ninja").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", "from qwen35.ops import cpu; assert cpu.kernels() is not None"],
                          env=env, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not mark.exists() and "compiling" not in done.stderr
    assert time.monotonic() - start < 30


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


@pytest.mark.parametrize("m", [1, 3, 4])
def test_bf16_gemv_outputs_are_the_same_bits_in_blocks_of_four_weight_rows(m):
    """Weight rows in blocks of 4 take their 16-lane sums together (one shuffle tree); a lone weight row (a
    thread's range end, or a matrix of one row) takes its own: the same pairing, so the same bits."""
    g = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, 256, generator=g).bfloat16(), torch.randn(132, 256, generator=g).bfloat16()
    together = cpu.kernels().linear_bf16(x, w)
    alone = torch.cat([cpu.kernels().linear_bf16(x, w[i:i + 1]) for i in range(w.shape[0])], dim=1)
    assert torch.equal(together, alone)


@pytest.mark.parametrize("m", [1, 3, 16, 40])  # 40 rows: the tiled prefill path
@pytest.mark.parametrize("bits, group", [(8, 0), (4, 32), (4, 64), (4, 128)])
def test_quantized_layers_match_dequantized_reference(m, bits, group):
    """Up to GEMV_ROWS rows the kernels round activations to int8 per block of 32 (VNNI): exact against the
    reference that rounds the same way, and within 1.5% (relative norm; measured ~0.55%) of the exact product."""
    g = torch.Generator().manual_seed(bits + group + m)
    w, x = torch.randn(96, 256, generator=g), torch.randn(m, 256, generator=g).bfloat16()
    parts = int8_quantize(w, torch.bfloat16) if bits == 8 else int4_quantize(w, group, torch.bfloat16)
    layer = make_linear(parts, group)
    assert layer.own_kernel
    weight = dequantize(parts, group)
    exact = x.float() @ weight.T
    ref = (int8_activations(x) if m <= cpu.GEMV_ROWS else x.float()) @ weight.T
    got = layer(x).float()
    assert (got - ref).abs().max().item() <= ulps(ref)
    assert ((got - exact).norm() / exact.norm()).item() < 0.015


@pytest.mark.parametrize("bits, group, k", [(8, 0, 1000), (8, 0, 96), (8, 0, 256), (4, 32, 256), (4, 64, 384),
                                             (4, 128, 256)])
def test_dequantized_tiles_equal_the_reference(bits, group, k, monkeypatch):
    """The prefill tiles (weight rows to bf16, vectorised) round exactly as the fp32 reference cast to bf16;
    rows picked one by one (embedding lookups) too. K = 1000 is not for the kernel (PyTorch's path). The kernel
    layout is built in blocks of 32 rows here (two blocks, the second partial)."""
    monkeypatch.setattr(qlinear, "LAYOUT_ROWS", 32)
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(k + group))
    parts = int8_quantize(w, torch.bfloat16) if bits == 8 else int4_quantize(w, group, torch.bfloat16)
    layer = make_linear(parts, group)
    assert layer.own_kernel == (k != 1000)
    ref = dequantize(parts, group).to(torch.bfloat16)
    assert torch.equal(layer.rows(slice(16, 48)), ref[16:])  # whole tiles of 16 rows (prefill)
    assert torch.equal(layer.rows(slice(3, 48)), ref[3:])
    picked = torch.tensor([47, 0, 17, 17, 30])
    assert torch.equal(layer.rows(picked), ref[picked])


def test_int8_activation_rounding():
    x = torch.tensor([[0.0] * 32 + [1.0, -0.5] + [0.0] * 30 + [3.0]]).bfloat16()  # a zero block, a ragged tail
    got = int8_activations(x)
    assert got.shape == x.shape and torch.equal(got[0, :32], torch.zeros(32))
    assert got[0, 32].item() == 1.0 and abs(got[0, 33].item() + 0.5) <= 1 / 254 and got[0, 64].item() == 3.0


@pytest.mark.parametrize("b, hq, hkv, s, d",
                         [(1, 8, 2, 80, 256), (2, 8, 2, 33, 256), (1, 4, 4, 5, 64), (3, 6, 2, 17, 96),
                          (1, 8, 2, 1300, 256), (2, 4, 1, 700, 64)])  # histories split in blocks and spans
@pytest.mark.parametrize("masked", [False, True])
def test_attention_decode_matches_sdpa(b, hq, hkv, s, d, masked):
    g = torch.Generator().manual_seed(s + d)
    q = torch.randn(b, hq, 1, d, generator=g).bfloat16()
    k, v = (torch.randn(b, hkv, s + 7, d, generator=g).bfloat16()[:, :, :s] for _ in range(2))  # cache-like views
    mask = None
    if masked:
        mask = torch.rand(b, 1, 1, s, generator=g) > 0.3
        mask[..., : s // 2] = False  # a left-padded history: on long ones whole blocks and spans see no key
        mask[..., -1] = True
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    got = attention_decode(cpu.kernels(), q, k, v, mask).float()
    assert (got - ref).abs().max().item() <= ulps(ref)
    qk, qv = (quantize_kv(t) for t in (k, v))  # an 8-bit cache, read as stored: against its blockwise reference
    ref8 = attention_8bit(q, qk, qv, mask, block=16).float()
    got8 = attention_decode(cpu.kernels(), q, qk, qv, mask).float()
    assert (got8 - ref8).abs().max().item() <= ulps(ref8)
    assert (got8 - ref).abs().max().item() < 0.05  # and close to the 16-bit answer


@pytest.mark.skipif(not (cpu.kernels() and cpu.kernels().isa() == "avx512"),
                    reason="the prefill attention kernel needs an AVX-512 BF16 build")
@pytest.mark.parametrize("b, hq, hkv, t, s, d", [(1, 8, 2, 100, 100, 256), (1, 8, 2, 77, 300, 256),
                                                 (2, 4, 2, 33, 33, 64), (1, 4, 1, 130, 1000, 64),
                                                 (2, 6, 2, 5, 70, 128)])
@pytest.mark.parametrize("tiles", [False, True])
def test_attention_prefill_matches_sdpa(b, hq, hkv, t, s, d, tiles):
    """A causal chunk, from empty (t = s) or after a history, against SDPA in fp32 with the bottom-right mask:
    runs of 32 tokens, blocks of 256 keys with a shorter last one, groups of 4, 3, 2 and 1 query heads; the same
    token's output is bit for bit the same whether it came in one chunk or after a history (the prefix cache
    relies on it); 8-bit K/V read as stored. On vdpbf16ps and, where the CPU has them, on AMX tiles (rows padded
    to pairs of 16)."""
    if tiles and not cpu.kernels().amx():
        pytest.skip("this CPU (or its OS) gives no AMX tiles")
    g = torch.Generator().manual_seed(t + s)
    q = torch.randn(b, hq, t, d, generator=g).bfloat16()
    k, v = (torch.randn(b, hkv, s + 3, d, generator=g).bfloat16()[:, :, :s] for _ in range(2))  # cache-like views
    mask = torch.ones(t, s, dtype=torch.bool).tril(s - t)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    got = cpu.kernels().attention_prefill(q, k, v, d ** -0.5, None, None, tiles)
    assert got.dtype == torch.bfloat16 and (got.float() - ref).abs().max().item() <= ulps(ref)
    if t > 2:
        tail = cpu.kernels().attention_prefill(q[:, :, -2:].contiguous(), k, v, d ** -0.5, None, None, tiles)
        assert torch.equal(tail, got[:, :, -2:])
    qk, qv = (quantize_kv(x) for x in (k, v))  # an 8-bit cache: exactly its bf16 dequantization's answer
    got8 = cpu.kernels().attention_prefill(q, qk.q, qv.q, d ** -0.5, qk.scale, qv.scale, tiles)
    deq = cpu.kernels().attention_prefill(q, qk.dequantize(torch.bfloat16), qv.dequantize(torch.bfloat16), d ** -0.5,
                                          None, None, tiles)
    assert torch.equal(got8, deq)


def test_rms_norm_matches_reference():
    x, w = torch.randn(5, 300).bfloat16(), torch.randn(300).bfloat16() * 0.1
    for offset in (1.0, 0.0):
        ref = cpu.rms_norm_reference(x, w, 1e-6, offset).float()
        got = cpu.kernels().rms_norm(x, w, 1e-6, offset).float()
        assert (got - ref).abs().max().item() <= ulps(ref)


@pytest.mark.parametrize("t, hk, hv, chunk", [(150, 2, 4, 64), (64, 2, 2, 64), (5, 1, 2, 64), (97, 2, 4, 16)])
@pytest.mark.parametrize("start", [False, True])
def test_chunked_delta_rule_kernel_matches_the_recurrence(t, hk, hv, chunk, start):
    """The native chunked rule (bf16 v and beta, as the model's prefill feeds it) against the token-by-token
    reference on the same values in fp32: whole chunks and a shorter last one, grouped key heads, from a state
    or from zeros; the state returned is a new tensor (the one passed is left as it was)."""
    g = torch.Generator().manual_seed(t + hv)
    q = F.normalize(torch.randn(2, t, hk, 32, generator=g), dim=-1) * 32 ** -0.5
    k = F.normalize(torch.randn(2, t, hk, 32, generator=g), dim=-1)
    v = torch.randn(2, t, hv, 48, generator=g).bfloat16()
    decay = -torch.rand(2, t, hv, generator=g) * 3  # log decay in [-3, 0]: cumulated past -87 in a chunk
    beta = torch.rand(2, t, hv, generator=g).bfloat16()
    state = torch.randn(2, hv, 32, 48, generator=g) * 0.1 if start else None
    kept = None if state is None else state.clone()
    o, s = cpu.kernels().chunk_delta_rule(q, k, v, decay, beta, state, chunk)
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v.float(), decay, beta.float(), state)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert (o.float() - o_ref).abs().max().item() <= ulps(o_ref)  # o is rounded to bf16
    torch.testing.assert_close(s, s_ref, atol=2e-5, rtol=1e-4)
    if state is not None:
        assert torch.equal(state, kept)
    o_op, s_op = chunk_gated_delta_rule(q, k, v, decay, beta, state, chunk)  # the op takes it for these dtypes
    assert torch.equal(o_op, o) and torch.equal(s_op, s)


def test_fused_decode_follows_the_plain_model(monkeypatch):
    """bf16 nano model, batch of 2: prefill, 24 decode steps, a 7-token continuation (stepped on the kernels) and
    4 more steps, vs PyTorch's ops, same tokens fed."""
    model = qwen35.load(None, dtype="bfloat16", device="cpu").model
    g = torch.Generator().manual_seed(0)
    ids, steps = torch.randint(0, 1000, (2, 9), generator=g), torch.randint(0, 1000, (24, 2, 1), generator=g)
    more = torch.randint(0, 1000, (2, 7), generator=g)

    def run(kernels_on: bool) -> torch.Tensor:
        if not kernels_on:
            monkeypatch.setattr(cpu, "kernels", lambda: None)
        cache = make_cache(model.config, 2)
        with torch.inference_mode():
            logits = [prefill(model, ids, cache)] + [model(step, cache)[:, -1] for step in steps]
            logits += [*model(more, cache).unbind(1)] + [model(step, cache)[:, -1] for step in steps[:4]]
        monkeypatch.undo()
        return torch.stack(logits).float()

    fast, plain = run(True), run(False)
    diff = (fast - plain).abs().amax(-1)
    assert diff.max().item() < 0.3  # logits of magnitude ~10: a few bf16 steps
    top2 = plain.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * diff  # greedy choices these differences cannot flip
    assert clear.sum() > 30 and torch.equal(fast.argmax(-1)[clear], plain.argmax(-1)[clear])


@pytest.mark.parametrize("bits, kv_bits", [(None, 16), (8, 16), (4, 16), (None, 8), (4, 8)])
def test_decode_plan_is_bit_identical_to_layer_by_layer(bits, kv_bits, monkeypatch):
    """The native decode step (`ops.decode`) against the model's own layers, nano model, a batch of 2 with a left-
    padded row (the attention mask path), 16- and 8-bit K/V: equal logits at every step, and the layers never ran
    in Python."""
    model = qwen35.load(None, dtype="bfloat16", device="cpu").model
    if bits:
        qwen35.quantize(model, bits=bits, group_size=32)
    g = torch.Generator().manual_seed(1)
    ids, steps = torch.randint(0, 1000, (2, 9), generator=g), torch.randint(0, 1000, (10, 2, 1), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0

    def run(step) -> torch.Tensor:
        model.decode_layers = step
        cache = make_cache(model.config, 2, kv_bits=kv_bits)
        with torch.inference_mode():
            first = model(ids, cache, attention_mask=mask)[:, -1]
            return torch.stack([first] + [model(s, cache)[:, -1] for s in steps])

    plain, layers = run(model.run_layers), model.run_layers
    lengths = []  # tokens per call of the Python layers: the prefill only
    monkeypatch.setattr(model, "run_layers", lambda x, *a: lengths.append(x.shape[1]) or layers(x, *a))
    assert torch.equal(run(model.decode_step), plain) and lengths == [9]


@pytest.mark.parametrize("bits, kv_bits", [(None, 16), (8, 16), (4, 16), (4, 8)])
def test_a_verify_pass_on_the_plan_is_bit_identical_to_layer_by_layer(bits, kv_bits, monkeypatch):
    """A speculative verify pass (3 tokens a sequence, a batch of 2 with a left-padded row) through the native plan
    against the model's own layers: equal hidden states, K/V, and DeltaNet states after every token (the trail the
    rollback picks from); then rolled back to different lengths, the next decode step equal too. The Python
    layers never ran on the plan's side."""
    model = qwen35.load(None, dtype="bfloat16", device="cpu").model
    if bits:
        qwen35.quantize(model, bits=bits, group_size=32)
    g = torch.Generator().manual_seed(6)
    ids, fed = torch.randint(0, 1000, (2, 9), generator=g), torch.randint(0, 1000, (2, 3), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    with torch.inference_mode():
        start = make_cache(model.config, 2, kv_bits=kv_bits)
        model(ids, start, attention_mask=mask)

    def verify(python: bool) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        cache, layers = copy.deepcopy(start), model.run_layers
        calls = []
        monkeypatch.setattr(model, "run_layers", lambda x, *a: calls.append(x.shape[1]) or layers(x, *a))
        if python:
            monkeypatch.setattr(model, "decode_step", model.run_layers)
        with torch.inference_mode():
            cache.track()
            hidden = model.features(fed, cache)
            states = [t for layer in cache.layers for t in (
                layer.tensors() if hasattr(layer, "k")
                else [x for pair in layer.trail + [(layer.conv, layer.state)] for x in pair])]
            cache.rollback([3, 1], 3)
            after = model(fed[:, :1], cache)
        monkeypatch.undo()
        assert python or calls == []
        return hidden, states, after

    (native, native_states, native_after), (plain, plain_states, plain_after) = verify(False), verify(True)
    assert torch.equal(native, plain) and torch.equal(native_after, plain_after)
    assert len(native_states) == len(plain_states)
    assert all(torch.equal(a, b) for a, b in zip(native_states, plain_states))


@pytest.mark.parametrize("bits", [None, 4])
def test_speculative_decoding_on_the_plan_is_the_plain_output(bits, monkeypatch):
    """The nano model (its trained MTP head) drafting 2 tokens a step, a batch of 2: verify passes, drafts and
    catch-ups all on native plans (no layer ran in Python on 3 tokens or fewer: only prompts did), the greedy
    replies those of plain decoding token for token, and drafts accepted."""
    qwen = qwen35.load(None, dtype="bfloat16", device="cpu", cache_ram=0, draft=0)
    model = qwen.model
    if bits:
        qwen35.quantize(model, bits=bits, group_size=32)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [qwen.prepare_chat([{"role": "user", "content": text}]).ids for text in ("Hello!", "Name a color.")]

    def replies(speculator) -> tuple[list[list[int]], int]:
        engine = Engine(model, scheduler=Scheduler(max_running=2), speculator=speculator)
        for i, ids in enumerate(prompts):
            engine.add(Request(str(i), ids, params))
        out, steps = [[], []], 0
        while engine.has_work():
            for event in engine.step():
                out[int(event.seq_id)].append(event.token)
            steps += 1
        return out, steps

    calls: list[int] = []
    for owner in (model, model.mtp):
        layers = owner.run_layers
        monkeypatch.setattr(owner, "run_layers", lambda x, *a, f=layers: calls.append(x.shape[1]) or f(x, *a))
    plain, plain_steps = replies(None)
    drafted, steps = replies(Speculator(model, 2))
    assert [t for t in calls if t <= 3] == [] and drafted == plain and steps < plain_steps


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_decode_batch_above_gemv_rows_equals_each_sequence_alone(bits):
    """Batch invariance at any batch size: sequences decoded together (more than GEMV_ROWS, and more query-head
    rows than NORM_ROWS: 72 x 4 heads in the nano model) give each the logits it gets alone, bit for bit; GEMM above
    16 rows did not. Each starts from one token: a longer prompt's prefill, (B, T > 1), runs GEMM above 16 rows
    together and the kernels alone, so it was never batch-invariant (`one_token_each`)."""
    model = qwen35.load(None, dtype="bfloat16", device="cpu").model
    if bits:
        qwen35.quantize(model, bits=bits, group_size=32)
    b = max(cpu.GEMV_ROWS, cpu.NORM_ROWS // model.config.num_attention_heads) + 8
    g = torch.Generator().manual_seed(3)
    ids, steps = torch.randint(0, 1000, (b, 1), generator=g), torch.randint(0, 1000, (5, b, 1), generator=g)

    def decode(rows: slice) -> torch.Tensor:
        cache = make_cache(model.config, rows.stop - rows.start)
        with torch.inference_mode():
            model(ids[rows], cache)
            return torch.stack([model(s[rows], cache)[:, -1] for s in steps])

    together = decode(slice(0, b))
    assert b > cpu.GEMV_ROWS and b * model.config.num_attention_heads > cpu.NORM_ROWS
    for i in (0, 17, b - 1):
        assert torch.equal(together[:, i:i + 1], decode(slice(i, i + 1))), i


def test_decode_plan_follows_replaced_modules():
    """Quantizing after a decode step swaps the linears: the plan is rebuilt, not run on the old weights."""
    model = qwen35.load(None, dtype="bfloat16", device="cpu").model
    ids = torch.randint(0, 1000, (1, 5), generator=torch.Generator().manual_seed(2))

    def logits() -> torch.Tensor:
        cache = make_cache(model.config)
        with torch.inference_mode():
            model(ids, cache)
            return model(ids[:, :1], cache)[0, -1]

    before = logits()
    qwen35.quantize(model, bits=4, group_size=32)
    after = logits()
    model.decode_layers = model.run_layers
    assert not torch.equal(before, after) and torch.equal(after, logits())


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_gemv_rows_are_the_same_bits_alone_and_in_any_block(kind):
    """Each activation row through a GEMV kernel gives the bits it gives alone, in blocks of 2 to 16 rows (batch
    invariance of decode): the bf16 kernel summed with 4 accumulators alone and 2 in a block (12 of 72 rows off
    at 12288 x 256)."""
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(12288, 256, generator=g), torch.randn(16, 256, generator=g).bfloat16()
    if kind == "bf16":
        wb = w.bfloat16()
        product = lambda rows: cpu.kernels().linear_bf16(rows, wb)  # noqa: E731
    else:
        parts = int8_quantize(w, torch.bfloat16) if kind == "int8" else int4_quantize(w, 32, torch.bfloat16)
        product = make_linear(parts, 32)
    with torch.inference_mode():
        alone = torch.cat([product(x[i:i + 1]) for i in range(16)])
        for m in (2, 3, 4, 5, 16):
            assert torch.equal(torch.cat([product(x[i:i + m]) for i in range(0, 16, m)]), alone), m


@pytest.mark.parametrize("bits", [8, 4])
def test_prefill_rows_run_on_the_kernels(bits):
    """A prefill's rows (more than GEMV_ROWS) go to the int8/int4 kernel in one call, each row the bits it gets
    alone as a decode row, with or without AMX (dequantized tiles through oneDNN's GEMM were close, not equal)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(256, 512, generator=g)
    layer = make_linear(int8_quantize(w, torch.bfloat16) if bits == 8 else int4_quantize(w, 32, torch.bfloat16), 32)
    x = torch.randn(1, 40, 512, generator=g).bfloat16()
    with torch.inference_mode():
        alone = torch.cat([layer(x[:, i:i + 1]) for i in range(x.shape[1])], dim=1)
        together = layer(x)
    assert torch.equal(together, alone)


def test_a_copy_after_a_decode_step_decodes_its_own_weights():
    """`copy.deepcopy` of a model whose native plan is built (quantizing a copy of a loaded model): it raised
    (a DecodePlan cannot be pickled); the copy now builds its own plan, on its own weights."""
    model = qwen35.load(None, dtype="bfloat16", device="cpu").model
    ids = torch.randint(0, 1000, (1, 5), generator=torch.Generator().manual_seed(4))

    def logits(m) -> torch.Tensor:
        cache = make_cache(m.config)
        with torch.inference_mode():
            m(ids, cache)
            return m(ids[:, :1], cache)[0, -1]

    before = logits(model)
    assert model.decode_step.plan  # built: the native step ran
    twin = copy.deepcopy(model)
    assert twin.decode_step.model is twin and twin.decode_step.plan is None
    qwen35.quantize(twin, bits=4, group_size=32)
    native = logits(twin)
    assert torch.equal(logits(model), before) and not torch.equal(native, before)
    twin.decode_layers = twin.run_layers  # the reference: its own layers in Python
    assert torch.equal(native, logits(twin))


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


def test_registered_operators_agree_with_their_fakes():
    """torch.compile traces the kernels through shape-only fakes (`_register_ops`): each must promise the real
    output's shape and dtype (the int4 one counts tiles of 16 rows)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 256, generator=g).bfloat16(), torch.randn(48, 256, generator=g)
    int8 = make_linear(int8_quantize(w, torch.bfloat16), 0)
    int4 = make_linear(int4_quantize(w, 64, torch.bfloat16), 64)
    ops = torch.ops.qwen35
    for op, args in [(ops.linear_bf16, (x, w.bfloat16())), (ops.linear_int8, (x, int8.packed, int8.scales)),
                     (ops.linear_int4, (x, int4.packed, int4.scales, int4.zeros, 64)),
                     (ops.rms_norm, (x, w[0].bfloat16(), 1e-6, 1.0)),
                     (ops.chunk_delta_rule, (x[:2].reshape(1, 2, 8, 32).float(), x[:2].reshape(1, 2, 8, 32).float(),
                                             x[:2].reshape(1, 2, 8, 32), x[:2, :8].float()[None], x[:2, :8].contiguous()[None],
                                             None, 64))]:
        torch.library.opcheck(op, args, test_utils=("test_faketensor",))


def test_deltanet_step_into_a_new_state_buffer_keeps_the_old_one():
    """A verify pass keeps each position's state: the fused step writes the new state to another buffer, with
    the same bits as in place, and leaves the state it read untouched."""
    k = cpu.kernels()
    g = torch.Generator().manual_seed(0)
    b, hk, hv, dk, dv, w = 2, 2, 4, 32, 32, 4
    c = 2 * hk * dk + hv * dv
    qkv, z = (torch.randn(b, n, generator=g).bfloat16() for n in (c, hv * dv))
    beta, a = (torch.randn(b, hv, generator=g).bfloat16() for _ in range(2))
    conv_w, norm_w = torch.randn(c, w, generator=g).bfloat16(), torch.randn(hv * dv, generator=g).bfloat16()
    A_log, dt_bias = torch.randn(hv, generator=g), torch.randn(hv, generator=g)
    conv, state = torch.randn(b, c, w - 1, generator=g).bfloat16(), torch.randn(b, hv, dk, dv, generator=g)
    args = (qkv, z, beta, a)
    weights = (conv_w, A_log, dt_bias)
    before, conv2, fresh = state.clone(), conv.clone(), torch.empty_like(state)
    out_new = k.deltanet_decode(*args, conv2, *weights, state, fresh, norm_w, 1e-6)
    assert torch.equal(state, before)
    out_in_place = k.deltanet_decode(*args, conv, *weights, state, None, norm_w, 1e-6)
    assert torch.equal(out_new, out_in_place) and torch.equal(fresh, state) and torch.equal(conv, conv2)
    assert not torch.equal(state, before)
