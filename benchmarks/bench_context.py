"""Long context: prefill and decode speed, peak RSS and the memory planner's prediction at 1K-262K tokens, qwen35
against llama.cpp, one run.

For each shape-true checkpoint (`shape_true.py`, in --cache: 0.8B bf16 and int4, 4B int4 by default; qwen35 int4 is
`qwen35 quantize --group-size 64 --head`, llama.cpp's peers F16 / Q4_0 come from its own converter and quantizer),
each prompt length and each K/V precision (16: qwen35 bf16 / llama.cpp F16; 8: qwen35 int8 with a scale per token
and head / llama.cpp q8_0), one greedy completion of a seeded random prompt (token ids drawn from the vocabulary,
no special tokens; the same ids for both engines) and `--decode-tokens` more tokens (EOS ignored), each row in a
fresh process so its peak RSS (VmHWM) is its own: the whole process's (loading included: loading a checkpoint
peaks above its loaded size) and the run's own (VmHWM reset after loading and warm-up, /proc/<pid>/clear_refs):

- qwen35: `qwen35.load(path, cache_ram=0, context=prompt + decode + 1, kv_bits=...)`, then `Qwen35.stream` of one
  `Request`. A forward hook on the model times the prefill (start to the first one-token forward, so the first
  token's sampling is in it) and the decode (the one-token forwards: decode tokens - 1 steps, the first token
  comes from the prefill) and prints the prefill's progress. A short warm-up call runs first (kernel builds).
- llama.cpp: its own `llama-server` (llama-cpp-python is not installed on the development machine; the server is
  built once from the llama.cpp vendored in the llama-cpp-python sdist, `bench_multiturn.llama_bin`), started per
  (model, length, K/V type) with `-c <prompt + decode + 1 rounded up to 256> -t/-tb <threads> -np 1 -fa on
  --cache-type-k/-v f16|q8_0 --cache-ram 0 --ctx-checkpoints 0` (flash attention on for both K/V types: the
  quantized V cache needs it), one `/completion` of the same token ids with `n_predict`, `cache_prompt: false`,
  `ignore_eos`, temperature 0. Speeds come from the response's `timings` (prompt_per_second; predicted_per_second
  = decode steps after the first token over their time, the same definition as qwen35's), peak RSS from VmHWM.

The decode limit of a row is read bandwidth ÷ (weight bytes read per token + K/V bytes at that depth): the
bandwidth is measured by the driver right before each row and again right after it (`bandwidth.ReadProbe`: the
fastest PyTorch sum over 512 MB with --threads threads, best of 3), and the larger reading counts: this shared
machine drifts by tens of percent within minutes, and a single early reading put shares between 53 and 127 %. The
planner's prediction is `qwen35.memory.plan(config, context, quant=..., kv_bits=...)` with no snapshot budget
(cache_ram=0), against the measured peak. The machine is shared, so each row also reports the cores other
processes used while it ran
(the machine's busy CPU time less this driver's and its children's), and `--quiet-wait M` waits up to M minutes
before each row for the others to leave the CPU. The prompt is capped at the model's 262,144 positions less the
reply (262K: 262,127 tokens).

Targets (the issue): qwen35 ahead of llama.cpp (prefill and decode) at every length at the same K/V precision;
long-context (>= 32K) decode >= 70% of the limit; 0.8B int4 at 262K with 8-bit K/V under 3 GB peak RSS; 4B int4
at 128K with 8-bit K/V under 5.5 GB. Prints a table per model, the checks, then one JSON line; `--plot` draws
decode tok/s against context length.

    # here, ~30 min on 2 cores:
    PYTHONPATH=src .venv/bin/python benchmarks/bench_context.py --sizes 0.8B --variants int4 --lengths 1024,8192
    PYTHONPATH=src .venv/bin/python benchmarks/bench_context.py --quiet-wait 20 --plot docs/context-decode.png  # all
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ENGINES = ["qwen35", "llama"]
GGUF = {"bf16": "F16", "int4": "Q4_0"}  # the llama.cpp peer of each qwen35 variant
LLAMA_KV = {16: "f16", 8: "q8_0"}
Q8_0_BYTES = 34 / 32  # llama.cpp q8_0: 32 int8 values and one fp16 scale per block
LENGTHS = [1024, 8192, 32768, 131072, 262144]
LONG = 32768  # "long context" for the decode-limit target
GB = 1e9


def label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def prompt_ids(n: int, seed: int, vocab: int) -> list[int]:
    """`n` seeded random token ids below `vocab` (the first special token): the same for every engine."""
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def peak_rss_self() -> int:
    """This process's peak RSS (VmHWM; ru_maxrss where there is no /proc)."""
    try:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak(proc: Path) -> None:
    """Linux: restart a process's peak-RSS counter (VmHWM), so what follows has its own peak."""
    try:
        (proc / "clear_refs").write_text("5")
    except OSError:
        pass


