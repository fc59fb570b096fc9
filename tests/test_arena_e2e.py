"""End to end: N ShareGPT prompts (the pipeline is the same for any number), two variants of the built-in model
served by the OpenAI-compatible server (greedy vs temperature 1.0 with the card's sampling preset), judged by a third
endpoint (the scripted judge: the nano model cannot judge), through the `qwen35 arena run` command, producing the
report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from qwen35.eval.scripted import ScriptedServer

pytestmark = pytest.mark.slow
N = 8  # prompts; each is answered by both variants and judged in both orders


@pytest.fixture()
def nano_server(default_model):
    """The OpenAI-compatible server on the session's fp32 built-in model, in a thread (`qwen35 serve` itself, a
    process of its own, is tested in test_server.py); `qwen35 arena run` below is a process of its own."""
    from test_server import running_server

    from qwen35.server import ServerSettings

    with running_server(ServerSettings(model_name="nano"), lambda: default_model) as (url, _):
        yield url + "/v1"


def test_arena_end_to_end_two_nano_variants_served_and_judged(nano_server, tmp_path):
    out = tmp_path / "arena"
    common = f"url={nano_server},model=nano,thinking=off,max_tokens=24,concurrency=4"
    with ScriptedServer(max_seconds=300) as judge:
        cmd = [sys.executable, "-m", "qwen35", "arena", "run", "--source", "sharegpt", "-n", str(N), "--seed", "0",
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
    assert f"| nano-greedy vs nano-t1 | scripted-judge | average | {N} |" in md  # every prompt has both games
    games = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert len(games) == 2 * N and not [g for g in games if g["error"]]
    assert {g["server_model"] for g in games} == {"scripted-judge"}
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and page.count("<details>") == N
    m = json.loads((out / "manifest.json").read_text())
    assert m["prompts"]["count"] == N and {x["name"] for x in m["models"]} == {"nano-greedy", "nano-t1"}
    assert json.loads((out / "exclusions.json").read_text())["kept"] == N
