"""Build a `Qwen35Model` from a GGUF file, one tensor at a time from the memory map.

Dense tensors (F32/F16/BF16, and the small matrices our quantization leaves dense) load as in the safetensors
loader; quantized matrices become our int8/int4 layers (`gguf_quant` says which type becomes what), so a Q4_0 file
runs on the same kernels as `qwen35 quantize --bits 4 --group-size 32`. Every tensor must be accounted for: an
unexpected, missing or wrong-shape tensor is an error naming it and the file.
"""

from __future__ import annotations

import logging
import mmap
from collections import defaultdict
from typing import Callable

import torch

from qwen35.files import MTP_PREFIX, CheckpointError, release_freed_memory
from qwen35.loading.gguf import GGUFFile, gguf_config
from qwen35.loading.gguf_names import (EXPERT_MARK, from_gguf, is_offset_norm, large_linears, name_map,
                                       v_permutation)
from qwen35.loading.gguf_quant import DENSE, GROUP, dense, permute_blocks, quant_parts
from qwen35.models import Qwen35Model
from qwen35.quant.checkpoint import build_quantized
from qwen35.quant.linear import gather_on_huge_pages
from qwen35.quant.quantize import QuantConfig

log = logging.getLogger(__name__)
HEAD_TABLES = ("lm_head.weight", "embed_tokens.weight")


def load_gguf_model(f: GGUFFile, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                    progress: Callable[[int, int], None] | None = None) -> Qwen35Model:
    """The text model of an opened GGUF file; `progress(done, total)` is called per tensor."""
    config = gguf_config(f)
    with torch.device("meta"):
        model = Qwen35Model(config)
    names = name_map(model, f.arch)
    unknown = [n for n in f.tensors if n not in names]
    if unknown:
        raise CheckpointError(f"{f.path}: unexpected tensor(s) {unknown[:5]} for a {f.arch} model with these "
                              "metadata; the file does not match its own header")
    if model.mtp is not None and not any(names[n].startswith(MTP_PREFIX) for n in f.tensors):
        model.mtp = None  # the converter's --no-mtp keeps the layer count but no tensors
    expected = {name: p.shape for name, p in model.named_parameters()}
    quantizable = large_linears(model) | set(HEAD_TABLES)
    loaded: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    experts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for i, (name, t) in enumerate(f.tensors.items()):
        ours = names[name]
        try:
            if EXPERT_MARK in ours:
                prefix, part = ours.split(EXPERT_MARK)
                if t.tensor_type.name in DENSE:
                    experts[prefix][part] = dense(t, dtype)
                else:
                    groups.update(_expert_parts(t, prefix, part, dtype))
            elif t.tensor_type.name not in DENSE and ours in quantizable and (parts := _parts(t, ours, config,
                                                                                               dtype)):
                groups[ours.removesuffix(".weight")] = parts
            else:
                exact = is_offset_norm(ours) or ours.endswith("A_log")  # transformed in fp32, then cast
                w = from_gguf(ours, dense(t, torch.float32 if exact else dtype), config)
                if ours in expected and [d for d in w.shape if d != 1] == [d for d in expected[ours] if d != 1]:
                    w = w.reshape(expected[ours])  # llama.cpp drops trailing 1s: (1, H) is stored as (H,)
                if ours in expected and tuple(w.shape) != tuple(expected[ours]):
                    raise CheckpointError(f"tensor '{name}' has shape {tuple(w.shape)} (as ours), the metadata "
                                          f"imply {tuple(expected[ours])}")
                loaded[ours] = w.to(dtype)
        except CheckpointError as e:
            raise CheckpointError(f"{f.path}: {e}") from None
        _drop_pages(f, t)
        if progress:
            progress(i + 1, len(f.tensors))
    for prefix, parts in experts.items():
        loaded.update(_stack_experts(f, prefix, parts, expected, dtype))
    tied = config.tie_word_embeddings
    if "lm_head" in groups and tied:  # one quantized table serves the head and the embedding
        loaded.pop("embed_tokens.weight", None)
    elif "embed_tokens" in groups and tied:  # llama.cpp's head is the embedding: ours, the quantized table
        groups["lm_head"] = groups.pop("embed_tokens")
    if groups:
        head = groups.get("lm_head") or groups.get("embed_tokens")
        bits = 4 if any("zeros" in p for p in groups.values()) else 8
        cfg = QuantConfig(bits, GROUP, 0 if head is None else 4 if "zeros" in head else 8)
        build_quantized(model, groups, cfg)
        release_freed_memory()
    expected = {name: p.shape for name, p in model.named_parameters()}
    missing = sorted(set(expected) - set(loaded))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{f.path}: missing tensor(s) {missing[:5]}{more}; the file is incomplete")
    model.load_state_dict(loaded, strict=False, assign=True)
    if tied and isinstance(model.lm_head, torch.nn.Linear) and isinstance(model.embed_tokens, torch.nn.Embedding):
        model.lm_head.weight = model.embed_tokens.weight
    model = model.to(device).eval()
    if groups:
        gather_on_huge_pages(model)
    return model


