"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) on the OpenAI chat path.

A Messages request is checked here (pydantic, strict, a 400 naming the field) and turned into the equivalent
`ChatRequest`, so `prepare_chat` is its one preparation (template, images under the server's policy, limits) and
`Generation.events()` its one generation loop; `MessagesGeneration` only shapes that loop's output as an Anthropic
message or its SSE event stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal, TypeVar

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qwen35.server.errors import APIError, anthropic_error_body
from qwen35.server.prepare import param_path
from qwen35.server.responses import Generation
from qwen35.server.schemas import ChatRequest
from qwen35.tokenizer.choice import ChoiceText

Model = TypeVar("Model", bound=BaseModel)
Loc = tuple[str | int, ...]


class Strict(BaseModel):
    """Anthropic's fields with OpenAI-route strictness: no coercion, no NaN; unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class TextBlock(Strict):
    type: Literal["text"]
    text: str


class ImageBlock(Strict):
    type: Literal["image"]
    source: dict[str, Any]  # checked by its own "type" in `_image_part`, so errors name source.<field>


class Base64Source(Strict):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str = Field(min_length=1)


class URLSource(Strict):
    type: Literal["url"]
    url: str = Field(min_length=1)


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[dict[str, Any]] | None = None
    is_error: bool = False


class ThinkingBlock(Strict):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(Strict):
    type: Literal["redacted_thinking"]
    data: str


USER_BLOCKS: dict[str, type[Strict]] = {"text": TextBlock, "image": ImageBlock, "tool_result": ToolResultBlock}
ASSISTANT_BLOCKS: dict[str, type[Strict]] = {"text": TextBlock, "thinking": ThinkingBlock,
                                             "redacted_thinking": RedactedThinkingBlock, "tool_use": ToolUseBlock}
TOOL_RESULT_BLOCKS: dict[str, type[Strict]] = {"text": TextBlock, "image": ImageBlock}
SOURCES: dict[str, type[Strict]] = {"base64": Base64Source, "url": URLSource}


class Message(Strict):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]  # blocks are checked per role in `chat_messages`


class Tool(Strict):
    type: Literal["custom"] | None = None  # server tools (bash_20250124, web_search_...) do not run here
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(Strict):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=1)


class OutputFormat(Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Strict):
    format: OutputFormat | None = None  # `effort` is ignored: thinking.budget_tokens sets the thinking budget


class CountTokensRequest(Strict):
    """What decides the prompt: the body of `count_tokens`, and the part of a Messages request that it counts."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)  # required, as Anthropic's API requires it
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    output_config: OutputConfig | None = None


# -- request: Anthropic -> OpenAI ----------------------------------------------------------------------------------
def _validate(model: type[Model], data: Any, loc: Loc) -> Model:
    """`model` from `data`, or a 400 naming the field below `loc` as the OpenAI routes do."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = param_path((*loc, *first["loc"]))
        detail = "is required" if first["type"] == "missing" else \
            f"is invalid: {first['msg']} (got {repr(first.get('input'))[:60]})"
        raise APIError(400, f"{where} {detail}", where) from None


def _blocks(content: list[dict[str, Any]], allowed: dict[str, type[Strict]], loc: Loc) -> list[Strict]:
    """Each block validated by its type; a type this place does not take is a 400 listing those it does."""
    out = []
    for j, block in enumerate(content):
        kind = block.get("type")
        if kind not in allowed:
            where = param_path((*loc, j))
            raise APIError(400, f"{where} is a {str(kind)[:40]!r} block; here the blocks are "
                           f"{', '.join(allowed)}", where)
        out.append(_validate(allowed[kind], block, (*loc, j)))
    return out


def _image_part(block: ImageBlock, loc: Loc) -> dict[str, Any]:
    """An image block as the OpenAI image_url part, so the server's image policy and caps apply unchanged."""
    kind = block.source.get("type")
    if kind not in SOURCES:
        where = param_path((*loc, "source", "type"))
        raise APIError(400, f"{where} {str(kind)[:40]!r} is not supported; use \"base64\" or \"url\"", where)
    source = _validate(SOURCES[kind], block.source, (*loc, "source"))
    url = f"data:{source.media_type};base64,{source.data}" if isinstance(source, Base64Source) else source.url
    return {"type": "image_url", "image_url": {"url": url}}


def _part(block: Strict, loc: Loc) -> dict[str, Any]:
    """A text or image block (at `loc`) as an OpenAI content part."""
    return {"type": "text", "text": block.text} if isinstance(block, TextBlock) else _image_part(block, loc)


def _tool_message(block: ToolResultBlock, loc: Loc) -> dict[str, Any]:
    """A tool_result as an OpenAI tool message; an error result says so in its text, the one place the model
    can see it."""
    if isinstance(block.content, list):
        blocks = _blocks(block.content, TOOL_RESULT_BLOCKS, (*loc, "content"))
        content: str | list[dict[str, Any]] = [_part(b, (*loc, "content", k)) for k, b in enumerate(blocks)]
    else:
        content = block.content or ""
    if block.is_error:
        content = [{"type": "text", "text": "Error: "}, *content] if isinstance(content, list) else f"Error: {content}"
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": content}


def _user_messages(content: list[dict[str, Any]], loc: Loc) -> list[dict[str, Any]]:
    """One user turn -> OpenAI messages in block order: each tool_result its own tool message, the text and
    image blocks between them user messages."""
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, USER_BLOCKS, loc)):
        if isinstance(block, ToolResultBlock):
            out += [{"role": "user", "content": parts}] if parts else []
            out.append(_tool_message(block, (*loc, j)))
            parts = []
        else:
            parts.append(_part(block, (*loc, j)))
    return out + ([{"role": "user", "content": parts}] if parts or not out else [])


