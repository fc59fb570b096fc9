"""Anthropic's Messages API on the server, live on 127.0.0.1, through the official `anthropic` client.

A Messages request must render the same prompt as its OpenAI equivalent and reply what the OpenAI route replies,
shaped as Anthropic's message or event stream; errors come in Anthropic's envelope on its routes (the Guard's
included) and leave the server serving. The nano model never calls tools or closes its thinking by itself, so
tool-call and multi-block shaping is also checked on scripted model output.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import uuid
from typing import Any

import anthropic
import httpx
import openai
import pytest
from test_server import _wait_idle, assert_still_serving, model_hook, running_server

from qwen35.runtime import Event
from qwen35.server import ServerSettings
from qwen35.server.anthropic import CountTokensRequest, MessagesGeneration, MessagesRequest, chat_request
from qwen35.server.metrics import Metrics
from qwen35.server.prepare import prepare_chat
from qwen35.server.schemas import ChatRequest
from qwen35.vision import ImagePolicy

try:
    from test_vision_api import checkpoint  # noqa: F401  (the tiny vision-language checkpoint; needs transformers)
except pytest.skip.Exception:
    @pytest.fixture(scope="module")
    def checkpoint():
        pytest.skip("the vision-language checkpoint needs transformers and scikit-image")

MODEL = "qwen35-nano"
HI = [{"role": "user", "content": "Hello, how are you?"}]
GREEDY = {"temperature": 0}  # in extra_body: this client version has no sampling arguments
NO_THINKING = {"type": "disabled"}
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}}}


def openai_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {"name": tool["name"], "parameters": tool["input_schema"]}
    if "description" in tool:
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


# A conversation with every block kind, and the same conversation written by hand for the OpenAI route.
TOOL_TURNS = [
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris "}, {"type": "text", "text": "and Rome?"}]},
    {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "Two cities: two calls.", "signature": "sig"},
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}}]},
    {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C, sunny"},
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "city not found"}],
         "is_error": True},
        {"type": "text", "text": "And tomorrow?"}]},
]
# The last user query comes before the assistant turn here, so the template renders that turn's reasoning.
REASONING_TURNS = [*HI, {"role": "assistant", "content": [
    {"type": "thinking", "thinking": "Need the weather.", "signature": ""},
    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "unknown city",
                                  "is_error": True}]}]
OPENAI_REASONING_TURNS = [*HI, {"role": "assistant", "content": "", "reasoning_content": "Need the weather.",
                                "tool_calls": [{"id": "toolu_1", "type": "function", "function": {
                                    "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                          {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: unknown city"}]
OPENAI_TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "Let me check.", "reasoning_content": "Two cities: two calls.", "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: city not found"},
    {"role": "user", "content": "And tomorrow?"},
]


@pytest.fixture(scope="module")
def live(default_model):
    with running_server(ServerSettings(model_name=MODEL), lambda: default_model) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def client(live):
    return anthropic.Anthropic(base_url=live[0], api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def oa(live):
    return openai.OpenAI(base_url=live[0] + "/v1", api_key="unused", max_retries=0)


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each event of an SSE body."""
    events = []
    for chunk in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in chunk.split("\n"))
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def blocks_of(events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The content blocks a stream builds, asserting Anthropic's event order on the way."""
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"], names
    assert all(name == data["type"] for name, data in events)
    assert events[0][1]["message"]["content"] == [] and events[0][1]["message"]["stop_reason"] is None
    blocks: list[dict[str, Any]] = []
    current = None
    for name, data in events[1:-2]:
        if name == "content_block_start":
            assert current is None and data["index"] == len(blocks)
            current = data["index"]
            blocks.append({**data["content_block"], "partial_json": ""})
        elif name == "content_block_delta":
            assert data["index"] == current
            delta, block = data["delta"], blocks[current]
            key = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}
            block[key[delta["type"]]] += delta[key[delta["type"]]]
        else:
            assert name == "content_block_stop" and data["index"] == current
            current = None
    for block in blocks:
        text = block.pop("partial_json")
        if block["type"] == "tool_use":
            block["input"] = json.loads(text)
    return blocks


