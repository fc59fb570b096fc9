"""What a reply may contain, enforced token by token in the engine: a thinking budget, and a grammar on the answer.

A chat reply has two phases. While thinking, tokens are free (the grammar never applies inside `<think>`), and
when the budget is spent the engine writes the closing itself: a short sentence, `</think>`, a blank line, as
Qwen's own guidance for budgets does, so the model then answers. In the answer, a grammar (JSON Schema, forced
tool call) masks every token it cannot take. Forced tokens are emitted one per step like sampled ones, so a
batched decode step never has to treat a row apart.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from qwen35.runtime.grammar import Matcher, Vocabulary

CLOSE_THINKING = ("\n\nConsidering the limited time by the user, I have to give the solution based on the thinking "
                  "directly now.\n</think>\n\n")


@dataclass(frozen=True)
class Steering:
    """A request's rules (immutable; each sequence keeps its own `Steer` state).

    `thinking`: the reply starts inside `<think>`; `budget`: thinking tokens before the engine closes it;
    `close`: the ids it then forces (CLOSE_THINKING); `think_end`: the `</think>` id; `gap`: ids forced after a
    sampled `</think>` when a grammar follows (the template's blank line); `ban_thinking` / `ban_answer`: ids
    never allowed in that phase (`<think>` in an answer when thinking is off, `<tool_call>` in thinking when a
    grammar will force the call); `grammar`: the answer's grammar, compiled against `vocabulary`; `shape`: what
    it describes, in words ("JSON", "tool call").
    """

    thinking: bool = False
    budget: int | None = None
    close: tuple[int, ...] = ()
    think_end: int = -1
    gap: tuple[int, ...] = ()
    ban_thinking: tuple[int, ...] = ()
    ban_answer: tuple[int, ...] = ()
    grammar: str | None = None
    vocabulary: Vocabulary | None = None
    shape: str = ""

    @property
    def active(self) -> bool:
        return bool(self.thinking or self.ban_answer or self.grammar)


class Steer:
    """One sequence's progress through its `Steering`."""

    def __init__(self, rules: Steering):
        self.rules = rules
        self.thinking = rules.thinking
        self.thought = 0  # thinking tokens so far
        self.queue: deque[int] = deque()
        self.matcher: Matcher | None = None
        if rules.thinking and rules.budget == 0:
            self.queue.extend(rules.close)

    def forced(self) -> int | None:
        """The next token the engine writes itself, if any."""
        return self.queue[0] if self.queue else None

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with what this phase forbids at -inf (the same tensor when nothing is)."""
        rules = self.rules
        banned = rules.ban_thinking if self.thinking else rules.ban_answer
        if not self.thinking and rules.grammar is not None:
            if self.matcher is None:
                self.matcher = Matcher(rules.vocabulary, rules.grammar)
            logits = self.matcher.mask(logits)
        if banned:
            logits = logits.float().clone() if self.matcher is None else logits
            logits[list(banned)] = float("-inf")
        return logits

    def accept(self, token: int) -> None:
        """Advance past `token` (forced or sampled)."""
        rules = self.rules
        forced = bool(self.queue) and self.queue[0] == token
        if forced:
            self.queue.popleft()
        if self.thinking:
            if token == rules.think_end:
                self.thinking = False
                if not forced and rules.grammar is not None:
                    self.queue.extend(rules.gap)
                return
            self.thought += 1
            if not forced and rules.budget is not None and self.thought >= rules.budget:
                self.queue.extend(rules.close)
        elif self.matcher is not None:
            self.matcher.accept(token)
