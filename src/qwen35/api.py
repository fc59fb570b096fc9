"""The Python API: `load()` a checkpoint, then `chat`, `stream_chat`, `generate`, `stream_generate`, `logits`.

Streaming is the primitive: every non-streaming call folds the stream it would have produced.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
import threading
from typing import Any, Callable, Literal

import torch

from qwen35.runtime import Request, run
from qwen35.runtime.background import Background
from qwen35.runtime.grammar import Vocabulary
from qwen35.runtime.prefix_cache import DEFAULT_CACHE_RAM, GIB, PrefixCache
from qwen35.runtime.speculative import Speculator, make_speculator
from qwen35.runtime.steering import Steering
from qwen35.files import steady_heap
from qwen35.memory import MemoryPlan, available_memory, fitting_context, gib, plan
from qwen35.loading import (available_vision, load_model, load_vision, preprocessor_config, release_freed_memory,
                            resolve_model)
from qwen35.models import Qwen35Model
from qwen35.ops.cpu import kernels
from qwen35.models.vision import ImageInputs, VisionModel
from qwen35.sampling import SamplingParams
from qwen35.tokenizer import ChoiceText, Tokenizer, tool_calls_in
from qwen35.tokenizer.controls import chat_steering, resolve_budget, tool_parameters
from qwen35.tokenizer.history import history_ids, reply_message
from qwen35.tokenizer.tools import tool_schemas
from qwen35.vision import EncodedImages, ImagePolicy, ImageProcessor, image_sources, load_images, prepare
from qwen35.vision.processor import DEFAULT_MAX_IMAGE_TOKENS


@dataclass(frozen=True)
class Piece:
    """A streamed fragment of a reply. The last piece of a stream carries `finish_reason` and token counts
    (`cached_tokens`: prompt tokens restored from a snapshot, not computed) and `notice` (why an answer is empty or
    partial, when it is). With `logprobs` asked for, `logprobs` holds (token, logprob, ((token, logprob), ...) most
    likely) of the tokens read since the previous piece."""

    kind: Literal["thinking", "answer"]
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: tuple[tuple[int, float, tuple[tuple[int, float], ...]], ...] = ()
    notice: str = ""


@dataclass(frozen=True)
class Prompt:
    """A prepared chat: ids (images expanded), encoded images, whether the reply starts inside `<think>`, the
    positions worth a prefix snapshot and the reply's `Steering` (thinking budget, grammar)."""

    ids: list[int]
    images: ImageInputs | None = None
    thinking: bool = False
    marks: tuple[int, ...] = ()
    followup: Callable[[list[int], tuple[str, ...]], list[int] | None] | None = None  # see `Request.followup`
    steering: Steering = field(default_factory=Steering)


@dataclass(frozen=True)
class Reply:
    """A whole reply: the answer text, the thinking text (empty when thinking is off) and usage."""

    text: str
    thinking: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    cached_tokens: int = 0
    logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]]] = field(default_factory=list)
    notice: str = ""  # why the answer is empty or partial (max_tokens spent thinking, JSON cut short)


def fold(pieces: Iterable[Piece], schemas: dict[str, Any] | None = None) -> Reply:
    """The non-streaming reply of a stream; `schemas` (function name -> parameters) say which tool-call
    arguments are strings (`controls.tool_parameters`)."""
    text, thinking, logprobs, last = [], [], [], None
    for piece in pieces:
        (thinking if piece.kind == "thinking" else text).append(piece.text)
        logprobs += piece.logprobs
        last = piece
    assert last is not None and last.finish_reason is not None, "a stream always ends with a finishing piece"
    content, calls = tool_calls_in("".join(text), schemas)
    reason = "tool_calls" if calls and last.finish_reason == "stop" else last.finish_reason  # as the server says
    return Reply(content, "".join(thinking), reason, last.prompt_tokens, last.completion_tokens, calls,
                 last.cached_tokens, logprobs, last.notice)


