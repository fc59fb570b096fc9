"""Run a benchmark against a model spec: same clients, cache and ledger as the arena; accuracy with an interval.

Every item ends as exactly one of: correct, wrong, unparsed (no answer could be extracted; counted as wrong),
error (the call failed after retries) or unverifiable (IFBench instructions whose verifier cannot run here).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.progress import Progress

from qwen35.eval.bench import Item, extract, is_correct
from qwen35.eval.cache import Cache, content_key
from qwen35.eval.clients import Ledger, make_client
from qwen35.eval.specs import Completion, ModelSpec
from qwen35.eval.stats import Interval, wilson


@dataclass
class ItemResult:
    id: str
    status: str  # correct / wrong / unparsed / error / unverifiable
    extracted: str | None
    gold: str
    finish_reason: str | None
    reply: str
    detail: str = ""


@dataclass
class BenchResult:
    benchmark: str
    model: str
    items: list[ItemResult]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.items)

    @property
    def scored(self) -> int:
        """Items with a verdict: errors and unverifiable items are reported but not scored."""
        return sum(r.status in ("correct", "wrong", "unparsed") for r in self.items)

    @property
    def accuracy(self) -> float:
        return self.count("correct") / self.scored if self.scored else float("nan")

    @property
    def interval(self) -> Interval:
        return wilson(self.count("correct"), self.scored)

    def summary(self) -> dict[str, Any]:
        ci = self.interval
        return {"benchmark": self.benchmark, "model": self.model, "items": len(self.items), "scored": self.scored,
                "correct": self.count("correct"), "accuracy": self.accuracy, "ci95": [ci.low, ci.high],
                "unparsed": self.count("unparsed"),
                "unparsed_rate": self.count("unparsed") / self.scored if self.scored else float("nan"),
                "errors": self.count("error"), "unverifiable": self.count("unverifiable"),
                "truncated": sum(r.finish_reason == "length" for r in self.items)}


def score(item: Item, c: Completion) -> ItemResult:
    if not c.ok:
        return ItemResult(item.id, "error", None, item.gold, None, "", c.error or "")
    if item.kind == "ifbench":
        from qwen35.eval.ifbench import verify

        r = verify(item.prompt, c.text, item.meta["instruction_id_list"], item.meta["kwargs"])
        status = "unverifiable" if not r.verifiable else "correct" if r.all_followed else "wrong"
        return ItemResult(item.id, status, json.dumps(r.followed), "all followed", c.finish_reason, c.text,
                          "; ".join(r.errors))
    answer = extract(item.kind, c.text, len(item.choices) or 10)
    status = "unparsed" if answer is None else "correct" if is_correct(item, answer) else "wrong"
    return ItemResult(item.id, status, answer, item.gold, c.finish_reason, c.text)


async def _run(name: str, items: list[Item], spec: ModelSpec, cache: Cache, ledger: Ledger,
               progress: Progress | None, backoff_s: float) -> BenchResult:
    client = make_client(spec, backoff_s)
    task = progress.add_task(f"{name} · {spec.name}", total=len(items)) if progress else None

    async def one(item: Item) -> ItemResult:
        messages = [{"role": "user", "content": item.prompt}]
        key = content_key("bench", spec.identity(), messages)
        cached = cache.get(key)
        if cached is not None:
            c = Completion(**cached)
        else:
            ledger.check()
            c = await client.complete(messages)
            ledger.add(spec, name, c)
            if c.ok:
                cache.put(key, "bench", asdict(c))
        if progress is not None:
            progress.advance(task)
        return score(item, c)

    try:
        await client.preflight()
        results = await asyncio.gather(*(one(i) for i in items))
    finally:
        await client.aclose()
    return BenchResult(name, spec.name, list(results))


def run_benchmark(name: str, items: list[Item], spec: ModelSpec, cache: Cache, ledger: Ledger,
                  progress: Progress | None = None, backoff_s: float = 1.0) -> BenchResult:
    return asyncio.run(_run(name, items, spec, cache, ledger, progress, backoff_s))


def write(result: BenchResult, out_dir: str | Path) -> Path:
    """<benchmark>-<model>.jsonl (one line per item) and the summary as the last line of a .json file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{result.benchmark}-{result.model}"
    (out / f"{stem}.jsonl").write_text("".join(json.dumps(asdict(r), ensure_ascii=False) + "\n"
                                               for r in result.items), encoding="utf-8")
    path = out / f"{stem}.json"
    path.write_text(json.dumps(result.summary(), indent=2), encoding="utf-8")
    return path
