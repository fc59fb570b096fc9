"""The vision tower from a GGUF vision projector (`mmproj-*.gguf`, llama.cpp's `clip` architecture).

llama.cpp's converter (`convert_hf_to_gguf.py --mmproj`, class `Qwen3VLVisionModel`) writes the tower under `v.*`
and the merger under `mm.*`, splits the Conv3d patch embedding into its two temporal slices
(`v.patch_embd.weight`, `v.patch_embd.weight.1`) and stores the geometry under `clip.vision.*` (the position grid
as `image_size` = side x patch). The image processor takes mean, std, patch and merge sizes from there; pixel
bounds are the reference defaults (the file does not carry them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen35.config import ModelConfig
from qwen35.files import CheckpointError
from qwen35.loading.gguf import GGUFFile, open_gguf
from qwen35.loading.gguf_quant import dense
from qwen35.models.vision import VisionConfig, VisionModel
from qwen35.vision import ImageProcessor

BLOCK = {"norm1": "ln1", "norm2": "ln2", "attn.qkv": "attn_qkv", "attn.proj": "attn_out", "mlp.linear_fc1": "ffn_up",
         "mlp.linear_fc2": "ffn_down"}
TOP = {"patch_embed.proj.bias": "v.patch_embd.bias", "pos_embed.weight": "v.position_embd.weight",
       "merger.norm.weight": "v.post_ln.weight", "merger.norm.bias": "v.post_ln.bias",
       "merger.linear_fc1.weight": "mm.0.weight", "merger.linear_fc1.bias": "mm.0.bias",
       "merger.linear_fc2.weight": "mm.2.weight", "merger.linear_fc2.bias": "mm.2.bias"}
PATCH = ("v.patch_embd.weight", "v.patch_embd.weight.1")  # temporal slices 0 and 1 of patch_embed.proj.weight


@dataclass
class Projector:
    """An opened, checked mmproj file: the tower's config and the processor settings it carries."""

    file: GGUFFile
    config: VisionConfig
    preprocessor: dict

    def tower_loader(self, dtype: torch.dtype, device: str) -> Callable[[], VisionModel]:
        return lambda: load_tower(self, dtype, device)

    def processor(self, max_image_tokens: int | None) -> ImageProcessor:
        return ImageProcessor.from_config(self.preprocessor, self.config, max_image_tokens)


def open_mmproj(path: str | Path, text: ModelConfig) -> Projector:
    """Open a vision projector for a text model; a file of another kind or width is refused by name."""
    f = open_gguf(path, projector=True)
    patch = f.value("clip.vision.patch_size", kind=int)
    side = f.value("clip.vision.image_size", kind=int) // max(patch, 1)
    raw = {"depth": f.value("clip.vision.block_count", kind=int),
           "hidden_size": f.value("clip.vision.embedding_length", kind=int),
           "intermediate_size": f.value("clip.vision.feed_forward_length", kind=int),
           "num_heads": f.value("clip.vision.attention.head_count", kind=int),
           "out_hidden_size": f.value("clip.vision.projection_dim", kind=int), "patch_size": patch,
           "spatial_merge_size": f.value("clip.vision.spatial_merge_size", 2, kind=int),
           "num_position_embeddings": side * side}
    if raw["out_hidden_size"] != text.hidden_size:
        raise CheckpointError(f"{f.path}: this projector feeds a model of width {raw['out_hidden_size']}, the model "
                              f"has {text.hidden_size}; use the mmproj file made with this model")
    try:
        config = VisionConfig.from_dict(raw, text.hidden_size)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{f.path}: the metadata describe no valid Qwen3.5 vision tower: {e}") from None
    preprocessor = {"patch_size": patch, "merge_size": raw["spatial_merge_size"], "temporal_patch_size": 2,
                    "image_mean": f.value("clip.vision.image_mean", [0.5] * 3, kind=list),
                    "image_std": f.value("clip.vision.image_std", [0.5] * 3, kind=list)}
    return Projector(f, config, preprocessor)


def gguf_names(config: VisionConfig) -> dict[str, str]:
    """Our tower's parameter names -> the projector file's tensor names (the patch embedding aside)."""
    out = dict(TOP)
    for i in range(config.depth):
        for ours, theirs in BLOCK.items():
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{kind}"] = f"v.blk.{i}.{theirs}.{kind}"
    return out


def load_tower(p: Projector, dtype: torch.dtype, device: str) -> VisionModel:
    """The tower's weights, one tensor at a time, every tensor accounted for."""
    with torch.device("meta"):
        model = VisionModel(p.config)
    expected = {name: p.shape for name, p in model.named_parameters()}
    names = gguf_names(p.config)
    wanted = set(names.values()) | set(PATCH)
    unexpected = sorted(set(p.file.tensors) - wanted)
    missing = sorted(wanted - set(p.file.tensors))
    if unexpected or missing:
        raise CheckpointError(f"{p.file.path}: not a Qwen3.5 vision projector: unexpected tensor(s) {unexpected[:5]}, "
                              f"missing {missing[:5]}")
    loaded = {ours: dense(p.file.tensors[theirs]) for ours, theirs in names.items()}
    loaded["patch_embed.proj.weight"] = torch.stack([dense(p.file.tensors[n]) for n in PATCH], dim=2)
    for name, w in loaded.items():
        if tuple(w.shape) != tuple(expected[name]):
            raise CheckpointError(f"{p.file.path}: tensor for {name} has shape {tuple(w.shape)}, the metadata imply "
                                  f"{tuple(expected[name])}")
    model.load_state_dict({n: w.to(dtype) for n, w in loaded.items()}, strict=True, assign=True)
    return model.to(device).eval()