# -- qwen35: one row in a fresh process ----------------------------------------------------------------------------

def child(spec: dict) -> None:
    """Load, warm up, prefill `spec["prompt"]` random tokens and decode; print progress, then `RESULT {json}`."""
    import torch
    from cpu_engines import weight_bytes_qwen35

    import qwen35
    from qwen35.runtime import Request
    from qwen35.sampling import SamplingParams

    torch.set_num_threads(spec["threads"])
    extra = {"kv_bits": spec["kv_bits"]} if "kv_bits" in inspect.signature(qwen35.load).parameters else {}
    start = time.perf_counter()
    m = qwen35.load(spec["path"], dtype="bfloat16", device="cpu", cache_ram=0, context=spec["context"], **extra)
    load_s = time.perf_counter() - start
    params = SamplingParams(temperature=0, max_tokens=spec["decode"], ignore_eos=True)
    for _ in m.stream(Request("warmup", prompt_ids(32, spec["seed"] + 1, spec["vocab"]), params.updated(
            max_tokens=2))):
        pass
    load_peak = peak_rss_self()
    reset_peak(Path("/proc/self"))  # from here: the run's own peak (loading peaks above the loaded size)
    ids = prompt_ids(spec["prompt"], spec["seed"], spec["vocab"])
    t: dict = {"prefilled": 0, "steps": 0, "first": None, "last": None, "shown": time.perf_counter()}
    features = m.model.features  # what prefill chunks and decode steps (through forward) both run

    def timed(chunk, *rest, **named):
        now, n = time.perf_counter(), chunk.shape[-1]
        if n == 1:
            t["first"] = t["first"] or now
            t["steps"] += 1
        else:
            if now - t["shown"] >= spec["progress_s"]:
                t["shown"] = now
                print(f"      prefill {t['prefilled']:,}/{len(ids):,} tokens, {now - t['start']:.0f} s, "
                      f"{t['prefilled'] / (now - t['start']):.1f} tok/s", flush=True)
            t["prefilled"] += n
        out = features(chunk, *rest, **named)
        if n == 1:
            t["last"] = time.perf_counter()
        return out

    m.model.features = timed
    t["start"] = time.perf_counter()
    last = None
    for last in m.stream(Request("0", ids, params)):
        pass
    end = time.perf_counter()
    del m.model.features  # the class method again
    first = t["first"] or end  # a one-token reply has no decode step
    print("RESULT " + json.dumps({
        "load_s": load_s, "prefill_s": first - t["start"], "prefill_tok_s": len(ids) / (first - t["start"]),
        "decode_steps": t["steps"], "decode_s": (t["last"] - first) if t["steps"] else None,
        "decode_tok_s": t["steps"] / (t["last"] - first) if t["steps"] else None,
        "completion_tokens": last.completion_tokens if last else 0, "load_peak_rss": load_peak,
        "run_peak_rss": peak_rss_self(), "peak_rss": max(load_peak, peak_rss_self()),
        "weight_bytes": weight_bytes_qwen35(m.model), "context": m.context, "kv_bits_passed": bool(extra)}),
        flush=True)


def run_qwen35(path: Path, row: dict, args: argparse.Namespace) -> dict:
    spec = {"path": str(path), "prompt": row["prompt"], "context": row["prompt"] + args.decode_tokens + 1,
            "kv_bits": row["kv_bits"], "decode": args.decode_tokens, "threads": args.threads, "seed": args.seed,
            "vocab": args.vocab, "progress_s": args.progress}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                                stderr=err, text=True, env=env)
        result = None
        for line in proc.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[7:])
            else:
                print(line, end="", flush=True)
        proc.wait()
        if result is None:
            err.seek(0)
            raise RuntimeError(" | ".join(err.read().strip().splitlines()[-3:]) or f"exit code {proc.returncode}")
    return result


# -- llama.cpp: llama-server per row ---------------------------------------------------------------------------------