def dumped(content: list[Any]) -> list[dict[str, Any]]:
    """Content blocks as the JSON the server sent (the client's streamed blocks have extra, unset fields)."""
    return [block.model_dump(exclude_none=True) for block in content]


def prompt_ids(model, request: ChatRequest) -> list[int]:
    return prepare_chat(request, model, ServerSettings(model_name=MODEL)).prompt_ids


def messages_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 8, "messages": HI, **fields}


# -- the request: the same prompt as the OpenAI request ----------------------------------------------------------
@pytest.mark.parametrize("anthropic_fields,openai_fields", [
    ({"system": "Be brief.", "messages": [*HI, {"role": "assistant", "content": "Fine."},
                                          {"role": "user", "content": "Good."}]},
     {"messages": [{"role": "system", "content": "Be brief."}, *HI, {"role": "assistant", "content": "Fine."},
                   {"role": "user", "content": "Good."}]}),
    ({"system": [{"type": "text", "text": "Be brief. "}, {"type": "text", "text": "Be kind."}]},
     {"messages": [{"role": "system", "content": "Be brief. Be kind."}, *HI]}),
    ({"tools": [WEATHER, TIME], "messages": TOOL_TURNS},
     {"tools": [openai_tool(WEATHER), openai_tool(TIME)], "messages": OPENAI_TOOL_TURNS}),
    ({"tools": [WEATHER], "messages": REASONING_TURNS},
     {"tools": [openai_tool(WEATHER)], "messages": OPENAI_REASONING_TURNS}),
    ({"tools": [WEATHER], "tool_choice": {"type": "none"}}, {"messages": HI}),
    ({"thinking": {"type": "enabled", "budget_tokens": 64}},
     {"messages": HI, "chat_template_kwargs": {"enable_thinking": True}}),
    ({"thinking": NO_THINKING}, {"messages": HI, "chat_template_kwargs": {"enable_thinking": False}}),
])
def test_a_request_renders_the_prompt_of_its_openai_equivalent(default_model, anthropic_fields, openai_fields):
    ours = chat_request(CountTokensRequest.model_validate({"model": MODEL, "messages": HI, **anthropic_fields}))
    theirs = ChatRequest.model_validate({"model": MODEL, **openai_fields})
    decode = default_model.tokenizer.decode
    assert decode(prompt_ids(default_model, ours)) == decode(prompt_ids(default_model, theirs))


@pytest.mark.parametrize("turns,texts", [
    (TOOL_TURNS, ("<function=get_weather>\n<parameter=city>\nRome", "<tool_response>\n18 C, sunny\n</tool_response>",
                  "<tool_response>\nError: city not found\n</tool_response>", '"name": "get_weather"')),
    (REASONING_TURNS, ("<think>\nNeed the weather.\n</think>", "<tool_response>\nError: unknown city\n</tool_response>")),
])
def test_tool_turns_render_calls_results_errors_and_reasoning(default_model, turns, texts):
    """The equality above would also hold if both sides dropped something: these parts must be in the prompt."""
    prompt = default_model.tokenizer.decode(prompt_ids(default_model, chat_request(CountTokensRequest.model_validate(
        {"model": MODEL, "messages": turns, "tools": [WEATHER]}))))
    for text in texts:
        assert text in prompt


