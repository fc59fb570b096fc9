"""`qwen35 serve` flags -> ServerSettings; the server itself is in qwen35.server (imported only when serving)."""

from __future__ import annotations

import argparse
import errno
import os
import socket
from pathlib import Path

from rich.console import Console

from qwen35.cli.args import image_tokens_arg
from qwen35.server.settings import LOOPBACK_HOSTS, ServerSettings
from qwen35.vision import ImagePolicy


def port_arg(text: str) -> int:
    """--port: 0-65535, checked here (a bigger one was a 70-line traceback from the socket layer)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: give 0-65535 (0 picks a free one)")
    return port


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind: loopback is this machine only; 0.0.0.0 "
                                                       "exposes it to the network")
    p.add_argument("--port", type=port_arg, default=8000, help="TCP port (0 picks a free one)")
    p.add_argument("--api-key", default=None, help="require this key (Bearer); also $QWEN35_API_KEY")
    p.add_argument("--api-key-file", default=None, help="read the key from a file (keeps it out of `ps`)")
    p.add_argument("--allowed-host", action="append", default=None,
                   help="accepted Host header (repeatable); default: localhost names on a loopback bind, any "
                        "host otherwise")
    p.add_argument("--model-name", default=None, help="name clients use in `model` (default: from --model)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together per step")
    p.add_argument("--max-queue", type=int, default=256, help="waiting sequences before 503")
    p.add_argument("--max-n", type=int, default=8, help="largest `n` a request may ask for")
    p.add_argument("--max-body-mb", type=float, default=2.0, help="request body limit (413 beyond)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per engine step while other "
                   "requests decode (alone, a prompt runs in the model's larger memory-bounded chunks)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight work may finish on SIGTERM")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a client has to send its headers, and again its body (408 beyond)")
    media = p.add_argument_group("images (data: URLs always work; files and remote URLs are off by default)")
    media.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                       help="serve image files (paths, file:// URLs) from inside this directory only")
    media.add_argument("--allow-remote-media", action="store_true",
                       help="download http(s) image URLs (public addresses only, pinned, redirects re-checked)")
    media.add_argument("--allowed-media-domains", nargs="+", default=(), metavar="HOST",
                       help="with --allow-remote-media: only these hosts and their subdomains")
    media.add_argument("--max-images", type=int, default=8, help="images per request")
    media.add_argument("--max-image-mb", type=float, default=20.0, help="encoded bytes per image")
    image_tokens_arg(media)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    key = args.api_key or os.environ.get("QWEN35_API_KEY") or None
    if args.api_key_file:
        key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
    loopback = args.host in LOOPBACK_HOSTS
    hosts = tuple(args.allowed_host) if args.allowed_host else (LOOPBACK_HOSTS if loopback else None)
    name = args.model_name or (Path(args.model).name if args.model and Path(args.model).is_dir() else args.model)
    return ServerSettings(model_name=name or "qwen35-nano", host=args.host, port=args.port, api_key=key,
                          allowed_hosts=hosts, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                          max_n=args.max_n, max_running=args.max_batch, max_queue=args.max_queue,
                          prefill_chunk=args.prefill_chunk, drain_timeout=args.drain_timeout,
                          read_timeout=args.read_timeout,
                          images=ImagePolicy(max_bytes=int(args.max_image_mb * 1024 * 1024),
                                             max_images=args.max_images, allow_remote=args.allow_remote_media,
                                             allowed_domains=tuple(d.lower() for d in args.allowed_media_domains),
                                             local_dir=Path(args.allowed_local_media_path)
                                             if args.allowed_local_media_path else None))


def check_address(host: str, port: int) -> None:
    """Fail in one line, before the model loads, when host:port cannot be listened on (in use, not this machine's
    address, a privileged port). The server binds it again itself; this probe is closed at once."""
    try:
        socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET).close()
    except OSError as e:
        hint = "stop what uses it or pick another --port" if e.errno == errno.EADDRINUSE else "check --host and --port"
        raise ConnectionError(f"cannot listen on {host}:{port}: {e.strerror or e}; {hint}") from None


def run_serve(args: argparse.Namespace, console: Console) -> None:
    from qwen35.api import load
    from qwen35.server.serve import serve

    check_address(args.host, args.port)

    def load_model():
        qwen = load(args.model, dtype=args.dtype, device=args.device, cache_ram=args.cache_ram,
                    context=args.context, kv_bits=args.kv_bits, max_image_tokens=args.max_image_tokens,
                    draft=args.draft, draft_vocab=args.draft_vocab, mmproj=args.mmproj)
        if qwen.context_note:
            console.print(f"[yellow]{qwen.context_note}[/]", highlight=False)
        return qwen

    serve(settings_from_args(args), load_model, console, verbose=args.verbose)
