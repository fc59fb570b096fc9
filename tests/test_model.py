"""Model-level invariants: cached chunked prefill + decode == full forward; a padded batch == each prompt alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import TINY_CONFIGS, VOCAB
from qwen35.cache import DeltaCache, KVCache, make_cache
from qwen35.runtime.prefill import prefill_chunk_size
from qwen35.loading import load_model

TOL = 1e-4


@pytest.fixture(scope="module", params=["dense-tied", "moe-untied"])
def model(request, reference_checkpoint):
    return load_model(reference_checkpoint(request.param)[0], dtype=torch.float32)


def test_cache_is_built_from_layer_pattern(model):
    cache = make_cache(model.config, batch_size=3)
    kinds = ["kv" if isinstance(c, KVCache) else "delta" for c in cache.layers]
    assert kinds == ["kv" if t == "full_attention" else "delta" for t in model.config.layer_types]
    assert isinstance(cache.layers[0], DeltaCache) and cache.seen.tolist() == [0, 0, 0]


@pytest.mark.parametrize("chunks", [[150], [1, 63, 86], [64, 64, 22], [7] * 21 + [3]])
@torch.no_grad()
def test_chunked_prefill_then_decode_equals_full_forward(model, chunks):
    ids = torch.randint(0, VOCAB, (1, 170), generator=torch.Generator().manual_seed(0))
    full = model(ids)
    cache, out, pos = make_cache(model.config), [], 0
    for n in chunks:  # prefill in pieces of any size ...
        out.append(model(ids[:, pos:pos + n], cache))
        pos += n
    while pos < ids.shape[1]:  # ... then one token at a time
        out.append(model(ids[:, pos:pos + 1], cache))
        pos += 1
    assert (torch.cat(out, 1) - full).abs().max().item() <= TOL
    assert cache.seen.tolist() == [170] and cache.length == 170
    assert cache.nbytes() > 0


@torch.no_grad()
def test_left_padded_batch_equals_each_prompt_alone(model):
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (5, 90, 41)]
    steps = torch.randint(0, VOCAB, (3, 4), generator=gen)  # the same continuation tokens per row
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    cache = make_cache(model.config, batch_size=3)
    batch_prefill = model(ids, cache, attention_mask=mask)
    batch_steps = [model(steps[:, j:j + 1], cache) for j in range(steps.shape[1])]
    assert cache.seen.tolist() == [len(p) + 4 for p in prompts]
    for i, p in enumerate(prompts):
        alone_cache = make_cache(model.config)
        alone = model(p[None], alone_cache)
        assert (batch_prefill[i, width - len(p):] - alone[0]).abs().max().item() <= TOL
        for j in range(steps.shape[1]):
            step = model(steps[i:i + 1, j:j + 1], alone_cache)
            assert (batch_steps[j][i] - step[0]).abs().max().item() <= TOL
        assert torch.isfinite(batch_prefill[i]).all()  # pad rows stay finite too


@torch.no_grad()
def test_bfloat16_tracks_float32(reference_checkpoint):
    path = reference_checkpoint("dense-tied")[0]
    ids = torch.randint(0, VOCAB, (1, 100), generator=torch.Generator().manual_seed(2))
    f32 = load_model(path, dtype=torch.float32)(ids)
    bf16 = load_model(path, dtype="bfloat16")(ids).float()
    assert (bf16 - f32).abs().mean().item() < 0.05  # bf16 keeps ~3 significant digits per op
    assert (bf16.argmax(-1) == f32.argmax(-1)).float().mean() > 0.9


def test_last_only_returns_final_position(model):
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, last_only=True)[:, 0], model(ids)[:, -1])


@pytest.mark.parametrize("hidden, chunk", [(64, 512), (1024, 512), (2048, 512), (2560, 256), (4096, 256)])
def test_prefill_chunk_follows_the_width(hidden, chunk):
    """512 prompt tokens per forward for 0.8B/2B widths, 256 from the 4B's 2560 up (bounded activation memory)."""
    assert prefill_chunk_size(SimpleNamespace(hidden_size=hidden)) == chunk


def test_configs_cover_tied_untied_and_moe():
    kinds = {(("num_experts" in c), c["tie_word_embeddings"]) for c in TINY_CONFIGS.values()}
    assert {(False, True), (False, False), (True, False)} <= kinds
