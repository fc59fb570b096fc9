"""Load an official Qwen3.5 checkpoint (Hugging Face layout) into `Qwen35Model`, strictly.

Tensors are read one at a time from memory-mapped safetensors files straight into a model built on the meta
device, so peak memory is the model itself. Every tensor must be accounted for: a missing, unexpected,
wrong-shape or truncated tensor is an error that names the tensor and the file.

The multi-token-prediction head (`mtp.*`, top-level in the official files) loads into `model.mtp`, routed experts
stacked as the body's are. A checkpoint whose config has the head but whose files hold no `mtp.*` tensor at all
(re-uploads that strip it) loads without it (`model.mtp` None); one holding part of it is an error.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from qwen35.config import ModelConfig, load_config
from qwen35.files import (MTP_PREFIX, SKIPPED_PREFIXES, CheckpointError, checkpoint_name, release_freed_memory,
                          weight_files)
from qwen35.models import Qwen35Model
from qwen35.quant.checkpoint import build_quantized, complete
from qwen35.quant.linear import gather_on_huge_pages
from qwen35.quant.quantize import QuantConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANT_PARTS = (".qweight", ".scales", ".zeros")
_LAYER = re.compile(r"^layers\.(\d+)\.")
_EXPERT_INDEX = re.compile(r"^layers\.\d+\.mlp\.experts\.(\d+)\.")
_EXPERT = re.compile(r"^((?:mtp\.)?layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
MTP_UNUSED = "multi-token-prediction head (config.json has mtp_num_hidden_layers = 0)"


def _diagnose(file: Path, error: Exception) -> CheckpointError:
    """Turn a safetensors parse failure into a message naming the first tensor the file does not hold."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        data = file.stat().st_size - 8 - n
        for name, info in header.items():
            if name != "__metadata__" and info["data_offsets"][1] > data:
                return CheckpointError(f"{file}: tensor '{name}' is truncated (needs bytes up to "
                                       f"{info['data_offsets'][1]}, file has {data}); re-download the file")
    except Exception:  # the header itself is unreadable: report the library's error
        pass
    return CheckpointError(f"{file}: not a readable safetensors file ({error}); re-download it")


def open_weights(file: Path) -> safe_open:
    """`safe_open` of one shard (memory-mapped; the header only is read now), its failures named and explained."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise _diagnose(file, e) from None


def _check_geometry(config: ModelConfig, files: list[Path], config_file: Path) -> bool:
    """Compare config.json with the weights' headers (names and shapes, no data) before the model is built, so a
    config claiming more layers or another vocabulary than the weights hold is refused before sizing anything.
    Returns whether the weights hold any `mtp.*` tensor."""
    has_mtp = False
    layers: set[int] = set()
    experts: set[int] = set()
    embed: tuple[tuple[int, ...], Path] | None = None
    for file in files:
        with open_weights(file) as f:
            for name in f.keys():
                ours = checkpoint_name(name)
                if ours is None:
                    continue
                has_mtp = has_mtp or ours.startswith(MTP_PREFIX)
                if m := _LAYER.match(ours):
                    layers.add(int(m[1]))
                if m := _EXPERT_INDEX.match(ours):
                    experts.add(int(m[1]))
                if ours == "embed_tokens.weight":
                    embed = (tuple(f.get_slice(name).get_shape()), file)
    counts = [("num_hidden_layers", config.num_hidden_layers, layers, "layers")]
    if experts:  # per-expert tensors (official layout); a fused layout is checked tensor by tensor
        counts.append(("num_experts", config.num_experts, experts, "experts per MoE layer"))
    for field, want, have, what in counts:
        if have != set(range(want)):
            raise CheckpointError(f"{config_file}: {field} = {want}, but the weights hold {_describe(have)} {what}; "
                                  "config.json and the weights do not match (use this checkpoint's own config.json)")
    if embed is not None:
        shape, file = embed
        for field, want, have in zip(("vocab_size", "hidden_size"), (config.vocab_size, config.hidden_size), shape):
            if want != have:
                raise CheckpointError(f"{config_file}: {field} = {want}, but embed_tokens.weight in {file.name} has "
                                      f"shape {shape}; config.json and the weights do not match")
    return has_mtp


def _describe(indices: set[int]) -> str:
    """'4 (0..3)', or the first indices when they are not 0..n-1."""
    ordered = sorted(indices)
    if ordered == list(range(len(ordered))):
        return f"{len(ordered)} (0..{len(ordered) - 1})" if ordered else "0"
    return f"{len(ordered)} (indices {ordered[:8]}{'...' if len(ordered) > 8 else ''})"


def load_model(directory: str | Path, dtype: torch.dtype | str = torch.bfloat16, device: str = "cpu",
               progress: Callable[[int, int], None] | None = None) -> Qwen35Model:
    """Build a `Qwen35Model` from a checkpoint directory; `progress(done, total)` is called per file."""
    directory = Path(directory)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
    config = load_config(directory)
    quant = _quant_config(directory)
    files = weight_files(directory)
    has_mtp = _check_geometry(config, files, directory / "config.json")
    with torch.device("meta"):
        model = Qwen35Model(config)
    if model.mtp is not None and not has_mtp:
        model.mtp = None
        log.info("%s: config.json has mtp_num_hidden_layers = %d but the weights hold no %s* tensor; loaded without "
                 "the multi-token-prediction head: speculative decoding is unavailable with this checkpoint",
                 directory, config.mtp_num_hidden_layers, MTP_PREFIX)
    expected = {name: p.shape for name, p in model.named_parameters()}  # tied lm_head appears once
    loaded: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # module -> qweight / scales / zeros
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    skipped: dict[str, int] = defaultdict(int)
    for i, file in enumerate(files):
        with open_weights(file) as f:
            for name in f.keys():
                ours = checkpoint_name(name)
                if ours is None:
                    skipped[next(p for p in SKIPPED_PREFIXES if name.startswith(p))] += 1
                    continue
                if ours.startswith(MTP_PREFIX) and model.mtp is None:  # the config has no head
                    skipped[MTP_PREFIX] += 1
                    continue
                if ours == "lm_head.weight" and config.tie_word_embeddings:
                    skipped["lm_head.weight (tied to the embedding)"] += 1
                    continue
                if quant is not None and ours.startswith("embed_tokens.") and not config.tie_word_embeddings:
                    tensor = _own_mapping(file, name)  # an untied table is only looked up: leave it on disk
                elif quant is not None:  # a copy: kernel layouts are rebuilt from these, and a view would keep
                    tensor = _read(f, name, file).clone()  # the whole mapped shard resident after its file is done
                else:
                    tensor = _read(f, name, file)
                if quant is not None and ours.endswith(QUANT_PARTS):
                    module, part = ours.rsplit(".", 1)
                    quantized[module][part] = tensor
                    continue
                if m := _EXPERT.match(ours):  # per-expert tensors are stacked into Experts' fused weights
                    experts[m[1]][int(m[2])][m[3]] = tensor
                    continue
                if ours not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor '{name}' (this config has no such "
                                          "parameter); is config.json from the same checkpoint?")
                loaded[ours] = _checked(tensor, expected[ours], name, file, dtype)
        if quant is not None:  # build what this shard completed now: its stored parts are freed before the next
            done = [m for m, parts in quantized.items() if complete(m, parts)]
            build_quantized(model, {m: quantized.pop(m) for m in done}, quant)
            release_freed_memory()  # the stored copies just freed, back to the OS (9B int4 load peak -0.3 GB)
        if progress:
            progress(i + 1, len(files))
    for prefix, per_expert in experts.items():
        loaded.update(_stack_experts(prefix, per_expert, config, expected, dtype))
    if quant is not None:  # what no shard completed on its own (routed experts, which are stacked)
        build_quantized(model, quantized, quant)
        expected = {name: p.shape for name, p in model.named_parameters()}
    missing = sorted(set(expected) - set(loaded))
    if missing and all(m.startswith(MTP_PREFIX) for m in missing):
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{directory}: the multi-token-prediction head is incomplete: missing tensor(s) "
                              f"{missing[:5]}{more} (looked in {[f.name for f in files]}); re-download the "
                              f"checkpoint, or remove every {MTP_PREFIX}* tensor to load it without the head")
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{directory}: missing tensor(s) {missing[:5]}{more} "
                              f"(looked in {[f.name for f in files]}); the checkpoint is incomplete")
    for prefix, count in skipped.items():
        log.info("skipped %d tensor(s) under %s: %s", count, prefix,
                 MTP_UNUSED if prefix == MTP_PREFIX else SKIPPED_PREFIXES.get(prefix, "unused"))
    model.load_state_dict(loaded, strict=False, assign=True)
    if config.tie_word_embeddings and not (quant is not None and quant.head):
        model.lm_head.weight = model.embed_tokens.weight
    model = model.to(device).eval()
    if quant is not None:
        gather_on_huge_pages(model)
    return model


def _quant_config(directory: Path):
    """The checkpoint's QuantConfig when `qwen35 quantize` wrote it, else None."""
    raw = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    if raw is None:
        return None
    try:
        return QuantConfig.from_dict(raw)
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from None


