"""What several commands share: the parser class, the model and sampling flags, and loading with a status line."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import NoReturn

from rich.console import Console

from qwen35.runtime.prefix_cache import DEFAULT_CACHE_RAM
from qwen35.vision.processor import DEFAULT_MAX_IMAGE_TOKENS

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


def whole_number(noun: str, hint: str) -> Callable[[str], int]:
    """An argparse type for a whole number, 0 or more, checked at parse time rather than as an error from deep in
    loading: `'-3' is not {noun}: {hint}`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}: {hint}")
        return value

    return parse


token_count = whole_number("a token count", "give 0 (no cap) or more tokens")  # --max-image-tokens


def image_tokens_arg(p: argparse._ActionsContainer) -> None:
    """--max-image-tokens, for the commands that take images (chat, serve)."""
    p.add_argument("--max-image-tokens", type=token_count, default=DEFAULT_MAX_IMAGE_TOKENS, metavar="N",
                   help="most tokens one image may cost: a larger one is resized down to fit (0: no cap, as the "
                        "reference: up to 16,384 per image)")


def model_args(p: argparse.ArgumentParser, sampling: bool = True, compile: bool = True,
               cache: bool = True) -> None:
    p.add_argument("-m", "--model", help="checkpoint directory, GGUF file or Hugging Face repo id (default: the "
                   "built-in model)")
    p.add_argument("--mmproj", default=None, metavar="FILE",
                   help="a GGUF model's vision projector (default: the mmproj*.gguf beside it, if one)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="weights and compute precision")
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    if compile:
        p.add_argument("--compile", action="store_true",
                       help="decode through torch.compile, compiled while loading (about a minute): +25-39%% "
                            "decode speed where qwen35's CPU kernels cannot run (no AVX2), no gain "
                            "beside them (docs/benchmarks.md)")
    if cache:
        p.add_argument("--cache-ram", dest="cache_ram", type=float, default=DEFAULT_CACHE_RAM, metavar="GB",
                       help="host memory (GiB) for prefix snapshots: a conversation's next turn computes only its "
                            "new tokens; 0 turns reuse off")
        p.add_argument("--context", type=int, default=None, metavar="N",
                       help="most tokens a conversation holds, K/V reserved to it (default: the model's, capped by "
                            "the free memory; `qwen35 info --context N` shows what it costs)")
        p.add_argument("--kv-bits", dest="kv_bits", type=int, choices=[16, 8], default=16,
                       help="K/V precision: 8 halves its memory (int8, a scale per token and head)")
        p.add_argument("--draft", type=int, choices=range(5), default=None, metavar="K",
                       help="speculative decoding with the model's MTP head: draft K (1-4) tokens per step, "
                            "verified in one forward; same output (default: 2 for bf16 models of 0.8B and up on a CPU "
                            "with qwen35's kernels, else off, where it does not pay; 0: off; docs/speculative.md)")
        p.add_argument("--draft-vocab", dest="draft_vocab", type=int, default=None, metavar="N",
                       help="draft over the N most frequent tokens only (cheaper; 0: all; default 16384)")
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
        model = load(args.model, dtype=args.dtype, device=args.device, compile=args.compile,
                     cache_ram=getattr(args, "cache_ram", None), context=getattr(args, "context", None),
                     kv_bits=getattr(args, "kv_bits", 16),
                     draft=getattr(args, "draft", None), draft_vocab=getattr(args, "draft_vocab", None),
                     max_image_tokens=getattr(args, "max_image_tokens", DEFAULT_MAX_IMAGE_TOKENS),
                     mmproj=getattr(args, "mmproj", None))
    if model.context_note:
        console.print(f"[yellow]{model.context_note}[/]", highlight=False)
    return model


