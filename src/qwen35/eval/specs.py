"""Contestant and judge specs: a local model run in-process, or any OpenAI-compatible endpoint.

A spec is data (so it can be hashed into cache keys and written to the manifest). On the command line it is
`key=value,key=value` or `@file.json`; e.g. `name=int4,path=default,bits=4,temperature=0,max_tokens=64` or
`name=gpt,url=https://api.openai.com/v1,model=gpt-4o,api_key_env=OPENAI_API_KEY,extra.seed=1`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "max_tokens",
                 "seed")
_FLOATS = {"temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "rps", "price_in", "price_out",
           "timeout"}
_INTS = {"top_k", "max_tokens", "seed", "bits", "concurrency", "retries"}


@dataclass(frozen=True)
class ModelSpec:
    """Who answers (or judges) and how: where the model is, its sampling settings, and how hard to call it."""

    name: str
    url: str | None = None  # OpenAI-compatible base URL (ending in /v1)
    model: str | None = None  # model name sent to the endpoint
    api_key_env: str | None = None  # the environment variable that holds the API key (never the key itself)
    path: str | None = None  # local checkpoint directory / repo id; "default" = the built-in model
    dtype: str = "bfloat16"
    bits: int | None = None  # local int8 / int4 quantization
    thinking: bool | None = None  # chat_template_kwargs.enable_thinking; None = the server's / template's default
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # passed through verbatim in the request body
    concurrency: int = 4
    rps: float = 0.0  # requests per second (0 = no rate limit)
    retries: int = 4
    timeout: float = 300.0
    price_in: float = 0.0  # USD per million prompt tokens
    price_out: float = 0.0  # USD per million completion tokens

    def __post_init__(self) -> None:
        if bool(self.url) == bool(self.path):
            raise ValueError(f"spec {self.name!r}: give exactly one of url=… (an OpenAI-compatible endpoint) "
                             f"or path=… (a local checkpoint, 'default' for the built-in model)")
        if self.url and not self.model:
            raise ValueError(f"spec {self.name!r}: an endpoint needs model=… (the name the server expects)")
        if self.bits not in (None, 4, 8):
            raise ValueError(f"spec {self.name!r}: bits={self.bits} must be 4 or 8")
        if self.concurrency < 1 or self.retries < 0 or self.rps < 0:
            raise ValueError(f"spec {self.name!r}: concurrency >= 1, retries >= 0 and rps >= 0 are required")

    @property
    def is_local(self) -> bool:
        return self.path is not None

    def sampling(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SAMPLING_KEYS if getattr(self, k) is not None}

    def identity(self) -> dict[str, Any]:
        """What determines the answers (hashed into cache keys): not the display name, key, limits or prices."""
        keep = ("url", "model", "path", "dtype", "bits", "thinking", *SAMPLING_KEYS, "extra")
        return {k: getattr(self, k) for k in keep}

    def public(self) -> dict[str, Any]:
        """The spec for the manifest (the API key's variable name, never its value)."""
        return asdict(self)

    def api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ValueError(f"spec {self.name!r}: environment variable {self.api_key_env} is empty or unset; "
                             f"export it with the API key for {self.url}")
        return key


def _convert(key: str, value: str) -> Any:
    if key in _FLOATS:
        return float(value)
    if key in _INTS:
        return int(value)
    if key == "thinking":
        if value.lower() not in ("on", "off", "true", "false", "1", "0"):
            raise ValueError(f"thinking={value!r}: use on or off")
        return value.lower() in ("on", "true", "1")
    return value


def _extra_value(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def parse_spec(text: str, default_name: str | None = None) -> ModelSpec:
    """A spec from `key=value,...` or `@file.json` (the JSON object holds the same keys)."""
    if text.startswith("@"):
        file = Path(text[1:])
        if not file.is_file():
            raise FileNotFoundError(f"spec file {file} does not exist")
        data = json.loads(file.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"spec file {file} must hold a JSON object")
    else:
        data: dict[str, Any] = {"extra": {}}
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "=" not in part:
                raise ValueError(f"spec part {part!r} is not key=value (spec: {text!r})")
            key, value = (s.strip() for s in part.split("=", 1))
            if key.startswith("extra."):
                data["extra"][key[6:]] = _extra_value(value)
            else:
                data[key] = _convert(key, value)
    data.setdefault("name", default_name or data.get("model") or Path(str(data.get("path", "model"))).name)
    known = {f.name for f in fields(ModelSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown spec key(s) {unknown}; known: {sorted(known)}")
    return ModelSpec(**data)


@dataclass(frozen=True)
class Completion:
    """One chat completion as recorded: the answer, its reasoning, usage, finish reason, latency and errors."""

    text: str
    reasoning: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    latency_s: float = 0.0
    model: str | None = None  # the model string the server returned
    error: str | None = None  # set when every retry failed: an explicit error record, never dropped

    @property
    def ok(self) -> bool:
        return self.error is None

    def cost(self, spec: ModelSpec) -> float:
        return (self.prompt_tokens * spec.price_in + self.completion_tokens * spec.price_out) / 1e6
