"""Tokens of one reply -> text deltas, pushed one token at a time (the Python API and the server both use it).

Incremental detokenization (never splits a UTF-8 character), stop strings, EOS and the thinking/answer split in
one place, so a reply streamed by the server has the same text as `Qwen35.chat`. With tools, answer text from
the first `<tool_call>` on is held back and parsed into OpenAI tool calls at the end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from qwen35.tokenizer.streaming import IncrementalDecoder, StopStrings, ThinkingSplitter, parse_tool_calls
from qwen35.tokenizer.tokenizer import Tokenizer

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


def tool_calls_in(text: str, schemas: Mapping[str, Any] | None = None) -> tuple[str, list[dict[str, Any]]]:
    """`parse_tool_calls` on the text up to the last `</tool_call>`; what follows stays content.

    Cutting there keeps the parse linear: the non-greedy `<tool_call>(.*?)</tool_call>` search would rescan
    the rest of the text from every unclosed `<tool_call>` (quadratic on a model that repeats the tag).
    """
    end = text.rfind(TOOL_CLOSE)
    if end < 0:
        return text, []
    end += len(TOOL_CLOSE)
    content, calls = parse_tool_calls(text[:end], schemas)
    return ((content + text[end:]).strip(), calls) if calls else (text, [])


class ChoiceText:
    """Feed tokens, get ("thinking" | "answer", text) deltas; `close` ends the choice and sets `finish_reason`."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: Iterable[int], stops: Iterable[str],
                 thinking: bool | None, tools: bool, structured: str = "",
                 schemas: Mapping[str, Any] | None = None):
        self.decoder, self.stops = IncrementalDecoder(tokenizer), StopStrings(stops)
        self.eos = set(eos_ids)
        self.splitter = ThinkingSplitter(thinking, TOOL_OPEN) if thinking is not None else None
        self.structured = structured  # what a grammar makes of the answer, in words ("JSON", "tool call")
        self.schemas = schemas  # function name -> parameters schema, for `parse_tool_calls`
        self.tool_gate = StopStrings((TOOL_OPEN,)) if tools else None
        self.answer: list[str] = []  # every answer character produced, shown or held
        self.shown = 0  # answer characters already sent as content
        self.thinking: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.tokens = 0
        self.finish_reason: str | None = None

    def feed(self, token: int) -> list[tuple[str, str]]:
        self.tokens += 1
        if token in self.eos:
            return self.close("stop")
        text, stopped = self.stops.feed(self.decoder.add(token))
        out = self._split(text)
        return out + self.close("stop") if stopped else out

    def close(self, reason: str) -> list[tuple[str, str]]:
        """End of the choice: release held text; a stop string found in it turns the reason into "stop"."""
        if self.finish_reason is not None:
            return []
        out: list[tuple[str, str]] = []
        if not self.stops.stopped:
            text, stopped = self.stops.feed(self.decoder.flush())
            reason = "stop" if stopped else reason
            out += self._split(text if stopped else text + self.stops.flush())
        if self.splitter is not None:
            out += self._route(self.splitter.flush())
        rest = "".join(self.answer)[self.shown:]
        if rest:
            content, self.tool_calls = tool_calls_in(rest, self.schemas) if self.tool_gate else (rest, [])
            out += [("answer", content)] if content else []
            self.shown = len("".join(self.answer))
        self.finish_reason = "tool_calls" if self.tool_calls and reason == "stop" else reason
        return out

    @property
    def notice(self) -> str:
        """Why the answer is empty or incomplete, said plainly ("" when it is whole)."""
        if self.finish_reason != "length":
            return ""
        if self.splitter is not None and self.splitter.kind == "thinking":
            return ("max_tokens ran out while the model was still thinking, so the answer is empty; raise "
                    "max_tokens or set a thinking budget (thinking_budget, reasoning_effort)")
        if self.structured:
            return (f"max_tokens ran out before the {self.structured} was complete: the content is a partial "
                    f"{self.structured}; raise max_tokens")
        return ""

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended the choice; None when EOS, the token limit or nothing (yet) did."""
        return self.stops.matched

    def content(self) -> tuple[str, list[dict[str, Any]]]:
        """The whole answer as a non-streaming reply has it: tool calls parsed out (as `api.fold` does)."""
        text = "".join(self.answer)
        return tool_calls_in(text, self.schemas) if self.tool_gate else (text, [])

    def _split(self, text: str) -> list[tuple[str, str]]:
        return self._route(self.splitter.feed(text) if self.splitter is not None else [("answer", text)])

    def _route(self, pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
        out = []
        for kind, text in pieces:
            if not text:
                continue
            if kind == "thinking":
                self.thinking.append(text)
                out.append((kind, text))
                continue
            self.answer.append(text)
            if self.tool_gate is None:
                self.shown += len(text)
                out.append((kind, text))
            elif not self.tool_gate.stopped:
                shown, _ = self.tool_gate.feed(text)
                self.shown += len(shown)
                out += [(kind, shown)] if shown else []
        return out
