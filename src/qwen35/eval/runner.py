"""The arena pipeline: generate every answer, then judge every pair of models on every prompt in both orders.

Answers and judgments are looked up in the content-hash cache first, so a re-run (or a run after a crash) only
makes the calls that are missing. Failures become explicit error records that the report counts. A judgment
whose verdict cannot be parsed is kept in the cache (the call itself succeeded), so a re-run reports the same
error instead of quietly drawing a new verdict.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.progress import Progress, TaskID

from qwen35.eval.cache import Cache, content_key
from qwen35.eval.clients import BudgetExceeded, ChatClient, Ledger, make_client
from qwen35.eval.judge import JudgePrompt, judge_messages, parse_verdict
from qwen35.eval.prompts import Prompt
from qwen35.eval.specs import Completion, ModelSpec


@dataclass
class Answer:
    """A contestant's reply to every user turn of a prompt (reasoning kept apart, never judged)."""

    turns: list[str]
    reasoning: list[str]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    server_model: str | None
    error: str | None = None

    @property
    def text(self) -> str:
        return "\n\n".join(self.turns)


@dataclass
class Game:
    """One judgment: `first` is in slot A when `game` is 1 and in slot B when it is 2."""

    prompt_id: str
    first: str
    second: str
    judge: str
    game: int
    label: str | None  # in the judge's own slot terms ("A>B" means slot A won)
    how: str  # json / regex / unparsed / error
    raw: str
    error: str | None = None
    latency_s: float = 0.0
    server_model: str | None = None


@dataclass
class ArenaRun:
    prompts: list[Prompt]
    contestants: list[ModelSpec]
    judges: list[ModelSpec]
    judge_prompt: JudgePrompt
    answers: dict[tuple[str, str], Answer] = field(default_factory=dict)  # (model, prompt id) -> answer
    games: list[Game] = field(default_factory=list)
    calls_made: int = 0
    cache_hits: int = 0


class Arena:
    """Runs an `ArenaRun` against a cache and a ledger; clients are made once per spec."""

    def __init__(self, run: ArenaRun, cache: Cache, ledger: Ledger, progress: Progress | None = None,
                 backoff_s: float = 1.0):
        self.run, self.cache, self.ledger, self.progress = run, cache, ledger, progress
        limits: dict = {}  # one semaphore and rate limit per endpoint URL, shared by its specs
        self.clients: dict[str, ChatClient] = {s.name: make_client(s, backoff_s, limits)
                                               for s in [*run.contestants, *run.judges]}
        names = [s.name for s in [*run.contestants, *run.judges]]
        if len(set(names)) != len(names):
            raise ValueError(f"model and judge names must be unique, got {names}; set name=… in each spec")

    async def _call(self, spec: ModelSpec, stage: str, messages: list[dict[str, str]]) -> Completion:
        self.ledger.check()
        c = await self.clients[spec.name].complete(messages)
        self.run.calls_made += 1
        self.ledger.add(spec, stage, c)
        return c

    def _tick(self, task: TaskID | None) -> None:
        if self.progress is not None and task is not None:
            self.progress.advance(task)

    async def answer(self, spec: ModelSpec, prompt: Prompt, task: TaskID | None) -> None:
        key = content_key("answer", spec.identity(), list(prompt.user_turns()))
        cached = self.cache.get(key)
        if cached is not None:
            self.run.cache_hits += 1
            self.run.answers[(spec.name, prompt.id)] = Answer(**cached)
            return self._tick(task)
        messages: list[dict[str, str]] = []
        turns, reasoning, total = [], [], Answer([], [], None, 0, 0, 0.0, None)
        for user in prompt.user_turns():
            messages.append({"role": "user", "content": user})
            c = await self._call(spec, "answer", messages)
            if not c.ok:
                total.error = c.error
                break
            messages.append({"role": "assistant", "content": c.text})
            turns.append(c.text)
            reasoning.append(c.reasoning)
            total.prompt_tokens += c.prompt_tokens
            total.completion_tokens += c.completion_tokens
            total.latency_s += c.latency_s
            total.finish_reason, total.server_model = c.finish_reason, c.model
        total.turns, total.reasoning = turns, reasoning
        if total.error is None:
            self.cache.put(key, "answer", asdict(total))
        self.run.answers[(spec.name, prompt.id)] = total
        self._tick(task)

    async def judge(self, judge: ModelSpec, prompt: Prompt, first: str, second: str, game: int,
                    task: TaskID | None) -> None:
        jp = self.run.judge_prompt
        a_name, b_name = (first, second) if game == 1 else (second, first)
        a, b = self.run.answers[(a_name, prompt.id)], self.run.answers[(b_name, prompt.id)]
        record = Game(prompt.id, first, second, judge.name, game, None, "error", "")
        if a.error or b.error:
            record.error = f"no answer to judge: {a.error or b.error}"
            self.run.games.append(record)
            return self._tick(task)
        messages = judge_messages(jp, prompt, a.turns, b.turns)
        key = content_key("judgment", judge.identity(), jp.version, jp.digest, messages)
        cached = self.cache.get(key)
        if cached is not None:
            self.run.cache_hits += 1
            c = Completion(**cached)
        else:
            c = await self._call(judge, "judge", messages)
            if c.ok:
                self.cache.put(key, "judgment", asdict(c))
        record.raw, record.latency_s, record.server_model = c.text, c.latency_s, c.model
        if not c.ok:
            record.error = c.error
        else:
            record.label, record.how = parse_verdict(c.text, jp.labels)
            if record.label is None:
                record.error = "unparsable verdict"
        self.run.games.append(record)
        self._tick(task)

    def _task(self, what: str, total: int) -> TaskID | None:
        return None if self.progress is None else self.progress.add_task(what, total=total)

    async def execute(self, pairs: Sequence[tuple[str, str]] | None = None) -> ArenaRun:
        run = self.run
        names = [s.name for s in run.contestants]
        pairs = list(pairs or itertools.combinations(names, 2))
        try:
            for client in self.clients.values():
                await client.preflight()
            task = self._task("answers", len(run.contestants) * len(run.prompts))
            async with asyncio.TaskGroup() as tg:
                for spec in run.contestants:
                    for p in run.prompts:
                        tg.create_task(self.answer(spec, p, task))
            task = self._task("judgments", len(pairs) * len(run.prompts) * 2 * len(run.judges))
            async with asyncio.TaskGroup() as tg:
                for judge, (x, y), p, game in itertools.product(run.judges, pairs, run.prompts, (1, 2)):
                    tg.create_task(self.judge(judge, p, x, y, game, task))
        finally:
            for client in self.clients.values():
                await client.aclose()
        run.games.sort(key=lambda g: (g.judge, g.first, g.second, g.prompt_id, g.game))
        return run


def run_arena(run: ArenaRun, cache: Cache, ledger: Ledger, progress: Progress | None = None,
              backoff_s: float = 1.0) -> ArenaRun:
    """Synchronous entry point (the CLI and tests); a budget stop surfaces as `BudgetExceeded` itself."""
    try:
        return asyncio.run(Arena(run, cache, ledger, progress, backoff_s).execute())
    except ExceptionGroup as group:
        budget, _ = group.split(BudgetExceeded)
        if budget is None:
            raise
        raise budget.exceptions[0] from None


def games_json(run: ArenaRun) -> list[dict[str, Any]]:
    return [asdict(g) for g in run.games]
