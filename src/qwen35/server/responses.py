"""Run a `Job` on the runner and shape the result as OpenAI JSON or an SSE stream.

Streaming is the primitive: a non-streaming reply folds the same per-choice deltas. A client that goes away
(disconnect, cancelled stream) releases its sequences at once, so its batch slot and state are freed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from qwen35.api import Qwen35
from qwen35.runtime import Event, Request
from qwen35.server.errors import APIError, sse_error
from qwen35.server.metrics import Metrics
from qwen35.server.prepare import Job
from qwen35.server.runner import Runner
from qwen35.tokenizer.choice import ChoiceText


class SSEResponse(StreamingResponse):
    """A stream that is cancelled the moment the client disconnects (its generator's `finally` then runs)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:
            async def stream() -> None:
                await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


class Generation:
    """One request in flight: its choices, logprobs and usage, fed by the runner's events."""

    def __init__(self, qwen: Qwen35, runner: Runner, metrics: Metrics, job: Job, model_name: str):
        self.qwen, self.runner, self.metrics, self.job, self.model_name = qwen, runner, metrics, job, model_name
        prefix = "chatcmpl-" if job.kind == "chat" else "cmpl-"
        self.id, self.created, self.start = prefix + uuid.uuid4().hex, int(time.time()), time.monotonic()
        self.seq_ids = [f"{self.id}/{i}" for i in range(len(job.params))]
        tok = qwen.tokenizer
        self.choices = [ChoiceText(tok, () if p.ignore_eos else tok.eos_token_ids, p.stop, job.thinking, job.tools,
                                   job.steering.shape, job.tool_schemas)
                        for p in job.params]
        self.logprobs: list[list[dict[str, Any]]] = [[] for _ in job.params]
        self.first_token = True
        self.cached = 0  # prompt tokens restored from a prefix snapshot (the most any choice reused)

    async def events(self) -> AsyncIterator[tuple[int, list[tuple[str, str]], list[dict[str, Any]]]]:
        """(choice index, text deltas, logprob entries) as tokens arrive; raises APIError for a failed sequence."""
        job = self.job
        queue = self.runner.submit([Request(seq_id, job.prompt_ids, p, job.logprobs, job.logit_bias, job.images,
                                            job.marks, job.followup, job.steering)
                                    for seq_id, p in zip(self.seq_ids, job.params)])
        self.metrics.prompt_tokens.inc(len(self.job.prompt_ids))
        try:
            while not all(c.finish_reason for c in self.choices):
                event = await queue.get()
                index = self.seq_ids.index(event.seq_id)
                choice = self.choices[index]
                if choice.finish_reason:
                    continue
                self.cached = max(self.cached, event.cached)
                if event.finish_reason == "error":
                    raise APIError(500, event.error or "the request failed in the engine")
                if self.first_token:
                    self.metrics.ttft.observe(time.monotonic() - self.start)
                    self.first_token = False
                deltas, entries = [], []
                if event.token >= 0:
                    deltas = choice.feed(event.token)
                    entries = self._logprob_entries(event)
                    self.logprobs[index] += entries
                    if choice.finish_reason:  # a stop string ended it before the engine did
                        self.runner.release([event.seq_id])
                if event.finish_reason:
                    deltas += choice.close(event.finish_reason)
                yield index, deltas, entries
            self.metrics.latency.observe(time.monotonic() - self.start)
        finally:
            self.runner.release(self.seq_ids)

    def _logprob_entries(self, event: Event) -> list[dict[str, Any]]:
        if event.logprob is None:
            return []
        decode = self.qwen.tokenizer.decode
        token = decode([event.token])
        top = [{"token": (t := decode([i])), "logprob": lp, "bytes": list(t.encode())} for i, lp in event.top_logprobs]
        return [{"token": token, "logprob": event.logprob, "bytes": list(token.encode()), "top_logprobs": top}]

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage; with images, what they cost: the sum in prompt_tokens_details.image_tokens, and per
        image (OpenAI has no field for it) in image_tokens_per_image."""
        prompt, completion = len(self.job.prompt_ids), sum(c.tokens for c in self.choices)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                 "prompt_tokens_details": {"cached_tokens": self.cached}}
        if self.job.images is not None:
            usage["prompt_tokens_details"]["image_tokens"] = sum(self.job.images.tokens)
            usage["image_tokens_per_image"] = list(self.job.images.tokens)
        return usage

    # -- shapes -------------------------------------------------------------------------------------------------
    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name}

    def _completion_logprobs(self, entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
        offsets, at = [], offset
        for e in entries:
            offsets.append(at)
            at += len(e["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": offsets}

    def chunk(self, index: int, kind: str, text: str | None, entries: list[dict[str, Any]],
              finish: str | None = None, tool_calls: list[dict[str, Any]] | None = None,
              role: bool = False) -> dict[str, Any]:
        job = self.job
        if job.kind == "completion":
            choice = {"index": index, "text": text or "", "finish_reason": finish,
                      "logprobs": self._completion_logprobs(entries, 0) if job.logprobs is not None else None}
            body = {**self._head("text_completion"), "choices": [choice]}
        else:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["reasoning_content" if kind == "thinking" else "content"] = text
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "finish_reason": finish,
                      "logprobs": {"content": entries} if job.logprobs is not None and entries else None}
            if finish and self.choices[index].notice:
                choice["notice"] = self.choices[index].notice
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        if job.include_usage:
            body["usage"] = None
        return body

    async def sse(self) -> AsyncIterator[str]:
        def line(body: dict[str, Any]) -> str:
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            if self.job.kind == "chat":
                for i in range(len(self.choices)):
                    yield line(self.chunk(i, "answer", "", [], role=True))
            async for index, deltas, entries in self.events():
                choice = self.choices[index]
                for n, (kind, text) in enumerate(deltas or [("answer", None)]):
                    if text is None and not entries:
                        continue
                    yield line(self.chunk(index, kind, text, entries if n == 0 else []))
                if choice.finish_reason:
                    for delta in tool_call_deltas(openai_tool_calls(choice.tool_calls, self.id)):
                        yield line(self.chunk(index, "answer", None, [], tool_calls=[delta]))
                    yield line(self.chunk(index, "answer", None, [], choice.finish_reason))
            if self.job.include_usage:
                yield line({**self._head("chat.completion.chunk" if self.job.kind == "chat" else "text_completion"),
                            "choices": [], "usage": self.usage()})
        except APIError as e:
            yield sse_error(e)
        yield "data: [DONE]\n\n"

    async def collect(self) -> dict[str, Any]:
        """The non-streaming reply: the folded stream."""
        async for _ in self.events():
            pass
        choices = []
        for i, c in enumerate(self.choices):
            content, calls = c.content()
            lp = self.logprobs[i]
            if self.job.kind == "completion":
                choices.append({"index": i, "text": content, "finish_reason": c.finish_reason,
                                "logprobs": self._completion_logprobs(lp, 0) if self.job.logprobs is not None
                                else None})
                continue
            message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
            if c.thinking:
                message["reasoning_content"] = "".join(c.thinking)
            if calls:
                message["tool_calls"] = openai_tool_calls(calls, self.id)
            choices.append({"index": i, "message": message, "finish_reason": c.finish_reason,
                            "logprobs": {"content": lp} if self.job.logprobs is not None else None,
                            **({"notice": c.notice} if c.notice else {})})
        obj = "chat.completion" if self.job.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": choices, "usage": self.usage()}


def openai_tool_calls(calls: list[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    """Parsed Qwen calls ({"name", "arguments": dict}) in OpenAI's shape (arguments as a JSON string)."""
    return [{"id": f"call_{request_id[-12:]}_{i}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for i, c in enumerate(calls)]


def tool_call_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streamed calls as OpenAI sends them: per call, its index, id, type and name with empty arguments, then
    the arguments (clients such as `openai`'s stream helpers concatenate argument fragments by index)."""
    out: list[dict[str, Any]] = []
    for i, call in enumerate(calls):
        out.append({"index": i, "id": call["id"], "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""}})
        out.append({"index": i, "function": {"arguments": call["function"]["arguments"]}})
    return out


async def respond(gen: Generation, request: HTTPRequest) -> JSONResponse | SSEResponse:
    if gen.job.stream:
        return SSEResponse(gen.sse(), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    work = asyncio.ensure_future(gen.collect())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not work.done():  # the client went away: cancelling runs the generation's cleanup (abort, free)
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return JSONResponse({}, status_code=499)
    return JSONResponse(work.result())


async def _disconnected(request: HTTPRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
