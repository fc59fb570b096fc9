"""`qwen35 info`: what a checkpoint is, from its config alone (no weights are read)."""

from __future__ import annotations

import argparse
import itertools
import json
from collections import Counter

import torch
from rich.console import Console
from rich.table import Table

from qwen35.config import ModelConfig, load_config
from qwen35.loading import resolve_checkpoint, resolve_model
from qwen35.loading.gguf import gguf_config, open_gguf
from qwen35.memory import gib, kv_bytes_per_token, plan, state_bytes
from qwen35.models import Qwen35Model
from qwen35.quant.quantize import QuantConfig
from qwen35.runtime.prefix_cache import DEFAULT_CACHE_RAM


def layer_pattern(config: ModelConfig) -> str:
    """E.g. '6 x (3 DeltaNet + 1 attention)', or the run-length form when the pattern is irregular."""
    runs = [(t, len(list(g))) for t, g in itertools.groupby(config.layer_types)]
    short = {"linear_attention": "DeltaNet", "full_attention": "attention"}
    unit = runs[:2]
    if len(runs) % 2 == 0 and runs == unit * (len(runs) // 2):
        inner = " + ".join(f"{n} {short[t]}" for t, n in unit)
        return f"{len(runs) // 2} x ({inner})"
    return ", ".join(f"{n} {short[t]}" for t, n in runs)


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = Qwen35Model(config)
    emb = model.embed_tokens.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    head = 0 if config.tie_word_embeddings else model.lm_head.weight.numel()
    return {"total": total, "embedding": emb, "lm_head": head, "layers": total - emb - head}


def run_info(args: argparse.Namespace, console: Console) -> None:
    from qwen35.default_model import default_model_path

    path, gguf = resolve_model(args.model) if args.model else (default_model_path(), False)
    source = open_gguf(path) if gguf else None
    config = gguf_config(source) if source else load_config(path)
    counts = parameter_counts(config)
    table = Table(title=f"{path}", show_header=False, title_justify="left")
    table.add_row("model type", config.model_type + (" (MoE)" if config.is_moe else ""))
    table.add_row("layers", f"{config.num_hidden_layers}: {layer_pattern(config)}")
    table.add_row("hidden / heads", f"{config.hidden_size} / {config.num_attention_heads} q, "
                  f"{config.num_key_value_heads} kv x {config.head_dim}; DeltaNet {config.linear_num_key_heads} qk, "
                  f"{config.linear_num_value_heads} v heads")
    if config.is_moe:
        table.add_row("experts", f"{config.num_experts} (top-{config.num_experts_per_tok}), inner "
                      f"{config.moe_intermediate_size}, shared {config.shared_expert_intermediate_size}")
    head = "tied head" if config.tie_word_embeddings else f"head {counts['lm_head'] / 1e6:,.1f}M"
    stored = None if source else json.loads((path / "config.json").read_text()).get("quantization_config")
    if source:
        types = Counter(t.tensor_type.name for t in source.tensors.values())
        table.add_row("GGUF tensors", ", ".join(f"{n} x {kind}" for kind, n in types.most_common()))
    if stored:
        table.add_row("quantization", f"int{stored.get('bits')} weight-only, group {stored.get('group_size')}"
                      f"{', int8 head/embedding' if stored.get('head') else ''} ({stored.get('quant_method')})")
    table.add_row("parameters", f"{counts['total'] / 1e6:,.1f}M (embedding {counts['embedding'] / 1e6:,.1f}M, "
                  f"{head}, layers {counts['layers'] / 1e6:,.1f}M)")
    table.add_row("context state", f"K/V {kv_bytes_per_token(config, args.kv_bits) / 1024:.1f} KiB per token "
                  f"({args.kv_bits}-bit) + DeltaNet {gib(state_bytes(config))} per sequence, whatever the length")
    console.print(table)
    quant = QuantConfig(args.bits, head=8) if args.bits else QuantConfig.from_dict(stored) if stored else None
    dtype_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]
    memory = plan(config, args.context, args.batch, dtype_bytes, quant, args.kv_bits,
                  snapshot_bytes=int(DEFAULT_CACHE_RAM * 2**30))
    weights = f"int{quant.bits} (head int{quant.head or 16})" if quant else args.dtype
    rows = Table(title=f"memory at {memory.context:,} tokens x {memory.batch} (weights {weights}, K/V "
                 f"{args.kv_bits}-bit)", title_justify="left")
    rows.add_column("part")
    rows.add_column("bytes", justify="right")
    rows.add_column("")
    notes = {"weights": "the text model as loaded (the vision tower loads with the first image)",
             "kv": "full-attention layers only, reserved to the context", "states": "Gated DeltaNet, fixed",
             "prefill": "one prefill chunk's activation peak", "snapshots": "prefix-reuse budget (--cache-ram)",
             "runtime": "Python, PyTorch, tokenizer"}
    for name, n in memory.parts().items():
        rows.add_row(name, gib(n), notes[name])
    rows.add_row("total", gib(memory.total), f"{memory.total:,} bytes")
    console.print(rows)


def run_quantize(args: argparse.Namespace, console: Console) -> None:
    """`qwen35 quantize SRC DST`: streams tensor by tensor from the memory-mapped source, with progress."""
    from rich.progress import Progress

    from qwen35.quant import QuantConfig, quantize_checkpoint

    src = resolve_checkpoint(args.src)
    with Progress(console=console) as bar:
        task = bar.add_task(f"int{args.bits} {src.name}", total=None)
        dst = quantize_checkpoint(src, args.dst, QuantConfig(args.bits, args.group_size, args.head),
                                  progress=lambda done, total: bar.update(task, completed=done, total=total))
    size = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    console.print(f"wrote {dst} ({size / 2**20:,.1f} MiB of weights)")
