"""Sampler: greedy, truncations, penalties, seeds, option validation, checkpoint defaults."""

from __future__ import annotations

import json

import pytest
import torch

from qwen35.sampling import SamplingParams, apply_penalties, sample

EMPTY = torch.tensor([], dtype=torch.long)


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample(logits, EMPTY, SamplingParams(temperature=0)) == 1


def test_top_k_one_is_greedy_at_any_temperature():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    for seed in range(5):
        assert sample(logits, EMPTY, SamplingParams(temperature=2.0, top_k=1, seed=seed),
                      torch.Generator().manual_seed(seed)) == int(logits.argmax())


def _draws(logits, params, n=400):
    g = torch.Generator().manual_seed(0)
    return {sample(logits, EMPTY, params, g) for _ in range(n)}


def test_top_k_top_p_min_p_restrict_the_support():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert _draws(logits, SamplingParams(top_k=2)) == {0, 1}
    assert _draws(logits, SamplingParams(top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert _draws(logits, SamplingParams(top_p=0.5)) == {0}
    assert _draws(logits, SamplingParams(min_p=0.25)) == {0, 1, 2}  # 0.15 >= 0.125, 0.05 < 0.125
    assert _draws(logits, SamplingParams()) == {0, 1, 2, 3}


def test_same_seed_same_draws():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    a = [sample(logits, EMPTY, SamplingParams(), torch.Generator().manual_seed(7)) for _ in range(3)]
    b = [sample(logits, EMPTY, SamplingParams(), torch.Generator().manual_seed(7)) for _ in range(3)]
    assert a == b


def test_penalties_follow_openai_and_hf_definitions():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.0])
    generated = torch.tensor([0, 0, 1])
    out = apply_penalties(logits, generated, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    torch.testing.assert_close(out, torch.tensor([2.0 - 0.5 - 0.5, -2.0 - 0.5 - 0.25, 1.0, 0.0]))
    out = apply_penalties(logits, generated, SamplingParams(repetition_penalty=2.0))
    torch.testing.assert_close(out, torch.tensor([1.0, -4.0, 1.0, 0.0]))


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1),
                                 dict(top_k=-1), dict(max_tokens=0), dict(presence_penalty=3),
                                 dict(repetition_penalty=0), dict(temperature=float("nan"))])
def test_invalid_options_are_named(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"sampling option {name}="):
        SamplingParams(**bad)


def test_updated_rejects_unknown_options_and_ignores_none():
    p = SamplingParams().updated(temperature=None, top_k=5, stop="###")
    assert p.top_k == 5 and p.temperature == 1.0 and p.stop == ("###",)
    with pytest.raises(ValueError, match="unknown sampling option.*'tempreature'"):
        SamplingParams().updated(tempreature=0.5)


def test_defaults_from_generation_config(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "eos_token_id": [1, 2]}))
    p = SamplingParams.from_generation_config(tmp_path)
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.95, 20)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert SamplingParams.from_generation_config(tmp_path).temperature == 0
    assert SamplingParams.from_generation_config(tmp_path / "none") == SamplingParams()
