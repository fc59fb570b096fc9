"""`qwen35 <command>`: argument parsing and dispatch; each command lives in its own module."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from importlib.metadata import version
from typing import NoReturn

from rich.console import Console

SAMPLING_FLAGS = {  # flag -> (SamplingParams field, type, help)
    "--temperature": ("temperature", float, "0 = greedy"),
    "--top-k": ("top_k", int, "keep the k most likely tokens (0 = off)"),
    "--top-p": ("top_p", float, "nucleus sampling mass"),
    "--min-p": ("min_p", float, "drop tokens below min_p x the top probability"),
    "--presence-penalty": ("presence_penalty", float, "OpenAI presence penalty"),
    "--frequency-penalty": ("frequency_penalty", float, "OpenAI frequency penalty"),
    "--repetition-penalty": ("repetition_penalty", float, "HF repetition penalty (1 = off)"),
    "--max-tokens": ("max_tokens", int, "most tokens to generate"),
    "--seed": ("seed", int, "same seed, same text"),
}


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default in --help only when it says something: not for None, off switches, empty lists, or a
    value outside the flag's choices (it stands for "not given", e.g. --head's 0)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        unsayable = action.choices is not None and action.default not in action.choices
        if action.default is None or action.default is False or action.default in ((), []) or unsayable:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every `qwen35` parser: defaults in --help, and a usage mistake in one line instead of the whole usage."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def device_arg(text: str) -> str:
    """--device, checked before loading so that a wrong name is one line, not a traceback from deep in torch."""
    name = text.strip().lower()
    if name == "cpu" or re.fullmatch(r"cuda(:\d+)?", name):
        return name
    if name == "mps":
        raise argparse.ArgumentTypeError("Apple's GPU (mps) is not supported; run on the CPU with --device cpu")
    raise argparse.ArgumentTypeError(f"unknown device {text!r}: supported are cpu, cuda and cuda:N (an NVIDIA GPU "
                                     "and its index)")


def _model_args(p: argparse.ArgumentParser, sampling: bool = True, compile: bool = True) -> None:
    p.add_argument("-m", "--model", help="checkpoint directory or Hugging Face repo id (default: the built-in model)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="weights and compute precision")
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    if compile:
        p.add_argument("--compile", action="store_true",
                       help="decode through torch.compile, compiled while loading (about a minute): +25-39%% "
                            "decode speed where qwen35's CPU kernels cannot run (no AVX-512 BF16), no gain "
                            "beside them (docs/benchmarks.md)")
    if sampling:
        group = p.add_argument_group("sampling (defaults come from the checkpoint's generation_config.json)")
        for flag, (dest, kind, text) in SAMPLING_FLAGS.items():
            group.add_argument(flag, dest=dest, type=kind, default=None, help=text)
        group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
        group.add_argument("--ignore-eos", dest="ignore_eos", action="store_true", default=None,
                           help="go on past the end-of-turn token until --max-tokens")


def sampling_options(args: argparse.Namespace) -> dict:
    names = [dest for dest, _, _ in SAMPLING_FLAGS.values()] + ["stop", "ignore_eos"]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qwen35", description="Run Qwen3.5 models on your own machine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading details")
    parser.add_argument("--version", action="version", version=f"qwen35 {version('qwen35')}")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="chat in the terminal (or one-shot with -p)")
    _model_args(chat)
    chat.add_argument("-p", "--prompt", help="one-shot: print the reply to this message and exit ('-' reads "
                                             "standard input)")
    chat.add_argument("-s", "--system", help="system prompt")
    chat.add_argument("--think", choices=["on", "off"], default=None, help="thinking mode (default: the template's)")
    chat.add_argument("--show-thinking", action="store_true", help="one-shot: also print the thinking (to stderr)")
    chat.add_argument("--image", action="append", default=[], metavar="PATH",
                      help="attach an image file to the (first) message; repeatable (needs a vision checkpoint)")

    gen = sub.add_parser("generate", help="raw completion of a prompt (no chat template)")
    _model_args(gen)
    gen.add_argument("prompt", help="text to continue ('-' reads standard input)")

    info = sub.add_parser("info", help="layer pattern, parameters, memory estimates of a model")
    _model_args(info, sampling=False, compile=False)

    quant = sub.add_parser("quantize", help="write an int8 / int4 weight-only copy of a checkpoint")
    quant.add_argument("src", help="checkpoint directory or Hugging Face repo id")
    quant.add_argument("dst", help="output directory")
    quant.add_argument("--bits", type=int, choices=[8, 4], default=4, help="weight bits")
    quant.add_argument("--group-size", type=int, choices=[32, 64, 128, 256], default=64, help="int4 group along K")
    quant.add_argument("--head", type=int, nargs="?", const=8, default=0, choices=[8, 4], metavar="BITS",
                       help="also the LM head / embedding: int8 (--head) or int4 (--head 4, group as --group-size); "
                            "left as they are without it")

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _model_args(serve, sampling=False, compile=False)  # a batch would compile anew mid-serving
    from qwen35.cli.serve import add_serve_args
    add_serve_args(serve)

    train = sub.add_parser("train", help="train a model from scratch (recipe 'nano': the built-in default)")
    train.add_argument("recipe", choices=["nano"])
    train.add_argument("--out", required=True, help="where the finished checkpoint goes")
    train.add_argument("--work", default="runs/nano", help="tokenizer, checkpoints and logs (resumable)")
    train.add_argument("--minutes", type=float, default=75.0, help="wall-time budget for all stages")
    train.add_argument("--seed", type=int, default=0, help="same seed, same model")

    from qwen35.cli.arena import add_arena_parser, add_eval_parser
    add_arena_parser(sub)
    add_eval_parser(sub)
    return parser


def load_for(args: argparse.Namespace, console: Console):
    """Load the model named by --model with a status line; the built-in default is created on first use."""
    import torch

    from qwen35.api import load
    from qwen35.ops.cpu import kernels

    if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
        kernels()  # before the spinner: a first build (minutes, see qwen35.ops.build) prints its own progress lines
    what = f"Loading {args.model or 'the built-in default model'}"
    what += " and compiling its decode step (about a minute)" * args.compile
    with console.status(f"{what}…", spinner="dots"):
        return load(args.model, dtype=args.dtype, device=args.device, compile=args.compile)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    err = Console(stderr=True)
    try:
        if args.command == "chat":
            from qwen35.cli.chat import run_chat
            run_chat(args, err)
        elif args.command == "generate":
            from qwen35.cli.chat import run_generate
            run_generate(args, err)
        elif args.command == "info":
            from qwen35.cli.info import run_info
            run_info(args, Console())
        elif args.command == "quantize":
            from qwen35.cli.info import run_quantize
            run_quantize(args, err)
        elif args.command == "arena":
            from qwen35.cli.arena import run_arena_command
            run_arena_command(args, Console(), err)
        elif args.command == "eval":
            from qwen35.cli.arena import run_eval_command
            run_eval_command(args, Console(), err)
        elif args.command == "serve":
            from qwen35.cli.serve import run_serve
            run_serve(args, err)
        elif args.command == "train":
            from qwen35.train.nano import NanoRecipe, run_nano
            run_nano(args.out, args.work, NanoRecipe(minutes=args.minutes, seed=args.seed),
                     command="qwen35 " + " ".join(sys.argv[1:] if argv is None else argv))
    except (ValueError, FileNotFoundError, ConnectionError, FloatingPointError) as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)  # one line, even when long
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
