"""Parity with the reference implementation (transformers 5.23.0) on tiny random configs, fp32."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_CONFIGS, VOCAB
from qwen35.runtime import generate_tokens
from qwen35.loading import load_model
from qwen35.sampling import SamplingParams

pytest.importorskip("transformers")
TOL = 1e-4


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_reference(reference_checkpoint, name):
    path, ref = reference_checkpoint(name)
    ours = load_model(path, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 150), generator=torch.Generator().manual_seed(1))  # > 2 chunks of 64
    with torch.no_grad():
        expected = ref(input_ids=ids).logits.float()
        got = ours(ids).float()
    err = (got - expected).abs().max().item()
    print(f"{name}: max |dlogit| = {err:.2e} (logit scale {expected.abs().max().item():.1f})")
    assert err <= TOL


def test_text_only_layout_matches_reference(reference_checkpoint):
    """A checkpoint saved as Qwen3_5ForCausalLM (`model.*` names, text config) loads too."""
    path, ref = reference_checkpoint("dense-untied-mha", causal_lm=True)
    ours = load_model(path, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, 70), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = (ours(ids) - ref(input_ids=ids).logits).abs().max().item()
    assert err <= TOL


@pytest.mark.parametrize("name", ["dense-tied", "moe-untied"])
def test_greedy_tokens_match_reference_generate(reference_checkpoint, name):
    path, ref = reference_checkpoint(name)
    ours = load_model(path, dtype=torch.float32)
    prompt = torch.randint(0, VOCAB, (1, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)[0, 23:].tolist()
    got = list(generate_tokens(ours, prompt[0].tolist(), SamplingParams(temperature=0, max_tokens=64)))
    assert len(expected) == 64
    assert got == expected
