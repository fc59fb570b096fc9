"""Arena statistics against known values: the published 499/431/70 re-analysis, Wilson, BT, kappa, tie rules."""

from __future__ import annotations

import numpy as np
import pytest

from qwen35.eval.analysis import prompt_score, style_features
from qwen35.eval.stats import (Battle, bootstrap_mean, bradley_terry, bt_bootstrap, cohen_kappa, equivalence_p,
                               exact_power, holm, required_prompts, sign_test, summarize, summary_from_counts,
                               wilson)


def test_published_counts_reproduce_the_reanalysis():
    s = summary_from_counts(499, 431, 70)
    assert round(s.sign_p, 3) == 0.028  # exact two-sided sign test, ties dropped (evaluation.md §1.2: 0.0280)
    assert s.sign_p == pytest.approx(0.02797, abs=5e-5)
    assert round(100 * s.win_rate, 1) == 53.4  # ties counted as half
    assert (round(100 * s.win_rate_ci.low, 1), round(100 * s.win_rate_ci.high, 1)) == (50.4, 56.4)
    assert round(100 * s.decisive_share, 2) == 53.66
    assert (round(100 * s.decisive_ci.low, 1), round(100 * s.decisive_ci.high, 1)) == (50.4, 56.8)  # Wilson
    assert abs(s.prompts_for_80_power - 1580) <= 10  # "≈1,580 prompts for 80 % power" (7 % ties)
    assert abs(required_prompts(499 / 930, 0.07, power=0.9) - 2110) <= 10
    assert exact_power(1000, 499 / 930, 0.07) == pytest.approx(0.59, abs=0.01)  # table: N = 1,000 -> 0.59
    assert exact_power(2000, 499 / 930, 0.07) == pytest.approx(0.88, abs=0.01)
    scores = [1.0] * 499 + [0.0] * 431 + [0.5] * 70  # "as good as" is not shown at ±5 pp, it is at ±10 pp
    assert equivalence_p(scores, 0.05) == pytest.approx(0.15, abs=0.01) and equivalence_p(scores, 0.10) < 1e-5


def test_prompt_bootstrap_matches_the_published_interval():
    scores = [1.0] * 499 + [0.0] * 431 + [0.5] * 70
    ci = bootstrap_mean(scores, rounds=4000, seed=1)
    assert ci.low == pytest.approx(0.5045, abs=0.002) and ci.high == pytest.approx(0.5635, abs=0.002)
    s = summarize(scores, rounds=500)
    assert (s.wins, s.losses, s.ties) == (499, 431, 70)


def test_wilson_and_sign_test_known_values():
    ci = wilson(8, 10)  # textbook value: [0.490, 0.943]
    assert (round(ci.low, 3), round(ci.high, 3)) == (0.490, 0.943)
    assert wilson(0, 10).low == pytest.approx(0.0, abs=1e-12)
    assert sign_test(9, 0) == pytest.approx(2 / 2 ** 9)
    assert sign_test(0, 0) == 1.0
    with pytest.raises(ValueError, match="not 0.5"):
        required_prompts(0.5)


def test_holm_adjustment_known_values():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_cohen_kappa_known_value():
    # 2x2 table [[20, 5], [10, 15]]: po = 0.7, pe = 0.5 -> kappa = 0.4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == 1.0
    with pytest.raises(ValueError, match="equally long"):
        cohen_kappa(a, b[:-1])


def _simulated_battles(strength: dict[str, float], per_pair: int, seed: int):
    rng = np.random.default_rng(seed)
    names, out = list(strength), []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for k in range(per_pair):
                la, lb = rng.uniform(100, 2000, size=2)
                f = (la - lb) / (la + lb)
                p = 1 / (1 + np.exp(-(strength[a] - strength[b])))
                out.append(Battle(f"{a}{b}{k}", a, b, float(rng.random() < p), (f,)))
    return out


def test_bradley_terry_recovers_known_strengths_with_prompt_bootstrap_intervals():
    truth = {"x": 0.8, "y": 0.0, "z": -0.8}
    fights = _simulated_battles(truth, 600, seed=0)
    ratings, _ = bradley_terry(fights, list(truth))
    assert ratings == pytest.approx(np.array(list(truth.values())), abs=0.12)
    point, low, high = bt_bootstrap(fights, list(truth), rounds=30)
    assert np.all(low < point) and np.all(point < high)
    assert point[0] > point[1] > point[2]


def test_style_control_removes_a_pure_length_preference():
    # equal models; "long" always writes the longer answer and the judge only rewards length
    rng = np.random.default_rng(2)
    fights = []
    for k in range(3000):
        f = float(rng.uniform(0.05, 0.9))
        a, b, f = ("long", "short", f) if k % 2 else ("short", "long", -f)
        fights.append(Battle(str(k), a, b, float(rng.random() < 1 / (1 + np.exp(-3.0 * f))), (f,)))
    plain, _ = bradley_terry(fights, ["short", "long"])
    styled, coef = bradley_terry(fights, ["short", "long"], style=True)
    assert plain[1] - plain[0] > 0.5  # without control the longer model looks much better
    assert abs(styled[1] - styled[0]) < 0.25  # with the length covariate the gap is gone
    assert coef[0] == pytest.approx(3.0, abs=0.6)


def test_tie_rules():
    assert prompt_score("A>B", "A>>B", "average") == 1.0
    assert prompt_score("A>B", "B>A", "average") == 0.5
    assert prompt_score("A>B", "A=B", "average") == 0.75
    assert prompt_score("A>B", "A=B", "consistent") == 0.5  # inconsistent -> tie
    assert prompt_score("A>>B", "A>B", "consistent") == 1.0
    # a slight win by a much longer answer is a tie; a strong win is kept
    assert prompt_score("A>B", "A>B", "length", 2000, 100, k=500) == 0.5
    assert prompt_score("A>>B", "A>B", "length", 2000, 100, k=500) == 0.75
    assert prompt_score("B>A", "B>A", "length", 2000, 100, k=500) == 0.0  # the shorter one won: no change
    with pytest.raises(ValueError, match="unknown tie rule"):
        prompt_score("A>B", "A>B", "coin")


def test_style_features_count_length_and_markdown_without_code():
    a = "# Title\n\n- one\n- two\n\n**bold** text\n```\n# not a header\n```"
    b = "plain text"
    f = style_features(a, b)
    assert f[1:] == (1.0, 1.0, 1.0) and 0 < f[0] < 1
    assert style_features(b, b) == (0.0, 0.0, 0.0, 0.0)
