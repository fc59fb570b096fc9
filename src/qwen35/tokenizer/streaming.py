"""Streaming text helpers: token ids -> text pieces, thinking/answer split, stop strings, tool-call parsing."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qwen35.tokenizer.tokenizer import Tokenizer


class IncrementalDecoder:
    """Turn a stream of token ids into text pieces without ever emitting half a UTF-8 character.

    A character can span tokens, so each token's bytes (`Tokenizer.token_bytes`) go through an incremental UTF-8
    decoder: only the bytes of a character still unfinished are held (at most 3), a literal U+FFFD in the text
    comes out at once, and bytes that can never form a character come out as U+FFFD as soon as that is certain.
    The pieces join to `Tokenizer.decode` of all the ids. (Decoding text and holding it while it ends in U+FFFD
    cannot tell a literal U+FFFD from an unfinished character.)
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._bytes = tokenizer.token_bytes
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Feed one id; returns the newly completed text, possibly ""."""
        return "" if token_id in self._skip else self._utf8.decode(self._bytes(token_id))

    def flush(self) -> str:
        """Release whatever is held (an unfinished character decodes as U+FFFD) and start afresh."""
        piece = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return piece


def _partial_tag_len(text: str, tags: Iterable[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags` (may still become one)."""
    return max((n for tag in tags for n in range(1, min(len(tag), len(text) + 1)) if text.endswith(tag[:n])),
               default=0)


