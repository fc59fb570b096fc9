"""Model configuration read from a Hugging Face `config.json`.

Both official shapes are accepted: the multimodal top level (`model_type` `qwen3_5` / `qwen3_5_moe`, with
`text_config` and `vision_config`) and a text-only config (`qwen3_5_text` / `qwen3_5_moe_text`). Every value the
model relies on is validated here, so the model code can trust its config.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NoReturn

from qwen35.files import regular_file_exists

LayerType = Literal["linear_attention", "full_attention"]
LAYER_TYPES = ("linear_attention", "full_attention")
MULTIMODAL_TYPES = {"qwen3_5": False, "qwen3_5_moe": True}  # model_type -> is MoE
TEXT_TYPES = {"qwen3_5_text": False, "qwen3_5_moe_text": True}


class ConfigError(ValueError):
    """An invalid or unsupported config value; the message names the field, the value and what is allowed."""


def _fail(name: str, value: Any, allowed: str) -> NoReturn:
    raise ConfigError(f"config field '{name}' = {value!r} is not supported: {allowed}")


# Upper bounds, far above any Qwen3.5 (60 layers, 512 experts, 248,320 vocab, 262,144 context): they refuse a
# value before it sizes anything, such as a layer list of 10^9 entries built from num_hidden_layers.
MAX_LAYERS = 1024
MAX_EXPERTS = 4096
MAX_WIDTH = 1 << 20
MAX_TOKENS = 1 << 24
MAX_TOKEN_ID = (1 << 31) - 1


@dataclass(frozen=True)
class Int:
    """An integer (not a bool, float or string) in [low, high]."""

    low: int
    high: int

    def __call__(self, name: str, value: Any) -> int:
        if type(value) is not int or not self.low <= value <= self.high:
            _fail(name, value, f"an integer from {self.low:,} to {self.high:,} is required")
        return value


@dataclass(frozen=True)
class Real:
    """A finite number (an int is taken as a float) in (low, high]."""

    low: float
    high: float = math.inf

    def __call__(self, name: str, value: Any) -> float:
        if type(value) not in (int, float) or not (math.isfinite(value) and self.low < value <= self.high):
            upper = "" if self.high == math.inf else f" and <= {self.high}"
            _fail(name, value, f"a finite number > {self.low}{upper} is required")
        return float(value)


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values (strings or bools)."""

    allowed: tuple[Any, ...]

    def __call__(self, name: str, value: Any) -> Any:
        if type(value) not in {type(a) for a in self.allowed} or value not in self.allowed:
            _fail(name, value, f"one of {list(self.allowed)}")
        return value


@dataclass(frozen=True)
class Items:
    """A JSON list (or tuple) of at most `most` items, each passing `item`; kept as a tuple."""

    item: Callable[[str, Any], Any]
    most: int

    def __call__(self, name: str, value: Any) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)) or len(value) > self.most:
            _fail(name, value if not isinstance(value, (list, tuple)) else f"<{len(value)} items>",
                  f"a list of at most {self.most:,} items")
        return tuple(self.item(f"{name}[{i}]", v) for i, v in enumerate(value))


def _object_or_none(name: str, value: Any) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        _fail(name, value, "a JSON object")
    return value


Check = Callable[[str, Any], Any]
_WIDTH, _HEADS = Int(1, MAX_WIDTH), Int(1, 1 << 12)
_TOKEN_ID = Int(0, MAX_TOKEN_ID)
# Every ModelConfig field -> its type and range; cross-field rules follow in __post_init__.
FIELDS: Mapping[str, Check] = MappingProxyType({
    "vocab_size": Int(1, MAX_TOKENS), "hidden_size": _WIDTH, "num_hidden_layers": Int(1, MAX_LAYERS),
    "layer_types": Items(OneOf(LAYER_TYPES), MAX_LAYERS), "num_attention_heads": _HEADS,
    "num_key_value_heads": _HEADS, "head_dim": _WIDTH, "linear_num_key_heads": _HEADS,
    "linear_num_value_heads": _HEADS, "linear_key_head_dim": _WIDTH, "linear_value_head_dim": _WIDTH,
    "linear_conv_kernel_dim": Int(1, 64), "intermediate_size": Int(0, MAX_WIDTH), "rms_norm_eps": Real(0.0, 1.0),
    "rope_theta": Real(0.0), "partial_rotary_factor": Real(0.0, 1.0), "mrope_section": Items(Int(0, MAX_WIDTH), 3),
    "max_position_embeddings": Int(1, MAX_TOKENS), "tie_word_embeddings": OneOf((False, True)),
    "num_experts": Int(0, MAX_EXPERTS), "num_experts_per_tok": Int(0, MAX_EXPERTS),
    "moe_intermediate_size": Int(0, MAX_WIDTH), "shared_expert_intermediate_size": Int(0, MAX_WIDTH),
    "eos_token_id": Items(_TOKEN_ID, 64), "image_token_id": _TOKEN_ID, "video_token_id": _TOKEN_ID,
    "vision_start_token_id": _TOKEN_ID, "vision_end_token_id": _TOKEN_ID, "vision_config": _object_or_none,
    "mtp_num_hidden_layers": Int(0, 1),
    "model_type": OneOf(tuple(MULTIMODAL_TYPES) + tuple(TEXT_TYPES)),
})


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
    mtp_num_hidden_layers: int = 0  # the multi-token-prediction head (`mtp.*`): 1 in every official checkpoint
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
        for f in fields(self):  # type and range of every field, normalized (lists to tuples, ints to floats)
            object.__setattr__(self, f.name, FIELDS[f.name](f.name, getattr(self, f.name)))
        if len(self.layer_types) != self.num_hidden_layers:
            _fail("layer_types", list(self.layer_types),
                  f"needs exactly num_hidden_layers ({self.num_hidden_layers}) entries, got {len(self.layer_types)}")
        if self.num_attention_heads % self.num_key_value_heads:
            _fail("num_attention_heads", self.num_attention_heads,
                  f"must be divisible by num_key_value_heads ({self.num_key_value_heads})")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            _fail("linear_num_value_heads", self.linear_num_value_heads,
                  f"must be divisible by linear_num_key_heads ({self.linear_num_key_heads})")
        rd = self.rotary_dim
        if rd == 0 or rd % 2:
            _fail("partial_rotary_factor", self.partial_rotary_factor,
                  f"head_dim ({self.head_dim}) x factor must be a positive even number of dims, got {rd}")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != rd // 2:
            _fail("rope_parameters.mrope_section", list(self.mrope_section),
                  f"three sections summing to rotary_dim/2 = {rd // 2}")
        if self.is_moe:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                _fail("num_experts_per_tok", self.num_experts_per_tok,
                      f"must be between 1 and num_experts ({self.num_experts})")
            for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
                if getattr(self, name) == 0:
                    _fail(name, getattr(self, name), "a positive integer is required for a MoE model")
        elif self.intermediate_size == 0:
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
        if self.mtp_num_hidden_layers:
            text.update(mtp_num_hidden_layers=self.mtp_num_hidden_layers, mtp_use_dedicated_embeddings=False)
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