def run_llama(gguf_path: Path, row: dict, args: argparse.Namespace) -> dict:
    import httpx
    from bench_multiturn import Server, llama_bin
    from bench_server import free_port

    ctx = min(-(-(row["prompt"] + args.decode_tokens + 1) // 256) * 256, args.max_positions)
    kv, port = LLAMA_KV[row["kv_bits"]], free_port()
    cmd = [str(llama_bin("llama-server", args)), "-m", str(gguf_path), "--host", "127.0.0.1", "--port", str(port),
           "-c", str(ctx), "-t", str(args.threads), "-tb", str(args.threads), "-np", "1", "-fa", "on",
           "--cache-type-k", kv, "--cache-type-v", kv, "--cache-ram", "0", "--ctx-checkpoints", "0",
           *args.llama_args.split()]
    server = Server(cmd, port, {**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    load_peak = server.rss("VmHWM")
    reset_peak(Path(f"/proc/{server.proc.pid}"))
    body = {"prompt": prompt_ids(row["prompt"], args.seed, args.vocab), "n_predict": args.decode_tokens,
            "cache_prompt": False, "ignore_eos": True, "temperature": 0}
    done = threading.Event()

    def ticker() -> None:  # llama-server answers at the end: say it is still working
        start = time.perf_counter()
        while not done.wait(args.progress):
            print(f"      llama-server working, {time.perf_counter() - start:.0f} s", flush=True)

    threading.Thread(target=ticker, daemon=True).start()
    try:
        r = httpx.post(server.url + "/completion", json=body, timeout=None)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        timings = r.json()["timings"]
        run_peak = server.rss("VmHWM")
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise RuntimeError(f"{e} | server: {server.tail()}") from e
    finally:
        done.set()
        server.stop()
    return {"load_s": server.load_s, "prefill_s": timings["prompt_ms"] / 1e3,
            "prefill_tok_s": timings["prompt_per_second"], "decode_steps": max(0, timings["predicted_n"] - 1),
            "decode_s": timings["predicted_ms"] / 1e3, "decode_tok_s": timings["predicted_per_second"] or None,
            "completion_tokens": timings["predicted_n"], "prompt_n": timings["prompt_n"], "load_peak_rss": load_peak,
            "run_peak_rss": run_peak, "peak_rss": max(load_peak, run_peak),
            "context": ctx}


# -- the driver -----------------------------------------------------------------------------------------------------

def first_special(tokenizer_json: Path) -> int:
    """The lowest added (special) token id: prompts draw below it."""
    added = json.loads(tokenizer_json.read_text())["added_tokens"]
    return min(t["id"] for t in added)


def quant_of(size: str, variant: str, cache: Path):
    """The QuantConfig of a variant: its quantized checkpoint's, or what `qwen35_dir` would write."""
    from cpu_engines import QUANTIZE

    from qwen35.quant.quantize import QuantConfig

    if variant == "bf16":
        return None
    stored = cache / f"{size}-{variant}" / "config.json"
    if stored.exists():
        return QuantConfig.from_dict(json.loads(stored.read_text())["quantization_config"])
    flags = QUANTIZE[variant]
    return QuantConfig(int(flags[flags.index("--bits") + 1]), 64, 8 if "--head" in flags else 0)


def planned(size: str, variant: str, context: int, kv_bits: int, cache: Path):
    """The planner's MemoryPlan for a qwen35 row (no snapshot budget: cache_ram=0)."""
    from qwen35.config import load_config
    from qwen35.memory import plan

    return plan(load_config(cache / size), context, 1, 2, quant_of(size, variant, cache), kv_bits)


def kv_per_token(config, engine: str, kv_bits: int) -> float:
    """K/V bytes per token of context for an engine at a K/V precision."""
    from qwen35.memory import kv_bytes_per_token

    if engine == "qwen35":
        return kv_bytes_per_token(config, kv_bits)
    elems = config.layer_types.count("full_attention") * 2 * config.num_key_value_heads * config.head_dim
    return elems * (2 if kv_bits == 16 else Q8_0_BYTES)


def kv_name(engine: str, kv_bits: int) -> str:
    return LLAMA_KV[kv_bits] if engine == "llama" else {16: "bf16", 8: "int8"}[kv_bits]


def rows_to_run(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(rows, skipped): every (size, variant, length, kv_bits, engine) asked for, or why it cannot run."""
    rows, skipped = [], []
    for size in args.sizes:
        variants = (["bf16", "int4"] if size == "0.8B" else ["int4"]) if args.variants == ["auto"] else args.variants
        for variant in variants:
            for length in args.lengths:
                for kv in args.kv_bits:
                    for engine in args.engines:
                        row = {"size": size, "variant": variant, "length": length, "kv_bits": kv, "engine": engine,
                               "prompt": min(length, args.max_positions - args.decode_tokens - 1)}
                        if length > 131072 and size != "0.8B":
                            skipped.append({**row, "skipped": "262K only for 0.8B (the issue's matrix)"})
                        elif engine == "qwen35" and kv == 8 and not args.load_kv_bits:
                            skipped.append({**row, "skipped": "unsupported: qwen35.load() has no kv_bits here"})
                        else:
                            rows.append(row)
    return rows, skipped


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, those of this driver and its finished children)."""
    import resource

    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:7]) - fields[3] - fields[4]  # user, nice, system, irq, softirq (guest is inside user)
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return busy / os.sysconf("SC_CLK_TCK"), own


class Others:
    """Cores used by other processes (the machine's busy time less this driver's and its children's) from
    `start()` to `cores()`: this machine is shared, and a row run beside other work is slower for it."""

    def start(self) -> Others:
        self.t, (self.busy, self.own) = time.perf_counter(), cpu_seconds()
        return self

    def cores(self) -> float:
        busy, own = cpu_seconds()
        return max(0.0, (busy - self.busy) - (own - self.own)) / max(1e-9, time.perf_counter() - self.t)


def wait_quiet(args: argparse.Namespace) -> None:
    """With --quiet-wait: wait (at most that many minutes) until other processes use under 0.25 cores over 10 s."""
    deadline = time.perf_counter() + 60 * args.quiet_wait
    while args.quiet_wait:
        probe = Others().start()
        time.sleep(10)
        busy = probe.cores()
        if busy < 0.25:
            return
        if time.perf_counter() > deadline:
            print(f"    other processes still use {busy:.2f} cores: running anyway", flush=True)
            return
        print(f"    waiting: other processes use {busy:.2f} cores", flush=True)
        time.sleep(20)


def measure(row: dict, args: argparse.Namespace, probe) -> None:
    """Run one row in its own process and fill in its figures, or `error` / `skipped`."""
    from bench_multiturn import gguf, qwen35_dir
    from cpu_engines import gguf_weight_bytes

    from qwen35.config import load_config
    from qwen35.memory import available_memory

    cache = Path(args.cache)
    config = load_config(cache / row["size"])
    context = row["prompt"] + args.decode_tokens + 1
    kv_bytes = kv_per_token(config, row["engine"], row["kv_bits"]) * row["prompt"]
    try:
        if row["engine"] == "qwen35":
            path = qwen35_dir(row["size"], row["variant"], cache)
            memory_plan = planned(row["size"], row["variant"], context, row["kv_bits"], cache)
            row.update(planned_bytes=memory_plan.total, planned_parts=memory_plan.parts())
            need = memory_plan.total
        else:
            path = gguf(row["size"], GGUF[row["variant"]], args)
            row["weight_bytes"] = gguf_weight_bytes(path)
            need = path.stat().st_size + kv_per_token(config, "llama", row["kv_bits"]) * context + (300 << 20)
        free = available_memory()
        if need > 0.95 * free:
            row["skipped"] = f"needs ~{need / GB:.1f} GB, {free / GB:.1f} GB free"
            print(f"    skipped: {row['skipped']}", flush=True)
            return
        wait_quiet(args)
        before = probe(passes=3)
        others = Others().start()
        row.update(run_qwen35(path, row, args) if row["engine"] == "qwen35" else run_llama(path, row, args))
        row["others_cores"] = round(others.cores(), 2)
        # this shared host's bandwidth moves by a third from minute to minute: the limit takes the larger
        # reading, before the row or right after its decode, so a share is never flattered by a slow moment
        row["read_bw_before_after"] = [round(before, 1), round(probe(passes=3), 1)]
        row["read_bw_gbs"] = max(row["read_bw_before_after"])
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        row["error"] = str(e)[:500]
        print(f"    error: {row['error']}", flush=True)
        return
    row["kv_bytes"] = int(kv_bytes)
    if row.get("decode_tok_s"):
        row["limit_tok_s"] = row["read_bw_gbs"] * GB / (row["weight_bytes"] + kv_bytes)
        row["decode_share"] = row["decode_tok_s"] / row["limit_tok_s"]
    planner = f", planner {row['planned_bytes'] / GB:.2f} GB" if "planned_bytes" in row else ""
    print(f"    prefill {row['prefill_tok_s']:.1f} tok/s ({row['prefill_s']:.0f} s), decode "
          f"{row['decode_tok_s'] or 0:.2f} tok/s ({row.get('decode_share', 0):.0%} of the "
          f"{row.get('limit_tok_s', 0):.1f} tok/s limit at {row['read_bw_gbs']:.1f} GB/s), peak RSS "
          f"{row['peak_rss'] / GB:.2f} GB (loading {row['load_peak_rss'] / GB:.2f}, run "
          f"{row['run_peak_rss'] / GB:.2f}){planner}; other processes used {row['others_cores']:.2f} cores meanwhile",
          flush=True)


# -- checks, table, plot ---------------------------------------------------------------------------------------------

def done(row: dict) -> bool:
    return "prefill_tok_s" in row


def find(rows: list[dict], **key) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in key.items())), None)


