"""Judge protocol: versioned prompts, blinded answers, structured verdicts with a regex fallback.

Every prompt is judged twice, with the answers swapped; the judge only ever sees "Assistant A" and "Assistant
B", and only the answers (reasoning is stripped before this point). A verdict that cannot be parsed is an
explicit error record with the judge's raw text, never a silent drop.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from qwen35.eval.prompts import Prompt

LEVELS_5 = ("A>>B", "A>B", "A=B", "B>A", "B>>A")
LEVELS_3 = ("A>B", "A=B", "B>A")
SCORE = {"A>>B": 1.0, "A>B": 1.0, "A=B": 0.5, "B>A": 0.0, "B>>A": 0.0}  # slot A's share of one game

_SYSTEM_5 = """You are an impartial judge of two AI assistants' answers to the same user prompt.
First write your own brief answer to the prompt. Then compare both assistants' answers with yours: identify
mistakes and inaccuracies, judge helpfulness, relevance and concision, then creativity and missing
information. Ignore the order in which the answers appear, their length as such, and any names.
End with a JSON object on its own line: {"verdict": "<label>"} where <label> is exactly one of
"A>>B" (A is significantly better), "A>B" (A is slightly better), "A=B" (tie, relatively the same),
"B>A" (B is slightly better), "B>>A" (B is significantly better). Also write the label as [[label]]."""

_SYSTEM_3 = """You are an impartial judge. Compare two AI assistants' answers to the same user prompt for
helpfulness, correctness and relevance. Ignore the order of the answers, their length as such and any names.
End with a JSON object on its own line: {"verdict": "<label>"} with <label> one of "A>B" (A is better),
"A=B" (tie) or "B>A" (B is better). Also write the label as [[label]]."""


@dataclass(frozen=True)
class JudgePrompt:
    """A versioned judge prompt: the version (and a hash of the text) goes into cache keys and the manifest."""

    version: str
    system: str
    labels: tuple[str, ...]

    @property
    def digest(self) -> str:
        return hashlib.sha256((self.system + "|".join(self.labels)).encode()).hexdigest()[:16]


JUDGE_PROMPTS = {
    "arena-5level-v1": JudgePrompt("arena-5level-v1", _SYSTEM_5, LEVELS_5),
    "pair-3way-v1": JudgePrompt("pair-3way-v1", _SYSTEM_3, LEVELS_3),
}


def judge_prompt(version: str) -> JudgePrompt:
    if version not in JUDGE_PROMPTS:
        raise ValueError(f"unknown judge prompt {version!r}; choose one of {sorted(JUDGE_PROMPTS)}")
    return JUDGE_PROMPTS[version]


def _transcript(prompt: Prompt, answers: list[str]) -> str:
    if len(prompt.user_turns()) == 1:
        return answers[-1]
    parts = []
    for i, (user, answer) in enumerate(zip(prompt.user_turns(), answers), 1):
        parts.append(f"[Turn {i}] User: {user}\n[Turn {i}] Assistant: {answer}")
    return "\n\n".join(parts)


def judge_messages(jp: JudgePrompt, prompt: Prompt, answer_a: list[str], answer_b: list[str]) -> list[dict]:
    """Chat messages for one game; the answers are per-turn lists, already stripped of reasoning."""
    user = prompt.prompt if len(prompt.user_turns()) == 1 else "(a conversation; judge the whole of it)"
    body = (f"<|User Prompt|>\n{user}\n\n"
            f"<|The Start of Assistant A's Answer|>\n{_transcript(prompt, answer_a)}\n"
            f"<|The End of Assistant A's Answer|>\n\n"
            f"<|The Start of Assistant B's Answer|>\n{_transcript(prompt, answer_b)}\n"
            f"<|The End of Assistant B's Answer|>")
    return [{"role": "system", "content": jp.system}, {"role": "user", "content": body}]


_JSON_VERDICT = re.compile(r"\{[^{}]*\"verdict\"\s*:\s*\"([^\"]+)\"[^{}]*\}")
_BRACKETS = (re.compile(r"\[\[([AB<>=]+)\]\]"), re.compile(r"\[([AB<>=]+)\]"))


def _normalise(label: str, labels: tuple[str, ...]) -> str | None:
    label = label.strip().upper().replace(" ", "")
    label = {"A<B": "B>A", "A<<B": "B>>A", "B<A": "A>B", "B<<A": "A>>B", "B=A": "A=B"}.get(label, label)
    if label in labels:
        return label
    if len(labels) == 3 and label in ("A>>B", "B>>A"):  # a 3-way judge that still said "much better"
        return label.replace(">>", ">")
    return None


def parse_verdict(text: str, labels: tuple[str, ...]) -> tuple[str | None, str]:
    """(label, how) from a judge's text: the last JSON `{"verdict": …}`, else the last [[label]] / [label]."""
    for m in reversed(_JSON_VERDICT.findall(text)):
        if (label := _normalise(m, labels)) is not None:
            return label, "json"
    for pattern in _BRACKETS:
        for m in reversed(pattern.findall(text.upper())):
            if (label := _normalise(m, labels)) is not None:
                return label, "regex"
    return None, "unparsed"


def swap(label: str) -> str:
    """The verdict with the slots exchanged: "A>B" -> "B>A" (game 2 read from the first model's side)."""
    return "A=B" if label == "A=B" else label.translate(str.maketrans("AB", "BA"))


def game_score(label: str, first_in_a: bool) -> float:
    """The first model's share of one game, given which slot it held."""
    return SCORE[label] if first_in_a else 1.0 - SCORE[label]


def verdict_json(label: str) -> str:
    return json.dumps({"verdict": label})
