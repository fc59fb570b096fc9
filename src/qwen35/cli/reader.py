"""Reading the chat's user messages: line editing and history at a terminal, plain lines from a pipe.

At a terminal, prompt_toolkit reads the keys in raw mode: arrow keys edit and recall earlier messages (history in
memory only: chats may be private, so nothing is written to disk), and a paste arrives whole, newlines included
(bracketed paste). In the terminal's own line mode (canonical mode) the kernel would cut a line at 4,095
characters; raw mode has no such limit. Piped input (scripts, tests) is read line by line, as before.
"""

from __future__ import annotations

from collections.abc import Callable

from prompt_toolkit import PromptSession
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.output import Output
from rich.console import Console

LineReader = Callable[[bool], str]  # (first line of a message?) -> the line; EOFError at the end of input


def read_message(read_line: LineReader) -> str | None:
    """One user message; None at end of input. A line of triple quotes opens and closes a multi-line block."""
    try:
        first = read_line(True)
    except EOFError:
        return None
    if first.strip() != '"""':
        return first
    lines = []
    while True:
        try:
            line = read_line(False)
        except EOFError:
            break
        if line.strip() == '"""':
            break
        lines.append(line)
    return "\n".join(lines)


class TerminalLines:
    """Lines typed at a terminal, with editing, history and whole pastes; Ctrl-D on an empty line is EOFError,
    Ctrl-C is KeyboardInterrupt. `input`/`output` default to the terminal (tests pass a pipe)."""

    def __init__(self, input: Input | None = None, output: Output | None = None):
        self.session: PromptSession[str] = PromptSession(history=InMemoryHistory(), input=input, output=output)

    def __call__(self, first: bool) -> str:
        return self.session.prompt(FormattedText([("ansigreen bold", "you> " if first else "...  ")]))


def piped_lines(console: Console) -> LineReader:
    """Lines from a pipe or file on standard input (no terminal to edit in)."""
    return lambda first: console.input("[bold green]you>[/] ") if first else input()
