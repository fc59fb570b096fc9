"""Qwen3.5 tokenizer: `tokenizer.json` via the `tokenizers` library, and the chat template in a Jinja sandbox."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders

from qwen35.files import regular_file_exists
from qwen35.tokenizer.template import compile_chat_template, render
from qwen35.tokenizer.tools import tool_schemas
from qwen35.tokenizer.vocab import bytes_to_unicode

ROLES = ("system", "user", "assistant", "tool")
MEDIA_TYPES = ("image", "image_url", "video")
PART_KEYS = ("image_url", "image", "video", "text")  # what a part without "type" is, by the first key it has
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' names; the first one set wins
BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}
IM_END = "<|im_end|>"
SENTINEL, SENTINEL_END = "\ue000", "\ue001"  # private-use marks for control-token text while the template renders
BUILD_HINT = ("build one offline with `qwen35.tokenizer.build_qwen35_tokenizer(dir)` or use the checkpoint "
              "directory downloaded from the Hugging Face Hub")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download it or {BUILD_HINT}") from e


def _plain(value: Any) -> Any:
    """A JSON-only deep copy, as transformers makes: the template cannot mutate the caller's data or reach methods
    of caller objects. Anything else (say a PIL image in an image part) becomes an inert "<TypeName>" string;
    templates only test whether media keys are present."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # str subclasses (enums, numpy) carry extra methods
        return str.__str__(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def part_type(part: Any) -> str | None:
    """A content part's type: its "type", else the first of PART_KEYS it holds. The official template and
    transformers take `{"text": ...}` or `{"image": ...}` without a "type", so every layer reads parts this way."""
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    return kind if kind is not None else next((key for key in PART_KEYS if key in part), None)


def _check_content(content: Any, where: str, role: str) -> None:
    """None (or no content) renders as an empty turn in the template, for every role, as in transformers."""
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise ValueError(f"{where}.content must be a string, a list of parts or null, got {type(content).__name__}")
    for j, part in enumerate(content):
        kind = part_type(part)
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        if kind in MEDIA_TYPES and role != "system":
            continue
        raise ValueError(f"{where}.content[{j}] must be {{'type': 'text', 'text': str}} or an image/video part"
                         f"{'' if role != 'system' else ' (system messages take text only)'}, got {part!r}")


def _alias_reasoning(message: dict, where: str) -> dict:
    """Reasoning sent as `thinking` or `reasoning` also under `reasoning_content`, the name the template reads
    (and under `thinking`, if unset), as transformers does. Only assistant turns render it, so only there must
    it be a string; elsewhere it is ignored."""
    name = next((key for key in REASONING_FIELDS if message.get(key) is not None), None)
    if name is None:
        return message
    if message["role"] == "assistant" and not isinstance(message[name], str):
        raise ValueError(f"{where}.{name} must be a string (the reasoning text of an assistant message), got "
                         f"{type(message[name]).__name__}")
    return {"thinking": message[name], **message, "reasoning_content": message[name]}


def _normalize_tool_call(call: Any, where: str) -> dict:
    """OpenAI shape `{"function": {"name", "arguments"}}` or flat `{"name", "arguments"}`; JSON-string args parsed."""
    if not isinstance(call, dict):
        raise ValueError(f"{where} must be a dict, got {type(call).__name__}")
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"{where} needs a non-empty string function name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.arguments is not valid JSON: {e}") from e
    if not isinstance(args, dict):
        raise ValueError(f"{where}.arguments must be a JSON object, got {type(args).__name__}")
    return {**call, "function": {**fn, "arguments": args}} if "function" in call else {**call, "arguments": args}


