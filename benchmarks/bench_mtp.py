"""Speculative decoding with the MTP head: what it gains, measured.

1. The built-in nano model, whose head was trained (`qwen35 train mtp`): greedy replies to held-out IFBench
   prompts, decode tok/s without MTP and with k = 1..4 drafted tokens per step, over the full and a trimmed draft
   vocabulary; acceptance per draft position; every reply checked identical to the plain one.
2. The cost side on shape-true random checkpoints (0.8B and 4B, int4 and bf16, with the head): a plain decode step, the
   draft of k tokens (full and trimmed head), the verify pass of k + 1 tokens and the head's catch-up, each timed
   in place; the speed-up they give at acceptance 0.6 / 0.7 / 0.8 per position (a random head accepts nothing,
   so acceptance is the model's input here, not a measurement).

    python benchmarks/bench_mtp.py [--sizes 0.8B 4B] [--prompts 12] [--max-tokens 96] [--threads 2]

Prints tables and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib import resources
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bandwidth import ReadProbe  # noqa: E402
from cpu_engines import QUANTIZE  # noqa: E402
from shape_true import quantized  # noqa: E402

from qwen35.api import load  # noqa: E402
from qwen35.runtime import Engine, Request, Scheduler  # noqa: E402
from qwen35.runtime.speculative import Speculator, make_speculator  # noqa: E402
from qwen35.sampling import SamplingParams  # noqa: E402

ACCEPTANCE = (0.6, 0.7, 0.8)
TRIMMED = {"nano": 2048, "0.8B": 16384, "4B": 16384}


def ifbench_prompts(n: int) -> list[str]:
    """IFBench's last prompts (the nano never trained on IFBench)."""
    data = resources.files("ifbench").joinpath("data", "IFBench_test.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in data.splitlines()[-n:]]


def decode_run(qwen, prompts: list[list[int]], speculator, max_tokens: int) -> dict:
    """Greedy replies one by one: decode tok/s (tokens after the first over the time after it), tokens per step,
    and per draft position how often it was accepted when reached."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    tokens, seconds, steps, reached, accepted, replies = 0, 0.0, 0, [0] * 5, [0] * 5, []
    for i, ids in enumerate(prompts):
        engine = Engine(qwen.model, qwen.tokenizer.eos_token_ids, qwen.tokenizer.vocab_size,
                        Scheduler(max_running=1), isolate_failures=False, speculator=speculator)
        engine.add(Request(str(i), ids, params))
        reply = [e.token for e in engine.step()]
        start = time.perf_counter()
        while engine.has_work():
            events = engine.step()
            reply += [e.token for e in events]
            steps += 1
            k = speculator.k if speculator is not None else 0
            kept = len(events) - 1  # drafts accepted (the last event is the verify pass's own token) ...
            ended = events[-1].finish_reason is not None
            for j in range(min(k, kept + (0 if ended else 1))):  # ... unless the reply ended inside the run
                reached[j] += 1
                accepted[j] += j < kept
        seconds += time.perf_counter() - start
        tokens += len(reply) - 1
        replies.append(reply)
    return {"tok_s": tokens / seconds, "tokens": tokens, "tokens_per_step": tokens / max(steps, 1),
            "acceptance": [round(a / r, 3) for a, r in zip(accepted, reached) if r], "replies": replies}


def nano(args: argparse.Namespace) -> list[dict]:
    qwen = load(None, cache_ram=0, draft=0)
    prompts = [qwen.prepare_chat([{"role": "user", "content": p}]).ids for p in ifbench_prompts(args.prompts)]
    base = decode_run(qwen, prompts, None, args.max_tokens)
    rows = [{"model": "nano", "k": 0, "vocab": "-", **{k: v for k, v in base.items() if k != "replies"}}]
    print(f"nano plain: {base['tok_s']:.1f} tok/s over {base['tokens']} tokens", flush=True)
    for k in range(1, 5):
        for vocab in (0, TRIMMED["nano"]):
            spec = make_speculator(qwen.model, qwen.path, k, vocab)
            got = decode_run(qwen, prompts, spec, args.max_tokens)
            stats = {x: v for x, v in got.items() if x != "replies"}
            row = {"model": "nano", "k": k, "vocab": vocab or "full", "identical": got["replies"] == base["replies"],
                   "speedup": round(got["tok_s"] / base["tok_s"], 3), **stats}
            rows.append(row)
            print(f"nano k={k} vocab={row['vocab']}: {got['tok_s']:.1f} tok/s ({row['speedup']:.2f}x), "
                  f"{got['tokens_per_step']:.2f} tokens/step, acceptance {got['acceptance']}, "
                  f"identical {row['identical']}", flush=True)
    return rows


def shape_true(size: str, fmt: str, cache: Path) -> Path:
    return quantized(size, fmt, cache, QUANTIZE.get(fmt, []), mtp=True)


def interleaved(parts: dict, repeat: int) -> dict[str, float]:
    """Median seconds of each part, the parts timed in turn round after round (after one warm-up round), so a
    machine that drifts (frequency, other load) shifts every part alike."""
    times: dict[str, list[float]] = {name: [] for name in parts}
    for round_ in range(repeat + 1):
        for name, fn in parts.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def costs(size: str, fmt: str, args: argparse.Namespace) -> dict:
    """Seconds of each part of a step, measured in place after a 256-token prompt. Every timed call leaves the
    state as a decode step would (one more token, the head's K/V one slot behind), so each can repeat."""
    from qwen35.cache import make_cache
    from qwen35.runtime.prefill import prefill

    qwen = load(shape_true(size, fmt, Path(args.cache).expanduser()), cache_ram=0, draft=0)
    model, layers = qwen.model, qwen.model.config.mtp_num_hidden_layers
    prompt = torch.randint(0, 200_000, (1, 256), generator=torch.Generator().manual_seed(0))
    plain, cache = make_cache(model.config, 1), make_cache(model.config, 1, draft_layers=layers)
    prefill(model, prompt, plain)
    prefill(model, prompt, cache)
    x = torch.tensor([[11]])

    def behind() -> None:  # the head's K/V one slot behind the model's, as between steps
        for layer in cache.draft:
            layer.length = cache.length - 1

    parts = {"plain": lambda: model(x, plain)}
    spec = Speculator(model, 4)
    heads = {"full": spec.head}
    trimmed = make_speculator(model, qwen.path, 1, TRIMMED[size])
    if trimmed is not None:
        heads["trimmed"] = trimmed.head

    def draft(k: int, head) -> None:
        behind()
        spec.head = head
        spec.propose(cache, x, cache.seen, k)

    def verify(k: int) -> None:  # k + 1 tokens verified, one kept
        behind()
        spec.propose(cache, x, cache.seen, 0)
        fed = torch.full((1, k + 1), 11)
        cache.track()
        features = model.features(fed, cache)
        model.lm_head(features)
        cache.rollback([1], k + 1)
        spec.catch_up(cache, fed, features, cache.seen - 1, [1])

    def catch_up(k: int) -> None:  # the head over k accepted tokens
        behind()
        hidden = torch.zeros(1, k, model.config.hidden_size, dtype=model.norm.weight.dtype)
        model.draft(torch.full((1, k), 11), hidden, cache, torch.zeros(3, 1, k, dtype=torch.long),
                    torch.ones(1, cache.length - 1 + k, dtype=torch.bool))

    for k in range(1, 5):
        parts |= {f"draft{k}_{name}": (lambda k=k, h=head: draft(k, h)) for name, head in heads.items()}
        parts |= {f"verify{k + 1}": lambda k=k: verify(k), f"catchup{k}": lambda k=k: catch_up(k)}
    parts["head0"] = lambda: (behind(), spec.propose(cache, x, cache.seen, 0))
    out = interleaved(parts, args.repeat)
    for k in range(1, 5):  # the head's first forward (pairing x with the last state) runs in every step
        out[f"verify{k + 1}"] -= out["head0"]
    return out


def speedups(cost: dict, head: str) -> dict:
    """Tokens per step at acceptance a per position, E = 1 + a + ... + a^k, over the step's time (draft k,
    verify k + 1, catch-up over the accepted ones) against E plain steps; the best k for each a."""
    table = {}
    for a in ACCEPTANCE:
        best = (1.0, 0)
        for k in range(1, 5):
            if f"draft{k}_{head}" not in cost:
                continue
            expected = sum(a ** i for i in range(k + 1))
            step = cost[f"draft{k}_{head}"] + cost[f"verify{k + 1}"] + cost[f"catchup{max(1, round(expected - 1))}"]
            best = max(best, (expected * cost["plain"] / step, k))
        table[str(a)] = {"speedup": round(best[0], 3), "k": best[1]}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=["0.8B", "4B"])
    parser.add_argument("--formats", nargs="*", default=["int4", "bf16"], choices=["int4", "bf16"])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="~/.cache/qwen35-bench")
    parser.add_argument("--skip-nano", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [] if args.skip_nano else nano(args)
    cost_rows = {}
    probe = ReadProbe(args.threads) if args.sizes else None
    for size, fmt in ((size, fmt) for size in args.sizes for fmt in args.formats):
        cost = costs(size, fmt, args)
        name, bandwidth = f"{size} {fmt}", probe()  # the host's memory traffic moves the ratios: stated beside
        print(f"read bandwidth after {name}: {bandwidth:.1f} GB/s ({probe.describe()})", flush=True)
        cost_rows[name] = {"read_gbs": round(bandwidth, 1), "ms": {k: round(v * 1e3, 2) for k, v in cost.items()},
                           "speedup": {head: speedups(cost, head) for head in ("full", "trimmed")
                                       if f"draft1_{head}" in cost}}
        ms = cost_rows[name]["ms"]
        print(f"{name}: plain step {ms['plain']} ms; draft k=1..4 full "
              f"{[ms[f'draft{k}_full'] for k in range(1, 5)]} ms, trimmed "
              f"{[ms.get(f'draft{k}_trimmed') for k in range(1, 5)]} ms; verify 2..5 tokens "
              f"{[ms[f'verify{k}'] for k in range(2, 6)]} ms", flush=True)
        for head, table in cost_rows[name]["speedup"].items():
            print(f"  {head} draft head: " + ", ".join(f"acceptance {a}: {v['speedup']:.2f}x at k={v['k']}"
                                                      for a, v in table.items()), flush=True)
    print(json.dumps({"benchmark": "mtp", "threads": args.threads, "nano": rows, "cost": cost_rows}))


if __name__ == "__main__":
    main()