class Qwen35:
    """A loaded model with its tokenizer, chat template and default sampling settings.

    `vision` is the checkpoint's vision tower (None without `model.visual.*` weights), or a function that loads
    it: then it is loaded when first used (an image arrives), so text-only use never holds it (0.67 GB at 4B).
    `image_policy` says where images may come from: the Python API trusts its caller (local files anywhere, no
    remote URLs by default). `prefix_cache` holds the snapshots every call (and a server on this model) resumes
    from; None turns prefix reuse off.
    """

    def __init__(self, model: Qwen35Model, tokenizer: Tokenizer, defaults: SamplingParams, path: Path,
                 vision: VisionModel | Callable[[], VisionModel | None] | None = None,
                 processor: ImageProcessor | None = None, image_policy: ImagePolicy | None = None,
                 prefix_cache: PrefixCache | None = None):
        self.model, self.tokenizer, self.defaults, self.path = model, tokenizer, defaults, path
        self.prefix_cache = prefix_cache
        self.config = model.config
        self._vision, self.processor = vision, processor
        self._encoded = EncodedImages()  # tower outputs by pixels: later turns resend the same images
        self._vision_lock = threading.Lock()
        self.image_policy = image_policy
        self._background = Background()  # a finished reply's warm-up, run while the caller is idle
        self.context, self.context_note = model.config.max_position_embeddings, ""  # set by `load`
        self.kv_bits = 16
        self.speculator: Speculator | None = None  # set by `load`: decode drafts with the MTP head
        self.vocabulary = Vocabulary(tokenizer.to_json, model.config.vocab_size,
                                     tokenizer.token_to_id("<|im_end|>") or -1)  # for grammars, built on first use

    @property
    def vision(self) -> VisionModel | None:
        """The vision tower, loaded on first use when `load` deferred it."""
        with self._vision_lock:
            if callable(self._vision) and not isinstance(self._vision, VisionModel):
                self._vision = self._vision()
            return self._vision

    # -- raw model access -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Full forward, no cache: (T, V) fp32 logits for one sequence, or (B, T, V) for a 2-D batch."""
        self._background.settle()
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.model.embed_tokens.weight.device)
        out = self.model(ids if ids.ndim == 2 else ids[None]).float()
        return out if ids.ndim == 2 else out[0]

    # -- completion -------------------------------------------------------------------------------------------
    def stream_generate(self, prompt: str, logprobs: int | None = None, logit_bias: dict[int, float] | None = None,
                        **sampling: Any) -> Iterator[Piece]:
        """Raw completion of `prompt` (no chat template; control-token text in it is parsed as control tokens),
        streamed. `logprobs`: None, or k for each token's log-probability and the k most likely; `logit_bias`:
        token id -> value added to its logit."""
        return self.stream(Request("0", self.tokenizer.encode(prompt), self.defaults.updated(**sampling), logprobs,
                                   logit_bias or {}))

    def generate(self, prompt: str, **options: Any) -> Reply:
        return fold(self.stream_generate(prompt, **options))

    # -- chat -------------------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    enable_thinking: bool | None = None) -> str:
        """The prompt text the chat template renders for `messages` (ends with the assistant generation prompt)."""
        return self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                  enable_thinking=enable_thinking)

    def prepare_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                     enable_thinking: bool | None = None, images: list[Any] | None = None,
                     allow_control_tokens: bool = False, thinking_budget: int | None = None,
                     reasoning_effort: str | None = None, response_format: dict[str, Any] | None = None,
                     tool_choice: Any = None, parallel_tool_calls: bool = True) -> Prompt:
        """A conversation as the engine takes it: the one preparation of the API, the CLI and the server.

        Renders the checkpoint's template (control-token text from callers stays text unless
        `allow_control_tokens`), loads the image parts (or takes `images` already loaded, as the server does under
        its own policy), expands and encodes them, marks the chat's stable points for prefix reuse, and sets the
        reply's rules: `thinking_budget` tokens (or OpenAI's `reasoning_effort`: "none" turns thinking off,
        else `controls.REASONING_EFFORT`), `response_format` (OpenAI's: json_object, json_schema) and
        `tool_choice` ("none", "auto", "required", {"type": "function", "function": {"name": ...}}).
        Raises ValueError (`ImageError` for images) naming what is wrong.
        """
        tok = self.tokenizer
        tools = tool_schemas(tools)  # Python functions as their schemas, once, for the template and the grammar
        if reasoning_effort == "none":
            enable_thinking = False
        budget = resolve_budget(thinking_budget, reasoning_effort)
        if tool_choice == "none":
            tools = None
        prompt, text_ids = tok.encode_chat(messages, tools, enable_thinking, allow_control_tokens)
        if images is None:
            sources = image_sources(messages)
            images = load_images(sources, self.image_policy or ImagePolicy()) if sources else []
        ids, encoded = text_ids, None
        if images:
            ids, encoded = prepare(text_ids, images, self.processor, self.vision, self.config.image_token_id,
                                   self.context, self._encoded)
        thinking, header = prompt.rstrip().endswith("<think>"), tok.generation_header_end(text_ids)
        steering = chat_steering(tok, self.vocabulary, thinking, prompt.rstrip().endswith("</think>"), budget,
                                 response_format, tools, tool_choice, parallel_tool_calls)

        def followup(reply: list[int], stops: tuple[str, ...]) -> list[int] | None:
            """This conversation with the reply, as its next turn renders it; None unless that extends this
            prompt up to its assistant header (images in it sit before the header, so their expansion carries)."""
            message = reply_message(tok, reply, thinking, stops, bool(tools))
            later = history_ids(tok, messages, tools, enable_thinking, allow_control_tokens, message)
            if header is None or later[:header] != text_ids[:header]:
                return None
            return ids[: header + len(ids) - len(text_ids)] + later[header:]

        return Prompt(ids, encoded, thinking, tok.chat_marks(ids), followup, steering)

    def stream_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    enable_thinking: bool | None = None, logprobs: int | None = None,
                    logit_bias: dict[int, float] | None = None, allow_control_tokens: bool = False,
                    thinking_budget: int | None = None, reasoning_effort: str | None = None,
                    response_format: dict[str, Any] | None = None, tool_choice: Any = None,
                    parallel_tool_calls: bool = True, progress: Callable[[int, int], None] | None = None,
                    **sampling: Any) -> Iterator[Piece]:
        """Reply to a conversation, streamed as thinking and answer pieces (the options: `prepare_chat`);
        `progress(done, total)` hears of the prompt's prefill after each chunk (a long prompt takes minutes on a CPU).

        User messages may hold image parts: `{"type": "image_url", "image_url": {"url": URL}}` (data:, http(s)
        when the policy allows, file path) or `{"type": "image", "image": path | PIL image | bytes}`. Images are
        loaded and encoded here, before the first piece, so a bad image raises `ImageError` (a ValueError) at once.
        """
        prompt = self.prepare_chat(messages, tools, enable_thinking, allow_control_tokens=allow_control_tokens,
                                   thinking_budget=thinking_budget, reasoning_effort=reasoning_effort,
                                   response_format=response_format, tool_choice=tool_choice,
                                   parallel_tool_calls=parallel_tool_calls)
        params = self.defaults.updated(**sampling)
        return self.stream(Request("0", prompt.ids, params, logprobs, logit_bias or {}, prompt.images, prompt.marks,
                                   prompt.followup, prompt.steering, progress), prompt.thinking)

    def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
             enable_thinking: bool | None = None, **options: Any) -> Reply:
        schemas = tool_parameters(tool_schemas(tools))  # which call arguments are strings
        return fold(self.stream_chat(messages, tools, enable_thinking, **options), schemas)

    def stream(self, request: Request, thinking: bool = False) -> Iterator[Piece]:
        """The engine's events for one request as text pieces (`thinking`: the reply starts inside `<think>`)."""
        self._background.settle()  # the model serves one call at a time, and this turn may need the warm-up
        tok, params = self.tokenizer, request.params
        text = ChoiceText(tok, () if params.ignore_eos else tok.eos_token_ids, params.stop, thinking, tools=False,
                          structured=request.steering.shape)
        cached = 0
        for event in run(self.model, request, tok.eos_token_ids, tok.vocab_size, self.prefix_cache,
                         self._background.start, context=self.context, kv_bits=self.kv_bits,
                         speculator=self.speculator):
            cached = event.cached
            pieces = [Piece(kind, t) for kind, t in text.feed(event.token)]
            if request.logprobs is not None:
                entry = ((event.token, event.logprob, event.top_logprobs),)
                pieces = [replace(pieces[0], logprobs=entry), *pieces[1:]] if pieces else [Piece("answer", "",
                                                                                                 logprobs=entry)]
            yield from pieces
            if text.finish_reason is not None:
                break
        yield from (Piece(kind, t) for kind, t in text.close("length"))
        yield Piece("answer", "", text.finish_reason, len(request.prompt), text.tokens, cached, notice=text.notice)


