"""Prefix reuse: snapshots of a sequence's whole state at chosen token positions, in host memory under a budget.

Gated DeltaNet's recurrent state cannot be trimmed back to an earlier token, so a prompt can only resume from a
position where its state was saved: each snapshot holds, at one position, every layer's state (DeltaNet conv
history and fp32 state, attention K/V up to there, the rope offset) keyed by the tokens before it and the images
that fed them. A new prompt restores the deepest snapshot on its own prefix and prefills the rest.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from qwen35.cache import BufferPool, ModelCache, is_finite, select_rows

GIB = 1 << 30
DEFAULT_CACHE_RAM = 2.0  # GiB: ~40 snapshots of a 0.8B at 2,000 tokens, ~15 of a 4B; fits beside the model on 16 GB
EVERY = 1024  # inside long prefills a snapshot every this many tokens, so a shared long prefix hits


@dataclass(frozen=True)
class Snapshot:
    tokens: tuple[int, ...]
    images: tuple[str, ...]  # content digests of the images whose tokens are among `tokens`
    cache: ModelCache  # one sequence, exactly len(tokens) slots; never handed out, only copied
    nbytes: int


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    reused_tokens: int = 0
    computed_tokens: int = 0
    evictions: int = 0
    stored: int = 0
    warmed_tokens: int = 0  # computed while idle: replies re-rendered as the next turn will show them


class PrefixCache:
    """Snapshots under `budget` bytes, least recently used evicted first. Thread-safe: the server's engine thread
    and Python API callers may share one. `pool`: K/V buffers of finished sequences that restores copy into
    (`BufferPool`; engines give them back)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.pool = BufferPool()
        self.stats = CacheStats()
        self._snapshots: OrderedDict[tuple[tuple[int, ...], tuple[str, ...]], Snapshot] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._snapshots)

    def lengths(self) -> list[int]:
        """The token count of each snapshot held, oldest use first."""
        with self._lock:
            return [len(tokens) for tokens, _ in self._snapshots]

    def store(self, tokens: Sequence[int], images: tuple[str, ...], cache: ModelCache, row: int = 0) -> bool:
        """Save a copy of `cache`'s row `row`, whose state is exactly `tokens`; False if it is not kept (no
        budget, larger than the budget, or not finite: NaN/Inf is never stored)."""
        key = (tuple(tokens), images)
        if self.budget <= 0 or not tokens:
            return False
        with self._lock:
            if key in self._snapshots:
                self._snapshots.move_to_end(key)
                return True
        snap = select_rows(cache, [row])  # a copy of that row's real slots: shares no memory with `cache`
        size = snap.nbytes()
        if size > self.budget or not is_finite(snap):
            return False
        with self._lock:
            self._snapshots[key] = Snapshot(key[0], images, snap, size)
            self._bytes += size
            self.stats.stored += 1
            while self._bytes > self.budget:
                _, old = self._snapshots.popitem(last=False)
                self._bytes -= old.nbytes
                self.stats.evictions += 1
        return True

    def holds(self, tokens: Sequence[int], images: tuple[str, ...]) -> bool:
        with self._lock:
            return (tuple(tokens), images) in self._snapshots

    def restore(self, tokens: Sequence[int], images: tuple[str, ...], warm: bool = False, draft: bool = False,
                context: int | None = None) -> tuple[int, ModelCache | None]:
        """(position, a copy of the state there) of the deepest snapshot on this prompt's prefix, leaving at
        least one token to compute; (0, None) on a miss. Counts the prompt's reused and computed tokens (`warm`:
        an idle-time prefill, counted apart). `draft`: the state must include the MTP head's (speculative
        decoding); otherwise any head state a snapshot holds is left out of the copy. `context`: the copy's K/V
        are planned for it (`select_rows`)."""
        best: Snapshot | None = None
        with self._lock:
            for snap in self._snapshots.values():
                n = len(snap.tokens)
                if (n < len(tokens) and (best is None or n > len(best.tokens)) and (snap.cache.draft or not draft)
                        and images[: len(snap.images)] == snap.images and tuple(tokens[:n]) == snap.tokens):
                    best = snap
            if best is not None:
                self._snapshots.move_to_end((best.tokens, best.images))
            position = len(best.tokens) if best else 0
            if warm:
                self.stats.warmed_tokens += len(tokens) - position
            else:
                self.stats.hits += best is not None
                self.stats.misses += best is None
                self.stats.reused_tokens += position
                self.stats.computed_tokens += len(tokens) - position
        if best is None:
            return 0, None
        cache = select_rows(best.cache, [0], context, self.pool)
        if not draft:
            cache.draft, cache.hidden = [], None
        return position, cache

    def clear(self) -> None:
        with self._lock:
            self._snapshots.clear()
            self._bytes = 0
        self.pool.clear()


def snapshot_points(length: int, marks: Sequence[int], start: int) -> list[int]:
    """Where a prompt of `length` tokens, prefilled from `start`, saves its state: the caller's marks (the chat's
    stable points), every EVERY tokens at least EVERY // 4 from where the prefill starts and ends, and its end.
    A periodic point a few tokens from the restored one or from the end would hold almost the same state again
    (2,048 is a multiple of EVERY, 38 tokens into a turn that resumes at 2,010): a copy and budget for nothing."""
    gap = EVERY // 4
    periodic = {p for p in range(EVERY, length, EVERY) if p - start >= gap and length - p >= gap}
    points = {p for p in marks if start < p < length} | periodic | {length}
    return sorted(p for p in points if p > start)
