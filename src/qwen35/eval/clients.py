"""Chat clients behind one async call: OpenAI-compatible endpoints (httpx) and local models (this package).

Each client owns its endpoint's limits (a semaphore for concurrency, a token bucket for requests per second)
and retries transient failures with exponential backoff and jitter; when retries run out the result is an
explicit error `Completion`. A shared `Ledger` counts tokens and cost and enforces the budget cap.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from qwen35.eval.specs import Completion, ModelSpec
from qwen35.sampling import SamplingParams

THINK_END = "</think>"
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class BudgetExceeded(RuntimeError):
    """The run reached its cost cap; everything finished so far is cached, so a re-run with more budget resumes."""


@dataclass
class Ledger:
    """Token and cost totals per (model name, stage), with an optional budget cap in USD."""

    budget_usd: float | None = None
    tokens: dict[tuple[str, str], list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))
    cost: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))

    @property
    def spent(self) -> float:
        return sum(self.cost.values())

    def check(self) -> None:
        if self.budget_usd is not None and self.spent >= self.budget_usd:
            raise BudgetExceeded(f"budget of ${self.budget_usd:.2f} reached (spent ${self.spent:.4f}); "
                                 f"re-run with a larger --budget to fill the remaining gaps from the cache")

    def add(self, spec: ModelSpec, stage: str, c: Completion) -> None:
        t = self.tokens[(spec.name, stage)]
        t[0] += c.prompt_tokens
        t[1] += c.completion_tokens
        t[2] += 1
        self.cost[(spec.name, stage)] += c.cost(spec)

    def rows(self) -> list[dict[str, Any]]:
        return [{"model": m, "stage": s, "calls": t[2], "prompt_tokens": t[0], "completion_tokens": t[1],
                 "cost_usd": round(self.cost[(m, s)], 6)} for (m, s), t in sorted(self.tokens.items())]


def split_reasoning(text: str, reasoning: str = "") -> tuple[str, str]:
    """(answer, reasoning): text before the last `</think>` is reasoning, never judged or scored."""
    if THINK_END in text:
        head, _, text = text.rpartition(THINK_END)
        reasoning = (reasoning + "\n" + re.sub(r"^\s*<think>", "", head)).strip()
    return text.strip(), reasoning


class ChatClient(Protocol):
    spec: ModelSpec

    async def preflight(self) -> None: ...

    async def complete(self, messages: list[dict[str, str]]) -> Completion: ...

    async def aclose(self) -> None: ...


class TokenBucket:
    """At most `rate` acquisitions per second on average (bursts of one); rate 0 means unlimited."""

    def __init__(self, rate: float):
        self.rate, self.next_at, self.lock = rate, 0.0, asyncio.Lock()

    async def acquire(self) -> None:
        if self.rate <= 0:
            return
        async with self.lock:
            now = time.monotonic()
            wait = self.next_at - now
            self.next_at = max(now, self.next_at) + 1.0 / self.rate
        if wait > 0:
            await asyncio.sleep(wait)


class OpenAIClient:
    """POST {url}/chat/completions with the spec's sampling settings (extra fields passed through)."""

    def __init__(self, spec: ModelSpec, backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 limits: dict[str, tuple[asyncio.Semaphore, TokenBucket]] | None = None):
        self.spec, self.backoff_s, self.max_backoff_s = spec, backoff_s, max_backoff_s
        key = spec.api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.AsyncClient(base_url=spec.url.rstrip("/"), headers=headers, timeout=spec.timeout)
        # specs that point at the same endpoint share its limits (the first spec's values)
        limits = {} if limits is None else limits
        self.limit, self.bucket = limits.setdefault(spec.url.rstrip("/"), (asyncio.Semaphore(spec.concurrency),
                                                                            TokenBucket(spec.rps)))

    def body(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.spec.model, "messages": messages, **self.spec.sampling()}
        if self.spec.thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": self.spec.thinking}
        body.update(self.spec.extra)
        return body

    async def preflight(self) -> None:
        """Fail fast on an endpoint that is not there or refuses the key, instead of retrying every call."""
        try:
            r = await self.http.get("/models")
        except httpx.TransportError as e:
            raise ConnectionError(f"spec {self.spec.name!r}: cannot reach {self.spec.url} ({type(e).__name__}); "
                                  f"is the server running and the URL right (it should end in /v1)?") from e
        if r.status_code in (401, 403):
            raise ValueError(f"spec {self.spec.name!r}: {self.spec.url} refused the request (HTTP {r.status_code});"
                             f" set api_key_env=VAR to the variable that holds a valid key")

    async def complete(self, messages: list[dict[str, str]]) -> Completion:
        body, error, retry_after = self.body(messages), "no attempt made", 0.0
        async with self.limit:
            for attempt in range(self.spec.retries + 1):
                if attempt:
                    delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                    # jitter spreads retries out; a server's Retry-After is a floor
                    await asyncio.sleep(max(retry_after, delay * (0.5 + random.random())))
                await self.bucket.acquire()
                start = time.monotonic()
                try:
                    r = await self.http.post("/chat/completions", json=body)
                except httpx.HTTPError as e:
                    error = f"{type(e).__name__}: {e}"
                    continue
                if r.status_code in RETRY_STATUS:
                    error = f"HTTP {r.status_code}: {r.text[:300]}"
                    retry_after = _seconds(r.headers.get("retry-after"), self.max_backoff_s)
                    continue
                if r.status_code != 200:
                    return Completion("", error=f"HTTP {r.status_code} (not retried): {r.text[:300]}")
                try:
                    return parse_response(r.json(), time.monotonic() - start)
                except (ValueError, KeyError, IndexError, TypeError) as e:
                    error = f"malformed response ({e}): {r.text[:300]}"
        return Completion("", error=f"failed after {self.spec.retries + 1} attempts: {error}")

    async def aclose(self) -> None:
        await self.http.aclose()