def load(path_or_repo: str | Path | None = None, dtype: str | torch.dtype = "bfloat16", device: str | None = None,
         progress: Callable[[int, int], None] | None = None, compile: bool = False,
         cache_ram: float | None = None, context: int | None = None, kv_bits: int = 16,
         max_image_tokens: int | None = DEFAULT_MAX_IMAGE_TOKENS, draft: int | None = None,
         draft_vocab: int | None = None, mmproj: str | Path | None = None) -> Qwen35:
    """Load a checkpoint directory, a GGUF file or a Hugging Face repo id; None loads the built-in default model.

    A GGUF file (llama.cpp's format) brings its config, tokenizer and chat template in its metadata; `mmproj` is
    its vision projector file (default: an `mmproj*.gguf` beside it). docs/gguf.md.

    `context`: the most tokens a conversation may hold (None: the model's, capped by the memory free after loading;
    `Qwen35.context_note` says when it was); its K/V is reserved to that size as it grows, never copied by doubling.
    `kv_bits`: 16 (K/V in the activation dtype) or 8 (int8 with a scale per token and head: half the K/V memory,
    accuracy in docs/benchmarks.md).

    `cache_ram`: GiB of host memory for prefix snapshots (None: DEFAULT_CACHE_RAM; 0 turns reuse off), so a
    conversation's next turn computes only its new tokens (docs/design.md, "Prefix reuse").

    `max_image_tokens`: the most tokens one image may cost; larger images are resized down to it (0 or None: no
    cap, as the reference: up to 16,384 per image; docs/images.md).

    `draft`: speculative decoding with the checkpoint's multi-token-prediction head, `draft` tokens (1-4) per
    step verified in one forward; the output is the same (greedy: token for token; sampled: in distribution).
    None: the measured default for this model size (off where it does not pay, or without a head); 0: off.
    `draft_vocab`: draft over only the N most frequent tokens (cheaper at small sizes; 0: all; None: default).
    docs/speculative.md has the figures.

    `compile`: decode steps through torch.compile, compiled here (about a minute); measured to help where
    qwen35's CPU kernels cannot run (PyTorch's kernels: +25-39% decode at 0.8B), not beside them
    (docs/benchmarks.md). A batch of several or padded sequences compiles a second graph when first seen.
    """
    steady_heap()  # before anything large is allocated: the planner's figures then hold (qwen35.files)
    if path_or_repo is None:
        from qwen35.default_model import default_model_path
        path, gguf = default_model_path(), False
    else:
        path, gguf = resolve_model(path_or_repo)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    if device == "cpu":
        kernels()  # built on first use: do it now, while the caller shows "loading"
    if gguf:
        from qwen35.loading.gguf_open import load_gguf
        tokenizer, model, defaults, tower, processor = load_gguf(path, dtype, device, progress, mmproj,
                                                                 max_image_tokens)
    else:
        tokenizer = Tokenizer.from_dir(path)  # first: its parse leaves ~0.2 GB of freed heap, returned before
        release_freed_memory()  # the weights
        model = load_model(path, dtype=dtype, device=device, progress=progress)
        defaults = SamplingParams.from_generation_config(path)
        vision = available_vision(path)
        processor = ImageProcessor.from_config(preprocessor_config(path), vision, max_image_tokens) if vision else None
        tower = (lambda: load_vision(path, dtype=dtype, device=device)) if vision else None
    release_freed_memory()
    if compile:
        model.compile_decode()
    ram = DEFAULT_CACHE_RAM if cache_ram is None else cache_ram
    if not ram >= 0:
        raise ValueError(f"cache_ram={cache_ram!r} GiB is invalid: give 0 (off) or more")
    qwen = Qwen35(model, tokenizer, defaults, path, tower, processor,
                  ImagePolicy(local_dir=Path(Path.cwd().anchor)), PrefixCache(int(ram * GIB)) if ram else None)
    if kv_bits not in (8, 16):
        raise ValueError(f"kv_bits={kv_bits} is not supported: use 16 or 8")
    qwen.kv_bits = kv_bits
    qwen.speculator = make_speculator(model, path, draft, draft_vocab)
    qwen.context, qwen.context_note = choose_context(model, context, int(ram * GIB), kv_bits,
                                                     qwen.speculator is not None)
    return qwen


