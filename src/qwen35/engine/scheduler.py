"""Request bookkeeping for continuous batching; pure Python, no tensors.

Waiting sequences are prefilled one chunk per step (so a long prompt never stalls the running streams); a
sequence whose prompt is consumed joins the running batch, which advances one token per step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from qwen35.sampling import SamplingParams


@dataclass
class Sequence:
    """One request's token state. `cache` is opaque here: only the engine reads it."""

    id: str
    prompt: list[int]
    params: SamplingParams
    generated: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already in the cache
    finish_reason: str | None = None
    cache: Any = None
    generator: Any = None
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the k most likely
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the logits before sampling
    images: Any = None  # opaque here: the prompt's encoded images (ImageInputs), read by the engine's prefill


class Scheduler:
    def __init__(self, max_running: int = 16, max_waiting: int = 256, prefill_chunk: int = 256):
        self.max_running, self.max_waiting, self.prefill_chunk = max_running, max_waiting, prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise OverflowError(f"the queue is full ({self.max_waiting} waiting requests); retry later")
        self.waiting.append(seq)

    def abort(self, seq_id: str) -> Sequence | None:
        """Remove a sequence wherever it is (a client went away); returns it, or None if unknown."""
        for seq in list(self.waiting):
            if seq.id == seq_id:
                self.waiting.remove(seq)
                return seq
        for seq in self.running:
            if seq.id == seq_id:
                self.running.remove(seq)
                return seq
        return None

    def next_prefill(self) -> tuple[Sequence, int, int] | None:
        """(sequence, start, end) of the prompt chunk to prefill this step, if there is room to admit it."""
        if not self.waiting or len(self.running) >= self.max_running:
            return None
        seq = self.waiting[0]
        end = min(seq.prefilled + self.prefill_chunk, len(seq.prompt))
        return seq, seq.prefilled, end

    def prefilled(self, seq: Sequence, end: int) -> bool:
        """Record a prefilled chunk; True when the whole prompt is in and the sequence starts decoding."""
        seq.prefilled = end
        if end < len(seq.prompt):
            return False
        self.waiting.popleft()
        return True

    def clear(self) -> list[Sequence]:
        """Drop every sequence (after a failed step); returns them so their owners can be told."""
        dropped = [*self.waiting, *self.running]
        self.waiting.clear()
        self.running.clear()
        return dropped

    def admit(self, seq: Sequence) -> None:
        self.running.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.running.remove(seq)