def _assistant_message(content: list[dict[str, Any]], loc: Loc) -> dict[str, Any]:
    """One assistant turn: text joined as content, thinking as reasoning_content, tool_use as tool_calls
    (redacted thinking has no text to render and is dropped)."""
    blocks = _blocks(content, ASSISTANT_BLOCKS, loc)
    message: dict[str, Any] = {"role": "assistant",
                               "content": "".join(b.text for b in blocks if isinstance(b, TextBlock))}
    thinking = [b.thinking for b in blocks if isinstance(b, ThinkingBlock)]
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    calls = [{"id": b.id, "type": "function",
              "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}}
             for b in blocks if isinstance(b, ToolUseBlock)]
    if calls:
        message["tool_calls"] = calls
    return message


def chat_messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    """The conversation as OpenAI messages: the system prompt first, then each turn."""
    system = req.system if isinstance(req.system, str) else [{"type": "text", "text": b.text}
                                                              for b in req.system or []]
    out = [{"role": "system", "content": system}] if system else []
    for i, message in enumerate(req.messages):
        loc = ("messages", i, "content")
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
        elif message.role == "user":
            out += _user_messages(message.content, loc)
        else:
            out.append(_assistant_message(message.content, loc))
    return out


def _tools(tools: list[Tool]) -> list[dict[str, Any]]:
    """Anthropic tools as OpenAI function tools; each input_schema must be a valid JSON Schema."""
    out = []
    for i, tool in enumerate(tools):
        try:
            validator_for(tool.input_schema).check_schema(tool.input_schema)
        except SchemaError as e:
            where = f"tools[{i}].input_schema"
            raise APIError(400, f"{where} is not a valid JSON Schema: {e.message[:200]}", where) from None
        function = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description is not None:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    """auto -> "auto", any -> "required", none -> "none", {"type": "tool", "name"} -> that function."""
    if choice.type != "tool":
        return {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    if not choice.name:
        raise APIError(400, "tool_choice.name is required when tool_choice.type is \"tool\"", "tool_choice.name")
    return {"type": "function", "function": {"name": choice.name}}


def _thinking(thinking: Thinking | None) -> dict[str, Any]:
    """enabled -> thinking on with its budget, adaptive -> on, disabled -> off; absent -> the model's default."""
    if thinking is None:
        return {}
    if thinking.type == "enabled" and thinking.budget_tokens is None:
        raise APIError(400, "thinking.budget_tokens is required when thinking.type is \"enabled\"",
                       "thinking.budget_tokens")
    return {"chat_template_kwargs": {"enable_thinking": thinking.type != "disabled"},
            "thinking_budget": thinking.budget_tokens if thinking.type == "enabled" else None}


def chat_request(req: CountTokensRequest) -> ChatRequest:
    """The equivalent OpenAI chat request; `prepare_chat` then checks it against the model and the limits."""
    fields: dict[str, Any] = {"model": req.model, "messages": chat_messages(req), **_thinking(req.thinking)}
    if req.tools:
        fields["tools"] = _tools(req.tools)
    if req.tool_choice is not None:
        fields["tool_choice"] = _tool_choice(req.tool_choice)
        if req.tool_choice.disable_parallel_tool_use is not None:
            fields["parallel_tool_calls"] = not req.tool_choice.disable_parallel_tool_use
    if isinstance(req, MessagesRequest):
        fields.update(max_tokens=req.max_tokens, stop=req.stop_sequences, temperature=req.temperature,
                      top_p=req.top_p, top_k=req.top_k, stream=req.stream)
        if req.output_config is not None and req.output_config.format is not None:
            schema = req.output_config.format.schema_
            fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    return ChatRequest(**fields)


# -- response: one choice -> an Anthropic message ------------------------------------------------------------------
def stop_reason(choice: ChoiceText) -> str:
    """Anthropic's stop_reason; a reply cut short for any other reason (the server draining) reads as cut."""
    if choice.finish_reason == "tool_calls":
        return "tool_use"
    if choice.stop_sequence is not None:
        return "stop_sequence"
    return "end_turn" if choice.finish_reason == "stop" else "max_tokens"


def sse_event(kind: str, body: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **body}, ensure_ascii=False)}\n\n"