def choose_context(model: Qwen35Model, context: int | None, snapshot_bytes: int,
                   kv_bits: int = 16, draft: bool = False) -> tuple[int, str]:
    """(context, a note when it was capped): the asked-for context, or the model's own capped by what the memory
    free after loading holds (K/V, DeltaNet state, prefill peak and snapshots: `qwen35.memory.plan`)."""
    config, limit = model.config, model.config.max_position_embeddings
    if context is not None:
        if not 1 < context <= limit:
            raise ValueError(f"context={context} is invalid: this model reads 2 to {limit:,} tokens")
        return context, ""
    dtype_bytes = model.embed_tokens.weight.element_size()

    def rest(n: int) -> MemoryPlan:  # what a context still needs beside the weights and runtime already resident
        return replace(plan(config, n, dtype_bytes=dtype_bytes, kv_bits=kv_bits, snapshot_bytes=snapshot_bytes,
                            weights=0, draft=draft), runtime=0)

    free = available_memory()
    fits = fitting_context(rest, limit, int(free * 0.9))
    if fits >= limit:
        return limit, ""
    fits = max(fits, min(limit, 4096))
    return fits, (f"context capped at {fits:,} tokens: the model's {limit:,} would need "
                  f"{gib(rest(limit).total)} beside the weights and {gib(free)} is free (--context sets it)")