class ThinkingSplitter:
    """Split streamed model text into ("thinking", text) and ("answer", text) pieces.

    Qwen3.5 writes `<think>\\nreasoning\\n</think>\\n\\nanswer`; with thinking on, the prompt already ends in
    `<think>\\n`, so pass `starts_in_thinking=True`. Tags are not emitted and may be split across pieces.
    Newlines are cut exactly as the chat template cuts a past assistant turn: every "\\n" directly after
    `<think>`, directly before `</think>` and directly after `</think>` is dropped (other whitespace is kept),
    so the two parts render back into the same prompt. A trailing "\\n" of the thinking is therefore held
    until the next non-newline text shows it is not followed by `</think>`. In the answer a new `<think>` opens
    thinking again; a stray `</think>` there is dropped. The stream start counts as "just after a tag" (the
    prompt ends in `<think>\\n` or `</think>\\n\\n`). Decode with special tokens kept, or the tags are gone.

    `interrupt` (the tool-call tag) also ends thinking, and stays in the answer: a model that calls a tool from
    inside `<think>`, or after a `<think>` it never closed, has still decided to call it, and the call must reach
    the caller (the template renders calls after the thinking anyway).
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, starts_in_thinking: bool = False, interrupt: str | None = None) -> None:
        self.kind = "thinking" if starts_in_thinking else "answer"
        self._interrupt = interrupt
        self._buf = ""
        self._held_newlines = ""  # "\n"s at the end of thinking that may precede </think>
        self._at_start = True  # just after a tag (or at the very start of thinking): drop "\n"s

    def feed(self, piece: str) -> list[tuple[str, str]]:
        """Feed the next text piece; returns the (kind, text) pieces that are now certain."""
        self._buf += piece
        out: list[tuple[str, str]] = []
        while True:
            tags = (self.CLOSE, *filter(None, [self._interrupt])) if self.kind == "thinking" else (self.OPEN,
                                                                                                   self.CLOSE)
            hits = [(self._buf.find(t), t) for t in tags if t in self._buf]
            if not hits:
                break
            index, tag = min(hits)
            self._text(self._buf[:index], out)
            self._buf = self._buf[index + (0 if tag == self._interrupt else len(tag)):]
            self._held_newlines, self._at_start = "", True
            self.kind = "thinking" if tag == self.OPEN else "answer"
        keep = _partial_tag_len(self._buf, tags)
        self._text(self._buf[:len(self._buf) - keep], out)
        self._buf = self._buf[len(self._buf) - keep:]
        return out

    def _text(self, text: str, out: list[tuple[str, str]]) -> None:
        if self._at_start:
            text = text.lstrip("\n")
            self._at_start = not text
        if self.kind == "thinking" and text:
            body = text.rstrip("\n")
            text, held = self._held_newlines + body, text[len(body):]
            self._held_newlines = held if body else self._held_newlines + held
            if not body:
                return
        if text and out and out[-1][0] == self.kind:
            out[-1] = (self.kind, out[-1][1] + text)
        elif text:
            out.append((self.kind, text))

    def flush(self) -> list[tuple[str, str]]:
        """End of stream: a held partial tag is plain text; trailing thinking newlines are dropped."""
        out: list[tuple[str, str]] = []
        self._text(self._buf, out)
        self._buf, self._held_newlines = "", ""
        return out


class StopStrings:
    """Find user stop strings in streamed text, holding back any tail that could be the start of one."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self.matched: str | None = None  # the stop string that stopped the text (Anthropic's `stop_sequence`)
        self._buf = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to show, stopped). Text at and after the earliest stop string is dropped."""
        if self.stopped:
            return "", True
        self._buf += piece
        hits = [(at, s) for s in self.stops if (at := self._buf.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits, key=lambda hit: hit[0])
            self.stopped = True
            text, self._buf = self._buf[:at], ""
            return text, True
        keep = _partial_tag_len(self._buf, self.stops)
        text, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        return text, False

    def flush(self) -> str:
        """End of stream: a held prefix that never became a stop string is ordinary text."""
        text, self._buf = self._buf, ""
        return "" if self.stopped else text


_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>\n?(.*?)</function>\s*", re.DOTALL)
_PARAMETER = re.compile(r"\s*<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


def is_text_parameter(schema: Any) -> bool:
    """A parameter written raw in a call (a string, or an enum of strings), never JSON-decoded: the one rule the
    tool-call parser and the forced-call grammar share."""
    if not isinstance(schema, Mapping):
        return False
    enum = schema.get("enum")
    return schema.get("type") == "string" or (isinstance(enum, list) and bool(enum) and
                                              all(isinstance(v, str) for v in enum))


def _parse_call(body: str, schemas: Mapping[str, Any]) -> dict | None:
    """One `<tool_call>` body in the Qwen3-Coder XML format, or None when it does not match exactly."""
    function = _FUNCTION.fullmatch(body)
    if function is None:
        return None
    name = function.group(1).strip()
    parameters = schemas.get(name)
    properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
    properties = properties if isinstance(properties, Mapping) else {}
    arguments: dict[str, Any] = {}
    rest = function.group(2)
    while rest.strip():
        parameter = _PARAMETER.match(rest)
        if parameter is None:
            return None
        key, value = parameter.group(1).strip(), parameter.group(2)
        if is_text_parameter(properties.get(key)):
            arguments[key] = value
        else:
            try:
                arguments[key] = json.loads(value)
            except json.JSONDecodeError:
                arguments[key] = value
        rest = rest[parameter.end():]
    return {"name": name, "arguments": arguments}


def parse_tool_calls(text: str, schemas: Mapping[str, Any] | None = None) -> tuple[str, list[dict]]:
    """Split model output into (content, [{"name", "arguments"}]) for Qwen3-Coder XML tool calls.

    Parameter values lose the one newline the template puts on each side. `schemas` (function name -> its
    `parameters` JSON Schema) says which parameters are strings: those are kept as written (a zip code `02134` or
    an id `12345` stays a string); the others are JSON-decoded when they are valid JSON (`5`, `true`,
    `{"a": 1}`), else kept as strings. A block that does not parse stays in the content, so nothing is lost and
    nothing raises; when calls were found the content is stripped.
    """
    calls: list[dict] = []
    kept: list[str] = []
    end = 0
    for match in _TOOL_CALL.finditer(text):
        call = _parse_call(match.group(1), schemas or {})
        if call is not None:
            kept.append(text[end:match.start()])
            end = match.end()
            calls.append(call)
    if not calls:
        return text, []
    kept.append(text[end:])
    return "".join(kept).strip(), calls
