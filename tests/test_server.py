"""The OpenAI-compatible server, live on 127.0.0.1 with the built-in model, through the official `openai` client.

Chat, streaming, tools, usage, logprobs, errors; 32 concurrent streams each equal to the same request alone
(batch invariance); disconnect frees the slot; NaN logits and a failing step end only their request; SIGTERM
drains. The model is the session's fp32 nano (loaded once); each server runs in a thread on a free port.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn

from qwen35.server import ServerSettings, create_app
from qwen35.server.protocol import uvicorn_config
from qwen35.tokenizer.choice import ChoiceText

MODEL = "qwen35-nano"
HI = [{"role": "user", "content": "Hello, how are you?"}]


@contextmanager
def running_server(settings: ServerSettings, load: Callable, ready: bool = True) -> Iterator[tuple[str, object]]:
    """(base url, server state) of a live uvicorn server in a thread; stopped on exit."""
    app = create_app(settings, load)
    server = uvicorn.Server(uvicorn_config(app, settings, port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    while ready and httpx.get(url + "/health").status_code != 200:
        time.sleep(0.05)
    try:
        yield url, app.state.server
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def live(default_model):
    with running_server(ServerSettings(model_name=MODEL), lambda: default_model) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0] + "/v1", api_key="unused", max_retries=0)


def assert_still_serving(url: str) -> None:
    """A fault must lose nothing: /health is 200 and a normal request still succeeds."""
    assert httpx.get(url + "/health").status_code == 200
    r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def collect_stream(stream) -> tuple[str, str, str | None, object]:
    """(content, reasoning, finish_reason, usage) of a streamed chat completion."""
    content, reasoning, finish, usage = [], [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
            finish = choice.finish_reason or finish
    return "".join(content), "".join(reasoning), finish, usage


def test_chat_models_and_usage(client, default_model):
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=0)
    reply = default_model.chat(HI, max_tokens=12, temperature=0)  # the Python API gives the same reply
    assert r.choices[0].message.content == reply.text and r.choices[0].finish_reason == reply.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (reply.prompt_tokens, reply.completion_tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.parametrize("thinking", [False, True])
def test_stream_equals_non_stream_with_usage_in_last_chunk(client, thinking):
    kwargs = dict(model=MODEL, messages=[{"role": "system", "content": "Be brief."}, *HI], max_tokens=40,
                  temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
    whole = client.chat.completions.create(**kwargs)
    content, reasoning, finish, usage = collect_stream(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    message = whole.choices[0].message
    assert content == (message.content or "") and finish == whole.choices[0].finish_reason
    assert reasoning == (getattr(message, "reasoning_content", None) or "")
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    if thinking:  # the prompt opened <think>: text before </think> (or all of it) is reasoning
        assert reasoning
    assert "\ufffd" not in content + reasoning


def test_sampling_fields_seed_n_stop_and_completions(client):
    kwargs = dict(model=MODEL, messages=HI, max_tokens=16, temperature=0.9, top_p=0.9, seed=7, n=3,
                  presence_penalty=0.5, frequency_penalty=0.2,
                  extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1})
    a, b = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2] and len({c.message.content for c in a.choices}) > 1
    greedy = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=30, temperature=0)
    text = greedy.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    done = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert done.object == "text_completion" and done.usage.completion_tokens <= 8 and done.choices[0].text


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    for e in entries:  # greedy: the sampled token is the most likely one
        assert len(e.top_logprobs) == 3 and e.logprob <= 0 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
    c = client.completions.create(model=MODEL, prompt="The cat", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens
    assert all(len(t) == 2 for t in lp.top_logprobs)


def test_tools_round_trip(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_calls_parsed_into_openai_shape_streamed_and_whole(default_model):
    """The nano model never calls tools, so feed the Qwen tool-call text through the server's text path."""
    tok = default_model.tokenizer
    text = "Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n" \
           "</function>\n</tool_call>"
    choice = ChoiceText(tok, tok.eos_token_ids, (), thinking=False, tools=True)
    streamed = [d for t in tok.encode(text) + [tok.eos_token_ids[0]] for d in choice.feed(t)]
    assert "".join(t for _, t in streamed) == "Let me check.\n"  # the call itself is never streamed as text
    assert choice.tool_calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert choice.content() == ("Let me check.", choice.tool_calls)
    done = choice
    assert done.finish_reason == "tool_calls"


def test_errors_through_the_client(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=HI, temperature=5)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=HI)
    with pytest.raises(openai.BadRequestError, match="images .* not supported"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}]}])


def test_metrics(client, live):
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    text = httpx.get(live[0] + "/metrics").text
    for name in ("qwen35_requests_total", "qwen35_generation_tokens_total", "qwen35_queue_depth",
                 "qwen35_batch_size", "qwen35_time_to_first_token_seconds_bucket",
                 "qwen35_request_latency_seconds_bucket", "qwen35_prompt_tokens_total"):
        assert name in text
    assert 'qwen35_requests_total{route="/v1/chat/completions",status="200"}' in text