def test_sampling_thinking_and_tool_choice_fields_map_to_the_chat_request():
    req = chat_request(MessagesRequest.model_validate(messages_body(
        max_tokens=50, stop_sequences=["END"], top_k=5, top_p=0.5, temperature=0.25, stream=True,
        metadata={"user_id": "u"}, thinking={"type": "enabled", "budget_tokens": 32}, tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}, unknown_field=1)))
    assert (req.max_tokens, req.stop, req.top_k, req.top_p, req.temperature, req.stream) == \
        (50, ["END"], 5, 0.5, 0.25, True)
    assert req.chat_template_kwargs == {"enable_thinking": True} and req.thinking_budget == 32
    assert req.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert req.parallel_tool_calls is False
    choices = {"auto": "auto", "any": "required", "none": "none"}
    for kind, expected in choices.items():
        assert chat_request(CountTokensRequest.model_validate(
            {"model": MODEL, "messages": HI, "tool_choice": {"type": kind}})).tool_choice == expected
    off = chat_request(CountTokensRequest.model_validate({"model": MODEL, "messages": HI, "thinking": NO_THINKING}))
    assert off.chat_template_kwargs == {"enable_thinking": False} and off.thinking_budget is None
    default = chat_request(CountTokensRequest.model_validate({"model": MODEL, "messages": HI}))
    assert default.chat_template_kwargs is None and default.thinking_budget is None


def test_count_tokens_equals_the_openai_prompt_tokens(client, oa):
    count = client.messages.count_tokens(model=MODEL, system="Be brief.", tools=[WEATHER], messages=TOOL_TURNS)
    reply = oa.chat.completions.create(model=MODEL, max_tokens=1, tools=[openai_tool(WEATHER)],
                                       messages=[{"role": "system", "content": "Be brief."}, *OPENAI_TOOL_TURNS])
    assert count.input_tokens == reply.usage.prompt_tokens > 100
    plain = client.messages.count_tokens(model=MODEL, messages=HI)
    assert plain.input_tokens < count.input_tokens


