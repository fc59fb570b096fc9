"""Checkpoint discovery and loading (safetensors only, never pickle)."""

from qwen35.loading.checkpoint import CheckpointError, load_model, release_freed_memory, weight_files
from qwen35.loading.hub import resolve_checkpoint, resolve_model
from qwen35.loading.save import official_state_dict, save_model, save_state_dict
from qwen35.loading.vision import available_vision, load_vision, preprocessor_config

__all__ = ["CheckpointError", "available_vision", "load_model", "load_vision", "official_state_dict",
           "preprocessor_config", "release_freed_memory", "resolve_checkpoint", "resolve_model", "save_model",
           "save_state_dict", "weight_files"]
