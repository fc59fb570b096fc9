"""Open a GGUF file (llama.cpp's format) with the `gguf` package and read a Qwen3.5 config from its metadata.

The reader (llama.cpp's own, PyPI `gguf`) memory-maps the file and parses only the header; every tensor stays a
view of the mapping until it is converted. On top of the reader this module checks what a hostile or damaged file
could claim: a wrong architecture, tensors whose shape overflows or whose bytes lie beyond the end of the file,
metadata of the wrong type. Each failure is a `CheckpointError` naming the file and the problem, raised before any
weight is read or allocated.

Names and layout are those of llama.cpp's converter (`convert_hf_to_gguf.py`, classes `Qwen3_5TextModel` and
`Qwen3_5MoeTextModel`): `qwen35.block_count` counts the multi-token-prediction layers too
(`qwen35.nextn_predict_layers`), the layer pattern is `qwen35.attention.recurrent_layers`, and the DeltaNet geometry
lives under `qwen35.ssm.*` (state_size = key head dim, group_count = key heads, time_step_rank = value heads,
inner_size = value heads x value head dim).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen35.config import ModelConfig
from qwen35.files import CheckpointError, regular_file_exists

ARCHES = {"qwen35": False, "qwen35moe": True}  # general.architecture -> is MoE
MAGIC = b"GGUF"
MAX_ELEMENTS = 1 << 40  # no Qwen3.5 tensor comes near 10^12 elements; a header claiming more is damaged
_REQUIRED = object()


def is_gguf(path: str | Path) -> bool:
    """Whether `path` names a GGUF file: by its suffix, or by its magic for a file of another name."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".gguf":
        return True
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


@dataclass
class GGUFFile:
    """An opened, checked GGUF file: the reader, the architecture and its tensors by name."""

    path: Path
    reader: Any  # gguf.GGUFReader
    arch: str
    tensors: dict[str, Any]  # name -> gguf.ReaderTensor (data: a view of the memory map)

    def value(self, key: str, default: Any = _REQUIRED, kind: type | tuple[type, ...] = (int, float, str, bool)
              ) -> Any:
        """A metadata value (`{arch}` in the key is this file's architecture), checked to be of `kind`."""
        key = key.format(arch=self.arch)
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.path}: metadata key '{key}' is missing; is this a complete Qwen3.5 "
                                      "GGUF written by llama.cpp's converter or `qwen35 export --gguf`?")
            return default
        try:
            value = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError, TypeError) as e:
            raise CheckpointError(f"{self.path}: metadata key '{key}' cannot be read ({e})") from None
        if isinstance(value, list):
            if kind is not list:
                raise CheckpointError(f"{self.path}: metadata key '{key}' is an array, expected a single value")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(f"{self.path}: metadata key '{key}' is {type(value).__name__} {value!r:.80}, "
                                  f"expected {getattr(kind, '__name__', kind)}")
        return value


def open_gguf(path: str | Path, projector: bool = False) -> GGUFFile:
    """Parse and check the header of a GGUF file (nothing else is read); errors name the file and the problem.
    `projector`: the file must be a vision projector (mmproj, architecture `clip`) rather than a Qwen3.5 model."""
    path = Path(path).expanduser()
    if not regular_file_exists(path):
        raise FileNotFoundError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] != MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected {MAGIC!r})")
    if len(head) < 8 or int.from_bytes(head[4:8], "little") not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {int.from_bytes(head[4:8], 'little')} is not supported "
                              "(2 or 3)")
    try:
        reader = _reader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, KeyError, ... for a damaged header
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:200]}); "
                              "the file is damaged or truncated: download it again") from None
    tensors = {}
    for t in reader.tensors:
        dims = [int(d) for d in t.shape]
        elements = math.prod(dims)
        if any(d <= 0 for d in dims) or elements > MAX_ELEMENTS or elements != int(t.n_elements):
            raise CheckpointError(f"{path}: tensor '{t.name}' has an impossible shape {dims}")
        if t.data_offset + int(t.n_bytes) > size or t.data.nbytes != int(t.n_bytes):
            raise CheckpointError(f"{path}: tensor '{t.name}' needs bytes {t.data_offset}..{t.data_offset + t.n_bytes}"
                                  f" but the file has {size}; it is truncated: download it again")
        tensors[t.name] = t
    arch = _architecture(path, reader, projector)
    return GGUFFile(path, reader, arch, tensors)


def _reader(path: Path) -> Any:
    """`gguf.GGUFReader` with array fields read in one pass. The stock reader makes two numpy views per string and
    took 60-200 s (and ~0.5 GB) over the 750,000 strings of a Qwen3.5 vocabulary and merges; here a string array is
    decoded straight into a list of str and a numeric array is one view, behind the same `contents()`."""
    import gguf

    string, array = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY
    lengths = struct.Struct("<Q")

    class Strings(gguf.ReaderField):
        def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
            return self.parts[-1][index_or_slice]

    class Reader(gguf.GGUFReader):
        def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list, list[int], list]:
            if raw_type != array or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            itype, count, offs = gguf.GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
            if itype == string:
                buffer, values = memoryview(self.data), []
                for _ in range(count):
                    end = offs + 8 + (lengths.unpack_from(buffer, offs)[0] if offs + 8 <= len(buffer) else 0)
                    if end > len(buffer) or offs + 8 > len(buffer):
                        raise ValueError(f"string array at offset {orig_offs} runs past the end of the file")
                    values.append(str(buffer[offs + 8:end], "utf-8"))
                    offs = end
                return offs - orig_offs, [raw_itype, alen, values], [2], [array, string]
            scalar = self.gguf_scalar_to_np.get(itype)
            if scalar is None:
                return super()._get_field_parts(orig_offs, raw_type)
            values = self._get(offs, scalar, count)
            if len(values) != count:
                raise ValueError(f"array at offset {orig_offs} runs past the end of the file")
            return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [array, itype]

        def _push_field(self, field: gguf.ReaderField, skip_sum: bool = False) -> int:
            if field.types == [array, string]:
                field = Strings(*field)
            return super()._push_field(field, skip_sum)

    return Reader(path, "r")


