"""From judged games to figures: per-prompt scores under three tie rules, summaries, position-bias checks,
judge agreement, style features and Bradley–Terry ratings. The prompt is the unit: its two games make one score.

Tie rules (evaluation blueprint §7): "average" (the mean of the two games; primary), "consistent" (a win only
when both orders agree, else a tie; FastChat), "length" (a slight win becomes a tie when the winner is more than
K characters longer; WildBench), then averaged.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qwen35.eval.judge import SCORE, swap
from qwen35.eval.runner import ArenaRun, Game
from qwen35.eval.stats import Battle, Summary, bradley_terry, bt_bootstrap, cohen_kappa, holm, summarize

TIE_RULES = ("average", "consistent", "length")


def first_view(g: Game) -> str:
    """The game's label from the first model's side ("A" is always the first model)."""
    return g.label if g.game == 1 else swap(g.label)


def prompt_score(l1: str, l2: str, rule: str, len_first: int = 0, len_second: int = 0, k: int = 500) -> float:
    """The first model's per-prompt share from its two games' labels (both already from its side)."""
    if rule == "consistent":
        s1, s2 = SCORE[l1], SCORE[l2]
        return s1 if s1 == s2 else 0.5
    if rule == "length":
        l1, l2 = (_length_tie(label, len_first, len_second, k) for label in (l1, l2))
    elif rule != "average":
        raise ValueError(f"unknown tie rule {rule!r}; choose from {TIE_RULES}")
    return (SCORE[l1] + SCORE[l2]) / 2


def _length_tie(label: str, len_first: int, len_second: int, k: int) -> str:
    if label == "A>B" and len_first - len_second > k or label == "B>A" and len_second - len_first > k:
        return "A=B"
    return label


_MD = {"headers": re.compile(r"^#{1,6} ", re.M), "lists": re.compile(r"^\s*(?:[-*+] |\d+\. )", re.M),
       "bold": re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")}


def style_counts(text: str) -> tuple[int, int, int, int]:
    """(characters, headers, list items, bold spans), code blocks removed first (as arena-hard does)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return (len(text), *(len(p.findall(text)) for p in _MD.values()))


def style_features(a: str, b: str) -> tuple[float, ...]:
    """Normalised differences (a − b) / (a + b) of length and markdown counts, each in [−1, 1]."""
    return tuple((x - y) / (x + y) if x + y else 0.0 for x, y in zip(style_counts(a), style_counts(b)))


@dataclass
class PairResult:
    """One judge's view of one pair: summaries per tie rule, diagnostics, the per-prompt scores."""

    first: str
    second: str
    judge: str
    summaries: dict[str, Summary]
    scores: dict[str, float]  # prompt id -> score under the primary rule
    errors: int  # games that are error records (failed or unparsable)
    incomplete_prompts: int  # prompts without two valid games (left out of the scores, counted here)
    consistency: float  # share of complete prompts whose two games agree (3-way)
    first_slot_win_rate: float  # share of decisive games won by whoever sat in slot A
    tie_rate_by_game: tuple[float, float]


@dataclass
class ArenaAnalysis:
    pairs: list[PairResult]
    ratings: dict[str, dict[str, Any]] = field(default_factory=dict)  # "plain" / "style" -> name -> (r, lo, hi)
    style_coefficients: list[float] = field(default_factory=list)
    kappa: float | None = None
    kappa_games: int = 0
    truncated: dict[str, int] = field(default_factory=dict)
    answer_errors: dict[str, int] = field(default_factory=dict)
    lengths: dict[str, list[int]] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)  # median seconds per answer
    server_models: dict[str, str] = field(default_factory=dict)  # model strings the endpoints returned


def _three_way(label: str) -> str:
    return {1.0: "win", 0.5: "tie", 0.0: "loss"}[SCORE[label]]


