"""Quantized checkpoints: written tensor by tensor from a memory-mapped source, loaded without full weights.

Layout: the official names, with each quantized weight `X.weight` replaced by `X.qweight` + `X.scales`
(+ `X.zeros` for int4); routed experts are stored per expert (a source that fuses them, `experts.gate_up_proj`
(E, 2I, H) and `experts.down_proj` (E, H, I), is split). The multi-token-prediction head (`mtp.*`) is quantized by
the body's rules: its large linears and experts at `bits`, its norms, router and shared-expert gate as they are.
config.json carries
`"quantization_config": {"quant_method": "qwen35-weight-only", "bits": 4, "group_size": 64, "head": 0}` (`head`: the
bits of the LM head and embedding, 0 for full precision; `true`, written before int4 heads existed, means 8).
Shards of at most `shard_bytes` keep peak memory near one shard, whatever the model size.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qwen35.config import ModelConfig, load_config
from qwen35.files import MTP_PREFIX, CheckpointError, checkpoint_name, weight_files
from qwen35.models import Qwen35Model
from qwen35.models.qwen3_5 import Experts
from qwen35.quant.linear import StoredTable, make_linear
from qwen35.quant.quantize import QuantConfig, QuantEmbedding, QuantExperts, _large, _set, quantize_parts

COPIED = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
          "preprocessor_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
_EXPERT = re.compile(r"^((?:mtp\.)?layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$")
_FUSED = re.compile(r"^((?:mtp\.)?layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def _quantized_modules(config: ModelConfig, cfg: QuantConfig) -> set[str]:
    """Our module names whose `.weight` is stored quantized (the MTP head's too, when the config has one)."""
    with torch.device("meta"):
        meta = Qwen35Model(config)
    names = {n for n, m in meta.named_modules() if _large(n, m)}
    for n, m in meta.named_modules():
        if isinstance(m, Experts):
            names |= {f"{n}.{e}.{p}" for e in range(config.num_experts) for p in ("gate_proj", "up_proj", "down_proj")}
    if cfg.head:
        names |= {"lm_head"} | ({"embed_tokens"} if not config.tie_word_embeddings else set())
    return names


def quantize_checkpoint(src: str | Path, dst: str | Path, cfg: QuantConfig, dtype: torch.dtype = torch.bfloat16,
                        shard_bytes: int = 256 << 20, progress: Callable[[int, int], None] | None = None) -> Path:
    """`qwen35 quantize SRC DST`: stream every tensor of SRC once; never hold more than one shard."""

    src, dst = Path(src), Path(dst)
    config = load_config(src)
    targets = _quantized_modules(config, cfg)
    if cfg.head and config.tie_word_embeddings:
        targets.add("embed_tokens")  # tied: the one table is stored once, as the head's int8 rows
    dst.mkdir(parents=True, exist_ok=True)
    files = weight_files(src)
    total = sum(len(safe_open(str(f), "pt").keys()) for f in files)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    done, size, n_shards = 0, 0, 0

    def add(name: str, t: torch.Tensor) -> None:
        nonlocal size
        shard[name] = t.contiguous()
        size += t.numel() * t.element_size()

    def flush() -> None:
        nonlocal shard, size, n_shards
        if shard:
            n_shards += 1
            name = f"model-{n_shards:05d}.safetensors"
            save_file(shard, str(dst / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                ours = checkpoint_name(key)
                module = ours.removesuffix(".weight") if ours else None
                unused = ours is not None and ours.startswith(MTP_PREFIX) and not config.mtp_num_hidden_layers
                tensor = None if unused else f.get_tensor(key)
                if unused:  # a head the config does not have: loading would skip it
                    pass
                elif (m := _FUSED.match(ours or "")) and f"{m[1]}.0.gate_proj" in targets:
                    base = key.removesuffix(m[2])  # the official name up to `experts.`
                    for e, w in enumerate(tensor):  # (E, 2I, H) / (E, H, I): stored per expert, as any source
                        pieces = {"down_proj": w} if m[2] == "down_proj" else dict(zip(("gate_proj", "up_proj"),
                                                                                        w.chunk(2)))
                        for proj, piece in pieces.items():
                            for part, t in quantize_parts(piece, cfg, dtype).items():
                                add(f"{base}{e}.{proj}.{part}", t)
                elif module in targets and ours.endswith(".weight"):
                    table = module in ("lm_head", "embed_tokens")
                    parts = quantize_parts(tensor, cfg, dtype, cfg.head if table else None)
                    if module == "embed_tokens" and config.tie_word_embeddings:
                        key = "lm_head.weight"  # tied: the one quantized table serves head and embedding
                    base = key.removesuffix(".weight")
                    for part, t in parts.items():
                        add(f"{base}.{part}", t)
                elif (ours is not None or key.startswith("model.visual.")) and not (
                        ours == "lm_head.weight" and config.tie_word_embeddings):  # the vision tower stays as it is
                    add(key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
                done += 1
                if size >= shard_bytes:
                    flush()
                if progress:
                    progress(done, total)
    flush()
    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"] = cfg.to_dict()
    raw["dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    for name in COPIED:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


def complete(module: str, parts: dict[str, torch.Tensor]) -> bool:
    """Whether a (non-expert) module's stored parts are all read: int8 has qweight + scales, int4 also zeros."""
    return (not _EXPERT.match(module) and "qweight" in parts and "scales" in parts
            and ("zeros" in parts or parts["qweight"].dtype == torch.int8))


def build_quantized(model: Qwen35Model, groups: dict[str, dict[str, torch.Tensor]], cfg: QuantConfig) -> set[str]:
    """Swap the quantized modules of a meta-device model for ones built from stored parts; returns their names."""

    def make(parts: dict[str, torch.Tensor], lookups: bool = False) -> nn.Module:
        return make_linear(parts, cfg.group_size, lookups)

    experts: dict[str, dict[int, dict[str, nn.Module]]] = defaultdict(lambda: defaultdict(dict))
    for name, parts in groups.items():
        if m := _EXPERT.match(name):
            experts[m[1]][int(m[2])][m[3]] = parts
        elif name == "lm_head":
            tied = model.config.tie_word_embeddings
            model.lm_head = make(parts, lookups=tied)
            if tied:
                model.embed_tokens = QuantEmbedding(model.lm_head)
        elif name == "embed_tokens":
            model.embed_tokens = QuantEmbedding(StoredTable(parts, cfg.group_size))
        else:
            _set(model, name, make(parts))
    for prefix, per in experts.items():
        _check_experts(prefix, per, model.config.num_experts)
        gate_up = [make({k: torch.cat([per[e]["gate_proj"][k], per[e]["up_proj"][k]]) for k in per[e]["gate_proj"]})
                   for e in sorted(per)]
        _set(model, prefix, QuantExperts(gate_up, [make(per[e]["down_proj"]) for e in sorted(per)]))
    model.quantization = cfg
    return set(groups)


def _check_experts(prefix: str, per: dict[int, dict[str, dict[str, torch.Tensor]]], n: int) -> None:
    """Every expert 0..n-1 with all three projections' stored parts, or an error naming what is not there."""
    incomplete = sorted(e for e, projs in per.items() if set(projs) != {"gate_proj", "up_proj", "down_proj"}
                        or not all(complete(p, parts) for p, parts in projs.items()))
    if set(per) != set(range(n)) or incomplete:
        have = sorted(per)
        raise CheckpointError(f"'{prefix}': expected quantized gate/up/down weights for experts 0..{n - 1}, found "
                              f"experts {have[:8]}{'...' if len(have) > 8 else ''}"
                              f"{f', incomplete: {incomplete[:8]}' if incomplete else ''}; the checkpoint is "
                              "incomplete (re-download it, or quantize it again)")