def _architecture(path: Path, reader: Any, projector: bool) -> str:
    field = reader.fields.get("general.architecture")
    try:
        arch = field.contents() if field is not None else None
    except (ValueError, IndexError, UnicodeDecodeError, TypeError):
        arch = None
    if projector and arch != "clip":
        raise CheckpointError(f"{path}: architecture {arch!r}, not a vision projector (mmproj, architecture 'clip');"
                              " pass the model's mmproj-*.gguf as --mmproj")
    if projector:
        return arch
    if arch == "clip":
        raise CheckpointError(f"{path}: a vision projector (mmproj) file, not a language model; pass the model's "
                              "GGUF as the model and this file as --mmproj")
    if arch not in ARCHES:
        raise CheckpointError(f"{path}: architecture {arch!r} is not Qwen3.5 (qwen35 or qwen35moe); qwen35 runs "
                              "only the Qwen3.5 family")
    return arch


def gguf_config(f: GGUFFile) -> ModelConfig:
    """The model's config from the metadata (as `config.json` would give it); the vocabulary size is the token
    embedding's row count, the head is tied when the file has no `output.weight`."""
    blocks = f.value("{arch}.block_count", kind=int)
    nextn = f.value("{arch}.nextn_predict_layers", 0, kind=int)
    layers = blocks - nextn
    recurrent = f.value("{arch}.attention.recurrent_layers", None, kind=list)
    if recurrent is None:
        interval = f.value("{arch}.full_attention_interval", 4, kind=int)
        recurrent = [(i + 1) % max(interval, 1) != 0 for i in range(layers)]
    embed = f.tensors.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"{f.path}: tensor 'token_embd.weight' is missing")
    head_dim = f.value("{arch}.attention.key_length", kind=int)
    value_heads = f.value("{arch}.ssm.time_step_rank", kind=int)
    sections = f.value("{arch}.rope.dimension_sections", [11, 11, 10, 0], kind=list)
    text: dict[str, Any] = {
        "model_type": "qwen3_5_moe_text" if ARCHES[f.arch] else "qwen3_5_text",
        "vocab_size": int(embed.shape[1]) if len(embed.shape) == 2 else -1,
        "hidden_size": f.value("{arch}.embedding_length", kind=int),
        "num_hidden_layers": layers, "layer_types": ["linear_attention" if r else "full_attention"
                                                     for r in recurrent[:layers]],
        "num_attention_heads": f.value("{arch}.attention.head_count", kind=int),
        "num_key_value_heads": f.value("{arch}.attention.head_count_kv", kind=int),
        "head_dim": head_dim,
        "linear_num_key_heads": f.value("{arch}.ssm.group_count", kind=int),
        "linear_num_value_heads": value_heads,
        "linear_key_head_dim": f.value("{arch}.ssm.state_size", kind=int),
        "linear_value_head_dim": f.value("{arch}.ssm.inner_size", kind=int) // max(value_heads, 1),
        "linear_conv_kernel_dim": f.value("{arch}.ssm.conv_kernel", 4, kind=int),
        "rms_norm_eps": _f32(f.value("{arch}.attention.layer_norm_rms_epsilon", 1e-6, kind=(int, float))),
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": _f32(f.value("{arch}.rope.freq_base", 1e7, kind=(int, float))),
                            "partial_rotary_factor": f.value("{arch}.rope.dimension_count", kind=int) / head_dim
                            if head_dim > 0 else 0.0,
                            "mrope_section": list(sections[:3]), "mrope_interleaved": True},
        "max_position_embeddings": f.value("{arch}.context_length", 262_144, kind=int),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "eos_token_id": [f.value("tokenizer.ggml.eos_token_id", 248044, kind=int)],
        "mtp_num_hidden_layers": nextn,
    }
    if ARCHES[f.arch]:
        text.update(num_experts=f.value("{arch}.expert_count", kind=int),
                    num_experts_per_tok=f.value("{arch}.expert_used_count", kind=int),
                    moe_intermediate_size=f.value("{arch}.expert_feed_forward_length", kind=int),
                    shared_expert_intermediate_size=f.value("{arch}.expert_shared_feed_forward_length", kind=int))
    else:
        text["intermediate_size"] = f.value("{arch}.feed_forward_length", kind=int)
    try:
        return ModelConfig.from_dict(text)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{f.path}: the metadata describes no valid Qwen3.5 model: {e}") from None


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-6, not 9.99999997e-07)."""
    return float(f"{float(value):.7g}")


SAMPLING_KEYS = {"temp": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "penalty_repeat": "repetition_penalty"}  # general.sampling.* -> SamplingParams


def gguf_sampling(f: GGUFFile) -> dict[str, float]:
    """Sampling defaults the file recommends (`general.sampling.*`, written from generation_config.json)."""
    out = {}
    for key, name in SAMPLING_KEYS.items():
        value = f.value(f"general.sampling.{key}", None, kind=(int, float))
        if value is not None:
            out[name] = int(value) if name == "top_k" else _f32(value)
    return out
