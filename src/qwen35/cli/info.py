"""`qwen35 info`: what a checkpoint is, from its config alone (no weights are read)."""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from rich.console import Console
from rich.table import Table

from qwen35.config import ModelConfig, load_config
from qwen35.loading import resolve_checkpoint
from qwen35.models import Qwen35Model

GiB = 1024 ** 3


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


def state_bytes(config: ModelConfig, dtype_bytes: int = 2) -> tuple[int, int]:
    """(K/V bytes per token of context, fixed DeltaNet state bytes per sequence)."""
    full = config.layer_types.count("full_attention")
    linear = config.num_hidden_layers - full
    kv = full * 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
    channels = (2 * config.linear_num_key_heads * config.linear_key_head_dim
                + config.linear_num_value_heads * config.linear_value_head_dim)
    recurrent = config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim * 4
    conv = channels * (config.linear_conv_kernel_dim - 1) * dtype_bytes
    return kv, linear * (recurrent + conv)


def run_info(args: argparse.Namespace, console: Console) -> None:
    from qwen35.default_model import default_model_path

    path = resolve_checkpoint(args.model) if args.model else default_model_path()
    config = load_config(path)
    counts = parameter_counts(config)
    kv, fixed = state_bytes(config)
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
    quant = json.loads((path / "config.json").read_text()).get("quantization_config")
    if quant:
        table.add_row("quantization", f"int{quant.get('bits')} weight-only, group {quant.get('group_size')}"
                      f"{', int8 head/embedding' if quant.get('head') else ''} ({quant.get('quant_method')})")
    table.add_row("parameters", f"{counts['total'] / 1e6:,.1f}M (embedding {counts['embedding'] / 1e6:,.1f}M, "
                  f"{head}, layers {counts['layers'] / 1e6:,.1f}M)")
    n = counts["total"]
    table.add_row("weights memory", f"bf16 {n * 2 / GiB:.2f} GiB, int8 ~{n * 1.0 / GiB:.2f} GiB, "
                  f"int4 ~{n * 0.53 / GiB:.2f} GiB (estimates; scales included)")
    table.add_row("context state", f"K/V {kv / 1024:.1f} KiB per token (bf16) + DeltaNet {fixed / 2**20:.2f} MiB fixed "
                  f"per sequence; {config.max_position_embeddings:,} tokens -> "
                  f"{kv * config.max_position_embeddings / GiB:.2f} GiB K/V")
    console.print(table)


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
