"""Report figures drawn with matplotlib (Agg, no display) and returned as base64 PNG for a self-contained page."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from qwen35.eval.analysis import TIE_RULES, ArenaAnalysis  # noqa: E402


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def win_rates(a: ArenaAnalysis) -> str:
    """Win rate (ties = ½) of the first model of each pair, per tie rule, with prompt-bootstrap 95 % intervals."""
    labels, mid, low, high = [], [], [], []
    for r in a.pairs:
        for rule in TIE_RULES:
            s = r.summaries[rule]
            labels.append(f"{r.first} vs {r.second} [{rule}] ({r.judge})")
            mid.append(s.win_rate)
            low.append(s.win_rate - s.win_rate_ci.low)
            high.append(s.win_rate_ci.high - s.win_rate)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1))
    y = np.arange(len(labels))
    ax.errorbar(np.nan_to_num(mid, nan=0.5), y, xerr=[np.nan_to_num(low), np.nan_to_num(high)], fmt="o",
                capsize=4)
    ax.axvline(0.5, color="grey", linestyle="--")
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate of the first model (ties = ½), 95 % prompt bootstrap")
    return _png(fig)


def ratings(a: ArenaAnalysis) -> str:
    """Bradley–Terry ratings (Elo scale), plain and style-controlled, with bootstrap 95 % intervals."""
    fig, ax = plt.subplots(figsize=(7, 0.5 * max(2, len(a.lengths)) + 1))
    for shift, (mode, table) in zip((-0.15, 0.15), a.ratings.items()):
        names = list(table)
        y = np.arange(len(names)) + shift
        mid = np.array([table[n][0] for n in names])
        err = [mid - [table[n][1] for n in names], [table[n][2] for n in names] - mid]
        ax.errorbar(mid, y, xerr=err, fmt="o", capsize=4, label=mode)
        ax.set_yticks(np.arange(len(names)), names)
    ax.axvline(1000, color="grey", linestyle="--")
    ax.set_xlabel("Bradley–Terry rating (Elo scale, mean 1000)")
    ax.legend()
    return _png(fig)


def lengths(a: ArenaAnalysis) -> str:
    """Answer-length distributions (characters), one histogram per model."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    values = [v for v in a.lengths.values() if v]
    bins = np.histogram_bin_edges(np.concatenate(values), bins=20) if values else 10
    for name, v in a.lengths.items():
        ax.hist(v, bins=bins, alpha=0.5, label=f"{name} (median {int(np.median(v)) if v else 0})")
    ax.set_xlabel("answer length (characters)")
    ax.set_ylabel("prompts")
    ax.legend()
    return _png(fig)


def category_matrix(rows: list[str], cols: list[str], values: np.ndarray) -> str:
    """Mean score of the first model per category (rows) and pair (columns); 0.5 is a tie."""
    fig, ax = plt.subplots(figsize=(1.8 * len(cols) + 3, 0.45 * len(rows) + 1.5))
    im = ax.imshow(values, cmap="RdBu", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=20, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="first model's score")
    return _png(fig)
