"""Statistics for pairwise and benchmark results; the prompt is the statistical unit everywhere.

Formulas follow the evaluation blueprint: exact sign test on decisive outcomes, Wilson intervals, a prompt-level
(cluster) bootstrap, Bradley–Terry by maximum likelihood with soft labels (ties count as ½), optional style
covariates (arena-hard "style control"), and a normal-approximation power analysis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

ELO_SCALE = 400.0 / math.log(10.0)  # a BT coefficient of 1 nat is 173.7 Elo points


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


def wilson(successes: float, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a proportion (better than Wald near 0 and 1 and for small n)."""
    if n <= 0:
        return Interval(float("nan"), float("nan"))
    z = stats.norm.ppf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes <= 0 else float(centre - half)  # exact ends: the formula leaves rounding dust there
    return Interval(low, 1.0 if successes >= n else float(centre + half))


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial (sign) test of wins vs losses, ties dropped; 1.0 when there is nothing decisive."""
    n = wins + losses
    return 1.0 if n == 0 else float(stats.binomtest(wins, n, 0.5, alternative="two-sided").pvalue)


def bootstrap_mean(scores: Sequence[float], rounds: int = 2000, seed: int = 0,
                   confidence: float = 0.95) -> Interval:
    """Percentile bootstrap interval of the mean, resampling whole prompts (one score per prompt)."""
    x = np.asarray(scores, dtype=float)
    if x.size == 0:
        return Interval(float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(rounds, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(low), float(high))


def required_prompts(decisive_share: float, tie_rate: float = 0.0, power: float = 0.8, alpha: float = 0.05) -> int:
    """Prompts needed for a two-sided sign test at `alpha` to detect a true decisive win share with `power`.

    Normal approximation: n_decisive = ((z_{α/2}·½ + z_β·√(p(1−p))) / (p − ½))², then divided by (1 − ties).
    """
    if not 0 < decisive_share < 1 or decisive_share == 0.5:
        raise ValueError(f"decisive_share={decisive_share} must be in (0, 1) and not 0.5 (no effect to detect)")
    if not 0 <= tie_rate < 1:
        raise ValueError(f"tie_rate={tie_rate} must be in [0, 1)")
    p = decisive_share
    z_a, z_b = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    n_decisive = ((z_a * 0.5 + z_b * math.sqrt(p * (1 - p))) / (p - 0.5)) ** 2
    return math.ceil(n_decisive / (1 - tie_rate))


def exact_power(n_prompts: int, decisive_share: float, tie_rate: float = 0.0, alpha: float = 0.05) -> float:
    """Power of the exact two-sided sign test with `n_prompts` prompts (expected number of decisive ones)."""
    n = round(n_prompts * (1 - tie_rate))
    k = np.arange(n + 1)
    rejecting = k[2 * stats.binom.sf(k - 1, n, 0.5) <= alpha]
    if rejecting.size == 0:  # too few decisive prompts for any result to reach alpha (e.g. 3 of 3 won: p = 0.25)
        return 0.0
    critical = int(rejecting.min())  # reject when wins >= critical
    return float(stats.binom.sf(critical - 1, n, decisive_share) + stats.binom.cdf(n - critical, n, decisive_share))


def equivalence_p(scores: Sequence[float], margin: float = 0.05) -> float:
    """TOST p-value that the mean per-prompt score lies within 0.5 ± margin ("as good as"), CLT standard error.
    Small p supports equivalence; a large p means "as good as" is not shown at this margin."""
    x = np.asarray(scores, dtype=float)
    if x.size < 2:
        return float("nan")
    mean, se = float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))
    if se == 0:
        return 0.0 if abs(mean - 0.5) < margin else 1.0
    low, high = (mean - (0.5 - margin)) / se, ((0.5 + margin) - mean) / se
    return float(max(stats.norm.sf(low), stats.norm.sf(high)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (for per-category tests: several looks at the same data)."""
    order = np.argsort(p_values)
    m, adjusted, running = len(p_values), [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's kappa between two raters' labels on the same items (1 = perfect, 0 = chance agreement)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"kappa needs two equally long, non-empty label lists (got {len(a)} and {len(b)})")
    labels = sorted(set(a) | set(b))
    idx = {label: i for i, label in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)))
    for x, y in zip(a, b):
        m[idx[x], idx[y]] += 1
    m /= m.sum()
    observed, expected = np.trace(m), float(m.sum(1) @ m.sum(0))
    return 1.0 if expected == 1 else float((observed - expected) / (1 - expected))


