"""How a reply will look in the next turn's prompt: the chat template re-renders it (past thinking dropped, tool
calls re-serialised), so its ids are not the ids generated. The runtime prefills this rendering while idle."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from qwen35.tokenizer.choice import ChoiceText
from qwen35.tokenizer.tokenizer import Tokenizer


def reply_message(tokenizer: Tokenizer, reply: Iterable[int], thinking: bool, stops: Iterable[str],
                  tools: bool) -> dict[str, Any]:
    """The assistant message a client gets back for these reply ids (and sends back with its next turn)."""
    text = ChoiceText(tokenizer, tokenizer.eos_token_ids, stops, thinking, tools)
    for token in reply:
        text.feed(token)
        if text.finish_reason is not None:
            break
    text.close("length")
    content, calls = text.content()
    message: dict[str, Any] = {"role": "assistant", "content": content, "reasoning_content": "".join(text.thinking)}
    return message | ({"tool_calls": calls} if calls else {})


def history_ids(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None, enable_thinking: bool | None,
                allow_control_tokens: bool, reply: dict[str, Any]) -> list[int]:
    """The ids of `messages` plus `reply` as the next turn renders them, up to where its next message starts.

    The next message is taken to be a tool result after tool calls and a user message otherwise: which one it is
    decides which past turns keep their reasoning.
    """
    after = {"role": "tool", "content": "."} if reply.get("tool_calls") else {"role": "user", "content": "."}
    _, ids = tokenizer.encode_chat([*messages, reply, after], tools, enable_thinking, allow_control_tokens,
                                   add_generation_prompt=False)
    start = tokenizer.token_to_id("<|im_start|>")
    return ids[: max((i for i, t in enumerate(ids) if t == start), default=0)]