class BlockEvents:
    """Content-block events of one stream: a new block each time the delta kind changes, indexed in order."""

    STARTS = {"thinking": {"type": "thinking", "thinking": "", "signature": ""}, "answer": {"type": "text", "text": ""}}

    def __init__(self) -> None:
        self.index, self.kind = -1, None

    def delta(self, kind: str, text: str) -> list[str]:
        out = self.stop() if kind != self.kind else []
        if kind != self.kind:
            self.index, self.kind = self.index + 1, kind
            out.append(sse_event("content_block_start", {"index": self.index, "content_block": self.STARTS[kind]}))
        delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" else \
            {"type": "text_delta", "text": text}
        return out + [sse_event("content_block_delta", {"index": self.index, "delta": delta})]

    def stop(self) -> list[str]:
        if self.kind is None:
            return []
        self.kind = None
        return [sse_event("content_block_stop", {"index": self.index})]

    def tool_use(self, block: dict[str, Any]) -> list[str]:
        """A whole tool_use block: its input arrives as one input_json_delta."""
        self.index += 1
        start = {**block, "input": {}}
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}
        return [sse_event("content_block_start", {"index": self.index, "content_block": start}),
                sse_event("content_block_delta", {"index": self.index, "delta": delta}),
                sse_event("content_block_stop", {"index": self.index})]


class MessagesGeneration(Generation):
    """A `Generation` whose reply is an Anthropic message (non-streaming) or its event stream."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.id = "msg_" + self.id.removeprefix("chatcmpl-")

    def anthropic_usage(self) -> dict[str, int]:
        """Anthropic counts cached prompt tokens apart: input_tokens + cache_read_input_tokens is the prompt."""
        return {"input_tokens": len(self.job.prompt_ids) - self.cached, "output_tokens": self.choices[0].tokens,
                "cache_read_input_tokens": self.cached, "cache_creation_input_tokens": 0}

    def message(self, content: list[dict[str, Any]]) -> dict[str, Any]:
        choice = self.choices[0]
        reason = stop_reason(choice) if choice.finish_reason else None
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model_name, "content": content,
                "stop_reason": reason, "stop_sequence": choice.stop_sequence if reason == "stop_sequence" else None,
                "usage": self.anthropic_usage()}

    def tool_uses(self) -> list[dict[str, Any]]:
        return [{"type": "tool_use", "id": f"toolu_{self.id[4:28]}{i:02d}", "name": c["name"], "input": c["arguments"]}
                for i, c in enumerate(self.choices[0].tool_calls)]

    async def collect(self) -> dict[str, Any]:
        async for _ in self.events():
            pass
        choice = self.choices[0]
        text, _ = choice.content()
        thinking = "".join(choice.thinking)
        blocks = [{"type": "thinking", "thinking": thinking, "signature": ""}] if thinking else []
        blocks += [{"type": "text", "text": text}] if text else []
        return self.message(blocks + self.tool_uses())

    async def sse(self) -> AsyncIterator[str]:
        """message_start once the first event says how much of the prompt was cached, then the blocks as their
        deltas come, tool_use blocks, message_delta and message_stop; an error is an `error` event."""
        blocks, started = BlockEvents(), False
        try:
            async for _, deltas, _ in self.events():
                if not started:
                    started = True
                    yield sse_event("message_start", {"message": {**self.message([]), "stop_reason": None,
                                                                    "stop_sequence": None}})
                for kind, text in deltas:
                    for event in blocks.delta(kind, text):
                        yield event
            for event in blocks.stop() + [e for block in self.tool_uses() for e in blocks.tool_use(block)]:
                yield event
            final = self.message([])
            yield sse_event("message_delta", {"delta": {"stop_reason": final["stop_reason"],
                                                        "stop_sequence": final["stop_sequence"]},
                                              "usage": final["usage"]})
            yield sse_event("message_stop", {})
        except APIError as e:
            yield f"event: error\ndata: {json.dumps(anthropic_error_body(e.status, e.message))}\n\n"
