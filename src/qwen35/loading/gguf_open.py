"""Everything `qwen35.load` takes from a GGUF file: tokenizer, text model, sampling defaults, the vision tower."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from qwen35.files import release_freed_memory
from qwen35.loading.checkpoint import DTYPES
from qwen35.loading.gguf import gguf_sampling, open_gguf
from qwen35.loading.gguf_load import load_gguf_model
from qwen35.loading.gguf_tokenizer import gguf_tokenizer
from qwen35.models import Qwen35Model
from qwen35.sampling import SamplingParams
from qwen35.tokenizer import Tokenizer


def find_mmproj(model: Path, mmproj: str | Path | None) -> Path | None:
    """The vision projector: the one given, else the only `mmproj*.gguf` in the model's directory."""
    if mmproj is not None:
        return Path(mmproj).expanduser()
    found = sorted(p for p in model.parent.glob("*.gguf") if p.name.lower().startswith("mmproj") and p != model)
    return found[0] if len(found) == 1 else None


def load_gguf(path: Path, dtype: torch.dtype | str, device: str, progress: Callable[[int, int], None] | None,
              mmproj: str | Path | None, max_image_tokens: int | None
              ) -> tuple[Tokenizer, Qwen35Model, SamplingParams, Callable | None, object | None]:
    """(tokenizer, model, sampling defaults, vision tower loader or None, image processor or None)."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
    f = open_gguf(path)
    tokenizer = gguf_tokenizer(f)
    release_freed_memory()
    model = load_gguf_model(f, dtype, device, progress)
    defaults = SamplingParams(**gguf_sampling(f))
    projector = find_mmproj(path, mmproj)
    if projector is None:
        return tokenizer, model, defaults, None, None
    from qwen35.loading.gguf_vision import open_mmproj

    vision = open_mmproj(projector, model.config)  # checked now: a wrong file fails at load, not at the first image
    return tokenizer, model, defaults, vision.tower_loader(dtype, device), vision.processor(max_image_tokens)
