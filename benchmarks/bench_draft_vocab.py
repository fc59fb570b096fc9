"""Draft vocabulary: how much held-out assistant text the top-N lists cover, and what the trimmed LM head costs.

Coverage: the share of tokens (each reply ending in <|im_end|>) of held-out assistant text that lie in the shipped
list's first N ids: ShareGPT replies of the 1/20 of conversations never counted (scripts/build_draft_vocab.py),
MT-bench's GPT-4 reference answers and IFBench's sample responses. A draft token outside the top N is always
rejected, so this bounds the acceptance rate (per drafted token) at 1 - coverage below the full head's.

Cost: one decode token (hidden (1, 1, H), bf16) through the full LM head (248,320 rows) and through `DraftHead`s of
N rows, with argmax, at shape-true sizes (H = 1024: 0.8B, H = 2560: 4B); bf16 weights and int4 (group 64) on
qwen35's kernels. Random weights (the kernels' time does not depend on the values). Median of --reps calls,
full and trimmed heads alternated.

    .venv/bin/python benchmarks/bench_draft_vocab.py                     # all, a few minutes on 2 cores
    .venv/bin/python benchmarks/bench_draft_vocab.py --skip-cost         # coverage only
    .venv/bin/python benchmarks/bench_draft_vocab.py --skip-coverage --formats bf16 int4 int8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qwen35.ops.cpu import Linear, kernels
from qwen35.quant.linear import make_linear
from qwen35.runtime.draft_vocab import DraftHead, draft_vocabulary, shipped_lists

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 248320
SIZES = {"0.8B": 1024, "4B": 2560}
REAL_NS = (4096, 8192, 16384, 32768, 65536)
NANO_NS = (1024, 2048, 4096)
COST_NS = (4096, 8192, 16384, 32768, 65536)
GROUP = 64


def _builder():
    spec = importlib.util.spec_from_file_location("build_draft_vocab", ROOT / "scripts" / "build_draft_vocab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def coverage(limit: int | None) -> dict:
    """{tokenizer: {held-out set: {"tokens": T, "N": share}}} from the shipped lists."""
    b = _builder()
    t0 = time.perf_counter()
    sets = {"sharegpt_held_out": [text for out, role, text in b.sharegpt_turns(limit) if out and role == "assistant"],
            **b.held_out_answers()}
    out: dict = {}
    for name, tok in b.tokenizers().items():
        ns = REAL_NS if name == "qwen35" else NANO_NS
        ranked = draft_vocabulary(tok, max(ns))
        if ranked is None:
            raise SystemExit(f"no shipped list for the {name} vocabulary: run scripts/build_draft_vocab.py")
        rank = np.full(tok.get_vocab_size(with_added_tokens=True), np.iinfo(np.int64).max, dtype=np.int64)
        rank[ranked.numpy()] = np.arange(ranked.numel())
        out[name] = {}
        for set_name, texts in sets.items():
            ids = np.concatenate(list(b.token_stream(tok, texts)))
            r = rank[ids]
            out[name][set_name] = {"texts": len(texts), "tokens": int(ids.size),
                                   **{str(n): round(float((r < n).mean()), 5) for n in ns}}
    print(f"coverage measured in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def random_head(fmt: str, hidden: int, seed: int = 0) -> torch.nn.Module:
    """A (VOCAB, hidden) LM head of random values in the given format (bf16 Linear, int8, int4 group 64)."""
    g = torch.Generator().manual_seed(seed)
    if fmt == "bf16":
        head = Linear(hidden, VOCAB, bias=False, device="meta")
        w = torch.empty(VOCAB, hidden, dtype=torch.bfloat16)
        for s in range(0, VOCAB, 16384):  # in row blocks: no fp32 copy of the whole table
            w[s:s + 16384] = (torch.randn(min(16384, VOCAB - s), hidden, generator=g) / 32).to(torch.bfloat16)
        head.weight = torch.nn.Parameter(w, requires_grad=False)
        return head
    if fmt == "int8":
        q = torch.randint(-127, 128, (VOCAB, hidden), dtype=torch.int8, generator=g)
        return make_linear({"qweight": q, "scales": (torch.rand(VOCAB, generator=g) / 500).to(torch.bfloat16)}, 0)
    q = torch.randint(0, 256, (VOCAB, hidden // 2), dtype=torch.uint8, generator=g)
    scales = (torch.rand(VOCAB, hidden // GROUP, generator=g) / 200).to(torch.bfloat16)
    zeros = (torch.randn(VOCAB, hidden // GROUP, generator=g) / 100).to(torch.bfloat16)
    return make_linear({"qweight": q, "scales": scales, "zeros": zeros}, GROUP)


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


@torch.no_grad()
def cost(formats: list[str], reps: int, ns: tuple[int, ...]) -> dict:
    """{size: {format: {"full_ms": .., "N": {"ms": .., "speedup": .., "build_s": ..}}}}: head + argmax, one token."""
    out: dict = {}
    for size, hidden in SIZES.items():
        out[size] = {}
        x = torch.randn(1, 1, hidden, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        for fmt in formats:
            head = random_head(fmt, hidden)
            ids = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(2))[:max(ns)]  # spread rows
            drafts = {}
            for n in ns:
                t0 = time.perf_counter()
                drafts[n] = (DraftHead(head, ids[:n]), time.perf_counter() - t0)
            full_times: list[float] = []
            times: dict[int, list[float]] = {n: [] for n in ns}
            for fn in [lambda: head(x).argmax(-1)] + [lambda d=d: d.greedy(x) for d, _ in drafts.values()]:
                fn()  # warm: first calls page the weights in
            for _ in range(reps):  # alternate, so background load hits every variant alike
                full_times += _time(lambda: head(x).argmax(-1), 1)
                for n, (d, _) in drafts.items():
                    times[n] += _time(lambda d=d: d.greedy(x), 1)
            full = statistics.median(full_times)
            entry = {"full_ms": round(full, 3),
                     "bytes_full_mb": round(_bytes(head) / 2**20, 1)}
            for n, (d, build) in drafts.items():
                ms = statistics.median(times[n])
                entry[str(n)] = {"ms": round(ms, 3), "speedup": round(full / ms, 2), "build_s": round(build, 2),
                                 "mb": round(_bytes(d) / 2**20, 1)}
            out[size][fmt] = entry
            print(f"{size} {fmt}: full {full:.2f} ms; " + ", ".join(
                f"N={n}: {entry[str(n)]['ms']:.2f} ms (x{entry[str(n)]['speedup']})" for n in ns), file=sys.stderr)
            del head, drafts
    return out


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.nbytes for t in [*module.parameters(), *module.buffers()] if t.is_floating_point() or t.dtype in
               (torch.uint8, torch.int8))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-coverage", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--formats", nargs="+", default=["bf16", "int4"], choices=["bf16", "int8", "int4"])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--limit", type=int, help="ShareGPT conversations read (default all: the held-out 1/20 of them)")
    args = ap.parse_args(argv)
    result: dict = {"torch_threads": torch.get_num_threads(), "qwen35_kernels": kernels() is not None,
                    "lists": {m["name"]: {"n_ids": int(m["n_ids"]), "fingerprint": fp[:25] + "..."}
                              for fp, m in shipped_lists().items()}}
    if not args.skip_coverage:
        result["coverage"] = cov = coverage(args.limit)
        for name, sets in cov.items():
            ns = REAL_NS if name == "qwen35" else NANO_NS
            print(f"\ncoverage, {name} vocabulary (share of held-out reply tokens in the top N)")
            print(f"{'set':<20}{'tokens':>10}" + "".join(f"{n:>9}" for n in ns))
            for set_name, row in sets.items():
                print(f"{set_name:<20}{row['tokens']:>10,}" + "".join(f"{row[str(n)]:>9.2%}" for n in ns))
    if not args.skip_cost:
        result["cost"] = c = cost(args.formats, args.reps, COST_NS)
        print(f"\nhead + argmax, one token, ms (median of {args.reps}; {torch.get_num_threads()} threads)")
        print(f"{'size/format':<14}{'full':>9}" + "".join(f"{n:>9}" for n in COST_NS))
        for size, fmts in c.items():
            for fmt, e in fmts.items():
                print(f"{size + ' ' + fmt:<14}{e['full_ms']:>9.2f}" + "".join(f"{e[str(n)]['ms']:>9.2f}"
                                                                          for n in COST_NS))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
