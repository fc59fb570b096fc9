"""Qwen3.5 tokenizer, chat template and streaming text helpers (thinking split, stop strings, tool calls)."""

from qwen35.tokenizer.choice import ChoiceText, tool_calls_in
from qwen35.tokenizer.streaming import IncrementalDecoder, StopStrings, ThinkingSplitter, parse_tool_calls
from qwen35.tokenizer.tokenizer import Tokenizer
from qwen35.tokenizer.vocab import build_qwen35_tokenizer

__all__ = ["ChoiceText", "IncrementalDecoder", "StopStrings", "ThinkingSplitter", "Tokenizer", "build_qwen35_tokenizer",
           "parse_tool_calls", "tool_calls_in"]
