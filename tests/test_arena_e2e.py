"""End to end: 20 ShareGPT prompts, two variants of the built-in model served by `qwen35 serve` (greedy vs
temperature 1.0 with the card's sampling preset), judged by a third endpoint (the scripted judge: the nano model
cannot judge), through the `qwen35 arena run` command, producing the report."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from qwen35.eval.scripted import ScriptedServer

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def nano_server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qwen35", "serve", "--port", str(port), "--dtype", "float32",
                             "--model-name", "nano"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300  # a fresh machine may first build the CPU kernels (about a minute)
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                r = httpx.post(f"{url}/chat/completions", timeout=10,
                               json={"model": "nano", "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 1})
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("qwen35 serve did not become ready in 300 s")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_arena_end_to_end_two_nano_variants_served_and_judged(nano_server, tmp_path):
    out = tmp_path / "arena"
    common = f"url={nano_server},model=nano,thinking=off,max_tokens=48,concurrency=4"
    with ScriptedServer(max_seconds=300) as judge:
        cmd = [sys.executable, "-m", "qwen35", "arena", "run", "--source", "sharegpt", "-n", "20", "--seed", "0",
               "--out", str(out), "--model", f"name=nano-greedy,{common},temperature=0",
               "--model", f"name=nano-t1,{common},temperature=1.0,top_p=0.95,top_k=20,presence_penalty=1.5,seed=7",
               "--judge", f"name=scripted-judge,url={judge.url},model=judge,temperature=0",
               "--bootstrap", "1000", "--bt-rounds", "50"]
        start = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=280,
                              env={**os.environ, "COLUMNS": "200"})
        elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    md = (out / "report.md").read_text()
    print(md, f"\n(arena run took {elapsed:.1f} s)")
    assert "| nano-greedy vs nano-t1 | scripted-judge | average | 20 |" in md  # every prompt has both games
    games = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(games) == 40 and not [g for g in games if g["error"]]
    assert {g["server_model"] for g in games} == {"scripted-judge"}
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and page.count("<details>") == 20
    m = json.loads((out / "manifest.json").read_text())
    assert m["prompts"]["count"] == 20 and {x["name"] for x in m["models"]} == {"nano-greedy", "nano-t1"}
    assert json.loads((out / "exclusions.json").read_text())["kept"] == 20