@dataclass(frozen=True)
class Battle:
    """One prompt's result between two models: `score` is model_a's share in [0, 1] (½ = tie)."""

    prompt_id: str
    model_a: str
    model_b: str
    score: float
    features: tuple[float, ...] = ()  # style differences (a − b) / (a + b), e.g. length, markdown


def bradley_terry(battles: Sequence[Battle], models: Sequence[str], style: bool = False,
                  l2: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood BT coefficients (natural-log scale, mean 0) and style coefficients.

    Soft labels: a tie contributes ½ to each side. With `style`, the battles' feature differences enter as
    covariates, so the model coefficients are ratings with length/markdown effects held at zero.
    """
    idx = {m: i for i, m in enumerate(models)}
    k, f = len(models), (len(battles[0].features) if style and battles else 0)
    x = np.zeros((len(battles), k + f))
    y = np.array([b.score for b in battles], dtype=float)
    for row, b in enumerate(battles):
        x[row, idx[b.model_a]] += 1
        x[row, idx[b.model_b]] -= 1
        if f:
            x[row, k:] = b.features

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = x @ w
        nll = np.sum(np.logaddexp(0, z) - y * z) + l2 * w @ w
        grad = x.T @ (1 / (1 + np.exp(-z)) - y) + 2 * l2 * w
        return float(nll), grad

    w = optimize.minimize(loss, np.zeros(k + f), jac=True, method="L-BFGS-B").x
    ratings = w[:k] - w[:k].mean()
    return ratings, w[k:]


def bt_bootstrap(battles: Sequence[Battle], models: Sequence[str], style: bool = False, rounds: int = 200,
                 seed: int = 0, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BT ratings on the Elo scale (mean 1000) with a bootstrap interval that resamples prompts, not battles."""
    by_prompt: dict[str, list[Battle]] = {}
    for b in battles:
        by_prompt.setdefault(b.prompt_id, []).append(b)
    groups = list(by_prompt.values())
    point = 1000 + ELO_SCALE * bradley_terry(battles, models, style)[0]
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(rounds):
        pick = rng.integers(0, len(groups), size=len(groups))
        samples.append(1000 + ELO_SCALE * bradley_terry([b for i in pick for b in groups[i]], models, style)[0])
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(np.array(samples), [tail, 100 - tail], axis=0)
    return point, low, high


@dataclass(frozen=True)
class Summary:
    """Head-to-head figures for one model against another from per-prompt scores (the first model's view)."""

    wins: int
    losses: int
    ties: int
    win_rate: float  # ties counted as half
    win_rate_ci: Interval  # prompt bootstrap
    decisive_share: float
    decisive_ci: Interval  # Wilson
    sign_p: float
    prompts_for_80_power: int | None

    @property
    def n(self) -> int:
        return self.wins + self.losses + self.ties


def summarize(scores: Sequence[float], rounds: int = 2000, seed: int = 0) -> Summary:
    """Counts (score > ½ win, < ½ loss, = ½ tie), win rate with ties as ½, intervals, sign test, power."""
    w = sum(s > 0.5 for s in scores)
    lo = sum(s < 0.5 for s in scores)
    t = len(scores) - w - lo
    return summary_from_counts(w, lo, t, float(np.mean(scores)) if scores else float("nan"),
                               bootstrap_mean(scores, rounds, seed))


def summary_from_counts(wins: int, losses: int, ties: int, win_rate: float | None = None,
                        win_rate_ci: Interval | None = None) -> Summary:
    """The same figures from W/L/T counts alone (CLT interval on the ties-as-½ score when none is given)."""
    n = wins + losses + ties
    if win_rate is None:
        s = np.array([1.0] * wins + [0.0] * losses + [0.5] * ties)
        win_rate = float(s.mean())
        half = float(stats.norm.ppf(0.975) * s.std(ddof=1) / math.sqrt(n))
        win_rate_ci = Interval(max(0.0, win_rate - half), min(1.0, win_rate + half))  # a rate stays in [0, 1]
    decisive = wins + losses
    share = wins / decisive if decisive else float("nan")
    needed = None
    if decisive and 0 < share < 1 and share != 0.5:
        needed = required_prompts(share, ties / n if n else 0.0)
    return Summary(wins, losses, ties, win_rate, win_rate_ci or Interval(float("nan"), float("nan")), share,
                   wilson(wins, decisive), sign_test(wins, losses), needed)
