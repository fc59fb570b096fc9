"""Multi-turn agent conversations (prefix reuse): `qwen35 serve` with its prefix cache, without it, and llama.cpp's
`llama-server`, all driven the same way through their OpenAI chat APIs (streamed, usage included).

Why: an agent resends its whole conversation every turn, so what a server recomputes decides its time to first
token (TTFT); with reuse, TTFT should follow the turn's new tokens, not the conversation's length.
The conversation is seeded and synthetic (no downloads): a ~2,000-token system prompt with tool definitions, then
user turns of 50-300 tokens, each answered in `--max-tokens` tokens (random weights never stop on their own;
`ignore_eos` makes every engine write the same length), the reply appended as the server returned it (content,
and reasoning_content when present). Run with thinking off and on, temperature 0, one server at a time; with
thinking on a qwen35 reply reasons for `--thinking-budget` tokens, then answers as long as with thinking off.
Models: shape-true checkpoints (`shape_true.py`, in --cache), qwen35 bf16 / int4 (g64, int8 head) against GGUF
F16 / Q4_0 from llama.cpp's converter. llama-server is built once from the llama.cpp vendored in the
llama-cpp-python sdist (`cpu_engines.llama_source`) into --cache, and runs with its own defaults for prompt
caching and context checkpoints. Prints a table per (model, thinking), the checks, then one JSON line.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_multiturn.py --turns 3 --max-tokens 40      # ~30 min here
    PYTHONPATH=src .venv/bin/python benchmarks/bench_multiturn.py --sizes 0.8B,4B --variants auto  # everything
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_server import free_port  # noqa: E402
from cpu_engines import QUANTIZE, gguf_file, llama_source  # noqa: E402
from shape_true import quantized, write_checkpoint  # noqa: E402

ENGINES = ["qwen35", "qwen35-nocache", "llama-server"]
GGUF = {"bf16": "F16", "int4": "Q4_0"}  # the llama.cpp peer of each qwen35 variant
WORDS = ("the a of to and in for on with by from that this it as is are was be can will should must not any each "
         "file module function class method test build server client request response cache token prompt model "
         "layer tensor memory thread process queue batch config option flag value error warning result output "
         "input path directory repository branch commit patch review user agent tool call schema field number "
         "string list object record index table query update delete create read write check run start stop "
         "first last next previous before after always never only also then when while because however").split()
TOOLS = [{"type": "function", "function": {"name": name, "description": text, "parameters": {
    "type": "object", "properties": props, "required": list(props)[:1]}}} for name, text, props in [
    ("read_file", "Read a text file of the repository and return its lines.",
     {"path": {"type": "string", "description": "path relative to the repository root"},
      "start": {"type": "integer", "description": "first line, 1-based"}, "end": {"type": "integer"}}),
    ("run_shell", "Run a shell command in the sandbox and return its exit status, stdout and stderr.",
     {"command": {"type": "string"}, "timeout_s": {"type": "number", "description": "seconds before it is killed"}}),
    ("search_code", "Search the repository for a regular expression; returns matching lines with their paths.",
     {"pattern": {"type": "string"}, "glob": {"type": "string", "description": "only files matching this glob"},
      "max_results": {"type": "integer", "minimum": 1, "maximum": 200}}),
    ("edit_file", "Replace an exact, unique string in a file with another.",
     {"path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"}}),
    ("get_weather", "Current weather for a city.",
     {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}})]]


# -- the conversation -----------------------------------------------------------------------------------------------

def text(rng: random.Random, n_tokens: int, tok) -> str:
    """About `n_tokens` tokens of word salad in sentences (cut to the count with the model's own tokenizer)."""
    words, i = [rng.choice(WORDS) for _ in range(n_tokens)], 0
    while i < len(words):
        words[i] = words[i].capitalize()
        i += rng.randint(6, 16)
        words[min(i, len(words)) - 1] += "."
    return tok.decode(tok.encode(" ".join(words)).ids[:n_tokens]).strip()


def conversation(seed: int, turns: int, tok, system_tokens: int = 1100) -> tuple[str, list[str]]:
    """(system message text, user messages): the same for every engine and thinking mode of a run. The system text
    plus the tools as the template renders them make the ~2,000-token prefix."""
    rng = random.Random(seed)
    system = ("You are a careful software agent working in a repository. Use the tools when they help; explain "
              "what you change and why. Rules and project notes follow.\n\n" + text(rng, system_tokens, tok))
    return system, [text(rng, rng.randint(50, 300), tok) for _ in range(turns)]


# -- artifacts: checkpoints, GGUFs, llama-server ----------------------------------------------------------------------

def qwen35_dir(size: str, variant: str, cache: Path) -> Path:
    """The qwen35 checkpoint of a variant: the shape-true bf16 one, or its `qwen35 quantize` copy (as bench_cpu)."""
    return quantized(size, variant, cache, QUANTIZE.get(variant, []))


def gguf(size: str, quant: str, args: argparse.Namespace) -> Path:
    """The GGUF of a size: `cpu_engines.gguf_file` where llama-cpp-python is installed, else the same converter
    and the llama-quantize built beside llama-server."""
    cache = Path(args.cache)
    out, f16 = cache / f"{size}-{quant}.gguf", cache / f"{size}-F16.gguf"
    if out.exists():
        return out
    print(f"  converting {size} to GGUF {quant} …", flush=True)
    ckpt = write_checkpoint(size, cache / size)
    try:
        import llama_cpp  # noqa: F401
        return gguf_file(ckpt, quant, args)
    except ImportError:
        pass
    src = llama_source(cache)
    if not f16.exists():
        subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", "f16",
                        "--no-mtp", "--outfile", str(f16)], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": str(src / "gguf-py")})
    if quant != "F16":
        done = subprocess.run([str(llama_bin("llama-quantize", args)), str(f16), str(out), quant,
                               str(args.threads)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"llama-quantize failed: {done.stderr[-500:]}")
    return out


def llama_bin(name: str, args: argparse.Namespace) -> Path:
    """A llama.cpp tool built (once, under nice) from the vendored source into --cache/llama-server-build."""
    build = Path(args.cache) / "llama-server-build"
    binary = build / "bin" / name
    if not binary.exists():
        src = llama_source(Path(args.cache))
        print(f"  building llama-server and llama-quantize from {src} into {build} (tens of minutes on 2 cores) …",
              flush=True)
        subprocess.run(["nice", "-n", "19", "cmake", "-S", str(src), "-B", str(build), "-DLLAMA_CURL=OFF",
                        "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_SERVER=ON", "-DCMAKE_BUILD_TYPE=Release"], check=True)
        subprocess.run(["nice", "-n", "19", "cmake", "--build", str(build), "--target", "llama-server",
                        "llama-quantize", f"-j{args.threads}"], check=True)
    return binary


# -- servers ---------------------------------------------------------------------------------------------------------

class Server:
    """A server process of ours (its RSS is read from /proc), ready once /health answers 200."""

    def __init__(self, cmd: list[str], port: int, env: dict[str, str]):
        self.url, self.log = f"http://127.0.0.1:{port}", tempfile.TemporaryFile("w+")
        start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        while True:
            if self.proc.poll() is not None or time.perf_counter() - start > 1800:
                tail = self.tail()  # before stop() closes the log
                self.stop()
                raise RuntimeError(f"{Path(cmd[0]).name} did not start: {tail}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.load_s = time.perf_counter() - start

    def rss(self, key: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def tail(self) -> str:
        self.log.seek(0)
        return " | ".join(self.log.read().strip().splitlines()[-4:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def has_cache_flag() -> bool:
    """Whether this qwen35 has `serve --cache-ram` (the prefix cache); without it nothing is passed."""
    out = subprocess.run([sys.executable, "-m", "qwen35", "serve", "--help"], capture_output=True, text=True)
    return "--cache-ram" in out.stdout


def start(engine: str, size: str, variant: str, args: argparse.Namespace) -> Server:
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if engine == "llama-server":
        cmd = [str(llama_bin("llama-server", args)), "-m", str(gguf(size, GGUF[variant], args)), "--host",
               "127.0.0.1", "--port", str(port), "-c", str(args.ctx), "-t", str(args.threads), "--jinja",
               *args.llama_args.split()]
        return Server(cmd, port, env)
    cmd = [sys.executable, "-m", "qwen35", "serve", "-m", str(qwen35_dir(size, variant, Path(args.cache))),
           "--port", str(port), "--device", "cpu", "--dtype", "bfloat16", "--model-name", "bench"]
    if args.cache_flag:
        cmd += ["--cache-ram", "0" if engine == "qwen35-nocache" else str(args.cache_ram)]
    return Server(cmd, port, env)


def prefix_metric(server: Server, name: str) -> float | None:
    """qwen35's `qwen35_prefix_cache_<name>` from GET /metrics, if it has one."""
    try:
        lines = httpx.get(server.url + "/metrics", timeout=10).text.splitlines()
    except httpx.HTTPError:
        return None
    return next((float(line.rsplit(" ", 1)[1]) for line in lines
                 if line.startswith(f"qwen35_prefix_cache_{name} ")), None)


# -- one conversation on one server ----------------------------------------------------------------------------------

def turn(client: httpx.Client, server: Server, body: dict) -> dict:
    """Stream one chat request: TTFT (first chunk with any content or reasoning text), total time, the reply."""
    t0, first, reply, reasoning, calls, last = time.perf_counter(), None, [], [], {}, {}
    with client.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if first is None and (delta.get("content") or delta.get("reasoning_content")):
                    first = time.perf_counter() - t0
                reply.append(delta.get("content") or "")
                reasoning.append(delta.get("reasoning_content") or "")
                for call in delta.get("tool_calls") or []:  # merged by index, as OpenAI streams them
                    c = calls.setdefault(call.get("index", 0), {"id": "", "type": "function",
                                                                "function": {"name": "", "arguments": ""}})
                    c["id"] += call.get("id") or ""
                    for k in ("name", "arguments"):
                        c["function"][k] += (call.get("function") or {}).get(k) or ""
            if chunk.get("usage") or chunk.get("timings"):
                last = chunk
    total = time.perf_counter() - t0
    message = {"role": "assistant", "content": "".join(reply)}
    if "".join(reasoning):
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = list(calls.values())
    usage, timings = last.get("usage") or {}, last.get("timings") or {}
    prompt = usage.get("prompt_tokens", 0)
    if timings:  # llama-server: per-request counts of its own
        computed, reused = timings.get("prompt_n", 0), timings.get("cache_n", 0)
    else:
        reused = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        computed = prompt - reused
    return {"ttft_s": first if first is not None else total, "total_s": total, "prompt_tokens": prompt,
            "computed": computed, "reused": reused, "completion_tokens": usage.get("completion_tokens", 0),
            "message": message}


def run_conversation(server: Server, system: str, users: list[str], thinking: bool, args: argparse.Namespace,
                     rows: list[dict], budget: int | None = None) -> None:
    """The whole conversation on one fresh server, as a client does: every turn resends everything so far. Turns
    go into `rows` as they end, so a failing turn keeps the ones before it. With thinking on, `budget` is the
    `thinking_budget` field (qwen35's) and replies get `args.think_tokens` more tokens: reasoning, then an answer
    as long as a reply with thinking off."""
    messages: list[dict] = [{"role": "system", "content": system}]
    for i, user in enumerate(users):
        if i:
            time.sleep(args.pause)  # the user reads the reply and types, or the agent's tools run
        messages.append({"role": "user", "content": user})
        length = args.max_tokens + (args.think_tokens if thinking else 0)
        body = {"model": "bench", "messages": messages, "tools": TOOLS, "max_tokens": length,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                "chat_template_kwargs": {"enable_thinking": thinking}}
        if thinking and budget is not None:
            body["thinking_budget"] = budget
        # a connection per turn: llama-server may drop a kept-alive one after a stream (seen: turn 2 failing
        # "Server disconnected"); the same loopback connect cost for every engine
        with httpx.Client(timeout=3600) as client:
            row = turn(client, server, body)
        messages.append(row.pop("message"))
        for call in messages[-1].get("tool_calls", []):  # a real agent answers every call
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": "ok"})
        row.update(turn_no=i + 1, rss=server.rss())
        rows.append(row)
        print(f"    turn {i + 1}: TTFT {row['ttft_s']:.2f} s, prompt {row['prompt_tokens']} = computed "
              f"{row['computed']} + reused {row['reused']}, total {row['total_s']:.1f} s, "
              f"RSS {row['rss'] / 2**30:.2f} GiB", flush=True)


# -- checks and report -------------------------------------------------------------------------------------------------

def checks(res: dict[str, dict], args: argparse.Namespace) -> dict[str, dict]:
    """The targets for one (model, thinking): each {"met": bool | None, ...figures}; None = cannot be judged."""
    out: dict[str, dict] = {}
    ours, base, llama = (res.get(e, {}).get("turns", []) for e in ENGINES)
    ref = base or ours  # turn 1 computes the whole prompt on either
    rate = ref[0]["computed"] / ref[0]["ttft_s"] if ref else None
    if ours and rate:
        worst = [(r["turn_no"], r["ttft_s"], 1.2 * r["computed"] / rate + 0.05) for r in ours[1:]]
        out["a_ttft_follows_new_tokens"] = {
            "met": all(t <= lim for _, t, lim in worst) if worst else None,
            "prefill_tok_s": round(rate, 1), "rate_from": f"turn 1 of {'qwen35-nocache' if base else 'qwen35'} "
            "(computed tokens / TTFT)", "turns": [[n, round(t, 3), round(lim, 3)] for n, t, lim in worst]}
    if ours and base:  # past the turns it ran, a server without reuse computes the whole (same) prompt
        full = sum(b["computed"] for b in base) + sum(r["prompt_tokens"] for r in ours[len(base):])
        computed, warmed = sum(r["computed"] for r in ours), res["qwen35"].get("warmed_tokens") or 0
        ratio = full / max(1, computed)
        out["b_8x_fewer_computed"] = {
            "met": ratio >= 8, "ratio": round(ratio, 2), "nocache_computed": full, "qwen35_computed": computed,
            "qwen35_warmed_while_idle": warmed, "ratio_counting_warmed": round(full / max(1, computed + warmed), 2),
            "turns": len(ours), "nocache_measured_turns": len(base)}
    if ours and llama:
        pairs = [(a["ttft_s"], b["ttft_s"]) for a, b in zip(ours, llama)]
        out["c_ttft_below_llama"] = {"met": all(a < b for a, b in pairs),
                                     "ratios": [round(a / b, 2) for a, b in pairs]}
    snap = res.get("qwen35", {}).get("snapshot_bytes")
    if ours:
        out["d_snapshots_in_budget"] = {"met": None if snap is None else snap <= args.cache_ram * 2**30,
                                        "snapshot_bytes": snap, "budget_bytes": args.cache_ram * 2**30}
    return out


def print_table(label: str, res: dict[str, dict], verdicts: dict[str, dict]) -> None:
    engines = [e for e in ENGINES if res.get(e, {}).get("turns")]
    print(f"\n{label}" + "".join(f"; {e} loaded in {res[e]['load_s']:.0f} s" for e in engines))
    heads = ["turn", "prompt"] + [f"{e} {h}" for e in engines for h in ("TTFT s", "computed/reused", "RSS GiB")]
    print("| " + " | ".join(heads) + " |\n|" + "---|" * len(heads))
    for i in range(max(len(res[e]["turns"]) for e in engines) if engines else 0):
        rows = [res[e]["turns"][i] if i < len(res[e]["turns"]) else None for e in engines]
        prompt = next(r["prompt_tokens"] for r in rows if r)
        cells = [str(i + 1), str(prompt)]
        for r in rows:
            cells += ["", "", ""] if r is None else [f"{r['ttft_s']:.2f}", f"{r['computed']}/{r['reused']}",
                                                     f"{r['rss'] / 2**30:.2f}"]
        print("| " + " | ".join(cells) + " |")
    for e, r in res.items():
        if r.get("warmed_tokens"):
            print(f"  {e}: {r['warmed_tokens']:.0f} tokens prefilled between turns (replies as history renders them)")
        if "error" in r:
            print(f"  {e}: error after {len(r['turns'])} turn(s): {r['error']}")
    for name, v in verdicts.items():
        state = {True: "met", False: "NOT met", None: "n/a"}[v["met"]]
        print(f"  ({name[0]}) {name[2:].replace('_', ' ')}: {state} "
              f"{json.dumps({k: x for k, x in v.items() if k != 'met'})}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0.8B", help="comma list of shape_true sizes (4B: --variants int4)")
    p.add_argument("--variants", default="int4", help="comma list of bf16,int4 (peers F16, Q4_0); auto: "
                   "bf16 and int4 at 0.8B, int4 above")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {','.join(ENGINES)}")
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--nocache-turns", type=int, default=1, help="qwen35-nocache runs only the first N turns (its "
                   "cost grows with the conversation; later turns count their whole prompt as computed in (b))")
    p.add_argument("--thinking", default="off,on", help="off, on or off,on")
    p.add_argument("--thinking-budget", type=int, default=60, help="thinking on: qwen35 closes each reply's "
                   "reasoning after this many tokens (and its closing sentence), then answers in --max-tokens, as a "
                   "real model reasons and then answers (random weights never close it, and the template drops past "
                   "reasoning from the history); -1: no budget, replies of --max-tokens all reasoning. llama-server "
                   "has no per-request budget: its replies are as long, all reasoning")
    p.add_argument("--cache-ram", type=float, default=2.0, help="qwen35's snapshot budget in GiB (--cache-ram)")
    p.add_argument("--max-tokens", type=int, default=100, help="reply length of every turn")
    p.add_argument("--pause", type=float, default=0.0, help="seconds between a reply and the next turn (a person "
                   "reading, an agent's tool running): qwen35 prefills the reply as history renders it meanwhile")
    p.add_argument("--ctx", type=int, default=32768, help="llama-server context size (-c)")
    p.add_argument("--llama-args", default="", help="more llama-server flags, space-separated (-nr: its AMX "
                   "repacking crashed at start on a Sapphire Rapids Xeon, a GP fault in ldtilecfg)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "qwen35-bench"))
    args = p.parse_args()
    from qwen35.runtime.steering import CLOSE_THINKING
    engines = args.engines.split(",")
    args.cache_flag = any(e.startswith("qwen35") for e in engines) and has_cache_flag()
    if not args.cache_flag and any(e.startswith("qwen35") for e in engines):
        print("qwen35 serve has no --cache-ram here: run without it (no prefix cache; 0 reused)", flush=True)
    cache = Path(args.cache)
    from tokenizers import Tokenizer

    results = []
    for size in args.sizes.split(","):
        variants = (["bf16", "int4"] if size == "0.8B" else ["int4"]) if args.variants == "auto" \
            else args.variants.split(",")
        tok = Tokenizer.from_file(str(write_checkpoint(size, cache / size) / "tokenizer.json"))
        args.think_tokens = (args.thinking_budget + len(tok.encode(CLOSE_THINKING).ids)
                             if args.thinking_budget >= 0 else 0)
        system, users = conversation(args.seed, args.turns, tok)
        for variant in variants:
            for mode in args.thinking.split(","):
                label = f"{size} {variant} (llama-server: {GGUF[variant]}), thinking {mode}"
                print(f"\n{label}", flush=True)
                res: dict[str, dict] = {}
                for engine in engines:
                    n = min(args.turns, args.nocache_turns) if engine == "qwen35-nocache" else args.turns
                    print(f"  {engine}: {n} turns", flush=True)
                    try:
                        server = start(engine, size, variant, args)
                    except (RuntimeError, subprocess.CalledProcessError) as e:
                        res[engine] = {"turns": [], "error": str(e)[:500]}
                        print(f"  {engine}: {e}", flush=True)
                        continue
                    res[engine] = {"load_s": server.load_s, "turns": []}
                    try:
                        budget = args.thinking_budget if engine.startswith("qwen35") and args.thinking_budget >= 0 \
                            else None
                        run_conversation(server, system, users[:n], mode == "on", args, res[engine]["turns"], budget)
                        res[engine]["peak_rss"] = server.rss("VmHWM")
                        if engine.startswith("qwen35"):
                            time.sleep(args.pause)  # the last reply's warm-up, counted like the others
                            res[engine]["snapshot_bytes"] = prefix_metric(server, "snapshot_bytes")
                            res[engine]["warmed_tokens"] = prefix_metric(server, "warmed_tokens")
                    except (RuntimeError, OSError, httpx.HTTPError) as e:
                        res[engine]["error"] = f"{e} | server: {server.tail()}"[:500]
                    finally:
                        server.stop()
                verdicts = checks(res, args)
                print_table(label, res, verdicts)
                results.append({"size": size, "variant": variant, "gguf": GGUF[variant], "thinking": mode,
                                "engines": res, "checks": verdicts})
    print(json.dumps({"benchmark": "multiturn", "threads": args.threads, "turns": args.turns,
                      "max_tokens": args.max_tokens, "pause_s": args.pause,
                      "thinking_budget": args.thinking_budget, "cache_ram_gib": args.cache_ram,
                      "qwen35_cache_flag": args.cache_flag, "results": results}))


if __name__ == "__main__":
    main()
