"""Benchmark runners: real items from the installed packages, user file formats, last-match extraction, IFBench
verifiers, and a run against the scripted endpoint (cache, unparsed accounting, accuracy interval)."""

from __future__ import annotations

import csv
import json

import pytest

from qwen35.eval.bench import Item, extract, gpqa, is_correct, load_benchmark, mmlu_pro
from qwen35.eval.benchrun import run_benchmark, score, write
from qwen35.eval.cache import Cache
from qwen35.eval.clients import Ledger
from qwen35.eval.prompts import ifbench_file
from qwen35.eval.scripted import Script, ScriptedServer
from qwen35.eval.specs import Completion, parse_spec


def test_packaged_benchmarks_load_with_gold_answers():
    mmlu, obqa, asdiv = (load_benchmark(n) for n in ("mmlu", "openbookqa", "asdiv"))
    assert len(mmlu) == 2850 and len(obqa) == 500 and len(asdiv) > 2200
    first = obqa[0]
    assert first.gold == "B" and first.choices[1] == "quit eating lunch out"
    assert "B. quit eating lunch out" in first.prompt and "'Answer: $LETTER'" in first.prompt
    assert asdiv[0].gold == "9" and "\\boxed{}" in asdiv[0].prompt
    assert len(load_benchmark("ifbench")) == 294
    with pytest.raises(ValueError, match="--file"):
        load_benchmark("gpqa")
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("hellaswag")


def test_extraction_takes_the_last_match_after_reasoning_is_stripped():
    assert extract("mc", "Maybe A? Let me check.\nAnswer: C") == "C"
    assert extract("mc", "Answer: B ... on reflection, Answer: D") == "D"
    assert extract("mc", 'Thus {"answer": "B"}') == "B"
    assert extract("mc", "The answer is (c).") == "C"
    assert extract("mc", "Answer: E", n_choices=4) is None  # not one of the choices
    assert extract("mc", "I am not sure.") is None
    assert extract("math", "6 + 3 = 9, so \\boxed{9}") == "9"
    assert extract("math", "It is 1,250 in total.") == "1250"
    assert extract("math", "no digits") is None
    item = Item("x", "math", "", "15")
    assert is_correct(item, "15.0") and not is_correct(item, "16") and not is_correct(item, None)


def test_user_files_gpqa_permutation_and_mmlu_pro(tmp_path):
    g = tmp_path / "gpqa.csv"
    with open(g, "w", newline="") as f:
        w = csv.DictWriter(f, ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                               "Incorrect Answer 3"])
        w.writeheader()
        for i in range(8):
            w.writerow({"Question": f"Q{i}?", "Correct Answer": "right", "Incorrect Answer 1": "w1",
                        "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"})
    items = gpqa(g, seed=1)
    assert all(it.choices["ABCD".index(it.gold)] == "right" for it in items)
    assert len({it.gold for it in items}) > 1 and items == gpqa(g, seed=1)  # permuted, reproducibly
    assert all(sorted(it.meta["permutation"]) == [0, 1, 2, 3] for it in items)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a GPQA CSV"):
        gpqa(bad)
    m = tmp_path / "mmlu_pro.jsonl"
    m.write_text(json.dumps({"question_id": 7, "question": "Q?", "options": [str(i) for i in range(10)],
                             "answer": "J"}) + "\n")
    (item,) = mmlu_pro(m)
    assert item.gold == "J" and "J. 9" in item.prompt and item.id == "mmlupro-7"
    with pytest.raises(ValueError, match="JSONL"):
        mmlu_pro(tmp_path / "x.parquet")


def test_ifbench_verifiers_score_real_sample_outputs():
    rows = [json.loads(line) for line in ifbench_file().with_name("sample_output.jsonl").read_text().splitlines()]
    spec = {json.loads(line)["prompt"]: json.loads(line) for line in ifbench_file().read_text().splitlines()}
    results = []
    for row in rows[:40]:
        meta = spec[row["prompt"]]
        item = Item("i", "ifbench", row["prompt"], "", meta={"instruction_id_list": meta["instruction_id_list"],
                                                             "kwargs": meta["kwargs"]})
        results.append(score(item, Completion(row["response"], finish_reason="stop")).status)
    assert {"correct", "wrong"} <= set(results)  # real responses: some follow every instruction, some do not
    empty = score(item, Completion("", finish_reason="stop"))
    assert empty.status in ("wrong", "unverifiable")


def test_scoring_statuses():
    item = Item("q", "mc", "", "B", ("x", "y", "z", "w"))
    assert score(item, Completion("Answer: B")).status == "correct"
    assert score(item, Completion("Answer: A")).status == "wrong"
    assert score(item, Completion("hmm")).status == "unparsed"
    assert score(item, Completion("", error="HTTP 500")).status == "error"


def test_benchmark_run_against_the_scripted_endpoint_is_cached(tmp_path):
    items = load_benchmark("openbookqa")[:12]
    results = {}
    for letter in ("B", None):  # always "Answer: B", then replies with no answer at all
        script = Script(answer_letter=letter)
        with ScriptedServer(script) as s:
            spec = parse_spec(f"name=bot{letter},url={s.url},model=bot,max_tokens=32")
            with Cache(tmp_path / f"c{letter}.sqlite") as cache:
                results[letter] = run_benchmark("openbookqa", items, spec, cache, Ledger(), backoff_s=0.01)
                again = run_benchmark("openbookqa", items, spec, cache, Ledger(), backoff_s=0.01)
        assert script.requests == 12  # the second run came from the cache
        assert [r.status for r in again.items] == [r.status for r in results[letter].items]
    s = results["B"].summary()
    assert s["correct"] == sum(it.gold == "B" for it in items) and s["unparsed"] == 0
    assert s["accuracy"] == s["correct"] / 12 and s["ci95"][0] < s["accuracy"] < s["ci95"][1]
    none = results[None].summary()
    assert none["unparsed_rate"] == 1.0 and none["accuracy"] == 0.0 and none["ci95"][0] == 0.0
    path = write(results["B"], tmp_path / "out")
    assert json.loads(path.read_text())["benchmark"] == "openbookqa"
    assert len(path.with_suffix(".jsonl").read_text().splitlines()) == 12
