"""Output controls agents rely on: thinking budgets, structured output (JSON Schema), forced tool calls.

Through the Python API and a live server (the official `openai` client), on the built-in nano model: a small
model that follows no format by itself, so every guarantee here comes from the engine (grammar masks, forced
tokens), not from the model.
"""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

from qwen35.runtime.steering import CLOSE_THINKING
from qwen35.server import ServerSettings
from qwen35.tokenizer.controls import REASONING_EFFORT
from test_api import _scripted
from test_server import MODEL, running_server

USER = [{"role": "user", "content": "Tell me about the weather in Paris."}]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "high"]},
                                           "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
          "required": ["ok", "level", "tags"], "additionalProperties": False}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                                     "days": {"type": "boolean"}},
    "required": ["city", "unit"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}


def _thinking_ids(model, reply_thinking: str) -> int:
    return len(model.tokenizer.encode(reply_thinking))


# -- Python API -------------------------------------------------------------------------------------------------

def test_json_schema_reply_is_valid_and_compact(default_model):
    for temperature, seed in [(0, None), (1.0, 1), (1.0, 2)]:
        reply = default_model.chat(USER, response_format=JSON_SCHEMA, temperature=temperature, seed=seed,
                                   max_tokens=60, enable_thinking=False)
        assert reply.finish_reason == "stop", reply
        jsonschema.validate(json.loads(reply.text), SCHEMA)
        assert " " not in reply.text and "\n" not in reply.text  # compact: no blanks between JSON tokens


def test_json_cut_by_max_tokens_is_length_with_a_plain_notice(default_model):
    reply = default_model.chat(USER, response_format={"type": "json_object"}, temperature=0, max_tokens=4,
                               enable_thinking=False)
    assert reply.finish_reason == "length" and reply.text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(reply.text)
    assert "partial JSON" in reply.notice


def test_grammar_starts_after_thinking(default_model):
    reply = default_model.chat(USER, response_format=JSON_SCHEMA, enable_thinking=True, thinking_budget=6,
                               temperature=0, max_tokens=80)
    assert reply.thinking and reply.finish_reason == "stop"
    jsonschema.validate(json.loads(reply.text), SCHEMA)


@pytest.mark.parametrize("budget", [0, 1, 5, 9])
def test_thinking_budget_closes_thinking_mid_sentence_and_the_model_answers(default_model, budget):
    reply = default_model.chat(USER, enable_thinking=True, thinking_budget=budget, temperature=0, max_tokens=60)
    closing = CLOSE_THINKING.split("</think>")[0].strip()
    assert reply.thinking.endswith(closing)
    own = reply.thinking[: -len(closing)]
    assert _thinking_ids(default_model, own.strip()) <= budget + 1  # re-encoding may merge or split one token
    assert reply.text and reply.finish_reason in ("stop", "length") and not reply.notice


def test_no_budget_lets_thinking_run_and_max_tokens_inside_it_says_so(default_model):
    reply = default_model.chat(USER, enable_thinking=True, temperature=0, max_tokens=8)
    assert reply.finish_reason == "length" and reply.thinking and reply.text == ""
    assert "still thinking" in reply.notice and "thinking budget" in reply.notice


def test_reasoning_effort_maps_to_budgets_and_none_turns_thinking_off(default_model):
    for effort, budget in REASONING_EFFORT.items():
        prompt = default_model.prepare_chat(USER, enable_thinking=True, reasoning_effort=effort)
        assert prompt.thinking and prompt.steering.budget == budget
    prompt = default_model.prepare_chat(USER, enable_thinking=True, reasoning_effort="high", thinking_budget=7)
    assert prompt.steering.budget == 7  # an explicit budget wins
    assert not default_model.prepare_chat(USER, enable_thinking=True, reasoning_effort="none").thinking


def test_enable_thinking_false_holds_even_against_the_model(default_model):
    think = default_model.tokenizer.token_to_id("<think>")
    reply = default_model.chat(USER, enable_thinking=False, logit_bias={think: 100.0}, temperature=0,
                               max_tokens=10)
    assert reply.thinking == "" and "<think>" not in reply.text


