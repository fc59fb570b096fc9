"""Server throughput and time to first token at 1, 4, 16 and 64 concurrent streams.

Starts `qwen35 serve` as a subprocess (so the client does not share its GIL), then for each concurrency level
sends that many streaming chat requests at once (distinct prompts, `ignore_eos` so every stream makes exactly
--tokens tokens) and measures total output tokens/s over the wall time and TTFT per request.
Prints a table and, last, one JSON line. Target: at 16 streams >= 4x the tokens/s of one stream.

    .venv/bin/python benchmarks/bench_server.py                       # the built-in nano model
    .venv/bin/python benchmarks/bench_server.py -m ./some-checkpoint --dtype bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_stream(client: httpx.AsyncClient, url: str, model: str, i: int, tokens: int) -> tuple[float, int]:
    """(seconds to the first token, completion tokens) of one streamed request."""
    body = {"model": model, "messages": [{"role": "user", "content": f"Write a story about the number {i}."}],
            "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start, first, used = time.perf_counter(), None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c["delta"].get("content") or c["delta"].get("reasoning_content")
                                     for c in chunk["choices"]):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
    return (first if first is not None else time.perf_counter() - start), used


async def level(url: str, model: str, concurrency: int, tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, model, i, tokens) for i in range(concurrency)))
        wall = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    total = sum(r[1] for r in results)
    return {"concurrency": concurrency, "output_tokens": total, "wall_s": round(wall, 3),
            "tokens_per_s": round(total / wall, 1), "ttft_p50_s": round(statistics.median(ttfts), 3),
            "ttft_max_s": round(ttfts[-1], 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default=None, help="checkpoint (default: the built-in nano model)")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--tokens", type=int, default=64, help="output tokens per stream")
    p.add_argument("--levels", default="1,4,16,64")
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "qwen35", "serve", "--port", str(port), "--dtype", args.dtype,
           "--max-batch", str(max(levels)), "--model-name", "bench"] + (["-m", args.model] if args.model else [])
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        asyncio.run(level(url, "bench", 2, 8))  # warm-up
        rows = [asyncio.run(level(url, "bench", c, args.tokens)) for c in levels]
    finally:
        server.terminate()
        server.wait(timeout=60)
    single = rows[0]["tokens_per_s"]
    print(f"model: {args.model or 'built-in nano'} ({args.dtype}), {args.tokens} tokens per stream, "
          f"{os.cpu_count()} CPUs")
    print(f"{'streams':>8} {'tokens':>7} {'wall s':>8} {'tok/s':>8} {'x single':>9} {'TTFT p50':>9} {'TTFT max':>9}")
    for r in rows:
        print(f"{r['concurrency']:>8} {r['output_tokens']:>7} {r['wall_s']:>8.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['tokens_per_s'] / single:>9.2f} {r['ttft_p50_s']:>9.3f} {r['ttft_max_s']:>9.3f}")
    at16 = next((r["tokens_per_s"] / single for r in rows if r["concurrency"] == 16), None)
    print(json.dumps({"benchmark": "server", "model": args.model or "nano", "dtype": args.dtype,
                      "tokens_per_stream": args.tokens, "levels": rows,
                      "speedup_at_16": None if at16 is None else round(at16, 2),
                      "target_met": None if at16 is None else at16 >= 4.0}))


if __name__ == "__main__":
    main()
