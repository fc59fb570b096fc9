"""Shared fixtures: tiny random Qwen3.5 checkpoints written by the reference (`transformers`) in the official layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # tests run in parallel processes (pyproject: -n 2): one core each
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # and for the commands they start

ROPE = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25, "mrope_interleaved": True}

# name -> text_config overrides; each exercises a different head layout or block kind.
TINY_CONFIGS: dict[str, dict] = {
    "dense-tied": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                       linear_value_head_dim=16, intermediate_size=128, tie_word_embeddings=True,
                       rope_parameters={**ROPE, "mrope_section": [1, 1, 2]}),
    "dense-untied-mha": dict(hidden_size=48, num_hidden_layers=8, num_attention_heads=2, num_key_value_heads=2,
                             head_dim=64, linear_num_key_heads=3, linear_num_value_heads=3, linear_key_head_dim=8,
                             linear_value_head_dim=24, intermediate_size=96, tie_word_embeddings=False,
                             rope_parameters={**ROPE, "mrope_section": [3, 3, 2]}),
    "dense-gqa4": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                       head_dim=16, linear_num_key_heads=1, linear_num_value_heads=4, linear_key_head_dim=32,
                       linear_value_head_dim=8, intermediate_size=80, tie_word_embeddings=True,
                       rope_parameters={**ROPE, "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}),
    "moe-untied": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                       linear_value_head_dim=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, tie_word_embeddings=False,
                       rope_parameters={**ROPE, "mrope_section": [1, 1, 2]}),
}
VOCAB = 300


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that logits are spread (greedy ties cannot hide errors), decays in a useful range.

    Residual-branch outputs are scaled down by sqrt(2 * layers) as in GPT-2's init: with unit gain per branch a
    random deep net amplifies fp32 rounding (1e-7) layer after layer, in the reference as much as here.
    """
    g = torch.Generator().manual_seed(seed)
    n_layers = sum(1 for name, _ in model.named_parameters() if name.endswith("input_layernorm.weight"))
    residual_out = ("o_proj.weight", "out_proj.weight", "down_proj.weight", "down_proj")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(-2.0, 1.0, generator=g))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.ndim == 1:  # norm weights: zero-centred ones near 0, gated norm near 1
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith("linear_attn.norm.weight") else 0.0))
            else:
                fan_in = p.shape[-1]
                scale = (2 * n_layers) ** -0.5 if name.endswith(residual_out) else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * scale / fan_in ** 0.5)


def make_reference(name: str, seed: int = 0, causal_lm: bool = False):
    """The transformers model for a tiny config (multimodal class by default, as the official checkpoints)."""
    import transformers as tf

    text = dict(TINY_CONFIGS[name], vocab_size=VOCAB)
    moe = "num_experts" in text
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                  num_position_embeddings=64)
    tie = text["tie_word_embeddings"]
    if causal_lm:
        cls = tf.Qwen3_5MoeForCausalLM if moe else tf.Qwen3_5ForCausalLM
        config = (tf.Qwen3_5MoeTextConfig if moe else tf.Qwen3_5TextConfig)(**text)
    else:
        cls = tf.Qwen3_5MoeForConditionalGeneration if moe else tf.Qwen3_5ForConditionalGeneration
        config = (tf.Qwen3_5MoeConfig if moe else tf.Qwen3_5Config)(text_config=text, vision_config=vision,
                                                                    tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize_(model, seed)
    if tie:
        model.tie_weights()
    return model


def write_mtp(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Add a random multi-token-prediction head to a checkpoint written by `save_pretrained`, as every official
    checkpoint has one (the reference model ignores it): top-level `mtp.*` tensors (`fc` (H, 2H), the two pre-fc
    norms, `norm`) and one full-attention decoder layer `mtp.layers.0.*` named as the body's full-attention layers
    are in this file (routed experts per expert), and `mtp_num_hidden_layers: 1` in config.json. Returns them."""
    from safetensors.torch import load_file, save_file

    raw = json.loads((path / "config.json").read_text())
    text = raw.get("text_config", raw)  # multimodal, or text-only (CausalLM) layout
    file = path / "model.safetensors"
    tensors = load_file(file)
    body = next(p for p in ("model.language_model.", "model.") if f"{p}embed_tokens.weight" in tensors)
    layer = f"{body}layers.{text['layer_types'].index('full_attention')}."
    h = text["hidden_size"]
    shapes = {"mtp.fc.weight": (h, 2 * h), "mtp.pre_fc_norm_embedding.weight": (h,),
              "mtp.pre_fc_norm_hidden.weight": (h,), "mtp.norm.weight": (h,)}
    shapes |= {f"mtp.layers.0.{k[len(layer):]}": tuple(t.shape) for k, t in tensors.items() if k.startswith(layer)}
    g = torch.Generator().manual_seed(seed + 1000)
    dtype = tensors[f"{body}embed_tokens.weight"].dtype
    mtp = {}
    for name, shape in sorted(shapes.items()):  # norms near 0 (zero-centred), matrices ~ 1/sqrt(fan_in)
        scale = 0.1 if len(shape) == 1 else shape[-1] ** -0.5 * (0.5 if name.endswith(("o_proj.weight",
                                                                                         "down_proj.weight")) else 1)
        mtp[name] = (torch.randn(shape, generator=g) * scale).to(dtype)
    save_file(tensors | mtp, file, metadata={"format": "pt"})
    text.update(mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False)
    (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return mtp


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory):
    """name -> (directory, transformers model) written with save_pretrained; built once per session. The files
    hold a random MTP head (`write_mtp`) as the official ones do, unless `mtp=False`."""
    made: dict[tuple[str, bool, bool], tuple[Path, torch.nn.Module]] = {}

    def get(name: str, causal_lm: bool = False, mtp: bool = True) -> tuple[Path, torch.nn.Module]:
        key = (name, causal_lm, mtp)
        if key not in made:
            ref = make_reference(name, causal_lm=causal_lm)
            path = tmp_path_factory.mktemp(f"{name}{'-causal' if causal_lm else ''}{'' if mtp else '-nomtp'}")
            ref.save_pretrained(path)
            if mtp:
                write_mtp(path)
            made[key] = (path, ref)
        return made[key]

    return get



@pytest.fixture(scope="session")
def default_model():
    """The built-in nano model (packaged), in fp32."""
    from qwen35.api import load

    return load(None, dtype="float32", device="cpu")


@pytest.fixture()
def in_process(capsys, monkeypatch):
    """`qwen35 ARGS` run by `main` in this process, as a CompletedProcess: the same parser, commands and exit codes
    as the subprocess, without importing torch again (an uncaught exception fails the test, as a traceback would)."""
    import io
    import subprocess

    from qwen35.cli.main import main

    monkeypatch.setenv("COLUMNS", "120")

    def go(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = 0 if e.code is None else e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["qwen35", *args], code, out.out, out.err)

    return go