# -- the reply -------------------------------------------------------------------------------------------------------
def test_message_equals_the_openai_reply(client, oa):
    system = f"Be brief. {uuid.uuid4()}"  # nothing cached yet
    reply = client.messages.create(model=MODEL, max_tokens=12, system=system, messages=HI, thinking=NO_THINKING,
                                   metadata={"user_id": "someone"}, extra_body=GREEDY)
    same = oa.chat.completions.create(model=MODEL, max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": system}, *HI], extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert reply.id.startswith("msg_") and reply.type == "message" and reply.role == "assistant"
    assert reply.model == MODEL and [b.type for b in reply.content] == ["text"]
    assert reply.content[0].text == same.choices[0].message.content
    assert reply.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[same.choices[0].finish_reason]
    assert reply.stop_sequence is None
    usage = reply.usage
    assert usage.output_tokens == same.usage.completion_tokens and usage.cache_creation_input_tokens == 0
    assert usage.input_tokens + usage.cache_read_input_tokens == same.usage.prompt_tokens


def test_repeated_request_reads_its_prompt_from_the_cache(client):
    kwargs = dict(model=MODEL, max_tokens=4, system=f"Cache me. {uuid.uuid4()}", thinking=NO_THINKING,
                  messages=[*HI, {"role": "assistant", "content": "Fine, thanks."}, {"role": "user", "content": "Go"}],
                  extra_body=GREEDY)
    first, again = client.messages.create(**kwargs), client.messages.create(**kwargs)
    count = client.messages.count_tokens(model=MODEL, system=kwargs["system"], messages=kwargs["messages"],
                                         thinking=NO_THINKING).input_tokens
    assert first.usage.cache_read_input_tokens == 0 and first.usage.input_tokens == count
    assert 0 < again.usage.cache_read_input_tokens <= count
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == count
    assert dumped(again.content) == dumped(first.content)


def test_thinking_enabled_and_disabled_equal_the_openai_reply(client, oa):
    for thinking, enable in (({"type": "enabled", "budget_tokens": 1000}, True), (NO_THINKING, False)):
        reply = client.messages.create(model=MODEL, max_tokens=10, messages=HI, thinking=thinking, extra_body=GREEDY)
        same = oa.chat.completions.create(model=MODEL, max_tokens=10, temperature=0, messages=HI, extra_body={
            "chat_template_kwargs": {"enable_thinking": enable}, "thinking_budget": 1000 if enable else None})
        message = same.choices[0].message
        thought = getattr(message, "reasoning_content", None)
        expected = ([{"type": "thinking", "thinking": thought, "signature": ""}] if thought else []) + \
            ([{"type": "text", "text": message.content}] if message.content else [])
        assert dumped(reply.content) == expected
        assert (reply.content[0].type == "thinking") is enable


def test_thinking_budget_closes_thinking_then_the_model_answers(client, default_model):
    """Needs the engine's thinking budget (ChatRequest.thinking_budget): nano thinks past 40 tokens unbudgeted."""
    kwargs = dict(model=MODEL, max_tokens=80, messages=HI, extra_body=GREEDY)
    free = client.messages.create(thinking={"type": "enabled", "budget_tokens": 1000}, **kwargs)
    assert [b.type for b in free.content] == ["thinking"]
    budgeted = client.messages.create(thinking={"type": "enabled", "budget_tokens": 4}, **kwargs)
    assert [b.type for b in budgeted.content] == ["thinking", "text"]
    assert len(default_model.tokenizer.encode(budgeted.content[0].thinking)) < \
        len(default_model.tokenizer.encode(free.content[0].thinking))


def test_stop_sequences(client):
    kwargs = dict(model=MODEL, max_tokens=30, messages=HI, thinking=NO_THINKING, extra_body=GREEDY)
    text = client.messages.create(**kwargs).content[0].text
    stop = text[len(text) // 2: len(text) // 2 + 4]
    cut = client.messages.create(stop_sequences=["never in the text", stop], **kwargs)
    assert cut.content[0].text == text[:text.index(stop)]
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    with client.messages.stream(stop_sequences=[stop], **kwargs) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)
    assert final.content[0].text == cut.content[0].text


@pytest.mark.parametrize("thinking", [NO_THINKING, {"type": "enabled", "budget_tokens": 1000}])
def test_stream_equals_the_whole_message(client, thinking):
    kwargs = dict(model=MODEL, max_tokens=16, system="Be brief.", messages=HI, thinking=thinking, extra_body=GREEDY)
    whole = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "".join(b.text for b in whole.content if b.type == "text")
    assert dumped(final.content) == dumped(whole.content) and final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens > 0
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens


def test_raw_event_stream(live, client):
    body = messages_body(max_tokens=6, stream=True, thinking=NO_THINKING, **GREEDY)
    r = httpx.post(live[0] + "/v1/messages", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    whole = client.messages.create(model=MODEL, max_tokens=6, messages=HI, thinking=NO_THINKING, extra_body=GREEDY)
    assert blocks_of(events) == dumped(whole.content)
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 6


# -- scripted model output: tool calls and several blocks ----------------------------------------------------------
class ScriptedRunner:
    """A runner that answers every sequence with the given tokens (text the nano model never writes)."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens

    def submit(self, requests: list[Any]) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        for request in requests:
            for token in self.tokens:
                queue.put_nowait(Event(request.id, token))
        return queue

    def release(self, seq_ids: list[str]) -> None:
        pass


def scripted(model, text: str, **fields: Any) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """(the whole message, the stream's events) for `text` followed by end-of-turn."""
    tok = model.tokenizer
    job = prepare_chat(chat_request(MessagesRequest.model_validate(messages_body(**fields))), model,
                       ServerSettings(model_name=MODEL))
    runner = ScriptedRunner(tok.encode(text) + [tok.eos_token_ids[0]])

    async def both():
        whole = await MessagesGeneration(model, runner, Metrics(), job, MODEL).collect()
        return whole, "".join([e async for e in MessagesGeneration(model, runner, Metrics(), job, MODEL).sse()])

    whole, stream = asyncio.run(both())
    return whole, sse_events(stream)


def test_tool_calls_become_tool_use_blocks_and_go_back_as_tool_results(default_model, client):
    text = "Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n" \
           "</function>\n</tool_call>"
    whole, events = scripted(default_model, text, tools=[WEATHER], thinking=NO_THINKING)
    assert whole["stop_reason"] == "tool_use" and whole["stop_sequence"] is None
    text_block, call = whole["content"]
    assert text_block == {"type": "text", "text": "Let me check."}
    assert call["type"] == "tool_use" and call["id"].startswith("toolu_")
    assert (call["name"], call["input"]) == ("get_weather", {"city": "Paris"})
    streamed = blocks_of(events)
    assert [b["type"] for b in streamed] == ["text", "tool_use"] and streamed[1]["id"].startswith("toolu_")
    assert {**streamed[1], "id": call["id"]} == call
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    turns = [*HI, {"role": "assistant", "content": whole["content"]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "18 C"}]}]
    count = client.messages.count_tokens(model=MODEL, tools=[WEATHER], messages=turns, thinking=NO_THINKING)
    same = prompt_ids(default_model, ChatRequest.model_validate({
        "model": MODEL, "tools": [openai_tool(WEATHER)], "chat_template_kwargs": {"enable_thinking": False},
        "messages": [*HI, {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": call["id"], "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": call["id"], "content": "18 C"}]}))
    assert count.input_tokens == len(same)


def test_thinking_then_answer_are_two_blocks(default_model):
    whole, events = scripted(default_model, "Think hard.</think>\n\nThe answer.",
                             thinking={"type": "enabled", "budget_tokens": 100})
    assert whole["content"] == [{"type": "thinking", "thinking": "Think hard.", "signature": ""},
                                {"type": "text", "text": "The answer."}]
    assert blocks_of(events) == whole["content"] and whole["stop_reason"] == "end_turn"
    assert whole["usage"]["output_tokens"] == events[-2][1]["usage"]["output_tokens"] > 3


def test_tool_choice_any_and_named_force_a_tool_call(client):
    """Needs forced tool calls in prepare_chat (tool_choice "required" and a named function). get_time has no
    required parameter, so nano's forced call closes within the token limit (its free-text city never does)."""
    kwargs = dict(model=MODEL, max_tokens=60, messages=HI, tools=[WEATHER, TIME], thinking=NO_THINKING,
                  extra_body=GREEDY)
    for choice, names in (({"type": "any"}, {"get_weather", "get_time"}),
                          ({"type": "tool", "name": "get_time"}, {"get_time"})):
        reply = client.messages.create(tool_choice=choice, **kwargs)
        calls = [b for b in reply.content if b.type == "tool_use"]
        assert reply.stop_reason == "tool_use" and calls and {c.name for c in calls} <= names
        assert all(isinstance(c.input, dict) for c in calls)
    with client.messages.stream(tool_choice={"type": "tool", "name": "get_time"}, **kwargs) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and [b.type for b in final.content] == [b.type for b in reply.content]
    assert (final.content[-1].name, final.content[-1].input) == ("get_time", reply.content[-1].input)


# -- images ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vision_live(checkpoint):  # noqa: F811
    import qwen35

    path, _ = checkpoint
    media = path / "media"
    media.mkdir(exist_ok=True)
    (media / "cat.png").write_bytes((path / "cat.png").read_bytes())
    model = qwen35.load(path, dtype="float32")
    settings = ServerSettings(model_name="tiny-vl", images=ImagePolicy(local_dir=media, max_images=3))
    with running_server(settings, lambda: model) as (url, _):
        yield url, path


def test_image_blocks_take_the_image_url_path(vision_live):
    url, path = vision_live
    raw = (path / "cat.png").read_bytes()
    data = base64.b64encode(raw).decode()
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    oa = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    def turn(source: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image", "source": source}, {"type": "text", "text": "What?"}]}]

    base64_turn = turn({"type": "base64", "media_type": "image/png", "data": data})
    count = client.messages.count_tokens(model="tiny-vl", messages=base64_turn).input_tokens
    image_url = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}}
    same = oa.chat.completions.create(model="tiny-vl", max_tokens=1, messages=[
        {"role": "user", "content": [image_url, {"type": "text", "text": "What?"}]}])
    assert count == same.usage.prompt_tokens > 40  # the image's tokens count
    reply = client.messages.create(model="tiny-vl", max_tokens=3, messages=base64_turn, extra_body=GREEDY)
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens == count
    by_file = turn({"type": "url", "url": f"file://{path / 'media' / 'cat.png'}"})
    assert client.messages.count_tokens(model="tiny-vl", messages=by_file).input_tokens == count
    for source, message in (({"type": "url", "url": "http://169.254.169.254/latest/meta-data/"}, "remote"),
                            ({"type": "url", "url": "file:///etc/passwd"}, "outside the allowed directory"),
                            ({"type": "base64", "media_type": "image/png", "data": "!!notbase64"}, "base64")):
        with pytest.raises(anthropic.BadRequestError, match=message) as e:
            client.messages.create(model="tiny-vl", max_tokens=3, messages=turn(source))
        assert e.value.type == "invalid_request_error"


# -- errors --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,message", [
    (messages_body(temperature=1.5), "temperature"),
    ({"model": MODEL, "messages": HI}, "max_tokens is required"),
    (messages_body(messages=[]), "messages"),
    (messages_body(messages=[{"role": "system", "content": "x"}]), "messages[0].role"),
    (messages_body(messages=[{"role": "user", "content": [{"type": "document", "source": {}}]}]),
     "messages[0].content[0] is a 'document' block"),
    (messages_body(messages=[{"role": "assistant", "content": [{"type": "image", "source": {}}]}]),
     "messages[0].content[0] is a 'image' block"),
    (messages_body(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content[0].text"),
    (messages_body(messages=[{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/bmp", "data": "AAAA"}}]}]), "messages[0].content[0].source.media_type"),
    (messages_body(messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]),
     "source.type 'file' is not supported"),
    (messages_body(messages=[{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]), "images are not supported"),
    (messages_body(messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "tool_use"}]}]}]), "messages[0].content[0].content[0] is a 'tool_use' block"),
    (messages_body(tools=[{"name": "bad name", "input_schema": {}}]), "tools[0].name"),
    (messages_body(tools=[{"name": "t", "input_schema": {"type": 5}}]), "tools[0].input_schema is not a valid"),
    (messages_body(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "tools[0].type"),
    (messages_body(tool_choice={"type": "tool"}), "tool_choice.name is required"),
    (messages_body(thinking={"type": "enabled"}), "thinking.budget_tokens is required"),
    (messages_body(thinking={"type": "enabled", "budget_tokens": "5"}), "thinking.budget_tokens"),
    (messages_body(stop_sequences=["a", "b", "c", "d", "e"]), "stop strings"),
    (messages_body(max_tokens=10**9), "max_tokens"),
])
def test_bad_requests_are_400_in_anthropics_envelope(live, body, message):
    url = live[0]
    r = httpx.post(url + "/v1/messages", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert message in r.json()["error"]["message"], r.text
    assert set(r.json()) == {"type", "error"}


def test_errors_through_the_client(client, live):
    with pytest.raises(anthropic.BadRequestError, match="temperature") as e:
        client.messages.create(model=MODEL, max_tokens=4, messages=HI, extra_body={"temperature": 1.5})
    assert e.value.type == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError, match="does not exist") as e:
        client.messages.create(model="claude-sonnet-4", max_tokens=4, messages=HI)
    assert e.value.type == "not_found_error"
    with pytest.raises(anthropic.NotFoundError, match="does not exist"):
        client.messages.count_tokens(model="claude-sonnet-4", messages=HI)
    url = live[0]
    for path, data in (("/v1/messages", b"{not json"), ("/v1/messages/count_tokens", b"[1, 2]")):
        r = httpx.post(url + path, content=data, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    nope = httpx.get(url + "/v1/messages/nope")
    assert nope.status_code == 404 and nope.json()["error"]["type"] == "not_found_error"
    big = httpx.post(url + "/v1/messages", content=b"x" * (3 << 20), headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["type"] == "error"
    assert big.json()["error"]["type"] == "invalid_request_error"
    openai_route = httpx.post(url + "/v1/chat/completions", content=b"x" * (3 << 20))  # its own envelope
    assert openai_route.status_code == 413 and openai_route.json()["error"]["code"] == 413
    assert_still_serving(url)


def test_failure_mid_generation_is_an_api_error_and_the_server_goes_on(live, client, default_model):
    with model_hook(default_model.model, lambda module, args, out: out * float("nan")):
        with pytest.raises(anthropic.InternalServerError, match="numerical error") as e:
            client.messages.create(model=MODEL, max_tokens=4, messages=HI)
        assert e.value.type == "api_error"
        with pytest.raises(anthropic.APIStatusError, match="numerical error") as e:  # after the 200: an error event
            for _ in client.messages.create(model=MODEL, max_tokens=4, messages=HI, stream=True):
                pass
        assert e.value.type == "api_error"
        with httpx.stream("POST", live[0] + "/v1/messages", json=messages_body(stream=True)) as r:
            events = sse_events(r.read().decode())
        assert r.status_code == 200 and events[-1][0] == "error"
        assert events[-1][1] == {"type": "error", "error": {"type": "api_error", "message": events[-1][1]["error"][
            "message"]}} and "numerical error" in events[-1][1]["error"]["message"]
    assert_still_serving(live[0])


def test_disconnect_mid_stream_frees_the_sequence(live):
    url, state = live
    body = messages_body(max_tokens=3000, stream=True, thinking=NO_THINKING, ignore_eos=True)
    with httpx.stream("POST", url + "/v1/messages", json=body) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        assert next(line for line in lines if "text_delta" in line)  # tokens are flowing
        assert state.runner.engine.scheduler.running or state.runner.engine.scheduler.joining
    assert _wait_idle(state) < 1.0
    assert state.runner.engine.batch is None and state.runner.queued() == 0
    assert_still_serving(url)


def test_overloaded_while_loading(default_model):
    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return default_model

    try:
        with running_server(ServerSettings(model_name=MODEL), slow_load, ready=False) as (url, _):
            client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
            with pytest.raises(anthropic.APIStatusError, match="Loading model") as e:
                client.messages.create(model=MODEL, max_tokens=4, messages=HI)
            assert (e.value.status_code, e.value.type) == (503, "overloaded_error")
            r = httpx.post(url + "/v1/messages/count_tokens", json={"model": MODEL, "messages": HI})
            assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
    finally:
        gate.set()


def test_x_api_key(default_model):
    key = "s3cret-key-123"
    with running_server(ServerSettings(model_name=MODEL, api_key=key), lambda: default_model) as (url, _):
        good = anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)
        assert good.messages.count_tokens(model=MODEL, messages=HI).input_tokens > 5
        assert good.messages.create(model=MODEL, max_tokens=2, messages=HI).usage.output_tokens == 2
        with pytest.raises(anthropic.AuthenticationError, match="API key") as e:
            anthropic.Anthropic(base_url=url, api_key="s3cret-key-124", max_retries=0).messages.count_tokens(
                model=MODEL, messages=HI)
        assert e.value.type == "authentication_error"
        r = httpx.post(url + "/v1/messages", json=messages_body())  # no key at all
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error" and "type" in r.json()
        openai_route = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": HI})
        assert openai_route.status_code == 401 and openai_route.json()["error"]["code"] == 401
