"""`qwen35 <command>`: argument parsing and dispatch; each command lives in its own module."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import version

from rich.console import Console

from qwen35.cli.args import Parser, image_tokens_arg, model_args

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qwen35", description="Run Qwen3.5 models on your own machine.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading details")
    parser.add_argument("--version", action="version", version=f"qwen35 {version('qwen35')}")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="chat in the terminal (or one-shot with -p)")
    model_args(chat)
    chat.add_argument("-p", "--prompt", help="one-shot: print the reply to this message and exit ('-' reads "
                                             "standard input)")
    chat.add_argument("-s", "--system", help="system prompt")
    chat.add_argument("--think", choices=["on", "off"], default=None, help="thinking mode (default: the template's)")
    chat.add_argument("--think-budget", type=int, default=None, metavar="N",
                      help="thinking tokens before the model must answer (thinking on); default: no limit")
    chat.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                      help="after each reply: prompt tokens reused from a snapshot and computed, time to first token")
    chat.add_argument("--show-thinking", action="store_true", help="one-shot: also print the thinking (to stderr)")
    chat.add_argument("--image", action="append", default=[], metavar="PATH",
                      help="attach an image file to the (first) message; repeatable (needs a vision checkpoint)")
    image_tokens_arg(chat)

    gen = sub.add_parser("generate", help="raw completion of a prompt (no chat template)")
    model_args(gen, cache=False)
    gen.add_argument("prompt", help="text to continue ('-' reads standard input)")

    info = sub.add_parser("info", help="layer pattern, parameters, memory estimates of a model")
    model_args(info, sampling=False, compile=False, cache=False)
    info.add_argument("--context", type=int, default=None, metavar="N",
                      help="plan the memory of a context of N tokens (default: the model's)")
    info.add_argument("--bits", type=int, choices=[4, 8], default=None, help="plan for weights quantized to these bits")
    info.add_argument("--kv-bits", dest="kv_bits", type=int, choices=[8, 16], default=16, help="K/V precision")
    info.add_argument("--batch", type=int, default=1, help="sequences at once")

    quant = sub.add_parser("quantize", help="write an int8 / int4 weight-only copy of a checkpoint")
    quant.add_argument("src", help="checkpoint directory or Hugging Face repo id")
    quant.add_argument("dst", help="output directory")
    quant.add_argument("--bits", type=int, choices=[8, 4], default=4, help="weight bits")
    quant.add_argument("--group-size", type=int, choices=[32, 64, 128, 256], default=64, help="int4 group along K")
    quant.add_argument("--head", type=int, nargs="?", const=8, default=0, choices=[8, 4], metavar="BITS",
                       help="also the LM head / embedding: int8 (--head) or int4 (--head 4, group as --group-size); "
                            "left as they are without it")

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    model_args(serve, sampling=False, compile=False)  # a batch would compile anew mid-serving
    from qwen35.cli.serve import add_serve_args
    add_serve_args(serve)

    train = sub.add_parser("train", help="train a model from scratch (recipe 'nano': the built-in default) or "
                                          "only the multi-token-prediction head of one (recipe 'mtp')")
    train.add_argument("recipe", choices=["nano", "mtp"])
    train.add_argument("--model", help="mtp: the checkpoint whose head to train (its body stays frozen)")
    train.add_argument("--out", required=True, help="where the finished checkpoint goes (mtp: may be --model)")
    train.add_argument("--work", default=None,
                       help="tokenizer, checkpoints and logs (resumable; default runs/<recipe>)")
    train.add_argument("--minutes", type=float, default=None,
                       help="wall-time budget: all stages (nano, default 75), the head's training (mtp, default 20)")
    train.add_argument("--seed", type=int, default=0, help="same seed, same model")

    from qwen35.cli.export import add_export_parser
    add_export_parser(sub)

    from qwen35.cli.arena import add_arena_parser, add_eval_parser
    add_arena_parser(sub)
    add_eval_parser(sub)
    return parser


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
        elif args.command == "export":
            from qwen35.cli.export import run_export
            run_export(args, err)
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
            command = "qwen35 " + " ".join(sys.argv[1:] if argv is None else argv)
            work = args.work or f"runs/{args.recipe}"
            if args.recipe == "mtp":
                if not args.model:
                    raise ValueError("qwen35 train mtp needs --model DIR (the checkpoint whose head to train)")
                from qwen35.train.mtp import HeadRecipe, train_head
                train_head(args.model, args.out, work, HeadRecipe(minutes=args.minutes or 20.0, seed=args.seed),
                           command=command)
            else:
                from qwen35.train.nano import NanoRecipe, run_nano
                run_nano(args.out, work, NanoRecipe(minutes=args.minutes or 75.0, seed=args.seed), command=command)
    except (ValueError, FileNotFoundError, ConnectionError, FloatingPointError) as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)  # one line, even when long
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
