"""The judge protocol against a scripted OpenAI-compatible endpoint served on loopback inside the test:
both orders, tie rules, parse failures, retries, budget, pass-through of settings, reports, resume after a kill."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen35.eval.analysis import analyse
from qwen35.eval.cache import Cache
from qwen35.eval.clients import BudgetExceeded, Ledger, OpenAIClient
from qwen35.eval.judge import judge_prompt
from qwen35.eval.manifest import manifest
from qwen35.eval.prompts import Prompt, save_jsonl
from qwen35.eval.report import write
from qwen35.eval.runner import ArenaRun, games_json, run_arena
from qwen35.eval.scripted import Script, ScriptedServer
from qwen35.eval.specs import parse_spec

PROMPTS = [Prompt(f"p{i}", f"Tell me about apples, oranges, bananas, cherries and plums, part {i}.",
                  "fruit" if i % 2 else "other") for i in range(6)]


def specs(url: str, judge_extra: str = ""):
    # the scripted contestant covers 2 + len(model) % 6 of the prompt's words: "wide" 6, "nr" 4, so "wide" wins
    a = parse_spec(f"name=wide,url={url},model=wide,temperature=0.7,top_k=20,thinking=off,extra.min_p=0.05,"
                   f"price_in=1,price_out=2")
    b = parse_spec(f"name=narrow,url={url},model=nr,temperature=0")
    j = parse_spec(f"name=judge,url={url},model=judge,temperature=0{judge_extra}")
    return a, b, j


def arena(url: str, tmp: Path, script: Script, judges: int = 1, budget: float | None = None):
    a, b, j = specs(url)
    js = [j] + ([parse_spec(f"name=judge2,url={url},model=judge2,temperature=0.1")] if judges == 2 else [])
    run = ArenaRun(PROMPTS, [a, b], js, judge_prompt("arena-5level-v1"))
    with Cache(tmp / "cache.sqlite") as cache:
        run_arena(run, cache, Ledger(budget), backoff_s=0.01)
    return run


def test_both_orders_blinded_and_settings_passed_through(tmp_path):
    script = Script()
    with ScriptedServer(script) as s:
        run = arena(s.url, tmp_path, script)
    answers = [b for b in script.bodies if b["model"] == "wide"]
    assert answers[0]["top_k"] == 20 and answers[0]["min_p"] == 0.05 and answers[0]["temperature"] == 0.7
    assert answers[0]["chat_template_kwargs"] == {"enable_thinking": False}
    judged = [b["messages"][1]["content"] for b in script.bodies if b["model"] == "judge"]
    assert len(judged) == 2 * len(PROMPTS)
    for p in PROMPTS:
        wide = run.answers[("wide", p.id)].text
        orders = [t.index(wide) < t.index("<|The Start of Assistant B") for t in judged if p.prompt in t]
        assert sorted(orders) == [False, True]  # each prompt once with "wide" in slot A, once in slot B
    assert not any("narrow" in t for t in judged)  # the spec's name never reaches the judge
    result = analyse(run, rounds=200, bt_rounds=20).pairs[0]
    # wide covers 2 + 4 = 6 prompt words, narrow ("nr") 2 + 2 = 4: "wide" wins every game by a slight margin
    assert (result.summaries["average"].wins, result.summaries["average"].losses) == (6, 0)
    assert result.consistency == 1.0 and result.first_slot_win_rate == 0.5


def test_api_key_from_the_environment_and_rate_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("ARENA_TEST_KEY", "sk-scripted")
    script = Script()
    with ScriptedServer(script) as s:
        spec = parse_spec(f"name=k,url={s.url},model=k,api_key_env=ARENA_TEST_KEY,rps=20,concurrency=8")
        client = OpenAIClient(spec)

        async def burst():
            start = time.monotonic()
            await asyncio.gather(*(client.complete([{"role": "user", "content": "hi"}]) for _ in range(10)))
            await client.aclose()
            return time.monotonic() - start

        elapsed = asyncio.run(burst())
    assert script.auth == ["Bearer sk-scripted"] * 10
    assert elapsed >= 9 / 20 - 0.02  # 10 requests at 20 per second: at least 0.45 s


def test_retry_after_is_honoured():
    script = Script(fail_first=1, retry_after=1)
    with ScriptedServer(script) as s:
        client = OpenAIClient(parse_spec(f"name=r,url={s.url},model=r"), backoff_s=0.01)

        async def once():
            start = time.monotonic()
            c = await client.complete([{"role": "user", "content": "hi"}])
            await client.aclose()
            return c, time.monotonic() - start

        c, elapsed = asyncio.run(once())
    assert c.ok and script.requests == 2 and elapsed >= 1.0


def test_an_unreachable_endpoint_fails_fast(tmp_path):
    with ScriptedServer() as s:
        url = s.url  # the port is free again once the server is gone
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="cannot reach"):
        arena(url, tmp_path, Script())
    assert time.monotonic() - start < 10


def test_position_bias_and_tie_rules(tmp_path):
    script = Script(slot_a_bias=3)  # slot A gets 3 extra points: the order now decides some games
    with ScriptedServer(script) as s:
        run = arena(s.url, tmp_path, script)
    r = analyse(run, rounds=200, bt_rounds=20).pairs[0]
    assert r.first_slot_win_rate == 1.0 and r.consistency == 0.0  # every game goes to slot A
    assert r.summaries["average"].win_rate == 0.5  # both orders averaged: the bias cancels out
    assert r.summaries["consistent"].ties == len(PROMPTS)  # inconsistent pairs become ties


def test_unparsable_and_failed_judgments_are_explicit_error_records(tmp_path):
    script = Script(unparsable_every=4, fail_first=2)  # two 503s are retried away; every 4th verdict unusable
    with ScriptedServer(script) as s:
        run = arena(s.url, tmp_path, script)
    bad = [g for g in run.games if g.error]
    assert bad and all(g.error == "unparsable verdict" and g.label is None and g.raw for g in bad)
    r = analyse(run, rounds=100, bt_rounds=10).pairs[0]
    assert r.errors == len(bad) and r.incomplete_prompts == len({g.prompt_id for g in bad})
    assert r.summaries["average"].n == len(PROMPTS) - r.incomplete_prompts

    script = Script(fail_first=10_000)  # the endpoint is down: retries run out
    with ScriptedServer(script) as s:
        run = arena(s.url, tmp_path / "down", script)
    assert all(a.error and "failed after 5 attempts" in a.error for a in run.answers.values())
    assert all(g.error and g.error.startswith("no answer to judge") for g in run.games)
    assert script.requests == 2 * len(PROMPTS) * 5  # 1 try + 4 retries per answer


def test_cache_rerun_makes_no_calls_and_budget_stops_the_run(tmp_path):
    script = Script()
    with ScriptedServer(script) as s:
        first = arena(s.url, tmp_path, script)
        calls = script.requests
        again = arena(s.url, tmp_path, script)
        assert script.requests == calls and again.calls_made == 0 and again.cache_hits == calls
        assert [g.label for g in again.games] == [g.label for g in first.games]
        with pytest.raises(BudgetExceeded, match="budget"):
            arena(s.url, tmp_path / "budget", script, budget=1e-5)  # "wide" costs money per token


def test_second_judge_agreement_and_report(tmp_path):
    script = Script()
    with ScriptedServer(script) as s:
        run = arena(s.url, tmp_path, script, judges=2)
    a = analyse(run, rounds=100, bt_rounds=10)
    assert a.kappa == 1.0 and a.kappa_games == 2 * len(PROMPTS)  # the same rule twice agrees perfectly
    files = write(tmp_path / "out", run, a, Ledger().rows(), manifest("test", PROMPTS, run.contestants, run.judges,
                                                                       {"seed": 0}), games_json(run))
    page = files["html"].read_text()
    assert page.count("data:image/png;base64,") == 4  # win rates, ratings, lengths, category matrix
    assert page.count("<details>") == len(PROMPTS) and "game 2" in page
    md = files["markdown"].read_text()
    assert "| wide vs narrow | judge | average | 6 | 6/0/0 |" in md and "Cohen's kappa" in md
    assert len(files["judgments"].read_text().splitlines()) == 4 * len(PROMPTS)
    assert json.loads(files["manifest"].read_text())["prompts"]["count"] == len(PROMPTS)


def test_resume_after_a_killed_run_only_fills_the_gaps(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    save_jsonl(PROMPTS + [Prompt(f"q{i}", f"Describe plums and pears number {i}") for i in range(10)], prompts)
    script = Script(delay_s=0.05)  # at the kill at most 27 judgments are left: 1.35 s of them, polled every 0.05 s
    env = {**os.environ, "COLUMNS": "150"}
    with ScriptedServer(script, max_seconds=110) as s:
        cmd = [sys.executable, "-m", "qwen35", "arena", "run", "--prompts", str(prompts), "--out", str(tmp_path / "o"),
               "--model", f"name=wide,url={s.url},model=wide,concurrency=1", "--model",
               f"name=narrow,url={s.url},model=nr,concurrency=1", "--judge",
               f"name=judge,url={s.url},model=judge,concurrency=1", "--bootstrap", "100", "--bt-rounds", "10"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        db, deadline = tmp_path / "o" / "cache.sqlite", time.monotonic() + 60
        while time.monotonic() < deadline:  # kill it in the middle of judging
            if db.exists():
                with sqlite3.connect(db) as con:
                    try:
                        if con.execute("SELECT COUNT(*) FROM results WHERE stage='judgment'").fetchone()[0] >= 5:
                            break
                    except sqlite3.OperationalError:
                        pass
            time.sleep(0.05)
        proc.kill()
        proc.wait(timeout=10)
        with sqlite3.connect(db) as con:
            done = dict(con.execute("SELECT stage, COUNT(*) FROM results GROUP BY stage").fetchall())
        assert done.get("answer") == 32 and 5 <= done["judgment"] < 32  # 16 prompts x 2 orders
        before = script.requests
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=100)
        assert out.returncode == 0, out.stderr
        assert script.requests - before == 32 - done["judgment"]  # only the missing judgments were asked for
    assert "| wide vs narrow | judge | average | 16 |" in (tmp_path / "o" / "report.md").read_text()


def test_local_in_process_contestants_full_precision_vs_int4_multi_turn(tmp_path):
    full = parse_spec("name=fp32,path=default,dtype=float32,temperature=0,max_tokens=12,thinking=off")
    int4 = parse_spec("name=int4,path=default,dtype=float32,bits=4,temperature=0,max_tokens=12,thinking=off")
    prompts = [Prompt("a", "Tell me about apples."), Prompt("b", "Capital of France?", "qa", ("Capital of France?",
                                                                                              "And of Spain?"))]
    with ScriptedServer() as s:
        run = ArenaRun(prompts, [full, int4], [parse_spec(f"name=judge,url={s.url},model=judge")],
                       judge_prompt("pair-3way-v1"))
        with Cache(tmp_path / "c.sqlite") as cache:
            run_arena(run, cache, Ledger(), backoff_s=0.01)
        judged = [b["messages"][1]["content"] for b in s.script.bodies]
    answers = run.answers
    assert all(a.error is None and a.server_model == "qwen35:nano" for a in answers.values())
    assert len(answers[("int4", "b")].turns) == 2 and answers[("fp32", "b")].completion_tokens > 0
    assert any("[Turn 2] User: And of Spain?" in t for t in judged)
    assert len(run.games) == 4 and all(g.label in ("A>B", "A=B", "B>A") for g in run.games)
