"""Arena reports: Markdown (tables) and a self-contained HTML page (the same tables, plots as base64 PNG, and a
per-prompt browser with the prompt, both answers and both judgments)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from qwen35.eval import plots
from qwen35.eval.analysis import TIE_RULES, ArenaAnalysis, category_matrix, category_tests
from qwen35.eval.runner import ArenaRun


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}%"


def _ci(lo: float, hi: float) -> str:
    return "n/a" if lo != lo else f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def tables(run: ArenaRun, a: ArenaAnalysis, ledger_rows: list[dict[str, Any]]) -> list[tuple[str, list[str],
                                                                                             list[list[str]]]]:
    """(title, header, rows) for every table of the report; Markdown and HTML render the same data."""
    out = []
    rows = []
    for r in a.pairs:
        for rule in TIE_RULES:
            s = r.summaries[rule]
            rows.append([f"{r.first} vs {r.second}", r.judge, rule, str(s.n), f"{s.wins}/{s.losses}/{s.ties}",
                         _pct(s.win_rate), _ci(s.win_rate_ci.low, s.win_rate_ci.high), _pct(s.decisive_share),
                         _ci(s.decisive_ci.low, s.decisive_ci.high), f"{s.sign_p:.3g}",
                         str(s.prompts_for_80_power or "—")])
    out.append(("Head to head (first model's view; one score per prompt from its two games)",
                ["pair", "judge", "tie rule", "prompts", "W/L/T", "win rate (ties ½)", "95% CI (bootstrap)",
                 "decisive share", "95% CI (Wilson)", "sign test p", "prompts for 80% power"], rows))
    out.append(("Position bias and failures",
                ["pair", "judge", "both orders agree", "slot-A win share (decisive games)", "tie rate game 1/2",
                 "error games", "prompts left out"],
                [[f"{r.first} vs {r.second}", r.judge, _pct(r.consistency), _pct(r.first_slot_win_rate),
                  f"{_pct(r.tie_rate_by_game[0])} / {_pct(r.tie_rate_by_game[1])}", str(r.errors),
                  str(r.incomplete_prompts)] for r in a.pairs]))
    if a.ratings:
        coef = ", ".join(f"{n} {c:+.2f}" for n, c in zip(("length", "headers", "lists", "bold"),
                                                          a.style_coefficients))
        out.append((f"Bradley–Terry ratings (Elo scale, 95% prompt-bootstrap interval; style coefficients: {coef})",
                    ["model", "rating", "interval", "style-controlled", "interval"],
                    [[n, f"{a.ratings['plain'][n][0]:.0f}", f"[{a.ratings['plain'][n][1]:.0f}, "
                      f"{a.ratings['plain'][n][2]:.0f}]", f"{a.ratings['style'][n][0]:.0f}",
                      f"[{a.ratings['style'][n][1]:.0f}, {a.ratings['style'][n][2]:.0f}]"] for n in a.ratings["plain"]]))
    out.append(("Answers", ["model", "answers", "errors", "truncated (length)", "median chars", "median latency",
                            "server model"],
                [[n, str(len(v)), str(a.answer_errors[n]), str(a.truncated[n]), str(int(np.median(v))) if v else "—",
                  f"{a.latency[n]:.2f} s", a.server_models[n]] for n, v in a.lengths.items()]))
    cat_rows = []
    for r in a.pairs:
        if r.judge != run.judges[0].name:
            continue
        for cat, s, p_holm in category_tests(run, r):
            cat_rows.append([f"{r.first} vs {r.second}", cat, str(s.n), f"{s.wins}/{s.losses}/{s.ties}",
                             _pct(s.win_rate), _ci(s.win_rate_ci.low, s.win_rate_ci.high), f"{s.sign_p:.3g}",
                             f"{p_holm:.3g}"])
    out.append(("By category (primary judge, average rule; p adjusted with Holm across categories)",
                ["pair", "category", "prompts", "W/L/T", "win rate", "95% CI", "sign test p", "Holm p"], cat_rows))
    if a.kappa is not None:
        out.append(("Judge agreement", ["judges", "games", "Cohen's kappa (3-way)"],
                    [[" vs ".join(j.name for j in run.judges[:2]), str(a.kappa_games), f"{a.kappa:.3f}"]]))
    out.append(("Tokens and cost", ["model", "stage", "calls", "prompt tokens", "completion tokens", "cost (USD)"],
                [[str(r[k]) for k in ("model", "stage", "calls", "prompt_tokens", "completion_tokens", "cost_usd")]
                 for r in ledger_rows]))
    return out


def markdown(run: ArenaRun, a: ArenaAnalysis, ledger_rows: list[dict[str, Any]]) -> str:
    lines = [f"# Arena: {' vs '.join(s.name for s in run.contestants)}", "",
             f"{len(run.prompts)} prompts · judge(s): {', '.join(j.name for j in run.judges)} · judge prompt "
             f"`{run.judge_prompt.version}` · both orders judged · calls made {run.calls_made}, "
             f"cache hits {run.cache_hits}", ""]
    for title, header, rows in tables(run, a, ledger_rows):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    lines += ["Tie rules: *average* = mean of the two games (primary); *consistent* = a win only when both orders "
              "agree; *length* = a slight win counts as a tie when the winner is more than K characters longer.", ""]
    return "\n".join(lines)


def _matrix(run: ArenaRun, a: ArenaAnalysis) -> str:
    primary = [r for r in a.pairs if r.judge == run.judges[0].name]
    mats = [category_matrix(run, r) for r in primary]
    cats = sorted({c for m in mats for c in m})
    values = np.array([[m.get(c, (np.nan, 0))[0] for m in mats] for c in cats]) if cats else np.zeros((0, 0))
    return plots.category_matrix(cats, [f"{r.first} vs {r.second}" for r in primary], values) if cats else ""


def _browser(run: ArenaRun) -> str:
    esc = html.escape
    by_prompt: dict[str, list] = {}
    for g in run.games:
        by_prompt.setdefault(g.prompt_id, []).append(g)
    items = []
    for p in run.prompts:
        answers = "".join(
            f"<h4>{esc(s.name)}</h4><pre>{esc(run.answers[(s.name, p.id)].text or run.answers[(s.name, p.id)].error or '')}"
            f"</pre>" for s in run.contestants if (s.name, p.id) in run.answers)
        judgments = "".join(
            f"<h4>{esc(g.judge)} · {esc(g.first)} vs {esc(g.second)} · game {g.game} "
            f"(slot A = {esc(g.first if g.game == 1 else g.second)}) → {esc(g.label or 'ERROR: ' + str(g.error))}"
            f"</h4><pre>{esc(g.raw)}</pre>" for g in by_prompt.get(p.id, []))
        items.append(f"<details><summary><b>{esc(p.id)}</b> [{esc(p.category)}] {esc(p.prompt[:120])}</summary>"
                     f"<h3>Prompt</h3><pre>{esc(chr(10).join(p.user_turns()))}</pre><h3>Answers</h3>{answers}"
                     f"<h3>Judgments</h3>{judgments}</details>")
    return "\n".join(items)


def html_page(run: ArenaRun, a: ArenaAnalysis, ledger_rows: list[dict[str, Any]], manifest: dict[str, Any]) -> str:
    esc = html.escape
    parts = [f"<h1>Arena: {esc(' vs '.join(s.name for s in run.contestants))}</h1>"]
    for title, header, rows in tables(run, a, ledger_rows):
        parts.append(f"<h2>{esc(title)}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
                     + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
                     + "</table>")
    figures = [("Win rate with intervals", plots.win_rates(a)), ("Answer lengths", plots.lengths(a))]
    if a.ratings:
        figures.insert(1, ("Ratings with intervals", plots.ratings(a)))
    if matrix := _matrix(run, a):
        figures.append(("Verdicts by category", matrix))
    parts += [f"<h2>{esc(t)}</h2><img alt='{esc(t)}' src='data:image/png;base64,{png}'>" for t, png in figures]
    parts.append(f"<h2>Prompts ({len(run.prompts)})</h2>{_browser(run)}")
    parts.append(f"<h2>Manifest</h2><pre>{esc(json.dumps(manifest, indent=2, ensure_ascii=False))}</pre>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px}pre{white-space:pre-wrap;background:#f6f6f6;padding:6px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>qwen35 arena</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")


def write(out_dir: str | Path, run: ArenaRun, a: ArenaAnalysis, ledger_rows: list[dict[str, Any]],
          manifest: dict[str, Any], games: list[dict[str, Any]]) -> dict[str, Path]:
    """report.md, report.html, manifest.json and judgments.jsonl (every game, errors included)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "report.md", "html": out / "report.html", "manifest": out / "manifest.json",
             "judgments": out / "judgments.jsonl"}
    files["markdown"].write_text(markdown(run, a, ledger_rows), encoding="utf-8")
    files["html"].write_text(html_page(run, a, ledger_rows, manifest), encoding="utf-8")
    files["manifest"].write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    files["judgments"].write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in games), encoding="utf-8")
    return files