def analyse_pair(run: ArenaRun, first: str, second: str, judge: str, k: int = 500, rounds: int = 2000,
                 seed: int = 0) -> PairResult:
    games: dict[str, dict[int, Game]] = defaultdict(dict)
    errors = 0
    for g in run.games:
        if (g.first, g.second, g.judge) == (first, second, judge):
            games[g.prompt_id][g.game] = g
            errors += g.error is not None
    per_rule: dict[str, dict[str, float]] = {r: {} for r in TIE_RULES}
    agree, slot_a_wins, decisive, ties = 0, 0, 0, [0, 0]
    for pid, pair in games.items():
        if any(pair.get(n) is None or pair[n].label is None for n in (1, 2)):
            continue
        l1, l2 = first_view(pair[1]), first_view(pair[2])
        la, lb = len(run.answers[(first, pid)].text), len(run.answers[(second, pid)].text)
        for rule in TIE_RULES:
            per_rule[rule][pid] = prompt_score(l1, l2, rule, la, lb, k)
        agree += _three_way(l1) == _three_way(l2)
        for n in (1, 2):
            s = SCORE[pair[n].label]
            ties[n - 1] += s == 0.5
            if s != 0.5:
                decisive += 1
                slot_a_wins += s == 1.0
    complete = len(per_rule["average"])
    summaries = {r: summarize(list(v.values()), rounds, seed) for r, v in per_rule.items()}
    return PairResult(first, second, judge, summaries, per_rule["average"], errors,
                      len({p.id for p in run.prompts}) - complete, agree / complete if complete else float("nan"),
                      slot_a_wins / decisive if decisive else float("nan"),
                      (ties[0] / complete, ties[1] / complete) if complete else (float("nan"), float("nan")))


def battles(run: ArenaRun, results: list[PairResult]) -> list[Battle]:
    out = []
    for r in results:
        for pid, score in r.scores.items():
            a, b = run.answers[(r.first, pid)].text, run.answers[(r.second, pid)].text
            out.append(Battle(pid, r.first, r.second, score, style_features(a, b)))
    return out


def judge_agreement(run: ArenaRun) -> tuple[float | None, int]:
    """Cohen's kappa of the first two judges over the games both parsed (3-way labels)."""
    if len(run.judges) < 2:
        return None, 0
    j1, j2 = run.judges[0].name, run.judges[1].name
    index = {(g.judge, g.first, g.second, g.prompt_id, g.game): g.label for g in run.games if g.label}
    a, b = [], []
    for (judge, *rest), label in index.items():
        other = index.get((j2, *rest))
        if judge == j1 and other is not None:
            a.append(_three_way(label))
            b.append(_three_way(other))
    return (cohen_kappa(a, b) if a else None), len(a)


def analyse(run: ArenaRun, k: int = 500, rounds: int = 2000, bt_rounds: int = 200, seed: int = 0) -> ArenaAnalysis:
    names = [s.name for s in run.contestants]
    pair_names = sorted({(g.first, g.second) for g in run.games}, key=lambda p: (names.index(p[0]), names.index(p[1])))
    results = [analyse_pair(run, x, y, j.name, k, rounds, seed) for j in run.judges for x, y in pair_names]
    out = ArenaAnalysis(results)
    primary = [r for r in results if r.judge == run.judges[0].name]
    fights = battles(run, primary)
    if fights:
        for mode, style in (("plain", False), ("style", True)):
            point, low, high = bt_bootstrap(fights, names, style, bt_rounds, seed)
            out.ratings[mode] = {n: (float(point[i]), float(low[i]), float(high[i])) for i, n in enumerate(names)}
        out.style_coefficients = [float(c) for c in bradley_terry(fights, names, style=True)[1]]
    out.kappa, out.kappa_games = judge_agreement(run)
    for name in names:
        answers = [a for (m, _), a in run.answers.items() if m == name]
        out.truncated[name] = sum(a.finish_reason == "length" for a in answers)
        out.answer_errors[name] = sum(a.error is not None for a in answers)
        out.lengths[name] = [len(a.text) for a in answers if a.error is None]
        out.latency[name] = float(np.median([a.latency_s for a in answers])) if answers else float("nan")
        out.server_models[name] = ", ".join(sorted({a.server_model for a in answers if a.server_model})) or "—"
    return out


def category_matrix(run: ArenaRun, result: PairResult) -> dict[str, tuple[float, int]]:
    """Category -> (mean score of the first model, prompts), under the primary rule."""
    return {c: (float(np.mean(v)), len(v)) for c, v in _by_category(run, result).items()}


def _by_category(run: ArenaRun, result: PairResult) -> dict[str, list[float]]:
    cats = {p.id: p.category for p in run.prompts}
    acc: dict[str, list[float]] = defaultdict(list)
    for pid, s in result.scores.items():
        acc[cats[pid]].append(s)
    return dict(sorted(acc.items()))


def category_tests(run: ArenaRun, result: PairResult) -> list[tuple[str, Summary, float]]:
    """Per category: the summary and the sign-test p adjusted (Holm) for testing every category."""
    groups = _by_category(run, result)
    sums = [summarize(v, rounds=1000) for v in groups.values()]
    return list(zip(groups, sums, holm([s.sign_p for s in sums])))
