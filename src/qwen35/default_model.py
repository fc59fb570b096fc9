"""The built-in default model: `nano`, a 10M-parameter Qwen3.5 trained by `qwen35 train nano` (see its MODEL_CARD.md).

It ships inside the package, so `qwen35 chat` works on a fresh machine with no network.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def default_model_path() -> Path:
    """The packaged nano checkpoint directory."""
    path = Path(str(resources.files("qwen35").joinpath("assets", "nano")))
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"the built-in model is missing from {path}; reinstall qwen35, or rebuild it with "
                                "`make train-nano`, or pass --model")
    return path
