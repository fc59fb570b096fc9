"""Long context at small scale: the memory planner against what is really allocated, K/V reserved to the context
up front, prompts over the context refused with the numbers, and 8-bit K/V (blocked attention against its
reference, the whole runtime on it: prefix snapshots, batches, the server)."""

from __future__ import annotations

import httpx
import pytest
import torch
import torch.nn.functional as F

import qwen35
from qwen35.cache import KVCache, quantize_kv
from qwen35.memory import kv_bytes_per_token, plan, state_bytes, weight_bytes
from qwen35.ops.attention import attention_8bit
from qwen35.ops.cpu import kernels
from qwen35.quant.quantize import QuantConfig
from qwen35.runtime import Engine, Request, Scheduler
from qwen35.sampling import SamplingParams
from qwen35.server import ServerSettings
from test_server import MODEL, running_server

USER = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def nano8():
    return qwen35.load(None, dtype="float32", device="cpu", kv_bits=8, cache_ram=0.1)


def _bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_planned_weights_are_the_loaded_bytes(default_model, tmp_path):
    assert weight_bytes(default_model.config, 4) == _bytes(default_model.model)
    from qwen35.quant import QuantConfig as Q, quantize_checkpoint

    out = quantize_checkpoint(default_model.path, tmp_path / "int4", Q(4, 32, 8))
    loaded = qwen35.load(out, dtype="bfloat16", cache_ram=0)
    planned = weight_bytes(loaded.config, 2, QuantConfig(4, 32, 8))
    assert abs(planned - _bytes(loaded.model)) <= 0.01 * planned


@pytest.mark.parametrize("kv_bits", [16, 8])
def test_planned_kv_and_state_are_the_cache_bytes(default_model, kv_bits):
    config, n = default_model.config, 300
    engine = Engine(default_model.model, scheduler=Scheduler(max_running=1, prefill_chunk=512), context=1000,
                    kv_bits=kv_bits)
    engine.add(Request("a", list(range(5, 5 + n)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)))
    engine.step(), engine.step()  # the prompt, then a decode step in the batch it joined
    cache = engine.batch
    kv = sum(layer.nbytes() for layer in cache.layers if isinstance(layer, KVCache))
    per_token = kv_bytes_per_token(config, 16) * 2 if kv_bits == 16 else kv_bytes_per_token(config, 8)  # fp32 model
    assert kv == cache.length * per_token
    assert cache.nbytes() - kv == state_bytes(config, 4)
    assert plan(config, 1000, kv_bits=kv_bits).kv == 1001 * kv_bytes_per_token(config, kv_bits)


def test_kv_is_reserved_to_the_context_up_front_and_never_moves(default_model):
    engine = Engine(default_model.model, scheduler=Scheduler(max_running=1, prefill_chunk=512), context=700)
    engine.add(Request("a", list(range(5, 505)), SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)))
    engine.step(), engine.step()  # the prompt, then a decode step in the batch it joined
    layers = [layer for layer in engine.batch.layers if isinstance(layer, KVCache)]
    assert all(layer.k.shape[2] == 701 for layer in layers)
    pointers = [layer.k.data_ptr() for layer in layers]
    for _ in range(30):  # past 512 tokens, where doubling would have moved the buffers
        engine.step()
    assert [layer.k.data_ptr() for layer in engine.batch.layers if isinstance(layer, KVCache)] == pointers


@pytest.mark.parametrize("bits", [16, 8])
def test_kv_buffers_of_a_long_context_sit_on_2mb_pages_and_keep_their_slots(bits):
    """K and V grown for a planned context start on a 2 MB boundary (allocated for huge pages: decode streams
    them whole); the 8-bit scales stay ordinary; what was filled before the growth is kept exactly."""
    layer = KVCache(bits=bits, capacity=8193)
    k, v = (torch.randn(1, 2, 100, 256, dtype=torch.bfloat16) for _ in range(2))
    layer.update(k, v)
    first = [t[:, :, :100].clone() for t in layer.tensors()]
    layer.reserve(9000, layer.k)  # past the capacity: grown again, the history copied
    assert layer.k.shape[2] == 9101 and layer.length == 100
    assert all(a.equal(b) for a, b in zip(first, layer.tensors()))
    if kernels() is not None:
        assert all(t.data_ptr() % (2 << 20) == 0 for t in (layer.k, layer.v))
    if bits == 8:
        assert layer.k_scale.shape == (1, 2, 9101, 1)


