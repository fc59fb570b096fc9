"""The Python API: `load()` a checkpoint, then `chat`, `stream_chat`, `generate`, `stream_generate`, `logits`.

Streaming is the primitive: every non-streaming call folds the stream it would have produced.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
import threading
from typing import Any, Callable, Literal

import torch

from qwen35.generate import generate_tokens
from qwen35.loading import (available_vision, load_model, load_vision, preprocessor_config, release_freed_memory,
                            resolve_checkpoint)
from qwen35.models import Qwen35Model
from qwen35.ops.cpu import kernels
from qwen35.models.vision import ImageInputs, VisionModel
from qwen35.sampling import SamplingParams
from qwen35.tokenizer import ChoiceText, Tokenizer, tool_calls_in
from qwen35.vision import ImagePolicy, ImageProcessor, image_sources, load_images, prepare


@dataclass(frozen=True)
class Piece:
    """A streamed fragment of a reply. The last piece of a stream carries `finish_reason` and token counts."""

    kind: Literal["thinking", "answer"]
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Reply:
    """A whole reply: the answer text, the thinking text (empty when thinking is off) and usage."""

    text: str
    thinking: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def fold(pieces: Iterable[Piece]) -> Reply:
    """The non-streaming reply of a stream."""
    text, thinking, last = [], [], None
    for piece in pieces:
        (thinking if piece.kind == "thinking" else text).append(piece.text)
        last = piece
    assert last is not None and last.finish_reason is not None, "a stream always ends with a finishing piece"
    content, calls = tool_calls_in("".join(text))
    return Reply(content, "".join(thinking), last.finish_reason, last.prompt_tokens, last.completion_tokens, calls)


class Qwen35:
    """A loaded model with its tokenizer, chat template and default sampling settings.

    `vision` is the checkpoint's vision tower (None without `model.visual.*` weights), or a function that loads
    it: then it is loaded when first used (an image arrives), so text-only use never holds it (0.67 GB at 4B).
    `image_policy` says where images may come from: the Python API trusts its caller (local files anywhere, no
    remote URLs by default).
    """

    def __init__(self, model: Qwen35Model, tokenizer: Tokenizer, defaults: SamplingParams, path: Path,
                 vision: VisionModel | Callable[[], VisionModel | None] | None = None,
                 processor: ImageProcessor | None = None, image_policy: ImagePolicy | None = None):
        self.model, self.tokenizer, self.defaults, self.path = model, tokenizer, defaults, path
        self.config = model.config
        self._vision, self.processor = vision, processor
        self._vision_lock = threading.Lock()
        self.image_policy = image_policy

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
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.model.embed_tokens.weight.device)
        out = self.model(ids if ids.ndim == 2 else ids[None]).float()
        return out if ids.ndim == 2 else out[0]

    # -- completion -------------------------------------------------------------------------------------------
    def stream_generate(self, prompt: str, **sampling: Any) -> Iterator[Piece]:
        """Raw completion of `prompt` (no chat template), streamed."""
        return self._stream(self.tokenizer.encode(prompt), self.defaults.updated(**sampling), thinking=False)

    def generate(self, prompt: str, **sampling: Any) -> Reply:
        return fold(self.stream_generate(prompt, **sampling))

    # -- chat -------------------------------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    enable_thinking: bool | None = None) -> str:
        """The prompt text the chat template renders for `messages` (ends with the assistant generation prompt)."""
        return self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                  enable_thinking=enable_thinking)

    def stream_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    enable_thinking: bool | None = None, **sampling: Any) -> Iterator[Piece]:
        """Reply to a conversation, streamed as thinking and answer pieces.

        User messages may hold image parts: `{"type": "image_url", "image_url": {"url": URL}}` (data:, http(s)
        when the policy allows, file path) or `{"type": "image", "image": path | PIL image | bytes}`. Images are
        loaded and encoded here, before the first piece, so a bad image raises `ImageError` (a ValueError) at once.
        """
        prompt = self.chat_prompt(messages, tools, enable_thinking)
        starts_thinking = prompt.rstrip().endswith("<think>")
        ids, images = self.encode_images(messages, self.tokenizer.encode(prompt))
        return self._stream(ids, self.defaults.updated(**sampling), starts_thinking, images)

    def encode_images(self, messages: list[dict[str, Any]],
                      prompt_ids: list[int]) -> tuple[list[int], ImageInputs | None]:
        """The prompt ids with each image placeholder expanded, and the encoded images (None without images)."""
        sources = image_sources(messages)
        if not sources:
            return prompt_ids, None
        images = load_images(sources, self.image_policy or ImagePolicy())
        return prepare(prompt_ids, images, self.processor, self.vision, self.config.image_token_id,
                       self.config.max_position_embeddings)

    def chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
             enable_thinking: bool | None = None, **sampling: Any) -> Reply:
        return fold(self.stream_chat(messages, tools, enable_thinking, **sampling))

    def _stream(self, prompt_ids: list[int], params: SamplingParams, thinking: bool,
                images: ImageInputs | None = None) -> Iterator[Piece]:
        tok = self.tokenizer
        text = ChoiceText(tok, () if params.ignore_eos else tok.eos_token_ids, params.stop, thinking, tools=False)
        for token in generate_tokens(self.model, prompt_ids, params, tok.eos_token_ids, tok.vocab_size, images):
            yield from (Piece(kind, t) for kind, t in text.feed(token))
            if text.finish_reason is not None:
                break
        yield from (Piece(kind, t) for kind, t in text.close("length"))
        yield Piece("answer", "", text.finish_reason, len(prompt_ids), text.tokens)


def load(path_or_repo: str | Path | None = None, dtype: str | torch.dtype = "bfloat16", device: str | None = None,
         progress: Callable[[int, int], None] | None = None, compile: bool = False) -> Qwen35:
    """Load a checkpoint directory or Hugging Face repo id; None loads the built-in default model.

    `compile`: decode steps through torch.compile, compiled here (about a minute); measured to help where
    qwen35's CPU kernels cannot run (PyTorch's kernels: +25-39% decode at 0.8B), not beside them
    (docs/benchmarks.md). A batch of several or padded sequences compiles a second graph when first seen.
    """
    if path_or_repo is None:
        from qwen35.default_model import default_model_path
        path = default_model_path()
    else:
        path = resolve_checkpoint(path_or_repo)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    if device == "cpu":
        kernels()  # built on first use: do it now, while the caller shows "loading"
    tokenizer = Tokenizer.from_dir(path)  # first: its parse leaves ~0.2 GB of freed heap, returned before the weights
    release_freed_memory()
    model = load_model(path, dtype=dtype, device=device, progress=progress)
    release_freed_memory()
    if compile:
        model.compile_decode()
    vision = available_vision(path)
    processor = ImageProcessor.from_config(preprocessor_config(path), vision) if vision else None
    tower = (lambda: load_vision(path, dtype=dtype, device=device)) if vision else None
    return Qwen35(model, tokenizer, SamplingParams.from_generation_config(path), path, tower, processor,
                  ImagePolicy(local_dir=Path(Path.cwd().anchor)))
