"""From a request body to a `Job` the engine can run: parse, validate against the model and the limits, render.

Everything a client can get wrong is found here and becomes a 400 naming the field; nothing below this layer
(engine, sampler, template) ever sees an unchecked value.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for
from pydantic import BaseModel, ValidationError

from qwen35.api import Qwen35
from qwen35.runtime.steering import Steering
from qwen35.tokenizer.controls import tool_parameters
from qwen35.sampling import SamplingParams
from qwen35.server.errors import APIError
from qwen35.server.media import load_media
from qwen35.server.schemas import ChatRequest, CompletionRequest, SamplingFields, Tool
from qwen35.server.settings import ServerSettings
from qwen35.vision import ImageError

Body = TypeVar("Body", bound=BaseModel)
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_DEPTH = 64  # nesting of the body's JSON: deep enough for any real tool schema, far from the stack's limit


@dataclass(frozen=True)
class Job:
    """One validated request: the prompt, one SamplingParams per choice and how to shape the output."""

    kind: Literal["chat", "completion"]
    prompt_ids: list[int]
    params: list[SamplingParams]
    logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    thinking: bool | None = None  # chat: the reply starts inside <think>; None: raw completion, no split
    tools: bool = False
    stream: bool = False
    include_usage: bool = False
    images: Any = None  # ImageInputs of a chat with images (prompt_ids already expanded)
    marks: tuple[int, ...] = ()  # the chat's stable points for prefix snapshots
    followup: Any = None  # chat: `Request.followup`, for the one choice of a request (n=1)
    steering: Steering = field(default_factory=Steering)  # thinking budget, grammar (response_format, tool_choice)
    tool_schemas: dict[str, Any] = field(default_factory=dict)  # function name -> parameters, to read calls back


def param_path(loc: tuple[Any, ...]) -> str:
    """pydantic's error location as the OpenAI `param`: messages[0].role (union type tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and _NAME.fullmatch(part) and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
    return out


def parse_body(raw: bytes, schema: type[Body]) -> Body:
    """JSON object -> schema instance, or a 400 that says what was wrong with the body."""
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid UTF-8; send a UTF-8 JSON object") from None
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body must be a JSON object; it is not valid JSON ({e.msg} at "
                       f"position {e.pos})") from None
    except ValueError as e:  # Python's cap on integer digits (a 5,000-digit max_tokens)
        raise APIError(400, f"the request body has a number that cannot be read ({e})") from None
    except RecursionError:
        raise APIError(400, f"the request body is nested too deeply; at most {MAX_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got a JSON {type(data).__name__}")
    if _depth(data) > MAX_DEPTH:
        raise APIError(400, f"the request body is nested more than {MAX_DEPTH} levels deep (arrays and objects "
                       "inside each other); flatten it")
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the request body contains invalid Unicode (a lone UTF-16 surrogate such as "
                       "\\ud800); send valid UTF-8 text") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = param_path(first["loc"])
        got = repr(first.get("input"))[:60]
        detail = "is required" if first["type"] == "missing" else f"is invalid: {first['msg']} (got {got})"
        raise APIError(400, f"{param or 'body'} {detail}", param or None) from None


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest in parsed JSON; iterative, so no input can exhaust the stack."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack += [(child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return deepest


def check_model(name: str, settings: ServerSettings) -> None:
    if name != settings.model_name:
        raise APIError(404, f"the model {name!r} does not exist here; this server serves {settings.model_name!r} "
                       "(see GET /v1/models)", "model")


def _check_common(req: SamplingFields, qwen: Qwen35, settings: ServerSettings) -> tuple[tuple[str, ...], dict]:
    """Stop strings and logit_bias against the limits."""
    if req.n > settings.max_n:
        raise APIError(400, f"n={req.n} is more than this server allows ({settings.max_n})", "n")
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stops) > settings.max_stop:
        raise APIError(400, f"{len(stops)} stop strings given; at most {settings.max_stop} are allowed", "stop")
    for stop in stops:
        if not stop or len(stop) > settings.max_stop_chars:
            raise APIError(400, f"each stop string must have 1 to {settings.max_stop_chars} characters, got "
                           f"{len(stop)}", "stop")
    bias: dict[int, float] = {}
    vocab = qwen.tokenizer.vocab_size
    for key, value in (req.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab:  # "²" is a digit to isdigit()
            raise APIError(400, f"logit_bias key {key[:20]!r} is not a token id in [0, {vocab})", "logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias value {value} for token {key} must be in [-100, 100]", "logit_bias")
        bias[int(key)] = value
    return stops, bias


def _params(req: SamplingFields, qwen: Qwen35, prompt_len: int, max_tokens: int | None,
            stops: tuple[str, ...]) -> list[SamplingParams]:
    context = qwen.context
    room = context - prompt_len
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_len} tokens, but this model's context is {context} tokens; "
                       "shorten the prompt", "messages" if isinstance(req, ChatRequest) else "prompt")
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"max_tokens={max_tokens} is too large: the prompt has {prompt_len} tokens and the "
                       f"context is {context}, so at most {room} (= {context} - {prompt_len}) new tokens fit",
                       "max_tokens")
    base = qwen.defaults.updated(
        temperature=req.temperature, top_p=req.top_p, min_p=req.min_p, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
        top_k=None if req.top_k is None else max(req.top_k, 0), max_tokens=max_tokens or room, stop=stops,
        ignore_eos=req.ignore_eos)
    seeds = [None if req.seed is None else (req.seed + i) % 2**64 for i in range(req.n)]
    return [base.updated(seed=seed) for seed in seeds]


