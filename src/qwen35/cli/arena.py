"""`qwen35 arena …` (pairwise evaluation, prompt import, statistics from counts, power) and `qwen35 eval …`
(benchmark runners). Parsers are defined here; cli/main.py only registers and dispatches them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qwen35.cli.args import whole_number


def add_arena_parser(sub: argparse._SubParsersAction) -> None:
    arena = sub.add_parser("arena", help="model A vs model B (and more), judged in both orders, with statistics")
    cmds = arena.add_subparsers(dest="arena_command", required=True)

    run = cmds.add_parser("run", help="answer, judge and report")
    run.add_argument("--model", action="append", required=True, metavar="SPEC",
                     help="contestant: key=value,… or @spec.json (repeat; two or more)")
    run.add_argument("--judge", action="append", required=True, metavar="SPEC", help="judge (repeat for a second)")
    _prompt_source_args(run)
    run.add_argument("--judge-prompt", default="arena-5level-v1", help="arena-5level-v1 or pair-3way-v1")
    run.add_argument("--out", default="arena-out", help="report folder (report.md, report.html, manifest.json …)")
    run.add_argument("--cache", default=None, help="SQLite cache (default: OUT/cache.sqlite); re-runs fill gaps")
    run.add_argument("--budget", type=float, default=None, help="stop when the cost reaches this many USD")
    run.add_argument("--length-k", type=int, default=500, help="length tie rule: K characters")
    run.add_argument("--bootstrap", type=int, default=2000, help="bootstrap rounds for win rates")
    run.add_argument("--bt-rounds", type=int, default=200, help="bootstrap rounds for Bradley–Terry ratings")

    imp = cmds.add_parser("prompts", help="write a prompt set (JSONL) and its exclusion log")
    _prompt_source_args(imp)
    imp.add_argument("--out", required=True, help="prompt JSONL to write (the log goes next to it)")

    st = cmds.add_parser("stats", help="the honest figures from W/L/T counts (e.g. 499 431 70)")
    st.add_argument("wins", type=count_arg, help="games A won")
    st.add_argument("losses", type=count_arg, help="games A lost")
    st.add_argument("ties", type=count_arg, help="games tied")

    pw = cmds.add_parser("power", help="prompts needed to detect a decisive win share")
    pw.add_argument("--share", type=float, required=True, help="true share of decisive games won, e.g. 0.537")
    pw.add_argument("--ties", type=float, default=0.0, help="expected tie rate, e.g. 0.07")
    pw.add_argument("--alpha", type=float, default=0.05, help="significance level of the two-sided sign test")


count_arg = whole_number("a count", "give whole numbers of games, 0 or more")  # a W/L/T count


def _prompt_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompts (one source)")
    g.add_argument("--prompts", help="prompt set JSONL (id, prompt, category, turns)")
    g.add_argument("--source", help="sharegpt (the installed ShareGPT V3 file), mtbench, ifbench, or a "
                                    "WildChat/ShareGPT-style JSON/JSONL conversation file")
    g.add_argument("-n", "--n", type=int, default=None, help="how many prompts (seeded sample)")
    g.add_argument("--seed", type=int, default=0, help="seed of the prompt sample (and, for run, of the bootstrap)")
    g.add_argument("--language", default="en", help="language filter for conversation files (en, any, …)")
    g.add_argument("--min-chars", type=int, default=15, help="shortest prompt kept from a conversation file")
    g.add_argument("--max-chars", type=int, default=1500, help="longest prompt kept from a conversation file")


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="benchmarks: mmlu, openbookqa, asdiv, ifbench, gpqa FILE, mmlu-pro FILE")
    ev.add_argument("benchmark", help="mmlu, openbookqa, asdiv, ifbench, gpqa (with --file) or mmlu-pro (--file)")
    ev.add_argument("--model", action="append", required=True, metavar="SPEC", help="key=value,… (repeatable)")
    ev.add_argument("--file", help="the benchmark file for gpqa (CSV) / mmlu-pro (JSONL)")
    ev.add_argument("--limit", type=int, default=None, help="first N items after a seeded shuffle")
    ev.add_argument("--seed", type=int, default=0, help="seed of the shuffle")
    ev.add_argument("--out", default="eval-out", help="results folder")
    ev.add_argument("--cache", default=None, help="SQLite cache (default: OUT/cache.sqlite)")
    ev.add_argument("--budget", type=float, default=None, help="stop when the cost reaches this many USD")


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def load_prompts(args: argparse.Namespace, out_dir: Path | None):
    from qwen35.eval import prompts as P

    if bool(args.prompts) == bool(args.source):
        raise ValueError("give exactly one prompt source: --prompts FILE.jsonl or --source sharegpt|mtbench|"
                         "ifbench|FILE")
    log = None
    if args.prompts:
        items = P.load_jsonl(args.prompts)
    elif args.source == "mtbench":
        items = P.import_mtbench()
    elif args.source == "ifbench":
        items = P.import_ifbench()
    else:
        path = None if args.source == "sharegpt" else args.source
        items, log = P.import_conversations(path, args.n or 100, args.seed, args.language, args.min_chars,
                                            args.max_chars)
    if args.n is not None and len(items) > args.n:
        import random
        items = sorted(random.Random(args.seed).sample(items, args.n), key=lambda p: p.id)
    if out_dir is not None and log is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "exclusions.json").write_text(json.dumps(log.to_json(), indent=2), encoding="utf-8")
    return items, log


def _arena(args: argparse.Namespace, console: Console, err: Console) -> None:
    from qwen35.eval import report
    from qwen35.eval.analysis import analyse
    from qwen35.eval.cache import Cache
    from qwen35.eval.clients import BudgetExceeded, Ledger
    from qwen35.eval.judge import judge_prompt
    from qwen35.eval.manifest import manifest
    from qwen35.eval.prompts import save_jsonl
    from qwen35.eval.runner import ArenaRun, games_json, run_arena
    from qwen35.eval.specs import parse_spec
    from qwen35.eval.stats import required_prompts

    if args.arena_command == "stats":
        _counts_report(args.wins, args.losses, args.ties, console)
        return
    if args.arena_command == "power":
        for power in (0.8, 0.9):
            console.print(f"{int(power * 100)}% power: {required_prompts(args.share, args.ties, power, args.alpha)} "
                          f"prompts (decisive share {args.share}, ties {args.ties}, alpha {args.alpha})")
        return
    if args.arena_command == "prompts":
        out = Path(args.out)
        items, log = load_prompts(args, out.parent)
        save_jsonl(items, out)
        console.print(f"wrote {len(items)} prompts to {out}" + (f"; dropped {dict(log.dropped)} (log: "
                                                                 f"{out.parent / 'exclusions.json'})" if log else ""))
        return

    out = Path(args.out)
    items, _ = load_prompts(args, out)
    models = [parse_spec(s, f"model{i + 1}") for i, s in enumerate(args.model)]
    judges = [parse_spec(s, f"judge{i + 1}") for i, s in enumerate(args.judge)]
    if len(models) < 2:
        raise ValueError("an arena needs two or more --model specs")
    jp = judge_prompt(args.judge_prompt)
    run = ArenaRun(items, models, judges, jp)
    ledger = Ledger(args.budget)
    out.mkdir(parents=True, exist_ok=True)
    with Cache(args.cache or out / "cache.sqlite") as cache:
        try:
            with _progress(err) as progress:
                run_arena(run, cache, ledger, progress)
        except BudgetExceeded as e:
            err.print(f"[yellow]stopped:[/] {e}")
            sys.exit(3)
    analysis = analyse(run, args.length_k, args.bootstrap, args.bt_rounds, args.seed)
    settings = {k: getattr(args, k) for k in ("seed", "length_k", "bootstrap", "bt_rounds", "budget", "n",
                                              "language", "min_chars", "max_chars", "source", "prompts")}
    settings.update(judge_prompt=jp.version, judge_prompt_sha=jp.digest)
    files = report.write(out, run, analysis, ledger.rows(),
                         manifest("qwen35 " + " ".join(sys.argv[1:]), items, models, judges, settings),
                         games_json(run))
    print(report.markdown(run, analysis, ledger.rows()), flush=True)  # plain: tables must not be re-wrapped
    console.print(f"report: {files['html']}  {files['markdown']}")


def _counts_report(wins: int, losses: int, ties: int, console: Console) -> None:
    """`arena stats W L T`: the figures that W/L/T counts alone support."""
    from qwen35.eval.stats import equivalence_p, exact_power, summary_from_counts

    if wins + losses == 0:
        raise ValueError(f"no decisive games in {wins} {losses} {ties}: the decisive share, sign test and power "
                         "need at least one win or loss (counts are W L T, e.g. `qwen35 arena stats 499 431 70`)")
    if wins + losses + ties < 2:
        raise ValueError("one game is too few: the win rate's confidence interval needs at least 2")
    s = summary_from_counts(wins, losses, ties)
    needed = s.prompts_for_80_power
    if needed is None:  # the sample size formula needs an effect strictly between 0 and 1 and not ½
        needed = f"— (not estimable from a decisive share of {100 * s.decisive_share:.0f}%)"
    console.print(f"prompts {s.n}: W {s.wins} / L {s.losses} / T {s.ties}\n"
                  f"win rate, ties = ½: {100 * s.win_rate:.1f}% (95% CI {100 * s.win_rate_ci.low:.1f}–"
                  f"{100 * s.win_rate_ci.high:.1f}%)\n"
                  f"decisive share: {100 * s.decisive_share:.2f}% (Wilson 95% {100 * s.decisive_ci.low:.1f}–"
                  f"{100 * s.decisive_ci.high:.1f}%)\nsign test (ties dropped), two-sided p = {s.sign_p:.4f}\n"
                  f"power of this design: {exact_power(s.n, s.decisive_share, s.ties / s.n):.2f}\n"
                  f"prompts for 80% power: {needed}")
    scores = [1.0] * wins + [0.0] * losses + [0.5] * ties
    for margin in (0.05, 0.10):
        console.print(f"equivalence (TOST) within ±{int(margin * 100)} pp of 50%: p = "
                      f"{equivalence_p(scores, margin):.2g}")


def _eval(args: argparse.Namespace, console: Console, err: Console) -> None:
    import random

    from qwen35.eval.bench import load_benchmark
    from qwen35.eval.benchrun import run_benchmark, write
    from qwen35.eval.cache import Cache
    from qwen35.eval.clients import Ledger
    from qwen35.eval.specs import parse_spec

    items = load_benchmark(args.benchmark, args.file, args.seed)
    if args.limit is not None:
        items = random.Random(args.seed).sample(items, min(args.limit, len(items)))
    out = Path(args.out)
    table = Table("model", "items", "accuracy", "95% CI (Wilson)", "unparsed", "errors", "unverifiable",
                  "truncated", title=f"{args.benchmark} ({len(items)} items)")
    summaries = []
    with Cache(args.cache or out / "cache.sqlite") as cache:
        ledger = Ledger(args.budget)
        for i, text in enumerate(args.model):
            spec = parse_spec(text, f"model{i + 1}")
            with _progress(err) as progress:
                result = run_benchmark(args.benchmark, items, spec, cache, ledger, progress)
            write(result, out)
            s = result.summary()
            summaries.append(s)
            table.add_row(spec.name, str(s["items"]), f"{100 * s['accuracy']:.1f}%",
                          f"[{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}]",
                          f"{s['unparsed']} ({100 * s['unparsed_rate']:.0f}%)", str(s["errors"]),
                          str(s["unverifiable"]), str(s["truncated"]))
    console.print(table)
    print(json.dumps({"benchmark": args.benchmark, "results": summaries}))


def run_arena_command(args: argparse.Namespace, console: Console, err: Console) -> None:
    try:
        _arena(args, console, err)
    except ModuleNotFoundError as e:  # a data package is missing: the message says what to install
        raise ValueError(str(e)) from e


def run_eval_command(args: argparse.Namespace, console: Console, err: Console) -> None:
    try:
        _eval(args, console, err)
    except ModuleNotFoundError as e:
        raise ValueError(str(e)) from e
