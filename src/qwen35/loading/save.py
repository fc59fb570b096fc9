"""Write a model in the official checkpoint layout (what the reference's `save_pretrained` produces)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen35.config import ModelConfig
from qwen35.files import MTP_PREFIX
from qwen35.models import Qwen35Model

_FUSED = re.compile(r"^((?:mtp\.)?layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def official_state_dict(config: ModelConfig, state: dict[str, torch.Tensor],
                        dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our state dict under the official names: `model.language_model.*`, `lm_head.weight` only when untied,
    the multi-token-prediction head top-level under its own names (`mtp.*`), routed experts (the body's and the
    head's) split per expert as the released MoE files store them."""
    out: dict[str, torch.Tensor] = {}
    for name, p in state.items():
        t = p.detach().to(dtype) if dtype is not None else p.detach()
        if name == "lm_head.weight":
            if config.tie_word_embeddings:  # the embedding itself
                continue
            out[name] = t.contiguous()
        elif m := _FUSED.match(name):
            for e in range(t.shape[0]):
                base = f"{_official(m[1])}.{e}"
                if m[2] == "down_proj":
                    out[f"{base}.down_proj.weight"] = t[e].contiguous()
                else:
                    gate, up = t[e].chunk(2, dim=0)
                    out[f"{base}.gate_proj.weight"], out[f"{base}.up_proj.weight"] = gate.contiguous(), up.contiguous()
        else:
            out[_official(name)] = t.contiguous()
    return out


def _official(name: str) -> str:
    return name if name.startswith(MTP_PREFIX) else f"model.language_model.{name}"


def save_model(model: Qwen35Model, directory: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """config.json + model.safetensors in `directory` (created)."""
    return save_state_dict(model.config, model.state_dict(), directory, dtype)


def save_state_dict(config: ModelConfig, state: dict[str, torch.Tensor], directory: str | Path,
                    dtype: torch.dtype = torch.bfloat16) -> Path:
    """Like `save_model`, from a (possibly gathered, e.g. FSDP) full state dict."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw = config.to_dict()
    raw["dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    save_file(official_state_dict(config, state, dtype), str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    return directory