def test_tool_choice_required_and_named_force_valid_calls(default_model):
    for choice, names in [("required", {"get_weather", "get_time"}),
                          ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})]:
        reply = default_model.chat(USER, tools=[WEATHER, CLOCK], tool_choice=choice, temperature=0, max_tokens=200,
                                   enable_thinking=False, parallel_tool_calls=False)
        assert reply.finish_reason == "tool_calls" and len(reply.tool_calls) == 1, reply
        call = reply.tool_calls[0]
        assert call["name"] in names
        schema = (WEATHER if call["name"] == "get_weather" else CLOCK)["function"]["parameters"]
        jsonschema.validate(call["arguments"], schema)


def test_parallel_calls_are_allowed_and_each_is_valid(default_model):
    for seed in range(3):
        reply = default_model.chat(USER, tools=[WEATHER, CLOCK], tool_choice="required", temperature=1.0, seed=seed,
                                   max_tokens=300, enable_thinking=False)
        assert reply.tool_calls, reply
        for call in reply.tool_calls:
            schema = (WEATHER if call["name"] == "get_weather" else CLOCK)["function"]["parameters"]
            jsonschema.validate(call["arguments"], schema)


def test_forced_call_with_thinking_keeps_the_call_out_of_the_thinking(default_model):
    reply = default_model.chat(USER, tools=[WEATHER], tool_choice="required", enable_thinking=True,
                               thinking_budget=4, temperature=0, max_tokens=200, parallel_tool_calls=False)
    assert reply.thinking and "<tool_call>" not in reply.thinking
    assert [c["name"] for c in reply.tool_calls] == ["get_weather"]


CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"


@pytest.mark.parametrize("reply_text", [
    f"I should check the weather.\n{CALL}<|im_end|>",  # a call inside <think>, which is never closed
    f"I should check.\n{CALL}\n</think>\n\n<|im_end|>",  # a call inside <think>, closed after it
])
def test_a_tool_call_inside_thinking_is_still_a_call(monkeypatch, default_model, reply_text):
    _scripted(monkeypatch, reply_text, default_model)
    reply = default_model.chat(USER, tools=[WEATHER], enable_thinking=True)
    assert reply.tool_calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert reply.thinking.startswith("I should check") and "tool_call" not in reply.thinking
    assert reply.finish_reason == "tool_calls"


def test_malformed_tool_xml_comes_back_as_text(monkeypatch, default_model):
    broken = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>"
    _scripted(monkeypatch, broken + "<|im_end|>", default_model)
    reply = default_model.chat(USER, tools=[WEATHER], enable_thinking=False)
    assert reply.tool_calls == [] and reply.text == broken and reply.finish_reason == "stop"


def test_bad_controls_are_errors_that_name_the_field(default_model):
    for options, message in [
            ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
             "response_format.json_schema.schema is not a valid JSON Schema"),
            ({"response_format": {"type": "xml"}}, "response_format.type 'xml' is invalid"),
            ({"tool_choice": "required"}, "needs tools"),
            ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
             "not among the tools"),
            ({"thinking_budget": -1}, "thinking_budget=-1 is invalid")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
            default_model.prepare_chat(USER, **options)


# -- the server, through the official client --------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(default_model):
    with running_server(ServerSettings(model_name=MODEL), lambda: default_model) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


class Answer(pydantic.BaseModel):
    ok: bool
    level: Literal["low", "high"]


def test_server_structured_output_through_the_client_parse_helper(client):
    completion = client.chat.completions.parse(model=MODEL, messages=USER, response_format=Answer,
                                               max_tokens=60, temperature=0,
                                               extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Answer)
    r = client.chat.completions.create(model=MODEL, messages=USER, response_format=JSON_SCHEMA, max_tokens=60,
                                       temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_server_length_inside_thinking_has_reasoning_and_a_notice(client):
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.content == ""
    assert choice.message.reasoning_content and "still thinking" in choice.model_extra["notice"]
    r = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=60, temperature=0,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": True},
                                                   "thinking_budget": 3})
    assert r.choices[0].message.content and r.choices[0].message.reasoning_content.endswith("directly now.")