def validate_messages(messages: Any) -> list[dict]:
    """Check the chat shape up front so mistakes surface as a ValueError naming the message, not a Jinja trace."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
        message = _alias_reasoning(_plain(message), where)
        _check_content(message.get("content"), where, role)
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                raise ValueError(f"{where}.tool_calls must be a list on an assistant message")
            message["tool_calls"] = [_normalize_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        out.append(message)
    return out


class Tokenizer:
    """Encode/decode with a `tokenizer.json` and render chats with the checkpoint's own chat template."""

    def __init__(self, tokenizer: HFTokenizer, chat_template: str | None = None,
                 eos_token_ids: Iterable[int] = (), source: str = "<memory>") -> None:
        self._tk = tokenizer
        self.chat_template = chat_template
        self.source = source
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_token_ids))
        added_tokens = tokenizer.get_added_tokens_decoder()
        added = sorted((t.content for t in added_tokens.values()), key=len, reverse=True)
        self._control = re.compile("|".join(map(re.escape, added))) if added else None
        self._added_text = {i: t.content for i, t in added_tokens.items()}
        self.special_ids = frozenset(i for i, t in added_tokens.items() if t.special)
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self._token_bytes: dict[int, bytes] = {}  # filled as tokens are streamed: at most the vocabulary (~10 MB)
        try:
            self._template = None if chat_template is None else compile_chat_template(chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template of {source} has a syntax error: {e}") from e

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (required), the chat template and the EOS ids from a checkpoint directory.

        Template: `chat_template.jinja`, else `tokenizer_config.json["chat_template"]` (a string, or a list of
        {name, template} where "default" is used). A missing template only fails when a chat is rendered.
        EOS ids: `generation_config.json` `eos_token_id`, the tokenizer_config `eos_token`, and `<|im_end|>`.
        """
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not regular_file_exists(tok_file):
            raise FileNotFoundError(f"{tok_file} not found; {BUILD_HINT}")
        try:
            tokenizer = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust loader raises a bare Exception for any parse error
            raise ValueError(f"{tok_file} could not be loaded ({e}); it is corrupt or not a Hugging Face "
                             f"tokenizer.json: {BUILD_HINT}") from e
        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file) if regular_file_exists(config_file) else {}
        if not isinstance(config, dict):
            raise ValueError(f"{config_file} must hold a JSON object; re-download it or {BUILD_HINT}")
        template = cls._find_template(path, config)
        gen_file = path / "generation_config.json"
        gen = _read_json(gen_file) if regular_file_exists(gen_file) else {}
        value = gen.get("eos_token_id") if isinstance(gen, dict) else None
        eos = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]
        eos_token = config.get("eos_token")  # a string or an AddedToken dict
        names = (eos_token.get("content") if isinstance(eos_token, dict) else eos_token, IM_END)
        eos += [i for i in (tokenizer.token_to_id(n) for n in names if isinstance(n, str)) if i is not None]
        return cls(tokenizer, template, eos, source=str(path))

    @staticmethod
    def _find_template(path: Path, config: dict) -> str | None:
        jinja_file = path / "chat_template.jinja"
        if regular_file_exists(jinja_file):
            return jinja_file.read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{path / 'tokenizer_config.json'}: chat_template must be a string or a list of "
                             "{name, template} with a 'default' entry")
        return template

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows, specials included (248,077 for Qwen3.5; the embedding is padded larger)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def to_json(self) -> str:
        """The tokenizer as `tokenizer.json` text (what grammar libraries build their vocabulary from)."""
        return self._tk.to_str()

    def encode(self, text: str) -> list[int]:
        """Token ids; special-token text such as `<|im_start|>` is parsed as the special token."""
        return self._tk.encode(text).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, as the byte-level decoder joins them before reading UTF-8: streaming
        decodes these, since one character can span tokens. Added tokens are their own text; an unknown id is
        empty, as `decode` drops it. Cached per token, so each costs its conversion once."""
        cached = self._token_bytes.get(token_id)
        if cached is None:
            cached = self._token_bytes[token_id] = self._bytes_of(token_id)
        return cached

    def _bytes_of(self, token_id: int) -> bytes:
        if token_id in self._added_text:
            return self._added_text[token_id].encode("utf-8")
        if not self._byte_level:
            raise ValueError(f"{self.source}: streaming text needs a byte-level BPE tokenizer.json (decoder type "
                             f"ByteLevel, as every Qwen3.5 checkpoint has), got {type(self._tk.decoder).__name__}")
        token = self._tk.id_to_token(token_id)
        if token is None:
            return b""
        try:
            return bytes(BYTE_OF_CHAR[char] for char in token)
        except KeyError:  # as the ByteLevel decoder does: a token with a character outside the table is its text
            return token.encode("utf-8")

    def apply_chat_template(self, messages: list[dict], tools: list[dict | Callable] | None = None,
                            add_generation_prompt: bool = True, enable_thinking: bool | None = None,
                            **kwargs: Any) -> str:
        """Render a chat to prompt text. `enable_thinking=None` leaves the template's own default in force.

        `tools`: JSON-schema dicts, or Python functions with type hints and a Google-style docstring (converted
        as transformers converts them, see `qwen35.tokenizer.tools`)."""
        if self._template is None:
            raise ValueError(f"no chat template for {self.source}: add chat_template.jinja (or a chat_template "
                             "entry in tokenizer_config.json) to the directory")
        context = {"messages": validate_messages(messages), "tools": _plain(tool_schemas(tools)),
                   "add_generation_prompt": add_generation_prompt, **_plain(kwargs)}
        if enable_thinking is not None:
            context["enable_thinking"] = bool(enable_thinking)
        try:
            return render(self._template, context)
        except (jinja2.TemplateError, ArithmeticError) as e:  # 1/0 or an over-long range() are ArithmeticErrors
            raise ValueError(f"chat template of {self.source} failed: {type(e).__name__}: {e}") from e

    def encode_chat(self, messages: list[dict], tools: list[dict | Callable] | None = None,
                    enable_thinking: bool | None = None, allow_control_tokens: bool = False,
                    add_generation_prompt: bool = True) -> tuple[str, list[int]]:
        """The rendered chat prompt and its ids, control tokens only where the template put them.

        Text in a message or a tool definition that spells a token of the vocabulary's added tokens (`<|im_end|>`,
        `<think>`, `<tool_call>`, ...) is tokenized as plain characters, so no caller's text can forge a turn, a
        thinking block or a tool call. `allow_control_tokens=True` parses it as control tokens (raw prompts).
        """
        if allow_control_tokens or self._control is None:
            prompt = self.apply_chat_template(messages, tools, add_generation_prompt, enable_thinking)
            return prompt, self.encode(prompt)
        tools = tool_schemas(tools)  # before protecting: a function's docstring may spell a control token
        found: list[str] = []
        protected = self._protect([messages, tools], found)
        if found and SENTINEL in json.dumps([messages, tools], ensure_ascii=False, default=str):
            raise ValueError("messages use the reserved character U+E000 together with control-token text")
        prompt = self.apply_chat_template(protected[0], protected[1], add_generation_prompt, enable_thinking)
        ids: list[int] = []
        for i, part in enumerate(re.split(f"{SENTINEL}(\\d+){SENTINEL_END}", prompt)):
            if i % 2 == 0:
                ids += self.encode(part) if part else []
            else:  # "<|im_end|" then ">": neither piece is an added token
                text = found[int(part)]
                ids += self.encode(text[:-1]) + self.encode(text[-1])
        return re.sub(f"{SENTINEL}(\\d+){SENTINEL_END}", lambda m: found[int(m.group(1))], prompt), ids

    def _protect(self, value: Any, found: list[str]) -> Any:
        """Control-token text in every string (keys included) swapped for numbered sentinels."""
        if isinstance(value, str):
            def swap(m: re.Match) -> str:
                found.append(m.group(0))
                return f"{SENTINEL}{len(found) - 1}{SENTINEL_END}"
            return self._control.sub(swap, value)
        if isinstance(value, Mapping):
            return {self._protect(k, found): self._protect(v, found) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._protect(v, found) for v in value]
        return value

    def chat_marks(self, ids: Sequence[int]) -> tuple[int, ...]:
        """A chat prompt's stable points for prefix reuse: where its last user turn starts (a later request that
        changes only that turn resumes here) and where the assistant header of its generation prompt ends (the
        next turn renders this reply after the same header, but without the thinking block)."""
        start, user = self.token_to_id("<|im_start|>"), self.encode("user")
        if start is None:
            return ()
        opens = [i for i, t in enumerate(ids) if t == start]
        users = [i for i in opens[:-1] if list(ids[i + 1: i + 1 + len(user)]) == user]
        header = self.generation_header_end(ids)
        return tuple([*users[-1:], *([header] if header is not None else [])])

    def generation_header_end(self, ids: Sequence[int]) -> int | None:
        """Where a chat prompt's final assistant header (`<|im_start|>assistant` and a newline) ends, or None."""
        start, header = self.token_to_id("<|im_start|>"), self.encode("<|im_start|>assistant\n")
        last = max((i for i, t in enumerate(ids) if t == start), default=None)
        if last is None or list(ids[last: last + len(header)]) != header:
            return None
        return last + len(header)
