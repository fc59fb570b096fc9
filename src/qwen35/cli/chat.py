"""`qwen35 chat` (interactive or one-shot) and `qwen35 generate`.

Interactive: replies stream; thinking streams dimmed, then collapses to one line once the answer starts
(`/thinking` shows it again). Ctrl-C stops a reply, not the program; Ctrl-D or /exit leaves. When the
conversation outgrows the model's context, the oldest turns are dropped (the system prompt stays), with a note.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from qwen35.api import Piece, Qwen35
from qwen35.cli.args import load_for, sampling_options
from qwen35.cli.reader import LineReader, TerminalLines, piped_lines, read_message

HELP = """commands:
  /reset            forget the conversation
  /think on|off     switch thinking mode
  /system TEXT      set the system prompt (and reset)
  /thinking         show the last reply's thinking
  /image PATH       attach an image file to your next message
  /exit             leave (or Ctrl-D)
multi-line input: start and end with a line of three double quotes (\"\"\"); Ctrl-C stops a reply"""


NO_THINKING = "this model has no thinking mode (it was trained with thinking off)"


def has_thinking_mode(model: Qwen35) -> bool:
    """False for checkpoints made by `qwen35 train nano`, the built-in model among them (its training_figures.json
    marks them): trained with thinking off, inside <think> they write the answer as thinking and never close it,
    so the reply comes back empty. Their template still renders <think>, so it cannot tell."""
    return not (model.path / "training_figures.json").is_file()


def reply_reserve(max_tokens: int, context: int) -> int:
    """Context kept free for the reply: --max-tokens, but at most a quarter of the context, so that a large
    --max-tokens does not squeeze out the whole conversation."""
    return min(max_tokens, context // 4)


def prompt_length(model: Qwen35, messages: list[dict], think: bool | None) -> int:
    """Tokens of the chat prompt for `messages` (an image counts as its placeholder only)."""
    return len(model.tokenizer.encode_chat(messages, enable_thinking=think)[1])


def fit_history(history: list[dict], count: Callable[[list[dict]], int], context: int,
                reserve: int) -> tuple[list[dict], int]:
    """The newest whole turns of `history` whose prompt leaves `reserve` of `context` tokens free, and how many
    turns were dropped to get there.

    A turn is a user message and all that follows it (the reply, tool messages): no reply outlives its question.
    `count(history)` is the prompt's length in tokens, the system prompt included. Raises ValueError when even
    the last turn alone does not fit.
    """
    starts = [i for i, message in enumerate(history) if message["role"] == "user"]
    for dropped, start in enumerate(starts):
        tokens = count(history[start:])
        if tokens <= context - reserve:
            return history[start:], dropped
    raise ValueError(f"your message is too long for this model: with the system prompt it takes {tokens} tokens; "
                     f"{context - reserve} fit ({context}-token context, {reserve} kept for the reply). Shorten it")


class PromptProgress:
    """A long prompt's prefill as it goes, shown before the reply (32K tokens take minutes on a laptop CPU)."""

    SHOWN_FROM = 2048  # prompt tokens left to compute

    def __init__(self) -> None:
        self.done = self.total = 0
        self.listener: Callable[[], None] | None = None

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if self.listener is not None:
            self.listener()

    def line(self) -> Text | None:
        if self.total - self.done <= 0 or self.total < self.SHOWN_FROM:
            return None
        return Text(f"reading the prompt: {self.done:,} / {self.total:,} tokens", style="dim")


def show_reply(stream: Iterator[Piece], console: Console,
               progress: PromptProgress | None = None) -> tuple[str, str, Piece | None, float]:
    """Render a streamed reply live; returns (answer, thinking, last piece, seconds to the first piece). Ctrl-C
    ends the reply early."""
    thinking, answer, last = [], [], None
    start, first = time.perf_counter(), 0.0

    def view() -> Group:
        parts = []
        reading = progress.line() if progress is not None and not thinking and not answer else None
        if reading is not None:
            parts.append(reading)
        if thinking and not answer:
            parts.append(Text("".join(thinking), style="dim italic"))
        elif thinking:
            words = len("".join(thinking).split())
            parts.append(Text(f"▸ thought ({words} words) — /thinking shows it", style="dim"))
        parts.append(Text("".join(answer)))
        return Group(*parts)

    with Live(view(), console=console, refresh_per_second=15, transient=False) as live:
        if progress is not None:
            progress.listener = lambda: live.update(view())
        try:
            for piece in stream:
                first = first or time.perf_counter() - start
                (thinking if piece.kind == "thinking" else answer).append(piece.text)
                last = piece
                live.update(view())
        except KeyboardInterrupt:
            stream.close()
            answer.append(" [stopped]")
            live.update(view())
    return "".join(answer).removesuffix(" [stopped]"), "".join(thinking), last, first


def turn_figures(last: Piece, first: float) -> str:
    """`chat --verbose`: what this turn's prompt cost (reused from a snapshot vs computed) and its first token."""
    computed = last.prompt_tokens - last.cached_tokens
    return (f"prompt {last.prompt_tokens} tokens: {last.cached_tokens} reused, {computed} computed · first token "
            f"{first:.2f} s · {last.completion_tokens} generated")


def run_chat(args: argparse.Namespace, err: Console) -> None:
    model = load_for(args, err)
    sampling = sampling_options(args)
    think = None if args.think is None else args.think == "on"
    if think and not has_thinking_mode(model):
        raise ValueError(f"{NO_THINKING}; leave out --think on")
    if args.think_budget is not None and args.think_budget < 0:
        raise ValueError(f"--think-budget {args.think_budget} is invalid: give 0 or more tokens")
    if args.prompt is not None:
        one_shot(model, args, sampling, think, err)
        return
    console = Console()
    terminal = sys.stdin.isatty() and sys.stdout.isatty()
    chat_loop(model, TerminalLines() if terminal else piped_lines(console), console, sampling, think, args.system,
              list(args.image), args.verbose, args.think_budget)


def chat_loop(model: Qwen35, read_line: LineReader, console: Console, sampling: dict, think: bool | None,
              system: str | None, images: list[str], verbose: bool = False, budget: int | None = None) -> None:
    """The interactive chat, until end of input or /exit; `images` are attached to the next message; `budget`:
    thinking tokens per reply."""
    context = model.context
    reserve = reply_reserve(model.defaults.updated(**sampling).max_tokens, context)
    console.print(f"[dim]{model.path.name} · {HELP.splitlines()[0]} /help[/]")
    history: list[dict] = []
    last_thinking = ""
    while True:
        try:
            message = read_message(read_line)
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
            elif command == "/think" and rest == "on" and not has_thinking_mode(model):
                console.print(f"[yellow]{NO_THINKING}; thinking stays off[/]")
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
        head = [{"role": "system", "content": system}] if system else []
        try:
            history, dropped = fit_history(history, lambda turns: prompt_length(model, head + turns, think),
                                           context, reserve)
            if dropped:
                what = "the oldest turn" if dropped == 1 else f"the {dropped} oldest turns"
                console.print(f"[dim]dropped {what} to fit the {context}-token context[/]")
            progress = PromptProgress()
            stream = model.stream_chat(head + history, enable_thinking=think, thinking_budget=budget,
                                       progress=progress, **sampling)
        except ValueError as e:  # too long, a bad image: say so, forget this message, keep chatting
            history.pop()
            console.print(f"[bold red]error:[/] {e}", highlight=False)
            continue
        images = []
        answer, last_thinking, last, first = show_reply(stream, console, progress)
        if last is not None and last.notice:
            console.print(f"[yellow]{last.notice}[/]", highlight=False)
        if verbose and last is not None and last.finish_reason is not None:
            console.print(f"[dim]{turn_figures(last, first)}[/]", highlight=False)
        history.append({"role": "assistant", "content": answer, "reasoning_content": last_thinking})


def user_content(text: str, images: list[str]) -> str | list[dict]:
    """A user message: plain text, or image parts (files, in order) followed by the text."""
    if not images:
        return text
    return [{"type": "image", "image": path} for path in images] + [{"type": "text", "text": text}]


def one_shot(model: Qwen35, args: argparse.Namespace, sampling: dict, think: bool | None, err: Console) -> None:
    """Print the reply's answer to stdout as it streams (thinking to stderr with --show-thinking)."""
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": user_content(text, args.image)}]
    for piece in model.stream_chat(messages, enable_thinking=think, thinking_budget=args.think_budget, **sampling):
        if piece.kind == "answer":
            sys.stdout.write(piece.text)
            sys.stdout.flush()
        elif args.show_thinking:
            err.print(piece.text, style="dim italic", end="", highlight=False)
        if piece.notice:
            err.print(piece.notice, style="yellow", highlight=False)
    sys.stdout.write("\n")


def run_generate(args: argparse.Namespace, err: Console) -> None:
    model = load_for(args, err)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    for piece in model.stream_generate(prompt, **sampling_options(args)):
        sys.stdout.write(piece.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