def pairs(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(qwen35 row, llama row) at the same model, length and K/V precision, both measured."""
    out = []
    for r in rows:
        if r["engine"] == "qwen35" and done(r):
            peer = find(rows, engine="llama", size=r["size"], variant=r["variant"], length=r["length"],
                        kv_bits=r["kv_bits"])
            if peer and done(peer):
                out.append((r, peer))
    return out


def checks(rows: list[dict], args: argparse.Namespace) -> dict[str, dict]:
    """The issue's targets, each {"met": bool | None (not judged), ...figures}."""
    out: dict[str, dict] = {}
    both = pairs(rows)
    ratios = [[f"{q['size']} {q['variant']} {label(q['length'])} kv{q['kv_bits']}",
               round(q["prefill_tok_s"] / l["prefill_tok_s"], 2),
               round(q["decode_tok_s"] / l["decode_tok_s"], 2) if q["decode_tok_s"] and l["decode_tok_s"] else None]
              for q, l in both]
    out["a_ahead_of_llama"] = {"met": all(p > 1 and (d or 0) > 1 for _, p, d in ratios) if ratios else None,
                               "qwen35_over_llama_prefill_decode": ratios}
    ours = [r for r in rows if r["engine"] == "qwen35" and r.get("decode_share") is not None]
    long = [r for r in ours if r["length"] >= LONG]
    judged = long or ours
    out["b_decode_70pct_of_limit"] = {
        "met": all(r["decode_share"] >= 0.7 for r in judged) if judged else None,
        "judged_on": "lengths >= 32K" if long else "the lengths run (no row >= 32K ran)" if ours else "nothing ran",
        "shares": [[f"{r['size']} {r['variant']} {label(r['length'])} kv{r['kv_bits']}", round(r["decode_share"], 2),
                    round(r["decode_tok_s"], 2), round(r["limit_tok_s"], 2)] for r in judged]}
    for name, size, length, limit in [("c_0.8B_int4_262K_kv8_under_3GB", "0.8B", 262144, 3.0),
                                      ("d_4B_int4_128K_kv8_under_5.5GB", "4B", 131072, 5.5)]:
        r = find(rows, engine="qwen35", size=size, variant="int4", length=length, kv_bits=8)
        prompt = min(length, args.max_positions - args.decode_tokens - 1)
        try:
            predicted = planned(size, "int4", prompt + args.decode_tokens + 1, 8, Path(args.cache)).total
        except (OSError, ValueError):  # no checkpoint of that size in --cache
            predicted = None
        out[name] = {"met": r["peak_rss"] < limit * GB if r and done(r) else None,
                     "peak_rss_gb": round(r["peak_rss"] / GB, 3) if r and done(r) else None,
                     "run_peak_rss_gb": round(r["run_peak_rss"] / GB, 3) if r and done(r) else None,
                     "planner_gb": round(predicted / GB, 3) if predicted else None, "limit_gb": limit,
                     "ran": bool(r and done(r))}
    return out


def print_tables(rows: list[dict], skipped: list[dict], verdicts: dict[str, dict]) -> None:
    heads = ["length", "prompt", "engine", "K/V", "prefill tok/s", "decode tok/s", "limit tok/s", "decode ÷ limit",
             "peak RSS GB", "run peak GB", "planner GB", "prefill ÷ llama.cpp", "decode ÷ llama.cpp",
             "others' cores"]
    ratio = {id(q): (q["prefill_tok_s"] / l["prefill_tok_s"],
                     q["decode_tok_s"] / l["decode_tok_s"] if q["decode_tok_s"] and l["decode_tok_s"] else None)
             for q, l in pairs(rows)}
    for model in dict.fromkeys((r["size"], r["variant"]) for r in rows + skipped):
        size, variant = model
        print(f"\n{size} {variant} (llama.cpp: {GGUF[variant]})")
        print("| " + " | ".join(heads) + " |\n|" + "---|" * len(heads))
        for r in sorted((r for r in rows + skipped if (r["size"], r["variant"]) == model),
                        key=lambda r: (r["length"], -r["kv_bits"], ENGINES.index(r["engine"]))):
            cells = [label(r["length"]), str(r["prompt"]), "qwen35" if r["engine"] == "qwen35" else "llama-server",
                     kv_name(r["engine"], r["kv_bits"])]
            if not done(r):
                why = r.get("skipped") or f"error: {r.get('error', '')[:100]}"
                print("| " + " | ".join(cells + [why] + [""] * (len(heads) - len(cells) - 1)) + " |")
                continue
            pr, dr = ratio.get(id(r), (None, None))
            cells += [f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.2f}" if r["decode_tok_s"] else "",
                      f"{r['limit_tok_s']:.1f}" if "limit_tok_s" in r else "",
                      f"{r['decode_share']:.0%}" if "decode_share" in r else "", f"{r['peak_rss'] / GB:.2f}",
                      f"{r['run_peak_rss'] / GB:.2f}",
                      f"{r['planned_bytes'] / GB:.2f}" if "planned_bytes" in r else "",
                      f"{pr:.2f}" if pr else "", f"{dr:.2f}" if dr else "",
                      f"{r['others_cores']:.2f}" if "others_cores" in r else ""]
            print("| " + " | ".join(cells) + " |")
    print()
    for name, v in verdicts.items():
        state = {True: "met", False: "NOT met", None: "n/a"}[v["met"]]
        print(f"  ({name[0]}) {name[2:].replace('_', ' ')}: {state} "
              f"{json.dumps({k: x for k, x in v.items() if k != 'met'})}")


