"""CPU speed and memory of qwen35 against transformers and llama.cpp, on shape-true Qwen3.5 checkpoints, one run.

For each size (the real 0.8B/2B/4B/9B configs, random weights, official layout, real vocabulary; written once to
--cache by `shape_true.py`) and each engine, a fresh process measures: prefill tok/s (512 and 4096 tokens), time
to first token of a 512-token prompt, decode tok/s over 128 tokens (EOS ignored), peak RSS (whole run, and while
generating: the 512-token prompt and its 128 tokens, run first after loading), and achieved weight
bandwidth (weight bytes read per token x decode tok/s) as a share of the read bandwidth (`bandwidth.ReadProbe`:
the fastest PyTorch sum this machine does, stated in the output) measured between blocks of 16 decode steps,
outside their timing (the median of those probes: this machine's bandwidth drifts by tens of percent within
minutes, so the two figures are taken seconds apart). With --turns, the engines of a size run at
once and take turns, block by block and prefill by prefill, so the ratios to the peers (last two columns) compare
the same minutes of the machine.
Engines: qwen35 bf16 / int8 / int4 (g64, int8 head) / int4h4 (int4 head too) / int4g128h4 (groups of 128,
int4 head; only when named), transformers bf16 (same checkpoint), and llama.cpp through llama-cpp-python
(`make bench` builds it from source) on the same checkpoint converted by llama.cpp's own converter to F16, then
quantized to Q8_0 / Q4_0; and qwen35 on those same GGUF files (gguf-Q8_0 / gguf-Q4_0). Same thread count
everywhere. Prints a table, then one JSON line.

    python benchmarks/bench_cpu.py --sizes 0.8B --engines all [--turns]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cpu_engines import engine_hooks, prepared

HERE = Path(__file__).resolve().parent
ENGINES = ["qwen35-bf16", "qwen35-int8", "qwen35-int4", "qwen35-int4h4", "transformers-bf16", "llama-F16",
           "llama-Q8_0", "llama-Q4_0", "gguf-Q8_0", "gguf-Q4_0"]  # `--engines all`; qwen35-int4g128h4 when named


PROBE_EVERY = 16  # decode steps between two read-bandwidth probes


# -- worker: one engine (cpu_engines.py), one size, in a fresh process, so its peak RSS is its own ----------------

def reset_peak_rss() -> None:
    """Linux: restart the process's peak-RSS counter (VmHWM), so the generation's own peak can be read."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    """This process's peak RSS since start or `reset_peak_rss` (VmHWM; ru_maxrss where there is no /proc, which
    on Linux also carries the peak of the parent that forked us, so it is the fallback only)."""
    try:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def serve(run_prefill, start_decode, load_s: float, weight_bytes: int) -> None:
    """Answer the driver's commands, one JSON line each (see `Worker`): the driver decides what runs when, so
    engines can take turns."""
    step = None
    reply({"load_s": load_s, "weight_bytes": weight_bytes})
    for line in sys.stdin:
        command, *arg = line.split()
        if command == "warmup":  # first-call allocations and kernel builds are not what is measured
            run_prefill(32)
            answer = {"load_peak": peak_rss()}
            reset_peak_rss()
        elif command == "start":  # first, as a user would: load, then generate
            ttft, step = start_decode()
            answer = {"ttft_s": ttft}
        elif command == "decode":
            start = time.perf_counter()
            for _ in range(int(arg[0])):
                step()
            answer = {"seconds": time.perf_counter() - start}
        elif command == "prefill":
            answer = {"seconds": run_prefill(int(arg[0]))}
        elif command == "rss":  # the peak since warm-up (generating) or since start (loading included)
            answer = {"peak_rss": peak_rss()}
        else:
            return
        reply(answer)


def reply(answer: dict) -> None:
    print("RESULT " + json.dumps(answer), flush=True)


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    serve(*engine_hooks(*args.worker, args))


# -- driver -------------------------------------------------------------------------------------------------------

class Worker:
    """One engine on one size in its own process (so its peak RSS is its own), driven line by line."""

    def __init__(self, engine: str, size: str, args: argparse.Namespace):
        self.engine, self.log = engine, tempfile.TemporaryFile("w+")
        cmd = [sys.executable, __file__, "--worker", engine, size, "--cache", args.cache, "--threads",
               str(args.threads), "--decode", str(args.decode), "--prefill", ",".join(map(str, args.prefill))]
        cmd += ["--compile"] * args.compile
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        self.result = self.answer()

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.answer()

    def answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        self.proc.wait()
        self.log.seek(0)
        tail = self.log.read().strip().splitlines()[-3:]
        raise RuntimeError(" | ".join(tail) or f"exit code {self.proc.returncode}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()
        self.log.close()


def run_group(engines: list[str], size: str, args: argparse.Namespace, probe) -> dict[str, dict]:
    """Measure `engines` on `size` taking turns: every block of decode steps and every prefill runs each engine
    once, in a rotating order, so all see the same minutes of this shared machine (one engine: a plain run).
    The read bandwidth is probed (`bandwidth.ReadProbe`) between rounds, while every engine waits."""
    results: dict[str, dict] = {}
    workers: list[Worker] = []
    for engine in engines:  # one at a time: loading, converting and quantizing do not overlap
        try:
            w = Worker(engine, size, args)
            w.result.update(w.ask("warmup"))
            workers.append(w)
        except RuntimeError as e:
            results[engine] = {"error": str(e)}

    def turns(command: str, key: str, round_: int = 0) -> None:
        for w in workers[round_ % len(workers):] + workers[:round_ % len(workers)]:
            time.sleep(0.01)  # the last engine's threads stop spinning (OpenMP, ggml) and leave the cores free
            try:
                w.result.setdefault(key, []).append(w.ask(command))
            except RuntimeError as e:  # this engine failed: report it, keep what the others measure
                results[w.engine] = {"error": str(e)}
                workers.remove(w)
                w.close()

    turns("start", "start")
    bandwidths = []
    for r, done in enumerate(range(0, args.decode, PROBE_EVERY)):
        turns(f"decode {min(PROBE_EVERY, args.decode - done)}", "decode", r)
        time.sleep(0.01)
        bandwidths.append(probe(passes=3))
    turns("rss", "generate")
    for n in args.prefill:
        for r in range(1 if n > 1024 else 2):
            turns(f"prefill {n}", f"prefill {n}", r)
    turns("rss", "end")
    for w in workers:
        w.close()
        r = w.result
        results[w.engine] = {
            "load_s": r["load_s"], "weight_bytes": r["weight_bytes"], "ttft_s": r["start"][0]["ttft_s"],
            "decode": args.decode / sum(b["seconds"] for b in r["decode"]),
            "prefill": {n: n / min(p["seconds"] for p in r[f"prefill {n}"]) for n in args.prefill},
            "generate_rss": r["generate"][0]["peak_rss"],
            "peak_rss": max(r["load_peak"], r["end"][0]["peak_rss"]), "read_bw": statistics.median(bandwidths)}
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0.8B", help="comma list of 0.8B,2B,4B,9B")
    p.add_argument("--engines", default="all", help=f"comma list of {','.join(ENGINES)}, qwen35-int4g128h4, or all")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prefill", default="512,4096", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "qwen35-bench"))
    p.add_argument("--compile", action="store_true", help="qwen35 engines decode through torch.compile")
    p.add_argument("--turns", action="store_true", help="all engines of a size loaded at once and measured taking "
                   "turns (same minutes of the machine for each; needs the memory of all of them)")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(HERE))
    from bandwidth import ReadProbe
    from shape_true import write_checkpoint

    engines = ENGINES if args.engines == "all" else args.engines.split(",")
    probe = ReadProbe(args.threads)
    bandwidth = probe()
    print(f"read bandwidth: {bandwidth:.1f} GB/s ({probe.describe()}); cpu: {cpu_name()}", flush=True)
    rows = []
    for size in args.sizes.split(","):
        if not all(prepared(engine, size, Path(args.cache)) for engine in engines):
            write_checkpoint(size, Path(args.cache) / size)
        results: dict[str, dict] = {}
        for group in [engines] if args.turns else [[e] for e in engines]:
            print(f"  {size} {', '.join(group)} …", flush=True)
            results.update(run_group(group, size, args, probe))
        for engine in engines:
            r = results[engine]
            if "error" not in r:  # against the read bandwidth probed between its decode steps
                r["bandwidth_gbs"] = r["weight_bytes"] * r["decode"] / 1e9
                r["bandwidth_share"] = r["bandwidth_gbs"] / r["read_bw"]
            rows.append({"size": size, "engine": engine, **r, **peer_ratios(engine, results, args)})
    print_table(rows, args)
    print(json.dumps({"benchmark": "cpu", "threads": args.threads, "turns": args.turns,
                      "read_bandwidth_gbs": round(bandwidth, 2), "probe": probe.describe(), "cpu": cpu_name(),
                      "results": rows}))


def peer_ratios(engine: str, results: dict[str, dict], args: argparse.Namespace) -> dict:
    """A qwen35 engine's decode over llama.cpp's at the same width, and its first prefill over transformers'."""
    family, variant = engine.split("-", 1)
    peer = "llama-" + (variant if family == "gguf" else {"bf16": "F16", "int8": "Q8_0"}.get(variant, "Q4_0"))
    ours, out = results[engine], {}
    if family not in ("qwen35", "gguf") or "error" in ours:
        return out
    if "error" not in results.get(peer, {"error": ""}):
        out["decode_vs_llama"] = ours["decode"] / results[peer]["decode"]
    if "error" not in results.get("transformers-bf16", {"error": ""}):
        n = args.prefill[0]
        out["prefill_vs_transformers"] = ours["prefill"][n] / results["transformers-bf16"]["prefill"][n]
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    heads = ["size", "engine"] + [f"prefill {n}" for n in args.prefill] + [
        "TTFT s", "decode tok/s", "GB/s", "read bw", "share", "peak RSS GB", "generating RSS GB",
        "decode ÷ llama.cpp", f"prefill {args.prefill[0]} ÷ transformers"]
    print("\n| " + " | ".join(heads) + " |\n|" + "---|" * len(heads))
    for r in rows:
        if "error" in r:
            print(f"| {r['size']} | {r['engine']} | error: {r['error'][:80]} |")
            continue
        cells = [r["size"], r["engine"]] + [f"{r['prefill'][n]:.0f}" for n in args.prefill] + [
            f"{r['ttft_s']:.2f}", f"{r['decode']:.1f}", f"{r['bandwidth_gbs']:.1f}", f"{r['read_bw']:.1f}",
            f"{100 * r['bandwidth_share']:.0f}%", f"{r['peak_rss'] / 1e9:.2f}",
            f"{r['generate_rss'] / 1e9:.2f}"] + [f"{r[key]:.2f}" if key in r else "" for key in
                                                 ("decode_vs_llama", "prefill_vs_transformers")]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
