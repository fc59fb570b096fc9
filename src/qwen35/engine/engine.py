"""The engine: runs the scheduler's plan on the model, one batched forward per decode step.

Running sequences share one left-padded `ModelCache` (rows in the scheduler's running order): a sequence joins
it when its prompt is prefilled (`merge_caches`) and leaves it when it finishes or is aborted (`select_rows`).
Every row then computes exactly what it would alone, so greedy output does not depend on the company it keeps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from qwen35.cache import ModelCache, make_cache, merge_caches, select_rows
from qwen35.engine.scheduler import Scheduler, Sequence
from qwen35.generate import prefill_chunk
from qwen35.models import Qwen35Model
from qwen35.models.vision import ImageInputs
from qwen35.sampling import SamplingParams, sample


log = logging.getLogger("qwen35.engine")
NUMERICAL_ERROR = "numerical error in model output (NaN/Inf logits)"
SEQUENCE_FAILED = "this request failed in the engine (see the server log); the other requests go on"


@dataclass(frozen=True)
class Event:
    """A token produced for a sequence; `finish_reason` is set on its last token.

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


class Engine:
    def __init__(self, model: Qwen35Model, eos_ids: Seq[int] = (), sample_limit: int | None = None,
                 scheduler: Scheduler | None = None):
        self.model, self.eos, self.sample_limit = model, set(eos_ids), sample_limit
        self.scheduler = scheduler or Scheduler()
        self.device = model.embed_tokens.weight.device
        self.batch: ModelCache | None = None

    def add(self, seq_id: str, prompt: list[int], params: SamplingParams, logprobs: int | None = None,
            logit_bias: dict[int, float] | None = None, images: ImageInputs | None = None) -> None:
        """Queue a prompt; `images` are its encoded images (`qwen35.vision.prepare`), prompt ids already expanded."""
        limit = self.model.config.max_position_embeddings
        if not prompt or len(prompt) >= limit:
            raise ValueError(f"prompt of {len(prompt)} tokens: need 1 to {limit - 1} for this model")
        seq = Sequence(seq_id, list(prompt), params, logprobs=logprobs, logit_bias=dict(logit_bias or {}),
                       images=images)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
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
        return [seq.id for seq in self.scheduler.clear()]

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One prefill chunk (if a sequence is waiting and there is room), then one decode step for all running.

        A failure that belongs to one sequence (its prefill, its sampling) ends that sequence alone, with an
        error event; only a failure of the shared batched forward raises (the caller then ends the batch).
        """
        events: list[Event] = []
        job = self.scheduler.next_prefill()
        if job is not None:
            events += self._prefill(*job)
        running = list(self.scheduler.running)
        if running:
            ids = torch.tensor([[s.generated[-1]] for s in running], device=self.device)
            logits = self.model(ids, self.batch)[:, -1]
            keep = []
            for row, seq in enumerate(running):
                event = self._sample_or_fail(seq, logits[row])
                events.append(event)
                if event.finish_reason is None:
                    keep.append(row)
                else:
                    self.scheduler.finish(seq, event.finish_reason)
            if len(keep) < len(running):
                self._keep(keep)
        return events

    def _prefill(self, seq: Sequence, start: int, end: int) -> list[Event]:
        """One chunk of a waiting sequence's prompt; on its last chunk, its first token (and it joins the batch)."""
        try:
            seq.cache = seq.cache or make_cache(self.model.config, 1, self.device)
            logits = prefill_chunk(self.model, torch.tensor([seq.prompt], device=self.device), seq.cache, start, end,
                                   seq.images)[0, -1]
        except Exception:  # noqa: BLE001 - only this sequence's state was touched
            log.exception("prefill of %s failed; ending that request", seq.id)
            self.scheduler.abort(seq.id)
            return [Event(seq.id, -1, "error", error=SEQUENCE_FAILED)]
        if not self.scheduler.prefilled(seq, end):
            return []
        event = self._sample_or_fail(seq, logits)
        if event.finish_reason is None:
            self.scheduler.admit(seq)
            self.batch = seq.cache if self.batch is None else merge_caches([self.batch, seq.cache])
        seq.cache = None
        return [event]

    def _sample_or_fail(self, seq: Sequence, logits: torch.Tensor) -> Event:
        try:
            return self._sample(seq, logits)
        except Exception:  # noqa: BLE001 - a bad value in one request must not end the others
            log.exception("sampling for %s failed; ending that request", seq.id)
            return Event(seq.id, -1, "error", error=SEQUENCE_FAILED)

    def _keep(self, rows: list[int]) -> None:
        self.batch = select_rows(self.batch, rows) if rows else None

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> Event:
        if self.sample_limit is not None and self.sample_limit < logits.shape[-1]:
            logits = logits.clone()
            logits[self.sample_limit:] = float("-inf")
        if torch.isnan(logits).any() or torch.isposinf(logits).any() or not torch.isfinite(logits).any():
            return Event(seq.id, -1, "error", error=NUMERICAL_ERROR)
        if seq.logit_bias:
            logits = logits.float().clone()
            ids = torch.tensor(list(seq.logit_bias), device=self.device)
            logits[ids] += torch.tensor(list(seq.logit_bias.values()), device=self.device)
        generated = torch.tensor(seq.generated, dtype=torch.long, device=self.device)
        token = sample(logits, generated, seq.params, seq.generator)
        seq.generated.append(token)
        total = len(seq.prompt) + len(seq.generated)
        reason = ("stop" if token in self.eos and not seq.params.ignore_eos else
                  "length" if len(seq.generated) >= seq.params.max_tokens
                  or total >= self.model.config.max_position_embeddings else None)
        if seq.logprobs is None:
            return Event(seq.id, token, reason)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = logprobs.topk(seq.logprobs) if seq.logprobs else None
        pairs = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
        return Event(seq.id, token, reason, float(logprobs[token]), pairs)