def test_a_prompt_over_the_context_is_refused_with_the_numbers(default_model):
    small = qwen35.load(None, dtype="float32", context=64, cache_ram=0)
    assert small.context == 64 and small.context_note == ""
    long = [{"role": "user", "content": "word " * 200}]
    with pytest.raises(ValueError, match=r"the prompt has \d+ tokens; this model's context is 64 tokens"):
        small.chat(long, max_tokens=4)
    with running_server(ServerSettings(model_name=MODEL), lambda: small) as (url, _):
        r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": long, "max_tokens": 4})
        assert r.status_code == 400 and "context is 64 tokens" in r.json()["error"]["message"]
    with pytest.raises(ValueError, match="context=1 is invalid"):
        qwen35.load(None, dtype="float32", context=1)


@pytest.mark.parametrize("shape", [(1, 8, 2, 1, 5000, 32), (2, 4, 2, 7, 7, 16), (1, 4, 1, 16, 9000, 16),
                                   (1, 8, 2, 600, 2600, 16)])
@pytest.mark.parametrize("given", [True, False])
def test_blocked_8bit_attention_equals_its_reference(shape, given):
    """With a mask, and without one: causal, the queries being the last T keys (a chunk after a history)."""
    b, hq, hkv, t, s, d = shape
    torch.manual_seed(0)
    q, k, v = torch.randn(b, hq, t, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    causal = torch.ones(t, s, dtype=torch.bool).tril(s - t).expand(b, 1, t, s)
    mask = torch.rand(b, 1, t, s) > 0.1 if given else None
    full = mask if given else causal
    qk, qv = quantize_kv(k), quantize_kv(v)
    ref = F.scaled_dot_product_attention(q, qk.dequantize(), qv.dequantize(), attn_mask=full, enable_gqa=True)
    assert (attention_8bit(q, qk, qv, mask, block=1000) - ref).abs().max() < 1e-5
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=full, enable_gqa=True)
    assert (ref - exact).abs().max() < 0.05  # what int8 rounding costs on random data


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,s", [(40, 40), (30, 300), (1, 1)])
def test_a_prefill_chunk_over_8bit_kv_matches_the_reference(monkeypatch, dtype, t, s):
    """A chunk's attention over 8-bit K/V without a mask (causal, the queries the last T keys): flash passes over
    blocks dequantized one at a time, merged by log-sum-exp, equal the blocked fp32 path and SDPA on the
    dequantized history."""
    from qwen35.ops import attention as attn

    monkeypatch.setattr(attn, "KV_BLOCK", 64)  # several blocks
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, t, 32, generator=g).to(dtype)
    qk, qv = (quantize_kv(torch.randn(1, 2, s, 32, generator=g)) for _ in range(2))
    mask = torch.ones(t, s, dtype=torch.bool).tril(s - t)
    ref = F.scaled_dot_product_attention(q.float(), qk.dequantize(), qv.dequantize(), attn_mask=mask,
                                         enable_gqa=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    out = attn.attention(q, qk, qv, None)
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max() < tol
    assert (attn.attention_8bit(q, qk, qv, None).float() - ref).abs().max() < tol


def test_8bit_kv_through_the_runtime(default_model, nano8):
    """The same greedy reply as 16-bit K/V here, a second turn resumed from an 8-bit snapshot, and a batch."""
    a = nano8.chat(USER, temperature=0, max_tokens=24)
    assert a.text == default_model.chat(USER, temperature=0, max_tokens=24).text
    again = nano8.chat(USER + [{"role": "assistant", "content": a.text}, {"role": "user", "content": "More."}],
                       temperature=0, max_tokens=8)
    assert again.cached_tokens > 0
    with running_server(ServerSettings(model_name=MODEL), lambda: nano8) as (url, _):
        import concurrent.futures as cf

        body = {"model": MODEL, "messages": USER, "max_tokens": 24, "temperature": 0}
        with cf.ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda _: httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
                                  ["choices"][0]["message"]["content"], range(4)))
    assert texts == [a.text] * 4


def test_info_prints_the_plan(in_process):
    out = in_process("info", "--context", "2048", "--kv-bits", "8", "--bits", "4")
    assert out.returncode == 0 and "memory at 2,048 tokens" in out.stdout and "total" in out.stdout


def test_long_prompt_prefill_reports_progress(default_model):
    from qwen35.cli.chat import PromptProgress

    seen = []
    long = [{"role": "user", "content": "word " * 1500}]
    reply = default_model.chat(long, max_tokens=2, progress=lambda done, total: seen.append((done, total)))
    total = reply.prompt_tokens
    assert len(seen) >= 2 and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    shown = PromptProgress()
    shown(512, 4096)
    assert str(shown.line()) == "reading the prompt: 512 / 4,096 tokens"
    shown(4096, 4096)
    assert shown.line() is None
