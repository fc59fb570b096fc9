"""GPU paths (run only where CUDA exists): the same logits and greedy tokens as on the CPU."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB
from qwen35.runtime import generate_tokens
from qwen35.loading import load_model
from qwen35.sampling import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("name", ["dense-tied", "moe-untied"])
def test_cuda_matches_cpu(reference_checkpoint, name):
    path = reference_checkpoint(name)[0]
    cpu, gpu = load_model(path, dtype=torch.float32), load_model(path, dtype=torch.float32, device="cuda")
    ids = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (gpu(ids.cuda()).cpu() - cpu(ids)).abs().max().item()
    assert err <= 1e-3
    params = SamplingParams(temperature=0, max_tokens=32)
    assert list(generate_tokens(gpu, ids[0, :20].tolist(), params)) == list(generate_tokens(cpu, ids[0, :20].tolist(), params))