def test_32_concurrent_streams_each_equal_the_request_alone(live, client):
    """Batch invariance: greedy text of each of 32 concurrent streams == that request alone, non-streamed."""
    prompts = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(32)]
    alone = [client.chat.completions.create(model=MODEL, messages=p, max_tokens=12, temperature=0)
             .choices[0].message.content for p in prompts]

    async def one(aclient, p):
        stream = await aclient.chat.completions.create(model=MODEL, messages=p, max_tokens=12, temperature=0,
                                                       stream=True)
        parts, finish = [], None
        async for chunk in stream:
            parts += [c.delta.content or "" for c in chunk.choices]
            finish = next((c.finish_reason for c in chunk.choices if c.finish_reason), finish)
        return "".join(parts), finish

    async def all_at_once():
        aclient = openai.AsyncOpenAI(base_url=live[0] + "/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(aclient, p) for p in prompts))

    got = asyncio.run(all_at_once())
    assert all(finish in ("stop", "length") for _, finish in got)
    assert [text for text, _ in got] == alone
    assert len(set(alone)) > 1  # the prompts really differ


def _wait_idle(state, timeout: float = 2.0) -> float:
    start = time.monotonic()
    while state.runner.engine.has_work() and time.monotonic() - start < timeout:
        time.sleep(0.01)
    return time.monotonic() - start


def test_disconnect_mid_stream_frees_the_slot(live):
    url, state = live
    body = {"model": MODEL, "messages": HI, "max_tokens": 3000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:
        chunks = (json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))
        assert next(c for c in chunks if c["choices"][0]["delta"].get("content"))  # tokens are flowing
        assert state.runner.engine.scheduler.running or state.runner.engine.scheduler.joining
    assert _wait_idle(state) < 1.0  # aborted within about a step once the client left
    assert state.runner.engine.batch is None and state.runner.queued() == 0
    body["stream"] = False  # a non-streaming request whose client times out is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=body, timeout=0.5)
    assert _wait_idle(state) < 1.0
    assert_still_serving(url)


@contextmanager
def model_hook(model, hook):
    handle = model.norm.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_nan_logits_end_that_request_with_an_error(live, default_model):
    url, state = live
    errors_before = state.metrics.errors._value.get()
    with model_hook(default_model.model, lambda module, args, out: out * float("nan")):
        r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 4})
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error" and "numerical error" in r.json()["error"]["message"]
        with httpx.stream("POST", url + "/v1/chat/completions",  # after the 200 header: an SSE error event
                          json={"model": MODEL, "messages": HI, "max_tokens": 4, "stream": True}) as s:
            events = [line for line in s.iter_lines() if line]
        assert s.status_code == 200 and events[-1] == "data: [DONE]"
        assert "numerical error" in json.loads(events[-2][len("data: "):])["error"]["message"]
    deadline = time.monotonic() + 5  # the engine thread counts a step's errors after handing out its events
    while state.metrics.errors._value.get() < errors_before + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state.metrics.errors._value.get() == errors_before + 2
    assert_still_serving(url)


def test_a_failing_step_ends_its_requests_and_the_server_goes_on(live, default_model):
    url, _ = live

    def boom(module, args, out):
        raise RuntimeError("simulated out of memory")

    with model_hook(default_model.model, boom):
        r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 4})
    assert r.status_code == 500 and "failed in the engine" in r.json()["error"]["message"]
    assert "simulated" not in r.text  # details stay in the server log
    assert_still_serving(url)


def test_health_503_while_loading_then_200(default_model):
    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return default_model

    with running_server(ServerSettings(model_name=MODEL), slow_load, ready=False) as (url, _):
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "Loading model" in health.json()["error"]["message"]
        r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": HI})
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable_error"
        gate.set()
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert_still_serving(url)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_work_then_exits_0():
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "qwen35", "serve", "--port", str(port), "--dtype", "float32",
                             "--drain-timeout", "3"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        results: dict[str, tuple[str | None, int]] = {}

        def stream(name: str, max_tokens: int) -> None:
            body = {"model": MODEL, "messages": HI, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
            finish, n = None, 0
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        n += 1
                        finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
            results[name] = (finish, n)

        threads = [threading.Thread(target=stream, args=a) for a in (("short", 40), ("long", 100_000 // 30))]
        for t in threads:
            t.start()
        time.sleep(1.0)  # both are generating
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no new work is admitted
            httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": HI}, timeout=2)
        for t in threads:
            t.join(timeout=30)
        assert proc.wait(timeout=30) == 0
        assert results["short"][0] == "length"  # finished within the drain timeout
        assert results["long"][0] == "abort"  # cut at the drain timeout, told so
    finally:
        if proc.poll() is None:
            proc.kill()
