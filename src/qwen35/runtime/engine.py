"""The engine: runs the scheduler's plan on the model, one batched forward per decode step; and `run`, the
engine driven for one request (the Python API and the CLI).

Running sequences share one left-padded `ModelCache` (rows in the scheduler's running order): a sequence joins
it the step after its prompt is prefilled (`merge_caches`) and leaves it when it finishes or is aborted
(`select_rows`). Every row then computes exactly what it would alone, so greedy output does not depend on the
company it keeps. What a first token need not wait for (the prompt's snapshot copies, joining the batch) waits for
the next step.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from qwen35.cache import ModelCache, make_cache, merge_caches, select_rows
from qwen35.runtime.prefix_cache import PrefixCache, snapshot_points
from qwen35.models import Qwen35Model
from qwen35.models.vision import ImageInputs
from qwen35.runtime.prefill import prefill_chunk, prefill_chunk_size
from qwen35.runtime.request import Request
from qwen35.runtime.scheduler import Scheduler, Sequence
from qwen35.runtime.speculative import Speculator
from qwen35.runtime.steering import Steer
from qwen35.sampling import SamplingParams, sample

log = logging.getLogger("qwen35.runtime")
NUMERICAL_ERROR = "numerical error in model output (NaN/Inf logits)"
SEQUENCE_FAILED = "this request failed in the engine (see the server log); the other requests go on"


@dataclass(frozen=True)
class Event:
    """A token produced for a sequence; `finish_reason` is set on its last token; `cached`: how many of its prompt
    tokens were restored from a snapshot rather than computed.

    finish_reason "error" (token -1) ends a sequence that cannot go on; `error` says why. With logprobs asked
    for, `logprob` is the sampled token's log-probability (logit_bias included; penalties and temperature not)
    and `top_logprobs` the most likely (token, logprob) pairs.
    """

    seq_id: str
    token: int
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    error: str = ""
    cached: int = 0


class Engine:
    """`isolate_failures`: a request's own failure (prefill, sampling) ends it with an error event and the batch
    goes on (the server); False raises it to the caller (one request, the Python API).

    `context`: the most tokens a sequence may hold (prompt and reply; default the model's), its K/V reserved to that
    size as it grows; `kv_bits`: 16 (the activation dtype) or 8 (int8 with a scale per token and head).
    `prefix_cache`: where prompts resume from and where their states are saved (at each request's snapshot
    points, captured by the prefill forwards and copied at the next step, and at the end of each reply, so the
    next turn of a conversation extends it). A finished chat reply is also queued as a *warm* sequence: the
    conversation as its next turn will render it (`Request.followup`), prefilled for a snapshot and nothing
    sampled, behind the requests already waiting.

    `speculator`: decode steps draft tokens with the model's MTP head and verify them (runtime/speculative.py);
    None: one token per step.
    """

    def __init__(self, model: Qwen35Model, eos_ids: Seq[int] = (), sample_limit: int | None = None,
                 scheduler: Scheduler | None = None, isolate_failures: bool = True,
                 prefix_cache: PrefixCache | None = None, context: int | None = None, kv_bits: int = 16,
                 speculator: Speculator | None = None):
        self.model, self.eos, self.sample_limit, self.speculator = model, set(eos_ids), sample_limit, speculator
        self.context, self.kv_bits = context or model.config.max_position_embeddings, kv_bits
        self.isolate_failures, self.prefix_cache = isolate_failures, prefix_cache
        self.scheduler = scheduler or Scheduler()
        self.device = model.embed_tokens.weight.device
        self.batch: ModelCache | None = None
        self.pending: list[tuple[list[int], tuple[str, ...], ModelCache]] = []  # snapshots to store next step
        self.retired: list[ModelCache] = []  # caches no sequence uses: their K/V buffers go to the pool at `settle`

    def add(self, request: Request) -> None:
        """Queue a request (its prompt ids already expanded for its images)."""
        limit = self.context
        if not request.prompt:
            raise ValueError("the prompt is empty: give at least one token")
        if len(request.prompt) >= limit:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens; this model's context is {limit} tokens "
                             "(the prompt and at least one reply token must fit): shorten it, or raise --context")
        seq = Sequence(request, steer=Steer(request.steering) if request.steering.active else None)
        if request.params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(request.params.seed)
        self.scheduler.add(seq)

    def abort(self, seq_id: str) -> None:
        """Drop a sequence and free its state (its row leaves the running batch)."""
        index = next((i for i, s in enumerate(self.scheduler.running) if s.id == seq_id), None)
        seq = self.scheduler.abort(seq_id)
        if seq is not None and index is not None:
            self._keep([i for i in range(len(self.scheduler.running) + 1) if i != index])

    def reset(self) -> list[str]:
        """Drop every sequence and the batch state (after a failed step); returns the dropped ids."""
        self.batch = None
        self.pending.clear()
        self.retired.clear()
        return [seq.id for seq in self.scheduler.clear()]

    def has_work(self) -> bool:
        sched = self.scheduler
        return bool(sched.waiting or sched.running or sched.joining or self.pending)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Last step's snapshots stored and prefilled sequences joined; one prefill chunk (if a sequence is
        waiting and there is room), then one decode step for all running.

        A failure that belongs to one sequence (its prefill, its sampling) ends that sequence alone, with an
        error event; only a failure of the shared batched forward raises (the caller then ends the batch).
        """
        events: list[Event] = []
        self.settle()
        waiting = self.scheduler.next_prefill()
        if waiting is not None:
            events += self._prefill(waiting)
        running = list(self.scheduler.running)
        if not running:
            return events
        if self.speculator is not None:
            produced = self.speculator.step(self.batch, running, self._sample_or_fail)
        else:
            ids = torch.tensor([[s.generated[-1]] for s in running], device=self.device)
            logits = self.model(ids, self.batch)[:, -1]
            produced = [[self._sample_or_fail(seq, logits[row])] for row, seq in enumerate(running)]
        keep = []
        for row, (seq, mine) in enumerate(zip(running, produced)):
            events += mine
            reason = mine[-1].finish_reason
            if reason is None:
                keep.append(row)
                continue
            self.scheduler.finish(seq, reason)
            if self.prefix_cache is not None and reason != "error":
                self._store_reply(seq, row)
                self._queue_warm(seq)
        if len(keep) < len(running):
            self._keep(keep)
        return events

    def settle(self) -> None:
        """Store the snapshots the last prefill captured (before anything changes their state), hand the K/V
        buffers of retired caches to the pool (the captures were their last users), then let the sequences
        prefilled last step join the batch."""
        for tokens, key, state in self.pending:
            self.prefix_cache.store(tokens, key, state)
        self.pending.clear()
        for cache in self.retired:
            self.prefix_cache.pool.give(cache)
        self.retired.clear()
        for seq in self.scheduler.join():
            self.batch = (seq.cache if self.batch is None else merge_caches([self.batch, seq.cache])).plan(self.context)
            seq.cache = None

    def _prefill(self, seq: Sequence) -> list[Event]:
        """One chunk of a waiting sequence's prompt (the first resumes from the deepest snapshot on its prefix),
        the states at its snapshot points captured; on its last chunk, its first token (it joins the batch next
        step)."""
        try:
            if seq.cache is None:
                self._restore(seq)
            start, end = seq.prefilled, self.scheduler.chunk_end(seq)
            points = [p for p in seq.stops if start < p <= end]  # none without a prefix cache
            logits, states = prefill_chunk(self.model, torch.tensor([seq.prompt], device=self.device), seq.cache,
                                           start, end, seq.request.images, [p for p in points if p < end])
            logits = logits[0, -1]
        except Exception:  # noqa: BLE001 - only this sequence's state was touched
            self.scheduler.abort(seq.id)
            if seq.warm:  # nobody waits for it: its snapshot is simply not made
                log.exception("warm-up prefill of %s failed; dropped", seq.id)
                return []
            if not self.isolate_failures:
                raise
            log.exception("prefill of %s failed; ending that request", seq.id)
            return [Event(seq.id, -1, "error", error=SEQUENCE_FAILED)]
        states += [seq.cache] if end in points else []
        self.pending += [(seq.prompt[:p], self._image_key(seq, p), state) for p, state in zip(points, states)]
        if seq.request.progress is not None and not seq.warm:
            seq.request.progress(end, len(seq.prompt))
        if not self.scheduler.prefilled(seq, end):
            return []
        if seq.warm:
            self._retire(seq)
            return []
        event = self._sample_or_fail(seq, logits)
        if event.finish_reason is None:
            self.scheduler.joining.append(seq)
        else:
            self._retire(seq)
        return [event]

    def _restore(self, seq: Sequence) -> None:
        drafting = self.speculator is not None
        key = None if self.prefix_cache is None else self._image_key(seq, len(seq.prompt))
        if key is not None:
            seq.cached, seq.cache = self.prefix_cache.restore(seq.prompt, key, warm=seq.warm, draft=drafting,
                                                                context=self.context)
            seq.prefilled = seq.cached
            seq.stops = snapshot_points(len(seq.prompt), seq.request.marks, seq.prefilled)
        if seq.cache is None:
            if self.prefix_cache is not None:
                self.prefix_cache.pool.clear()  # its K/V grows in new buffers: the held ones would double it
            layers = self.model.config.mtp_num_hidden_layers if drafting else 0
            seq.cache = make_cache(self.model.config, 1, self.device, self.kv_bits, draft_layers=layers)
        seq.cache.plan(self.context)

    def _store_reply(self, seq: Sequence, row: int) -> None:
        """The state after a reply, for the conversation's next turn (the reply's last token was never fed)."""
        tokens = seq.prompt + seq.generated[:-1]
        key = self._image_key(seq, len(tokens))
        if key is not None:
            self.prefix_cache.store(tokens, key, self.batch, row)

    def _queue_warm(self, seq: Sequence) -> None:
        """Queue the finished reply's history rendering (`Request.followup`) for an idle-time prefill."""
        request = seq.request
        if request.followup is None or self._image_key(seq, len(seq.prompt)) is None:
            return
        try:
            tokens = request.followup(seq.generated, request.params.stop)
        except Exception:  # noqa: BLE001 - a warm-up is an optimisation; it must never end anything
            log.exception("rendering the reply of %s for the next turn failed; no warm-up", seq.id)
            return
        key = self._image_key(seq, len(tokens or ()))
        if (not tokens or len(tokens) >= self.context
                or len(self.scheduler.waiting) >= self.scheduler.max_waiting or self.prefix_cache.holds(tokens, key)):
            return
        self.scheduler.add(Sequence(Request(f"{seq.id}/warm", tokens, request.params, images=request.images),
                                    warm=True))

    def drain(self, stop: threading.Event) -> None:
        """Step until nothing is left (the warm-ups queued after `run`'s request finished) or `stop` is set."""
        while self.has_work() and not stop.is_set():
            self.step()

    def _image_key(self, seq: Sequence, end: int) -> tuple[str, ...] | None:
        """Digests of the images whose tokens start before `end` (a snapshot's state depends on their pixels);
        None where images came without digests: such a sequence is never stored nor restored."""
        images = seq.request.images
        if images is None:
            return ()
        if not images.digests:
            return None
        pad, ids = self.model.config.image_token_id, seq.prompt
        starts = sum(1 for i in range(min(end, len(ids))) if ids[i] == pad and (i == 0 or ids[i - 1] != pad))
        return tuple(images.digests[:starts])

    def _sample_or_fail(self, seq: Sequence, logits: torch.Tensor) -> Event:
        try:
            return self._sample(seq, logits)
        except Exception:  # noqa: BLE001 - a bad value in one request must not end the others
            if not self.isolate_failures:
                raise
            log.exception("sampling for %s failed; ending that request", seq.id)
            return Event(seq.id, -1, "error", error=SEQUENCE_FAILED)

    def _keep(self, rows: list[int]) -> None:
        old, pool = self.batch, None if self.prefix_cache is None else self.prefix_cache.pool
        self.batch = select_rows(old, rows, self.context, pool) if rows else None
        if pool is not None:
            self.retired.append(old)

    def _retire(self, seq: Sequence) -> None:
        """`seq` is done with its own cache (it never joined the batch)."""
        if self.prefix_cache is not None:
            self.retired.append(seq.cache)
        seq.cache = None

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> Event:
        if self.sample_limit is not None and self.sample_limit < logits.shape[-1]:
            logits[self.sample_limit:] = float("-inf")  # in place: each step's logits are its own
        top = float(logits.max())  # NaN anywhere is NaN here; +inf, or all -inf, is no distribution either
        if not math.isfinite(top):
            return Event(seq.id, -1, "error", error=NUMERICAL_ERROR)
        request, params, steer = seq.request, seq.request.params, seq.steer
        if request.logit_bias:
            logits = logits.float().clone()
            ids = torch.tensor(list(request.logit_bias), device=self.device)
            logits[ids] += torch.tensor(list(request.logit_bias.values()), device=self.device)
        token = steer.forced() if steer is not None else None
        if token is None:
            if steer is not None:
                logits = steer.mask(logits)
            generated = torch.tensor(seq.generated, dtype=torch.long, device=self.device)
            token = sample(logits, generated, params, seq.generator)
        if steer is not None:
            steer.accept(token)
        seq.generated.append(token)
        total = len(seq.prompt) + len(seq.generated)
        reason = ("stop" if token in self.eos and not params.ignore_eos else
                  "length" if len(seq.generated) >= params.max_tokens
                  or total >= self.context else None)
        if request.logprobs is None:
            return Event(seq.id, token, reason, cached=seq.cached)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = logprobs.topk(request.logprobs) if request.logprobs else None
        pairs = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
        return Event(seq.id, token, reason, float(logprobs[token]), pairs, cached=seq.cached)


def run(model: Qwen35Model, request: Request, eos_ids: Seq[int] = (), sample_limit: int | None = None,
        prefix_cache: PrefixCache | None = None,
        background: Callable[[Callable[[threading.Event], None]], None] | None = None,
        context: int | None = None, kv_bits: int = 16, speculator: Speculator | None = None) -> Iterator[Event]:
    """The engine with one request: its events one by one, the last with `finish_reason`. Raises ValueError for a
    prompt that does not fit, FloatingPointError for NaN/Inf logits, and whatever the model or the sampler raised.

    `sample_limit` excludes ids >= it from sampling (the embedding rows past the tokenizer are untrained).
    `background` is handed the warm-up left when the request ends (`Engine.drain`), before its last event, to
    run while the caller is idle (it must finish before the model's next use); None drops it. `context`,
    `kv_bits`, `speculator`: see `Engine`.
    """
    scheduler = Scheduler(max_running=1, max_waiting=1, prefill_chunk=prefill_chunk_size(model.config))
    engine = Engine(model, eos_ids, sample_limit, scheduler, isolate_failures=False, prefix_cache=prefix_cache,
                    context=context, kv_bits=kv_bits, speculator=speculator)
    engine.add(request)
    while engine.has_work():
        for event in engine.step():
            if event.finish_reason == "error":  # NaN/Inf logits: the one error that is an event, not an exception
                raise FloatingPointError(f"{event.error}; the weights may be corrupt")
            if event.finish_reason is not None:
                if background is not None and engine.has_work():
                    background(engine.drain)
                else:
                    engine.settle()  # the snapshots its last step captured (a reply of one token), the pool's buffers
                yield event
                return
            yield event


def generate_tokens(model: Qwen35Model, prompt_ids: Seq[int], params: SamplingParams, eos_ids: Seq[int] = (),
                    sample_limit: int | None = None, images: ImageInputs | None = None) -> Iterator[int]:
    """`run`'s tokens for a prompt (no prefix cache): stops after an EOS token (which is yielded) or
    `params.max_tokens`."""
    return (event.token for event in run(model, Request("0", list(prompt_ids), params, images=images), eos_ids,
                                          sample_limit))
