"""`qwen35 export --gguf OUT`: write any model qwen35 loads as a GGUF file for llama.cpp, Ollama, LM Studio."""

from __future__ import annotations

import argparse

from rich.console import Console

from qwen35.cli.args import model_args


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a model as GGUF (llama.cpp, Ollama, LM Studio)")
    model_args(p, sampling=False, compile=False, cache=False)
    p.add_argument("--gguf", required=True, metavar="OUT", help="the GGUF file to write")
    p.add_argument("--type", dest="gguf_type", choices=["f16", "q8_0", "q4_0"], default="f16",
                   help="tensor type of the large matrices (norms and small tensors stay F32/F16, as llama.cpp's)")


def run_export(args: argparse.Namespace, console: Console) -> None:
    from rich.progress import Progress

    from qwen35.api import load
    from qwen35.loading.gguf_export import export_gguf

    model = load(args.model, dtype="float32" if args.dtype == "bfloat16" else args.dtype, device="cpu",
                 cache_ram=0, draft=0, mmproj=args.mmproj)
    name = model.path.stem if model.path.is_file() else model.path.name
    with Progress(console=console) as bar:
        task = bar.add_task(f"{args.gguf_type} {name}", total=None)
        out = export_gguf(model.model, model.tokenizer, args.gguf, args.gguf_type, model.defaults, name,
                          progress=lambda done, total: bar.update(task, completed=done, total=total))
    console.print(f"wrote {out} ({out.stat().st_size / 2**20:,.1f} MiB)")
