"""Load the vision tower (`model.visual.*`) of an official checkpoint, as strictly as the text model.

The tower is its own module beside the text model (text-only use never builds it). A checkpoint without any
`model.visual.*` tensor (text-only exports, `qwen35 quantize` output) simply has no vision; a partial or
mismatched tower is an error naming the tensor and the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from qwen35.config import ModelConfig, load_config
from qwen35.files import regular_file_exists
from qwen35.loading.checkpoint import DTYPES, CheckpointError, _checked, _read, open_weights, weight_files
from qwen35.models.vision import VisionConfig, VisionModel

log = logging.getLogger(__name__)
PREFIX = "model.visual."


def vision_config(config: ModelConfig) -> VisionConfig | None:
    """The validated vision config, or None for a text-only config."""
    if config.vision_config is None:
        return None
    return VisionConfig.from_dict(config.vision_config, config.hidden_size)


def available_vision(directory: str | Path) -> VisionConfig | None:
    """The vision config when the checkpoint has one and some `model.visual.*` tensor (reads file headers only),
    so callers can defer `load_vision` until an image arrives."""
    directory = Path(directory)
    config = vision_config(load_config(directory))
    if config is None:
        return None
    for file in weight_files(directory):
        with open_weights(file) as f:
            if any(n.startswith(PREFIX) for n in f.keys()):
                return config
    return None


def load_vision(directory: str | Path, dtype: torch.dtype | str = torch.bfloat16,
                device: str = "cpu") -> VisionModel | None:
    """The checkpoint's vision tower, or None when it has no vision config or no `model.visual.*` weights."""
    directory = Path(directory)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    config = vision_config(load_config(directory))
    if config is None:
        return None
    with torch.device("meta"):
        model = VisionModel(config)
    expected = {name: p.shape for name, p in model.named_parameters()}
    loaded: dict[str, torch.Tensor] = {}
    files = weight_files(directory)
    for file in files:
        with open_weights(file) as f:
            for name in (n for n in f.keys() if n.startswith(PREFIX)):
                ours = name[len(PREFIX):]
                if ours not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor '{name}' (the vision config has no such "
                                          "parameter); is config.json from the same checkpoint?")
                loaded[ours] = _checked(_read(f, name, file), expected[ours], name, file, dtype)
    if not loaded:
        log.info("%s: no %s* tensors; images are not available with this checkpoint", directory, PREFIX)
        return None
    missing = sorted(set(expected) - set(loaded))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{directory}: missing vision tensor(s) {[PREFIX + m for m in missing[:5]]}{more}; "
                              "the checkpoint is incomplete")
    model.load_state_dict(loaded, strict=True, assign=True)
    return model.to(device).eval()


def preprocessor_config(directory: str | Path) -> dict:
    """`preprocessor_config.json` of the checkpoint ({} when absent: the reference defaults apply)."""
    file = Path(directory) / "preprocessor_config.json"
    if not regular_file_exists(file):
        return {}
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e}); re-download it") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return raw