def plot(rows: list[dict], path: str, args: argparse.Namespace) -> None:
    """Decode tok/s against context length, one line per model, engine and K/V precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if done(r) and r["decode_tok_s"]:
            name = (f"{r['size']} {r['variant'] if r['engine'] == 'qwen35' else GGUF[r['variant']]} "
                    f"{'qwen35' if r['engine'] == 'qwen35' else 'llama.cpp'}, K/V {kv_name(r['engine'], r['kv_bits'])}")
            lines.setdefault(name, []).append((r["length"], r["decode_tok_s"]))
    if not lines:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in sorted(lines.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="s" if name.endswith(("int8", "q8_0")) else "o",
                linestyle="-" if "qwen35" in name else "--", label=name)
    ax.set_xscale("log", base=2)
    ticks = sorted({r["length"] for r in rows if done(r)})
    ax.set_xticks(ticks, [label(t) for t in ticks])
    ax.set_xlabel("context length (prompt tokens)")
    ax.set_ylabel("decode tok/s at that depth")
    ax.set_title(f"Decode speed against context, {args.threads} threads ({args.cpu})", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}", flush=True)


def drive(args: argparse.Namespace) -> None:
    from bandwidth import ReadProbe
    from bench_cpu import cpu_name
    from shape_true import official_config, write_checkpoint

    import qwen35

    args.sizes, args.variants = args.sizes.split(","), args.variants.split(",")
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.kv_bits, args.engines = [int(x) for x in args.kv_bits.split(",")], args.engines.split(",")
    args.max_positions = official_config(args.sizes[0])["text_config"]["max_position_embeddings"]
    args.load_kv_bits = "kv_bits" in inspect.signature(qwen35.load).parameters
    args.cpu = cpu_name()
    cache = Path(args.cache)
    args.vocab = first_special(write_checkpoint(args.sizes[0], cache / args.sizes[0]) / "tokenizer.json")
    probe = ReadProbe(args.threads)  # 512 MB, held by this driver only
    bandwidth = probe(passes=3)
    print(f"read bandwidth: {bandwidth:.1f} GB/s ({probe.describe()}); cpu: {args.cpu}; prompts: random ids "
          f"below {args.vocab}; qwen35 load(kv_bits=): {'yes' if args.load_kv_bits else 'no'}", flush=True)
    rows, skipped = rows_to_run(args)
    for r in skipped:
        print(f"  skip {r['size']} {r['variant']} {label(r['length'])} kv{r['kv_bits']} {r['engine']}: "
              f"{r['skipped']}", flush=True)
    start = time.perf_counter()
    for i, row in enumerate(rows):
        write_checkpoint(row["size"], cache / row["size"])  # skipped when written
        print(f"\n[{i + 1}/{len(rows)}, {(time.perf_counter() - start) / 60:.0f} min] {row['size']} {row['variant']} "
              f"{row['engine']}, {row['prompt']:,}-token prompt, K/V {kv_name(row['engine'], row['kv_bits'])}",
              flush=True)
        measure(row, args, probe)
    skipped += [r for r in rows if "skipped" in r]
    rows = [r for r in rows if "skipped" not in r]
    verdicts = checks(rows, args)
    print_tables(rows, skipped, verdicts)
    if args.plot:
        plot(rows, args.plot, args)
    print(json.dumps({"benchmark": "context", "threads": args.threads, "decode_tokens": args.decode_tokens,
                      "cpu": args.cpu, "read_bandwidth_gbs": round(bandwidth, 2), "probe": probe.describe(),
                      "qwen35_load_kv_bits": args.load_kv_bits, "minutes": round((time.perf_counter() - start) / 60, 1),
                      "rows": rows, "skipped": skipped, "checks": verdicts}))


def merge(args: argparse.Namespace) -> None:
    """--merge: the tables, checks, plot and JSON line of earlier runs together (the last JSON line of each log;
    a row measured again in a later log replaces the earlier one), for a matrix run in pieces."""
    from shape_true import official_config

    runs = []
    for log in args.merge:
        lines = [ln for ln in Path(log).read_text().splitlines() if ln.startswith('{"benchmark": "context"')]
        if not lines:
            raise SystemExit(f"{log}: no JSON line of bench_context.py")
        runs.append(json.loads(lines[-1]))
    key = ("size", "variant", "length", "kv_bits", "engine")
    measured = {tuple(r[k] for k in key): r for run in runs for r in run["rows"]}
    skipped = {tuple(r[k] for k in key): r for run in runs for r in run["skipped"]}
    rows, skipped = list(measured.values()), [r for k, r in skipped.items() if k not in measured]
    args.decode_tokens, args.threads, args.cpu = (runs[0][k] for k in ("decode_tokens", "threads", "cpu"))
    args.max_positions = official_config("0.8B")["text_config"]["max_position_embeddings"]
    verdicts = checks(rows, args)
    print_tables(rows, skipped, verdicts)
    if args.plot:
        plot(rows, args.plot, args)
    print(json.dumps({"benchmark": "context", "merged": args.merge, "threads": args.threads,
                      "decode_tokens": args.decode_tokens, "cpu": args.cpu, "rows": rows, "skipped": skipped,
                      "checks": verdicts}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0.8B,4B", help="comma list of shape_true sizes")
    p.add_argument("--variants", default="auto", help="comma list of bf16,int4 (llama.cpp: F16, Q4_0); auto: bf16 "
                   "and int4 at 0.8B, int4 above (the issue's matrix)")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="comma list of prompt lengths")
    p.add_argument("--kv-bits", default="16,8", help="comma list of 16,8 (llama.cpp: f16, q8_0)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {','.join(ENGINES)}")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated after each prompt")
    p.add_argument("--llama-args", default="", help="more llama-server flags, space-separated (-nr: its AMX "
                   "repacking crashed at start on a Sapphire Rapids Xeon)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", type=float, default=60.0, help="seconds between progress lines of a prefill")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "qwen35-bench"))
    p.add_argument("--quiet-wait", type=float, default=0.0, help="before each row, wait up to this many minutes "
                   "for other processes to leave the CPU (under 0.25 cores over 10 s); 0: never wait")
    p.add_argument("--plot", default="", help="PNG of decode tok/s against context length (e.g. "
                   "docs/context-decode.png)")
    p.add_argument("--merge", nargs="+", metavar="LOG", help="measure nothing: the tables, checks and plot of "
                   "earlier runs' logs together (a row in a later log replaces the same row of an earlier one)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if args.merge:
        return merge(args)
    drive(args)


if __name__ == "__main__":
    main()
