"""Optional torch.compile of decode steps: one graph through qwen35's kernels (registered as operators), kept as the
K/V buffers grow, with the same logits as eager (bit-for-bit is not promised: the compiler fuses elementwise ops
and rounds once)."""

from __future__ import annotations

import pytest
import torch

from qwen35.cache import make_cache
from qwen35.runtime.prefill import prefill
from qwen35.loading import load_model

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name, dtype, tol", [("dense-gqa4", "float32", 1e-4), ("dense-gqa4", "bfloat16", 0.1),
                                             ("moe-untied", "bfloat16", 0.1)])
def test_compiled_decode_matches_eager(reference_checkpoint, name, dtype, tol):
    from torch._dynamo.utils import counters

    model = load_model(reference_checkpoint(name)[0], dtype=dtype)
    ids = torch.randint(0, 200, (1, 250), generator=torch.Generator().manual_seed(0))

    def decode(steps: int = 8) -> list[torch.Tensor]:
        with torch.inference_mode():
            cache = make_cache(model.config)
            token, out = prefill(model, ids, cache).argmax(-1, keepdim=True), []
            for _ in range(steps):  # the same tokens both ways: compare logits, not a greedy path; past 256 slots
                out.append(model(token, cache)[:, -1].float())
                token = (token * 7 + 3) % 200
            return out

    eager = decode()
    torch._dynamo.reset()
    counters.clear()
    model.compile_decode()
    graphs = counters["stats"]["unique_graphs"]
    compiled = decode()
    assert counters["stats"]["unique_graphs"] == graphs  # all compiled in compile_decode: no recompiles
    if name.startswith("dense"):  # one graph: the kernels traced; MoE routing (data-dependent) breaks it per layer
        assert graphs == 1 and not counters["graph_break"]
    for a, b in zip(eager, compiled):
        assert (a - b).abs().max().item() <= tol * a.abs().max().item()
