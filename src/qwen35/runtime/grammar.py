"""Constrained decoding with llguidance: JSON Schemas and tool-call grammars compiled against the model's vocabulary,
and a per-sequence matcher that masks the logits of every token the grammar cannot take next.

Why llguidance (benchmarks/bench_grammar.py, 248K vocabulary, 2-core AVX2 host): per token 0.48 ms (mean) against
xgrammar's 0.26 ms and outlines-core's 15 ms, the first two both under 0.3% of a 0.8B int4 decode step there, while
a schema compiles in 1.3 ms against 78 ms (so llguidance costs less in all for replies under ~350 tokens), with no
dependencies (xgrammar pulls triton and transformers, ~1 GB) and a Lark dialect that embeds JSON Schemas, which the
tool-call format needs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

COMPACT = {"whitespace_flexible": False}  # no whitespace between JSON tokens: no model can pad max_tokens with blanks


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot compile; the message says what is wrong."""


class Vocabulary:
    """The model's vocabulary as llguidance sees it, built once per tokenizer on first use (a few seconds for 248K
    tokens) and shared by every matcher; `eos` is the one token a finished grammar allows."""

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int, eos: int):
        self._json, self.size, self.eos = tokenizer_json, vocab_size, eos
        self._lock = threading.Lock()
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                import llguidance  # imported on first use: most requests carry no grammar

                self._tokenizer = llguidance.LLTokenizer(self._json(), n_vocab=self.size, eos_token=self.eos,
                                                         slices=llguidance.LLTokenizer.json_slices())
            return self._tokenizer

    def compile(self, kind: str, source: str | dict) -> str:
        """A grammar ("json" schema or "lark" text) checked against this vocabulary; GrammarError if it is not
        one llguidance can run."""
        import llguidance

        try:
            grammar = (llguidance.LLMatcher.grammar_from_json_schema(json.dumps(source), defaults=COMPACT)
                       if kind == "json" else llguidance.LLMatcher.grammar_from_lark(source))
        except ValueError as e:
            raise GrammarError(str(e)[:500]) from None
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if failed:
            raise GrammarError("; ".join(messages)[:500])
        return grammar


class Matcher:
    """One sequence's position in a grammar: `mask` the logits, `accept` the token chosen."""

    def __init__(self, vocabulary: Vocabulary, grammar: str):
        import llguidance

        self._matcher = llguidance.LLMatcher(vocabulary.tokenizer, grammar, log_level=0)
        self._bits = np.zeros((vocabulary.size + 31) // 32, dtype=np.int32)
        self._size = vocabulary.size

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (V,) with every token the grammar forbids at -inf (a new tensor; fp32)."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self._matcher.is_error():
            raise GrammarError(f"the grammar matcher failed: {self._matcher.get_error()}")
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: logits.shape[-1]].view(np.bool_)
        return torch.where(torch.from_numpy(allowed).to(logits.device), logits.float(), float("-inf"))

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise GrammarError(f"token {token} does not fit the grammar: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete (only the end of the reply may follow)."""
        return self._matcher.is_accepting()
