"""Judge prompts and verdict parsing, reasoning stripping, spec parsing, and the prompt-set importers."""

from __future__ import annotations

import json

import pytest

from qwen35.eval.clients import parse_response, split_reasoning
from qwen35.eval.judge import JUDGE_PROMPTS, LEVELS_3, LEVELS_5, judge_messages, judge_prompt, parse_verdict, swap
from qwen35.eval.prompts import Prompt, import_conversations, import_ifbench, import_mtbench, load_jsonl
from qwen35.eval.specs import parse_spec


def test_verdicts_structured_then_regex_last_match():
    assert parse_verdict('thinking... {"verdict": "A>B"}\n[[A>B]]', LEVELS_5) == ("A>B", "json")
    assert parse_verdict('first {"verdict": "B>A"} then final {"verdict": "A>>B"}', LEVELS_5) == ("A>>B", "json")
    assert parse_verdict("My final verdict is [[b>>a]].", LEVELS_5) == ("B>>A", "regex")
    assert parse_verdict("Earlier [[A>B]] ... final: [[A=B]]", LEVELS_5) == ("A=B", "regex")
    assert parse_verdict("verdict: [B<A]", LEVELS_5) == ("A>B", "regex")
    assert parse_verdict("no idea", LEVELS_5) == (None, "unparsed")
    assert parse_verdict('{"verdict": "A>>B"}', LEVELS_3) == ("A>B", "json")  # 3-way judge over-reaching
    assert parse_verdict('{"verdict": "maybe"}', LEVELS_5) == (None, "unparsed")


def test_swap_and_versions():
    assert [swap(x) for x in LEVELS_5] == ["B>>A", "B>A", "A=B", "A>B", "A>>B"]
    assert set(JUDGE_PROMPTS) == {"arena-5level-v1", "pair-3way-v1"}
    assert judge_prompt("arena-5level-v1").digest != judge_prompt("pair-3way-v1").digest
    with pytest.raises(ValueError, match="unknown judge prompt"):
        judge_prompt("v0")


def test_judge_messages_are_blinded_and_multi_turn_shows_the_conversation():
    jp = judge_prompt("arena-5level-v1")
    msgs = judge_messages(jp, Prompt("p", "Name a fruit"), ["zucchini"], ["kumquat"])
    text = json.dumps(msgs)
    assert "Assistant A" in text and "zucchini" in text and "kumquat" in text
    assert text.index("zucchini") < text.index("kumquat")
    mt = Prompt("m", "Hi", "chat", ("Hi", "And then?"))
    body = judge_messages(jp, mt, ["hello", "more"], ["hey", "less"])[1]["content"]
    assert "[Turn 2] User: And then?" in body and "[Turn 2] Assistant: less" in body


def test_reasoning_is_stripped_from_content_and_taken_from_reasoning_content():
    assert split_reasoning("<think>plan</think>\n\nThe answer.") == ("The answer.", "plan")
    assert split_reasoning("no thinking here") == ("no thinking here", "")
    c = parse_response({"model": "m-1", "choices": [{"message": {"content": "Final", "reasoning_content": "why"},
                                                      "finish_reason": "length"}],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 7,
                                  "completion_tokens_details": {"reasoning_tokens": 3}}}, 0.5)
    assert (c.text, c.reasoning, c.finish_reason, c.prompt_tokens, c.completion_tokens, c.reasoning_tokens,
            c.model) == ("Final", "why", "length", 5, 7, 3, "m-1")


def test_specs_parse_and_explain_mistakes(monkeypatch):
    s = parse_spec("name=a,url=http://x/v1,model=m,thinking=off,temperature=0.7,top_k=20,max_tokens=64,"
                   "extra.min_p=0.05,extra.stop=[\"END\"],api_key_env=MY_KEY")
    assert (s.thinking, s.temperature, s.top_k, s.extra) == (False, 0.7, 20, {"min_p": 0.05, "stop": ["END"]})
    assert "api_key_env" not in s.identity() and "name" not in s.identity()
    with pytest.raises(ValueError, match="MY_KEY"):
        s.api_key()
    monkeypatch.setenv("MY_KEY", "sk-test")
    assert s.api_key() == "sk-test" and "sk-test" not in json.dumps(s.public())
    assert parse_spec("path=default,bits=4").is_local
    for bad, msg in [("url=http://x/v1", "model="), ("path=a,url=b,model=c", "exactly one"),
                     ("path=default,colour=red", "unknown spec key"), ("path=default,bits=3", "bits=3"),
                     ("path=default,thinking=maybe", "on or off"), ("oops", "not key=value")]:
        with pytest.raises(ValueError, match=msg):
            parse_spec(bad)


def test_load_jsonl_validates(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"id": "a", "prompt": "Hi", "category": "chat"}\n{"turns": ["One", "Two"]}\n')
    items = load_jsonl(good)
    assert items[0] == Prompt("a", "Hi", "chat", ("Hi",)) and items[1].user_turns() == ("One", "Two")
    for text, msg in [('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "duplicate id"),
                      ('{"prompt": ""}\n', "non-empty"), ("not json\n", "not valid JSON"), ("\n", "no prompts")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(ValueError, match=msg):
            load_jsonl(bad)


def test_conversation_import_filters_dedups_logs_and_samples_stably(tmp_path):
    rows = [{"conversation_hash": f"h{i}", "language": "English",
             "conversation": [{"role": "user", "content": f"Please explain topic number {i} to me in plain words."},
                              {"role": "assistant", "content": "ok"}]} for i in range(30)]
    rows += [{"conversation_hash": "dup", "language": "English",
              "conversation": [{"role": "user", "content": "Please explain topic number 3 to me in plain words!"}]},
             {"conversation_hash": "fr", "language": "French",
              "conversation": [{"role": "user", "content": "Explique-moi la photosynthèse, s'il te plaît."}]},
             {"conversation_hash": "short", "conversation": [{"role": "user", "content": "hi"}]},
             {"conversation_hash": "bot", "conversation": [{"role": "assistant", "content": "Hello there!"}]}]
    f = tmp_path / "wildchat.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, log = import_conversations(f, n=10, seed=3)
    b, _ = import_conversations(f, n=10, seed=3)
    c, _ = import_conversations(f, n=10, seed=4)
    assert a == b and a != c and len({p.id for p in a}) == 10
    assert dict(log.dropped) == {"duplicate": 1, "language_not_en": 1, "too_short": 1, "starts_with_assistant": 1}
    assert log.read == 34 and {e["source_id"] for e in log.examples} == {"dup", "fr", "short", "bot"}
    with pytest.raises(ValueError, match="only 30 prompts pass"):
        import_conversations(f, n=31)


def test_real_prompt_sets_from_installed_packages():
    sharegpt, log = import_conversations(None, n=20, seed=0, scan_limit=400)  # ShareGPT V3 (cut-off file)
    assert len(sharegpt) == 20 and all(15 <= len(p.prompt) <= 1500 for p in sharegpt)
    assert log.read == 400 and sum(log.dropped.values()) > 0
    mt = import_mtbench()
    assert len(mt) == 80 and all(len(p.user_turns()) == 2 for p in mt)
    assert len({p.category for p in mt}) == 8
    assert len(import_ifbench()) == 294
