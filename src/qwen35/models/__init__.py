"""Model definitions: one file per architecture."""

from qwen35.models.qwen3_5 import Qwen35Model

__all__ = ["Qwen35Model"]
