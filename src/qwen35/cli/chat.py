"""`qwen35 chat` (interactive or one-shot) and `qwen35 generate`.

Interactive: replies stream; thinking streams dimmed, then collapses to one line once the answer starts
(`/thinking` shows it again). Ctrl-C stops a reply, not the program; Ctrl-D or /exit leaves.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from qwen35.api import Piece, Qwen35
from qwen35.cli.main import load_for, sampling_options

HELP = """commands:
  /reset            forget the conversation
  /think on|off     switch thinking mode
  /system TEXT      set the system prompt (and reset)
  /thinking         show the last reply's thinking
  /image PATH       attach an image file to your next message
  /exit             leave (or Ctrl-D)
multi-line input: start and end with a line of three double quotes (\"\"\"); Ctrl-C stops a reply"""


def read_message(console: Console) -> str | None:
    """One user message; None at end of input. A line of triple quotes opens and closes a multi-line block."""
    try:
        first = console.input("[bold green]you>[/] ")
    except EOFError:
        return None
    if first.strip() != '"""':
        return first
    lines = []
    while True:
        try:
            line = input()
        except EOFError:
            break
        if line.strip() == '"""':
            break
        lines.append(line)
    return "\n".join(lines)


def show_reply(stream: Iterator[Piece], console: Console) -> tuple[str, str, Piece | None]:
    """Render a streamed reply live; returns (answer, thinking, last piece). Ctrl-C ends the reply early."""
    thinking, answer, last = [], [], None

    def view() -> Group:
        parts = []
        if thinking and not answer:
            parts.append(Text("".join(thinking), style="dim italic"))
        elif thinking:
            words = len("".join(thinking).split())
            parts.append(Text(f"▸ thought ({words} words) — /thinking shows it", style="dim"))
        parts.append(Text("".join(answer)))
        return Group(*parts)

    with Live(view(), console=console, refresh_per_second=15, transient=False) as live:
        try:
            for piece in stream:
                (thinking if piece.kind == "thinking" else answer).append(piece.text)
                last = piece
                live.update(view())
        except KeyboardInterrupt:
            stream.close()
            answer.append(" [stopped]")
            live.update(view())
    return "".join(answer).removesuffix(" [stopped]"), "".join(thinking), last


def run_chat(args: argparse.Namespace, err: Console) -> None:
    model = load_for(args, err)
    sampling = sampling_options(args)
    think = None if args.think is None else args.think == "on"
    system = args.system
    if args.prompt is not None:
        one_shot(model, args, sampling, think, err)
        return
    console = Console()
    console.print(f"[dim]{model.path.name} · {HELP.splitlines()[0]} /help[/]")
    history: list[dict] = []
    last_thinking = ""
    images = list(args.image)  # attached to the next message
    while True:
        try:
            message = read_message(console)
        except KeyboardInterrupt:
            console.print("\n[dim](Ctrl-D or /exit to leave)[/]")
            continue
        if message is None or message.strip() in ("/exit", "/quit"):
            return
        if message.startswith("/"):
            command, _, rest = message.strip().partition(" ")
            if command == "/reset":
                history = []
                console.print("[dim]conversation cleared[/]")
            elif command == "/think" and rest in ("on", "off"):
                think = rest == "on"
                console.print(f"[dim]thinking {rest}[/]")
            elif command == "/system":
                system, history = rest or None, []
                console.print("[dim]system prompt set; conversation cleared[/]")
            elif command == "/thinking":
                console.print(Text(last_thinking or "(no thinking in the last reply)", style="dim italic"))
            elif command == "/image" and rest.strip():
                if model.vision is None:
                    console.print("[red]this model has no vision tower; images need a Qwen3.5 checkpoint[/]")
                else:
                    images.append(rest.strip())
                    console.print(f"[dim]image attached to your next message ({len(images)} pending)[/]")
            else:
                console.print(HELP)
            continue
        if not message.strip():
            continue
        history.append({"role": "user", "content": user_content(message, images)})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        try:
            stream = model.stream_chat(messages, enable_thinking=think, **sampling)
        except ValueError as e:  # a bad image or prompt: say so, forget this message, keep chatting
            history.pop()
            console.print(f"[bold red]error:[/] {e}", highlight=False)
            continue
        images = []
        answer, last_thinking, _ = show_reply(stream, console)
        history.append({"role": "assistant", "content": answer, "reasoning_content": last_thinking})


def user_content(text: str, images: list[str]) -> str | list[dict]:
    """A user message: plain text, or image parts (files, in order) followed by the text."""
    if not images:
        return text
    return [{"type": "image", "image": path} for path in images] + [{"type": "text", "text": text}]


def one_shot(model: Qwen35, args: argparse.Namespace, sampling: dict, think: bool | None, err: Console) -> None:
    """Print the reply's answer to stdout as it streams (thinking to stderr with --show-thinking)."""
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": user_content(args.prompt, args.image)}]
    for piece in model.stream_chat(messages, enable_thinking=think, **sampling):
        if piece.kind == "answer":
            sys.stdout.write(piece.text)
            sys.stdout.flush()
        elif args.show_thinking:
            err.print(piece.text, style="dim italic", end="", highlight=False)
    sys.stdout.write("\n")


def run_generate(args: argparse.Namespace, err: Console) -> None:
    model = load_for(args, err)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    for piece in model.stream_generate(prompt, **sampling_options(args)):
        sys.stdout.write(piece.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
