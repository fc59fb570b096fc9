"""The request record: what a caller (the Python API, the CLI, the server) asks of the engine, carried to it
unchanged, so every front end has every option."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qwen35.runtime.steering import Steering
from qwen35.sampling import SamplingParams


@dataclass(frozen=True)
class Request:
    """One sequence to generate.

    `logprobs`: None for none, k for the sampled token's log-probability and the k most likely; `logit_bias`: added
    to the logits before sampling; `images`: the prompt's encoded images (`qwen35.vision.prepare`), its ids
    already expanded; `marks`: prompt positions worth a snapshot for later prompts (a chat's stable points: before
    its last user turn, after the assistant header); `followup`: given the reply's ids and the stop strings, the
    ids the conversation's next turn will start with, up to the end of this reply as the chat template renders it
    into history (not the ids generated: past thinking is dropped). The engine prefills them while idle, so the
    next turn computes only its new message. `steering`: the thinking budget and the answer's grammar.
    """

    id: str
    prompt: list[int]
    params: SamplingParams
    logprobs: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    images: Any = None
    marks: tuple[int, ...] = ()
    followup: Callable[[list[int], tuple[str, ...]], list[int] | None] | None = None
    steering: Steering = field(default_factory=Steering)
    progress: Callable[[int, int], None] | None = None  # (prompt tokens in the cache, prompt tokens) per chunk