def _seconds(value: str | None, cap: float) -> float:
    """A Retry-After header in seconds (the HTTP-date form is ignored), capped."""
    try:
        return min(cap, max(0.0, float(value))) if value else 0.0
    except ValueError:
        return 0.0


def parse_response(data: dict[str, Any], latency: float) -> Completion:
    """A Completion from an OpenAI chat.completion object (reasoning from `reasoning_content` or `<think>`)."""
    choice = data["choices"][0]
    msg = choice["message"]
    reasoning = msg.get("reasoning_content") or msg.get("reasoning") or ""
    text, reasoning = split_reasoning(msg.get("content") or "", reasoning)
    usage = data.get("usage") or {}
    details = usage.get("completion_tokens_details") or {}
    return Completion(text, reasoning, choice.get("finish_reason"), int(usage.get("prompt_tokens") or 0),
                      int(usage.get("completion_tokens") or 0), int(details.get("reasoning_tokens") or 0),
                      latency, data.get("model"))


class LocalClient:
    """A model of this package run in-process (`qwen35.load`, optionally `qwen35.quantize`), one call at a time."""

    def __init__(self, spec: ModelSpec, device: str | None = None):
        SamplingParams().updated(**spec.sampling(), **spec.extra)  # a wrong option fails now, not on every answer
        self.spec, self.device, self.model, self.lock = spec, device, None, asyncio.Lock()

    def _load(self):
        import qwen35

        device = "cpu" if self.spec.bits else self.device  # the int8/int4 layers use packed CPU kernels
        model = qwen35.load(None if self.spec.path == "default" else self.spec.path, self.spec.dtype, device)
        return qwen35.quantize(model, bits=self.spec.bits) if self.spec.bits else model

    def _chat(self, messages: list[dict[str, str]]) -> Completion:
        self.model = self.model or self._load()
        start = time.monotonic()
        options = {**self.spec.sampling(), **self.spec.extra}
        reply = self.model.chat(messages, enable_thinking=self.spec.thinking, **options)
        text, reasoning = split_reasoning(reply.text, reply.thinking)
        return Completion(text, reasoning, reply.finish_reason, reply.prompt_tokens, reply.completion_tokens, 0,
                          time.monotonic() - start, f"qwen35:{self.model.path.name}")

    async def complete(self, messages: list[dict[str, str]]) -> Completion:
        async with self.lock:
            try:
                return await asyncio.to_thread(self._chat, messages)
            except (ValueError, RuntimeError) as e:
                return Completion("", error=f"{type(e).__name__}: {e}")

    async def preflight(self) -> None:
        """Nothing to check before loading (a bad path fails when the model is loaded)."""

    async def aclose(self) -> None:
        self.model = None


def make_client(spec: ModelSpec, backoff_s: float = 1.0,
                limits: dict[str, tuple[asyncio.Semaphore, TokenBucket]] | None = None) -> ChatClient:
    """A client for `spec`; pass one `limits` dict to every client of a run so endpoints share their limits."""
    return LocalClient(spec) if spec.is_local else OpenAIClient(spec, backoff_s, limits=limits)