def check_tools(tools: list[Any]) -> None:
    """Each tool in OpenAI's shape, its parameters a valid JSON Schema (checked by `jsonschema`); a 400 naming
    the tool otherwise, before the template renders anything."""
    for i, tool in enumerate(tools):
        try:
            function = Tool.model_validate(tool).function
        except ValidationError as e:
            first = e.errors()[0]
            where = param_path(("tools", i, *first["loc"]))
            raise APIError(400, f"{where} is invalid: {first['msg']}; a tool is {{\"type\": \"function\", "
                           "\"function\": {\"name\": ..., \"parameters\": {JSON Schema}}}", where) from None
        if function.parameters is None:
            continue
        try:
            validator_for(function.parameters).check_schema(function.parameters)
        except SchemaError as e:
            where = f"tools[{i}].function.parameters"
            raise APIError(400, f"{where} is not a valid JSON Schema: {e.message[:200]}", where) from None


def prepare_chat(req: ChatRequest, qwen: Qwen35, settings: ServerSettings) -> Job:
    check_model(req.model, settings)
    if req.chat_template is not None or "chat_template" in (req.chat_template_kwargs or {}):
        raise APIError(400, "request chat templates are not accepted; the model's own template is used",
                       "chat_template")
    kwargs = dict(req.chat_template_kwargs or {})
    thinking = kwargs.pop("enable_thinking", None)
    if kwargs:
        raise APIError(400, f"chat_template_kwargs {sorted(kwargs)[:5]} are not accepted; only enable_thinking",
                       "chat_template_kwargs")
    if thinking is not None and not isinstance(thinking, bool):
        raise APIError(400, "chat_template_kwargs.enable_thinking must be true or false",
                       "chat_template_kwargs.enable_thinking")
    if req.top_logprobs is not None and req.top_logprobs > settings.max_logprobs:
        raise APIError(400, f"Requested top_logprobs of {req.top_logprobs}, which is greater than max allowed: "
                       f"{settings.max_logprobs}", "top_logprobs")
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    stops, bias = _check_common(req, qwen, settings)
    check_tools(req.tools or [])
    images = load_media(req.messages, qwen, settings.images)
    try:
        prompt = qwen.prepare_chat(req.messages, req.tools or None, thinking, images,
                                   thinking_budget=req.thinking_budget, reasoning_effort=req.reasoning_effort,
                                   response_format=req.response_format, tool_choice=req.tool_choice,
                                   parallel_tool_calls=req.parallel_tool_calls is not False)
    except ImageError as e:
        raise APIError(400, str(e), "messages") from None
    except ValueError as e:  # errors name their field (messages[i].content, response_format, tool_choice ...)
        message = str(e).replace(str(qwen.path), "the model")
        where = re.match(r"(messages\[\d+\][\w.\[\]]*|response_format[\w.]*|tool_choice|thinking_budget|"
                         r"reasoning_effort)", message)
        raise APIError(400, message, where.group(1) if where else "messages") from None
    max_tokens = req.max_completion_tokens or req.max_tokens
    params = _params(req, qwen, len(prompt.ids), max_tokens, stops)
    return Job("chat", prompt.ids, params, (req.top_logprobs or 0) if req.logprobs else None, bias, prompt.thinking,
               bool(req.tools) and req.tool_choice != "none", req.stream,
               bool(req.stream_options and req.stream_options.include_usage), prompt.images, prompt.marks,
               prompt.followup if len(params) == 1 else None, prompt.steering, tool_parameters(req.tools))


def prepare_completion(req: CompletionRequest, qwen: Qwen35, settings: ServerSettings) -> Job:
    check_model(req.model, settings)
    if req.echo or req.suffix is not None or (req.best_of or 1) > 1:
        raise APIError(400, "echo, suffix and best_of > 1 are not supported by this server",
                       "echo" if req.echo else "suffix" if req.suffix is not None else "best_of")
    if req.logprobs is not None and req.logprobs > settings.max_logprobs:
        raise APIError(400, f"Requested logprobs of {req.logprobs}, which is greater than max allowed: "
                       f"{settings.max_logprobs}", "logprobs")
    if req.response_format is not None and req.response_format != {"type": "text"}:
        raise APIError(400, "response_format applies to chat replies: use /v1/chat/completions", "response_format")
    stops, bias = _check_common(req, qwen, settings)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, f"one prompt per request, got a list of {len(prompt)}; send them separately",
                           "prompt")
        prompt = prompt[0]
    if not prompt:
        raise APIError(400, "the prompt must be non-empty", "prompt")
    if isinstance(prompt, str):
        ids = qwen.tokenizer.encode(prompt)
    else:
        vocab = qwen.tokenizer.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt token id {bad} is out of vocabulary: ids must be in [0, {vocab})", "prompt")
        ids = list(prompt)
    return Job("completion", ids, _params(req, qwen, len(ids), req.max_tokens, stops), req.logprobs, bias,
               None, False, req.stream, bool(req.stream_options and req.stream_options.include_usage))