def _int_or_list(value: Any) -> Any:
    """`eos_token_id` is an id or a list of ids in official configs; FIELDS checks each."""
    return () if value is None else value if isinstance(value, list) else (value,)


def _text_fields(text: dict[str, Any], is_moe: bool) -> dict[str, Any]:
    def req(name: str) -> Any:
        if name not in text:
            raise ConfigError(f"config field '{name}' is missing from the text config; the official configs set it")
        return FIELDS[name](name, text[name])

    act = text.get("hidden_act", "silu")
    if act != "silu":
        _fail("hidden_act", act, "only 'silu' (all Qwen3.5 checkpoints)")
    if text.get("attention_bias", False) is not False:
        _fail("attention_bias", text["attention_bias"], "only false (Qwen3.5 linear layers have no bias)")
    n_layers = req("num_hidden_layers")  # checked (bounded) before it sizes the pattern below
    layer_types = text.get("layer_types")
    if layer_types is None:  # the reference builds the pattern from the interval when the list is absent
        interval = Int(1, MAX_LAYERS)("full_attention_interval", text.get("full_attention_interval", 4))
        layer_types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layers)]
    rope = _object_or_none("rope_parameters", text.get("rope_parameters") or text.get("rope_scaling")) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        _fail("rope_parameters.rope_type", rope_type, "only 'default' (what every Qwen3.5 checkpoint uses)")
    theta = rope.get("rope_theta", text.get("rope_theta", 10_000_000.0))
    out: dict[str, Any] = {
        "vocab_size": req("vocab_size"), "hidden_size": req("hidden_size"), "num_hidden_layers": n_layers,
        "layer_types": layer_types, "num_attention_heads": req("num_attention_heads"),
        "num_key_value_heads": req("num_key_value_heads"),
        "head_dim": text.get("head_dim") or req("hidden_size") // req("num_attention_heads"),
        "linear_num_key_heads": req("linear_num_key_heads"), "linear_num_value_heads": req("linear_num_value_heads"),
        "linear_key_head_dim": req("linear_key_head_dim"), "linear_value_head_dim": req("linear_value_head_dim"),
        "linear_conv_kernel_dim": text.get("linear_conv_kernel_dim", 4),
        "rms_norm_eps": text.get("rms_norm_eps", 1e-6), "rope_theta": theta,
        "partial_rotary_factor": rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25)),
        "mrope_section": rope.get("mrope_section", (11, 11, 10)),
        "max_position_embeddings": text.get("max_position_embeddings", 262_144),
        "eos_token_id": _int_or_list(text.get("eos_token_id")),
        "mtp_num_hidden_layers": text.get("mtp_num_hidden_layers", 0),
    }
    if is_moe:
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"):
            out[name] = req(name)
    else:
        out["intermediate_size"] = req("intermediate_size")
    return out


def _top_fields(top: dict[str, Any], text: dict[str, Any], model_type: str) -> dict[str, Any]:
    tie = top.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    out: dict[str, Any] = {"model_type": model_type, "tie_word_embeddings": tie}
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "vision_config"):
        if name in top:
            out[name] = top[name]
    return out


def load_config(path: str | Path) -> ModelConfig:
    """Read `config.json` from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not regular_file_exists(file):
        raise FileNotFoundError(f"{file}: no config.json; pass a Hugging Face checkpoint directory")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e}); re-download the checkpoint's config.json") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a JSON object at the top level")
    try:
        return ModelConfig.from_dict(raw)
    except (TypeError, ValueError) as e:  # ConfigError, or a wrong JSON type reaching a numeric check
        raise ConfigError(f"{file}: {e}") from None
