"""The FastAPI app: routes, the loading lifecycle and the state they share (passed explicitly, no globals).

The model loads in a worker thread after the server starts listening, so /health can say 503 "loading" and
then 200; inference routes answer 503 until the engine is up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from qwen35.api import Qwen35
from qwen35.ops.cpu import release_thread_pool
from qwen35.runtime import Engine, Scheduler
from qwen35.runtime.prefill import prefill_chunk_size
from qwen35.server.anthropic import CountTokensRequest, MessagesGeneration, MessagesRequest, chat_request
from qwen35.server.errors import APIError, error_response, install_handlers
from qwen35.server.guard import Guard
from qwen35.server.metrics import Metrics
from qwen35.server.prepare import check_model, parse_body, prepare_chat, prepare_completion
from qwen35.server.responses import Generation, respond
from qwen35.server.runner import Runner
from qwen35.server.schemas import ChatRequest, CompletionRequest
from qwen35.server.settings import ServerSettings
from qwen35.server.web import install_web

log = logging.getLogger("qwen35.server")
T = TypeVar("T")


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on a worker thread (loading, request preparation), which then frees its OpenMP pool: the pool
    loading left on its thread made libgomp stop spin-waiting on the engine thread (`release_thread_pool`): a
    1,907-token first request to a 0.8B int4 server took 18.7 s, 11.5 s with the pool freed."""
    def run() -> T:
        try:
            return fn(*args)
        finally:
            release_thread_pool()

    return await asyncio.to_thread(run)


class ServerState:
    """What the routes share: settings, metrics and, once loaded, the model and its engine thread."""

    def __init__(self, settings: ServerSettings, load: Callable[[], Qwen35]):
        self.settings, self.load_fn, self.metrics = settings, load, Metrics()
        self.qwen: Qwen35 | None = None
        self.runner: Runner | None = None
        self.load_error: str | None = None
        self.created = int(time.time())

    async def load(self) -> None:
        try:
            qwen = await off_loop(self.load_fn)
            await off_loop(lambda: qwen.vision)  # the tower now, not in the first image request's path
        except Exception as e:  # noqa: BLE001 - reported on /health and by `qwen35 serve`
            log.exception("the model failed to load")
            self.load_error = f"{type(e).__name__}: {e}"
            return
        s = self.settings
        engine = Engine(qwen.model, qwen.tokenizer.eos_token_ids, qwen.tokenizer.vocab_size,
                        Scheduler(max_running=s.max_running, max_waiting=s.max_queue, prefill_chunk=s.prefill_chunk,
                                  idle_chunk=prefill_chunk_size(qwen.model.config)),
                        prefix_cache=qwen.prefix_cache, context=qwen.context, kv_bits=qwen.kv_bits,
                        speculator=qwen.speculator)
        self.runner = Runner(engine, asyncio.get_running_loop(), s.max_queue, s.max_backlog, self.metrics.on_step)
        self.qwen = qwen

    def ready(self) -> tuple[Qwen35, Runner]:
        if self.qwen is None or self.runner is None:
            raise APIError(503, "the model failed to load; see the server log" if self.load_error else
                           _loading(), headers={"Retry-After": "2"})
        return self.qwen, self.runner


def _loading() -> str:
    """What the server is doing while it loads: a first build of the CPU kernels takes minutes, not seconds."""
    from qwen35.ops.build import compiling, compiling_message

    if compiling():
        return f"Loading model: {compiling_message()}; retry in a minute"
    return "Loading model: the server is starting; retry in a few seconds"


def create_app(settings: ServerSettings, load: Callable[[], Qwen35]) -> FastAPI:
    """An app serving the model `load()` returns (called once, in a thread, after startup)."""
    state = ServerState(settings, load)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(state.load())
        yield
        loading.cancel()
        if state.runner is not None:
            state.runner.stop()

    app = FastAPI(title="qwen35", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(Guard, settings=settings)
    install_handlers(app)
    install_web(app, state)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.runner is not None and state.runner.draining:
            return error_response(503, "the server is shutting down")
        try:
            state.ready()
        except APIError as e:
            return error_response(e.status, e.message, headers=e.headers)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        state.metrics.on_cache(state.qwen.prefix_cache if state.qwen else None)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> JSONResponse:
        check_model(name, settings)
        return JSONResponse(_model_card(state))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _serve(request, "chat", state)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(request, "completion", state)

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        return await _serve(request, "messages", state)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> JSONResponse:
        qwen, _ = state.ready()
        raw = await request.body()
        job = await off_loop(lambda: prepare_chat(chat_request(parse_body(raw, CountTokensRequest)), qwen,
                                                           settings))
        return JSONResponse({"input_tokens": len(job.prompt_ids)})

    return app


def _model_card(state: ServerState) -> dict:
    return {"id": state.settings.model_name, "object": "model", "created": state.created, "owned_by": "qwen35"}


async def _serve(request: Request, kind: str, state: ServerState) -> Response:
    route = request.url.path
    try:
        qwen, runner = state.ready()
        if runner.draining:
            raise APIError(503, "the server is shutting down and takes no new requests", headers={"Retry-After": "5"})
        raw = await request.body()
        if kind == "chat":
            job = await off_loop(prepare_chat, parse_body(raw, ChatRequest), qwen, state.settings)
        elif kind == "messages":  # Anthropic's Messages API: the equivalent chat request, then the same path
            job = await off_loop(lambda: prepare_chat(chat_request(parse_body(raw, MessagesRequest)), qwen,
                                                               state.settings))
        else:
            job = await off_loop(prepare_completion, parse_body(raw, CompletionRequest), qwen,
                                          state.settings)
        reply = MessagesGeneration if kind == "messages" else Generation
        response = await respond(reply(qwen, runner, state.metrics, job, state.settings.model_name), request)
    except APIError as e:
        state.metrics.requests.labels(route, str(e.status)).inc()
        raise
    state.metrics.requests.labels(route, str(response.status_code)).inc()
    return response