def _read(f, name: str, file: Path) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file}: tensor '{name}' cannot be read ({e}); re-download the file") from None


def _own_mapping(file: Path, name: str) -> torch.Tensor:
    """The tensor as a view of its own memory mapping of the file: only the pages read later become resident
    (for an untied embedding, the rows of the tokens seen; 1 GB of int8 table at 9B stays on disk)."""
    with open_weights(file) as f:
        return _read(f, name, file)


def _checked(tensor: torch.Tensor, shape: torch.Size, name: str, file: Path, dtype: torch.dtype) -> torch.Tensor:
    if tensor.shape != shape:
        raise CheckpointError(f"{file}: tensor '{name}' has shape {tuple(tensor.shape)}, the config implies "
                              f"{tuple(shape)}; config.json and weights do not match")
    if not tensor.is_floating_point():
        raise CheckpointError(f"{file}: tensor '{name}' has dtype {tensor.dtype}; expected floating point weights")
    return tensor.to(dtype)


def _stack_experts(prefix: str, per_expert: dict[int, dict[str, torch.Tensor]], config: ModelConfig,
                   expected: dict[str, torch.Size], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Fuse `experts.{e}.{gate,up,down}_proj.weight` into gate_up_proj (E, 2I, H) and down_proj (E, H, I)."""
    want = set(range(config.num_experts))
    if set(per_expert) != want or any(len(parts) != 3 for parts in per_expert.values()):
        have = sorted(per_expert)
        raise CheckpointError(f"'{prefix}': expected gate/up/down weights for experts 0..{config.num_experts - 1}, "
                              f"found experts {have[:8]}{'...' if len(have) > 8 else ''} (some incomplete)")
    gate_up = torch.stack([torch.cat([per_expert[e]["gate_proj"], per_expert[e]["up_proj"]]) for e in sorted(want)])
    down = torch.stack([per_expert[e]["down_proj"] for e in sorted(want)])
    out = {}
    for name, tensor in ((f"{prefix}.gate_up_proj", gate_up), (f"{prefix}.down_proj", down)):
        if name not in expected or tensor.shape != expected[name]:
            raise CheckpointError(f"'{name}': stacked expert weights have shape {tuple(tensor.shape)}, the config "
                                  f"implies {tuple(expected.get(name, ()))}")
        out[name] = tensor.to(dtype)
    return out