def test_server_streams_tool_calls_in_openai_chunk_format(client):
    kwargs = dict(model=MODEL, messages=USER, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=200,
                  temperature=0, parallel_tool_calls=False,
                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    deltas = [d for chunk in client.chat.completions.create(stream=True, **kwargs) for choice in chunk.choices
              for d in (choice.delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.name
    assert deltas[0].function.arguments == "" and all(d.index == 0 for d in deltas)
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls" and call.function.name == deltas[0].function.name
    assert json.loads(call.function.arguments) == json.loads("".join(d.function.arguments for d in deltas))


def test_agent_loop_of_five_tool_round_trips(client):
    """An agent: forced calls, each answered with a tool result, five times; then a free answer. Every turn
    resumes from the previous one (prefix reuse), and every call is valid."""
    messages = list(USER)
    for turn in range(5):
        r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, CLOCK], max_tokens=200,
                                           tool_choice="required", temperature=0, parallel_tool_calls=False,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1
        call = message.tool_calls[0]
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, (WEATHER if call.function.name == "get_weather" else CLOCK)["function"]
                            ["parameters"])
        if turn:
            assert r.usage.prompt_tokens_details.cached_tokens > 0
        messages += [message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"result": turn})}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, CLOCK], tool_choice="none",
                                       max_tokens=20, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.usage.prompt_tokens_details.cached_tokens > 0


def test_default_thinking_follows_the_checkpoint_template(monkeypatch, default_model):
    """4B/9B templates think unless enable_thinking is false; the 0.8B/2B ones only when it is true."""
    from qwen35.tokenizer.tokenizer import Tokenizer

    on_guard = "'<think>\\n\\n</think>\\n\\n' if enable_thinking is defined and enable_thinking is false else '<think>\\n'"
    off_guard = "'<think>\\n' if enable_thinking is defined and enable_thinking is true else '<think>\\n\\n</think>\\n\\n'"
    tok = default_model.tokenizer
    template = tok.chat_template.replace(off_guard, on_guard)  # the built-in model's template is off by default
    assert on_guard in template
    think = tok.token_to_id("<think>")
    for guard, default in [(on_guard, True), (off_guard, False)]:
        monkeypatch.setattr(default_model, "tokenizer", Tokenizer(tok._tk, template.replace(on_guard, guard),
                                                                  tok.eos_token_ids))
        prompt = default_model.prepare_chat(USER)
        assert prompt.thinking is default and think in prompt.steering.ban_answer  # no second <think> either way
        assert default_model.prepare_chat(USER, enable_thinking=True).thinking
        assert not default_model.prepare_chat(USER, enable_thinking=False).thinking


def test_string_parameters_stay_strings_however_they_look(monkeypatch, default_model):
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {
        "zip": {"type": "string"}, "count": {"type": "integer"}, "flag": {"type": "boolean"}}}}}
    call = ("<tool_call>\n<function=lookup>\n<parameter=zip>\n12345\n</parameter>\n<parameter=count>\n3\n"
            "</parameter>\n<parameter=flag>\ntrue\n</parameter>\n</function>\n</tool_call><|im_end|>")
    _scripted(monkeypatch, call, default_model)
    reply = default_model.chat(USER, tools=[tool], enable_thinking=False)
    assert reply.tool_calls == [{"name": "lookup", "arguments": {"zip": "12345", "count": 3, "flag": True}}]

    def lookup(zip: str, count: int) -> str:
        """Look a zip code up.

        Args:
            zip: the zip code
            count: how many results
        """
        return ""

    reply = default_model.chat(USER, tools=[lookup], enable_thinking=False)  # a Python function: the same rule
    assert reply.tool_calls[0]["arguments"] == {"zip": "12345", "count": 3, "flag": True}


def test_forced_string_arguments_keep_their_pattern_and_lengths(default_model):
    tool = {"type": "function", "function": {"name": "book", "parameters": {"type": "object", "required": [
        "code", "note", "free"], "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                               "note": {"type": "string", "maxLength": 5},
                                               "free": {"type": "string", "minLength": 2, "maxLength": 4}}}}}
    for seed in range(3):
        reply = default_model.chat(USER, tools=[tool], tool_choice="required", parallel_tool_calls=False,
                                   temperature=1.0, seed=seed, max_tokens=120, enable_thinking=False)
        assert reply.finish_reason == "tool_calls", reply
        jsonschema.validate(reply.tool_calls[0]["arguments"], tool["function"]["parameters"])
