"""Shape-true random Qwen3.5 checkpoints: the real 0.8B/2B/4B/9B configs, random weights, the official layout.

Random weights run at the speed of real ones (dense models), so speed and memory can be measured without a
download. The tensor names and shapes come from the reference itself (`Qwen3_5ForConditionalGeneration` built on
the meta device), the vocabulary is the real one, and tensors are written shard by shard (never the whole model in
memory), with `model.safetensors.index.json` as the released checkpoints have it. Used by the benchmarks only.

    python benchmarks/shape_true.py 0.8B ~/.cache/qwen35-bench/0.8B
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

# The table of ../shared's architecture notes (section 3); everything else is common to the family.
SIZES: dict[str, dict] = {
    "0.8B": dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=3584, num_attention_heads=8,
                 num_key_value_heads=2, linear_num_value_heads=16, tie_word_embeddings=True,
                 vision=dict(depth=12, hidden_size=768, intermediate_size=3072, num_heads=12)),
    "2B": dict(hidden_size=2048, num_hidden_layers=24, intermediate_size=6144, num_attention_heads=8,
               num_key_value_heads=2, linear_num_value_heads=16, tie_word_embeddings=True,
               vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16)),
    "4B": dict(hidden_size=2560, num_hidden_layers=32, intermediate_size=9216, num_attention_heads=16,
               num_key_value_heads=4, linear_num_value_heads=32, tie_word_embeddings=True,
               vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16)),
    "9B": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=12288, num_attention_heads=16,
               num_key_value_heads=4, linear_num_value_heads=32, tie_word_embeddings=False,
               vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16)),
}
SHARD_BYTES = 2 << 30


def official_config(size: str, mtp: bool = False) -> dict:
    """config.json of the multimodal checkpoint (`model_type: qwen3_5`) for one size; `mtp`: with the
    multi-token-prediction head every official checkpoint has (bench_mtp.py; the other benchmarks go without)."""
    s = dict(SIZES[size])
    vision, tie = s.pop("vision"), s["tie_word_embeddings"]
    layers = s["num_hidden_layers"]
    text = dict(s, model_type="qwen3_5_text", vocab_size=248320, head_dim=256, linear_num_key_heads=16,
                linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, rms_norm_eps=1e-6,
                hidden_act="silu", max_position_embeddings=262144, eos_token_id=248044, dtype="bfloat16",
                layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)],
                rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                 "mrope_section": [11, 11, 10], "mrope_interleaved": True},
                mtp_num_hidden_layers=int(mtp), mtp_use_dedicated_embeddings=False)
    vision = dict(vision, model_type="qwen3_5_vision", out_hidden_size=s["hidden_size"], patch_size=16,
                  temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304, in_channels=3,
                  hidden_act="gelu_pytorch_tanh")
    return {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "text_config": text,
            "vision_config": vision, "tie_word_embeddings": tie, "image_token_id": 248056,
            "video_token_id": 248057, "vision_start_token_id": 248053, "vision_end_token_id": 248054}


def _shapes(config: dict) -> dict[str, torch.Size]:
    """Official tensor names and shapes, from the reference model built on the meta device."""
    import transformers as tf

    with torch.device("meta"):
        model = tf.Qwen3_5ForConditionalGeneration(tf.Qwen3_5Config(**config))
    shapes = {name: p.shape for name, p in model.named_parameters()}  # a tied lm_head is listed once, as embed
    text = config["text_config"]
    if text.get("mtp_num_hidden_layers"):  # the reference has no MTP module: its one layer is shaped like an
        h, layer = text["hidden_size"], text["layer_types"].index("full_attention")  # attention layer of the body
        body = f"model.language_model.layers.{layer}."
        shapes |= {"mtp.layers.0." + n[len(body):]: s for n, s in shapes.items() if n.startswith(body)}
        shapes |= {"mtp.fc.weight": torch.Size([h, 2 * h])} | {
            f"mtp.{n}.weight": torch.Size([h]) for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")}
    return shapes


def _random(name: str, shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    """Values in the ranges real weights have: small normals, norm weights near their identity, sane decays."""
    if name.endswith("A_log"):
        return torch.empty(shape).uniform_(-1.0, 1.0, generator=g)
    if name.endswith("dt_bias"):
        return torch.ones(shape)
    if len(shape) == 1:
        return torch.ones(shape) if "visual" in name or "linear_attn.norm" in name else torch.zeros(shape)
    return torch.randn(shape, generator=g) * 0.02


def write_checkpoint(size: str, out: Path, seed: int = 0, mtp: bool = False) -> Path:
    """Write the checkpoint (skipped when `out` already holds a finished one) and the real tokenizer."""
    out = Path(out)
    if (out / "model.safetensors.index.json").exists():
        return out
    from qwen35.tokenizer.vocab import build_qwen35_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    config = official_config(size, mtp)
    groups: list[dict[str, torch.Size]] = [{}]  # tensors per shard, planned first so the names say the count
    filled = 0
    for name, shape in _shapes(config).items():
        if filled >= SHARD_BYTES:
            groups.append({})
            filled = 0
        groups[-1][name] = shape
        filled += shape.numel() * 2
    g = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: _random(n, s, g).to(torch.bfloat16) for n, s in group.items()}, str(out / file),
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [248046, 248044]}) + "\n")
    build_qwen35_tokenizer(out)
    index = {"metadata": {"total_size": sum((out / f).stat().st_size for f in set(weight_map.values()))},
             "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def quantized(size: str, variant: str, cache: Path, flags: list[str], mtp: bool = False) -> Path:
    """`size` in `cache`: the shape-true bf16 checkpoint (written when missing) for variant "bf16", else its
    `qwen35 quantize --group-size 64 FLAGS` copy named by the variant, as the README quantizes."""
    tag = f"{size}-mtp" if mtp else size
    ckpt = write_checkpoint(size, cache / tag, mtp=mtp)
    if variant == "bf16":
        return ckpt
    out = cache / f"{tag}-{variant}"
    if not (out / "config.json").exists():
        print(f"  quantizing {size} to {variant} …", flush=True)
        subprocess.run([sys.executable, "-m", "qwen35", "quantize", str(ckpt), str(out), "--group-size", "64",
                        *flags], check=True)
    return out


if __name__ == "__main__":
    print(write_checkpoint(sys.argv[1], Path(sys.argv[2]).expanduser()))