def _drop_pages(f: GGUFFile, t) -> None:
    """Return a converted tensor's pages of the mapped file (every conversion copies): read pages of a mapping
    count in the process's RSS until unmapped, which made a 0.8B Q8_0 load peak at 3.3 GB for a 1.4 GB model."""
    buffer = getattr(f.reader.data, "_mmap", None)
    if buffer is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = t.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    buffer.madvise(mmap.MADV_DONTNEED, start, t.data_offset + int(t.n_bytes) - start)


def _parts(t, ours: str, config, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """Stored int8/int4 parts of a quantized matrix (value heads reordered in the block domain); None when the
    permutation would split blocks (the caller then dequantizes it as a dense tensor)."""
    import gguf

    data = t.data
    if perm := v_permutation(config, ours, to_gguf=False):
        data = permute_blocks(data, *perm, gguf.GGML_QUANT_SIZES[t.tensor_type][0])
        if data is None:
            return None
    return quant_parts(t, data, dtype)


def _expert_parts(t, prefix: str, part: str, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """Per-expert stored parts of one quantized (E, rows, cols) expert tensor, named as `build_quantized` takes
    them (`prefix.{e}.gate_proj` ...); a fused gate_up tensor is split into its halves."""
    out = {}
    for e in range(t.data.shape[0]):
        data = t.data[e]
        if part == "gate_up":
            half = data.shape[0] // 2
            for proj, rows in (("gate_proj", data[:half]), ("up_proj", data[half:])):
                out[f"{prefix}.{e}.{proj}"] = quant_parts(t, rows, dtype)
        else:
            out[f"{prefix}.{e}.{part}_proj"] = quant_parts(t, data, dtype)
    return out


def _stack_experts(f: GGUFFile, prefix: str, parts: dict[str, torch.Tensor], expected: dict[str, torch.Size],
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Dense expert tensors -> our gate_up_proj (E, 2I, H) and down_proj (E, H, I)."""
    gate_up = parts.get("gate_up")
    if gate_up is None and "gate" in parts and "up" in parts:
        gate_up = torch.cat([parts["gate"], parts["up"]], dim=1)
    out = {f"{prefix}.gate_up_proj": gate_up, f"{prefix}.down_proj": parts.get("down")}
    for name, w in out.items():
        if w is None or name not in expected or tuple(w.shape) != tuple(expected[name]):
            shape = None if w is None else tuple(w.shape)
            raise CheckpointError(f"{f.path}: expert tensors of '{prefix}' have shape {shape} for {name}, the "
                                  f"metadata imply {tuple(expected.get(name, ()))}")
    return {name: w.to(dtype) for name, w in out.items()}
