"""Model configuration read from a Hugging Face `config.json`.

Both official shapes are accepted: the multimodal top level (`model_type` `qwen3_5` / `qwen3_5_moe`, with
`text_config` and `vision_config`) and a text-only config (`qwen3_5_text` / `qwen3_5_moe_text`). Every value the
model relies on is validated here, so the model code can trust its config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

LayerType = Literal["linear_attention", "full_attention"]
LAYER_TYPES = ("linear_attention", "full_attention")
MULTIMODAL_TYPES = {"qwen3_5": False, "qwen3_5_moe": True}  # model_type -> is MoE
TEXT_TYPES = {"qwen3_5_text": False, "qwen3_5_moe_text": True}


class ConfigError(ValueError):
    """An invalid or unsupported config value; the message names the field, the value and what is allowed."""


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config field '{name}' = {value!r} is not supported: {allowed}")


@dataclass(frozen=True)
class ModelConfig:
    """The text decoder's geometry. `layer_types` is the hybrid pattern as data (one entry per layer)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[LayerType, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int = 4
    intermediate_size: int = 0  # dense MLP width (0 for MoE models)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    mrope_section: tuple[int, int, int] = (11, 11, 10)
    max_position_embeddings: int = 262_144
    tie_word_embeddings: bool = False
    # Mixture of experts (qwen3_5_moe); num_experts == 0 means dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    # Multimodal ids and the raw vision config (kept for the vision tower).
    eos_token_id: tuple[int, ...] = ()
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054
    vision_config: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    model_type: str = "qwen3_5"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "head_dim", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                    "linear_value_head_dim", "linear_conv_kernel_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(name, value, "a positive integer is required")
        if len(self.layer_types) != self.num_hidden_layers:
            _fail("layer_types", list(self.layer_types),
                  f"needs exactly num_hidden_layers ({self.num_hidden_layers}) entries, got {len(self.layer_types)}")
        for t in self.layer_types:
            if t not in LAYER_TYPES:
                _fail("layer_types", t, f"each entry must be one of {LAYER_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail("num_attention_heads", self.num_attention_heads,
                  f"must be divisible by num_key_value_heads ({self.num_key_value_heads})")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            _fail("linear_num_value_heads", self.linear_num_value_heads,
                  f"must be divisible by linear_num_key_heads ({self.linear_num_key_heads})")
        rd = self.rotary_dim
        if not 0 < self.partial_rotary_factor <= 1 or rd % 2:
            _fail("partial_rotary_factor", self.partial_rotary_factor,
                  f"head_dim ({self.head_dim}) x factor must be a positive even number of dims, got {rd}")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != rd // 2:
            _fail("rope_parameters.mrope_section", list(self.mrope_section),
                  f"three sections summing to rotary_dim/2 = {rd // 2}")
        if self.rms_norm_eps <= 0:
            _fail("rms_norm_eps", self.rms_norm_eps, "must be > 0")
        if self.is_moe:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                _fail("num_experts_per_tok", self.num_experts_per_tok,
                      f"must be between 1 and num_experts ({self.num_experts})")
            for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
                if getattr(self, name) <= 0:
                    _fail(name, getattr(self, name), "a positive integer is required for a MoE model")
        elif self.intermediate_size <= 0:
            _fail("intermediate_size", self.intermediate_size, "a positive integer is required for a dense model")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Build from a parsed config.json (multimodal top level or text-only)."""
        model_type = raw.get("model_type")
        if model_type in MULTIMODAL_TYPES:
            text = raw.get("text_config")
            if not isinstance(text, dict):
                _fail("text_config", text, f"a '{model_type}' config needs a text_config object")
            top = raw
        elif model_type in TEXT_TYPES:
            text, top = raw, {}
        else:
            _fail("model_type", model_type, f"one of {sorted(MULTIMODAL_TYPES) + sorted(TEXT_TYPES)}")
        is_moe = MULTIMODAL_TYPES.get(model_type, TEXT_TYPES.get(model_type))
        return cls(**_text_fields(text, is_moe), **_top_fields(top, text, model_type))

    def to_dict(self) -> dict[str, Any]:
        """The official multimodal config.json layout (what `save_pretrained` of the reference writes)."""
        moe = self.is_moe
        text: dict[str, Any] = {
            "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers, "layer_types": list(self.layer_types),
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "linear_num_key_heads": self.linear_num_key_heads,
            "linear_num_value_heads": self.linear_num_value_heads, "linear_key_head_dim": self.linear_key_head_dim,
            "linear_value_head_dim": self.linear_value_head_dim, "linear_conv_kernel_dim": self.linear_conv_kernel_dim,
            "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps, "attention_bias": False,
            "max_position_embeddings": self.max_position_embeddings, "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.partial_rotary_factor,
                                "mrope_section": list(self.mrope_section), "mrope_interleaved": True},
            "eos_token_id": list(self.eos_token_id) or None,
        }
        if moe:
            text.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                        moe_intermediate_size=self.moe_intermediate_size,
                        shared_expert_intermediate_size=self.shared_expert_intermediate_size)
        else:
            text["intermediate_size"] = self.intermediate_size
        arch = "Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"
        out = {"architectures": [arch], "model_type": "qwen3_5_moe" if moe else "qwen3_5", "text_config": text,
               "tie_word_embeddings": self.tie_word_embeddings, "image_token_id": self.image_token_id,
               "video_token_id": self.video_token_id, "vision_start_token_id": self.vision_start_token_id,
               "vision_end_token_id": self.vision_end_token_id}
        if self.vision_config is not None:
            out["vision_config"] = self.vision_config
        return out


def _int_or_list(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def _text_fields(text: dict[str, Any], is_moe: bool) -> dict[str, Any]:
    def req(name: str) -> Any:
        if name not in text:
            raise ConfigError(f"config field '{name}' is missing from the text config; the official configs set it")
        return text[name]

    act = text.get("hidden_act", "silu")
    if act != "silu":
        _fail("hidden_act", act, "only 'silu' (all Qwen3.5 checkpoints)")
    if text.get("attention_bias", False):
        _fail("attention_bias", True, "only false (Qwen3.5 linear layers have no bias)")
    n_layers = req("num_hidden_layers")
    layer_types = text.get("layer_types")
    if layer_types is None:  # the reference builds the pattern from the interval when the list is absent
        interval = text.get("full_attention_interval", 4)
        if not isinstance(interval, int) or interval <= 0:
            _fail("full_attention_interval", interval, "a positive integer")
        layer_types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layers)]
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        _fail("rope_parameters.rope_type", rope_type, "only 'default' (what every Qwen3.5 checkpoint uses)")
    theta = rope.get("rope_theta", text.get("rope_theta", 10_000_000.0))
    out: dict[str, Any] = {
        "vocab_size": req("vocab_size"), "hidden_size": req("hidden_size"), "num_hidden_layers": n_layers,
        "layer_types": tuple(layer_types), "num_attention_heads": req("num_attention_heads"),
        "num_key_value_heads": req("num_key_value_heads"),
        "head_dim": text.get("head_dim") or req("hidden_size") // req("num_attention_heads"),
        "linear_num_key_heads": req("linear_num_key_heads"), "linear_num_value_heads": req("linear_num_value_heads"),
        "linear_key_head_dim": req("linear_key_head_dim"), "linear_value_head_dim": req("linear_value_head_dim"),
        "linear_conv_kernel_dim": text.get("linear_conv_kernel_dim", 4),
        "rms_norm_eps": float(text.get("rms_norm_eps", 1e-6)), "rope_theta": float(theta),
        "partial_rotary_factor": float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))),
        "mrope_section": tuple(rope.get("mrope_section", (11, 11, 10))),
        "max_position_embeddings": text.get("max_position_embeddings", 262_144),
        "eos_token_id": _int_or_list(text.get("eos_token_id")),
    }
    if is_moe:
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
            out[name] = req(name)
    else:
        out["intermediate_size"] = req("intermediate_size")
    return out


def _top_fields(top: dict[str, Any], text: dict[str, Any], model_type: str) -> dict[str, Any]:
    known = {f.name for f in fields(ModelConfig)}
    out: dict[str, Any] = {"model_type": model_type,
                           "tie_word_embeddings": bool(top.get("tie_word_embeddings",
                                                               text.get("tie_word_embeddings", False)))}
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if name in top and name in known:
            out[name] = top[name]
    if isinstance(top.get("vision_config"), dict):
        out["vision_config"] = top["vision_config"]
    return out


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: no config.json; pass a Hugging Face checkpoint directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e}); re-download the checkpoint's config.json") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a JSON object at the top level")
    try:
        return ModelConfig.from_dict(raw)
    except (TypeError, ValueError) as e:  # ConfigError, or a wrong JSON type reaching a numeric check
        raise ConfigError(f"{file}: {e}") from None
