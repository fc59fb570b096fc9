"""Sampling settings and the sampler: a pure function from logits (and the tokens so far) to the next token."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from qwen35.files import regular_file_exists

GREEDY_BELOW = 1e-5  # a temperature under this samples greedily, as vLLM does: logits / 1e-40 would overflow
MIN_REPETITION_PENALTY = 0.01  # logits / penalty stays finite (1e-300 is 0 in fp32: every seen logit inf)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling options. temperature 0 is greedy (so is any temperature under GREEDY_BELOW);
    penalties follow the OpenAI / HF definitions."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int = 512
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False  # keep going past EOS until max_tokens (benchmarks, tests)

    def __post_init__(self) -> None:
        checks = [("temperature", self.temperature >= 0 and math.isfinite(self.temperature), ">= 0"),
                  ("top_k", self.top_k >= 0, ">= 0 (0 turns it off)"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
                  ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
                  ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
                  ("repetition_penalty", MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10,
                   f"in [{MIN_REPETITION_PENALTY}, 10]"),
                  ("max_tokens", self.max_tokens >= 1, ">= 1")]
        for name, ok, allowed in checks:  # NaN fails every comparison, so it is refused too
            if not ok:
                raise ValueError(f"sampling option {name}={getattr(self, name)!r} is invalid: must be {allowed}")

    def updated(self, **changes: Any) -> "SamplingParams":
        """A copy with the given options changed (None values are ignored); unknown names are an error."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown sampling option(s) {unknown}; known: {sorted(known)}")
        changes = {k: v for k, v in changes.items() if v is not None}
        if isinstance(changes.get("stop"), str):
            changes["stop"] = (changes["stop"],)
        elif "stop" in changes:
            changes["stop"] = tuple(changes["stop"])
        return replace(self, **changes)

    @classmethod
    def from_generation_config(cls, directory: Path) -> "SamplingParams":
        """Defaults from the checkpoint's generation_config.json (do_sample false means greedy)."""
        file = Path(directory) / "generation_config.json"
        if not regular_file_exists(file):  # a FIFO there is an error, not a read that blocks forever
            return cls()
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        options = {k: raw[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                       "presence_penalty", "frequency_penalty") if raw.get(k) is not None}
        if raw.get("do_sample") is False:
            options["temperature"] = 0.0
        return cls(**options)


def apply_penalties(logits: torch.Tensor, generated: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (V,) fp32; generated (n,) token ids produced so far in this reply."""
    if generated.numel() == 0:
        return logits
    counts = torch.bincount(generated, minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
    if params.repetition_penalty != 1.0:  # HF/CTRL: shrink positive logits, grow negative ones, of seen tokens
        seen = counts > 0
        scaled = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, scaled, logits)
    if params.presence_penalty or params.frequency_penalty:  # OpenAI definition
        logits = logits - params.presence_penalty * (counts > 0).to(logits.dtype) - params.frequency_penalty * counts
    return logits


def greedy(logits: torch.Tensor) -> int:
    """Index of the largest logit of (V,). On the CPU via numpy: torch's argmax over a 248k vocabulary is
    ~5x slower here (measured 430 vs 76 us), a cost paid every token."""
    logits = logits.float()
    return int(logits.numpy().argmax()) if logits.device.type == "cpu" else int(logits.argmax())


def sample(logits: torch.Tensor, generated: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None = None) -> int:
    """Next token from logits (V,) after penalties, temperature, top-k, top-p and min-p.

    Works on the candidates sorted by logit: only the top k when top-k is set (a sort of 20 values, not of the
    whole vocabulary); the same distribution as masking the full vector. The largest logit is subtracted before
    dividing by the temperature, so no finite input overflows to inf/NaN however small the temperature.
    """
    logits = apply_penalties(logits.float(), generated, params)
    if params.temperature < GREEDY_BELOW:
        return greedy(logits)
    if params.top_k:
        values, order = logits.topk(min(params.top_k, logits.shape[-1]))
    else:
        values, order = logits.sort(descending=True)
    probs = torch.softmax((values - values[0]) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= params.top_p, 0.0)  # the smallest set reaching top_p
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs[0], 0.0)
    return int(order[torch.multinomial(probs, 1, generator=generator)])
