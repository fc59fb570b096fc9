"""Request bodies as pydantic models: types and ranges are checked here, before anything reaches the engine.

Strict types (no "5" for 5, no 5.5 for an int), no NaN/Inf, unknown fields ignored as OpenAI's API does.
Limits that depend on the model or the server settings (context, `n`, stop counts) are checked in `prepare.py`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qwen35.sampling import MIN_REPETITION_PENALTY

Penalty = Field(default=None, ge=-2.0, le=2.0)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What chat and completion requests share."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0: off (vLLM's convention)
    min_p: float | None = Field(default=None, ge=0.0, lt=1.0)
    presence_penalty: float | None = Penalty
    frequency_penalty: float | None = Penalty
    repetition_penalty: float | None = Field(default=None, ge=MIN_REPETITION_PENALTY, le=10.0)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # extra: go on past the end-of-turn token (benchmarks)
    response_format: dict[str, Any] | None = None


class Function(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema: checked with `jsonschema` in prepare.py
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"]
    function: Function


class ChatRequest(SamplingFields):
    messages: list[Any] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_budget: int | None = Field(default=None, ge=0)  # extra: thinking tokens before the engine closes it
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None  # -> a thinking budget
    chat_template: Any = None  # refused when present: no request may change the template


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)
