"""The multi-token-prediction head (`mtp.*`) through loading, saving and quantizing: kept bit-exact, absent when a
checkpoint strips it, an error when part of it is missing, quantized by the body's rules, written back under the
official names."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import VOCAB
from qwen35.loading import CheckpointError, load_model, save_model
from qwen35.memory import weight_bytes
from qwen35.models.qwen3_5 import rotary_cos_sin
from qwen35.quant import Int4Linear, Int8Linear, QuantConfig, quantize, quantize_checkpoint
from qwen35.quant.quantize import QuantExperts

NAMES = ["dense-tied", "moe-untied"]
EXPERT = re.compile(r"^mtp\.layers\.0\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _copy(reference_checkpoint, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(reference_checkpoint(name)[0], dst)
    return dst


def _rewrite(ckpt: Path, edit) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def _mtp_in_file(ckpt: Path) -> dict[str, torch.Tensor]:
    return {k: t for k, t in load_file(ckpt / "model.safetensors").items() if k.startswith("mtp.")}


def _ours(model, name: str) -> torch.Tensor:
    """The loaded tensor an official `mtp.*` name maps to (per-expert names: their rows of the stacked experts)."""
    if m := EXPERT.match(name):
        experts, e = model.mtp.layers[0].mlp.experts, int(m[1])
        if m[2] == "down_proj":
            return experts.down_proj[e]
        gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
        return gate if m[2] == "gate_proj" else up
    return model.get_parameter(name)


def _head_input(model, batch: int = 2, t: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings of tokens 1..t, the body's final hidden states of tokens 0..t-1) for `batch` sequences."""
    ids = torch.randint(0, VOCAB, (batch, t + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.embed_tokens(ids[:, 1:]), model.features(ids[:, :-1])


def _head_output(model, inputs: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`model.mtp` on a small input (default: the model's own `_head_input`), without a cache."""
    embeds, hidden = _head_input(model) if inputs is None else inputs
    positions = torch.arange(hidden.shape[1])[None, None].expand(3, *hidden.shape[:2])
    with torch.no_grad():
        return model.mtp(embeds, hidden, rotary_cos_sin(model.config, positions, hidden.dtype), None, None)


@pytest.mark.parametrize("name", NAMES)
def test_loading_keeps_every_mtp_tensor_bit_exact(reference_checkpoint, name):
    ckpt = reference_checkpoint(name)[0]
    assert json.loads((ckpt / "config.json").read_text())["text_config"]["mtp_num_hidden_layers"] == 1
    model = load_model(ckpt, dtype=torch.float32)
    stored = _mtp_in_file(ckpt)
    assert model.mtp is not None and len(stored) >= 15
    for official, tensor in stored.items():
        assert torch.equal(_ours(model, official), tensor), official
    assert not any(p.is_meta for p in model.mtp.parameters())
    assert model.mtp.layers[0].layer_type == "full_attention"


def test_fused_mtp_experts_load_and_quantize_like_per_expert_ones(reference_checkpoint, tmp_path):
    """The head's routed experts stored fused (`experts.gate_up_proj` (E, 2I, H), `experts.down_proj` (E, H, I)),
    as in Qwen3.6-35B-A3B's index, load and quantize to what the per-expert layout gives."""
    src = reference_checkpoint("moe-untied")[0]
    fused = _copy(reference_checkpoint, "moe-untied", tmp_path)

    def fuse(t: dict[str, torch.Tensor]) -> None:
        n = sum(1 for k in t if EXPERT.match(k) and k.endswith("down_proj.weight"))
        per = {k: t.pop(k) for k in list(t) if EXPERT.match(k)}
        base = "mtp.layers.0.mlp.experts"
        t[f"{base}.gate_up_proj"] = torch.stack([torch.cat([per[f"{base}.{e}.gate_proj.weight"],
                                                            per[f"{base}.{e}.up_proj.weight"]]) for e in range(n)])
        t[f"{base}.down_proj"] = torch.stack([per[f"{base}.{e}.down_proj.weight"] for e in range(n)])

    _rewrite(fused, fuse)
    a, b = load_model(src, dtype=torch.float32), load_model(fused, dtype=torch.float32)
    assert all(torch.equal(p, q) for p, q in zip(a.mtp.parameters(), b.mtp.parameters(), strict=True))
    cfg = QuantConfig(4, 32)
    qa = load_model(quantize_checkpoint(src, tmp_path / "qa", cfg, dtype=torch.float32), dtype=torch.float32)
    qb = load_model(quantize_checkpoint(fused, tmp_path / "qb", cfg, dtype=torch.float32), dtype=torch.float32)
    assert isinstance(qb.mtp.layers[0].mlp.experts, QuantExperts)
    assert torch.equal(_head_output(qa), _head_output(qb))


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_without_mtp_tensors_loads_without_the_head(reference_checkpoint, tmp_path, caplog, name):
    """Re-uploads strip `mtp.*` but keep `mtp_num_hidden_layers: 1`: the model loads, `mtp` is None, one info line
    says why; so does its quantized form."""
    full = reference_checkpoint(name)[0]
    ckpt = _copy(reference_checkpoint, name, tmp_path)
    _rewrite(ckpt, lambda t: [t.pop(k) for k in list(t) if k.startswith("mtp.")])
    with caplog.at_level("INFO", logger="qwen35.loading.checkpoint"):
        model = load_model(ckpt, dtype=torch.float32)
    assert model.mtp is None
    lines = [r.getMessage() for r in caplog.records if "speculative decoding is unavailable" in r.getMessage()]
    assert len(lines) == 1 and "mtp" in lines[0]
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), load_model(full, dtype=torch.float32)(ids))
    quantized = load_model(quantize_checkpoint(ckpt, tmp_path / "q", QuantConfig(8)), dtype=torch.float32)
    assert quantized.mtp is None


def test_mtp_tensors_beyond_the_config_are_skipped(reference_checkpoint, tmp_path, caplog):
    """A config without the head (mtp_num_hidden_layers 0) loads none of it, as before, and says so."""
    ckpt = _copy(reference_checkpoint, "dense-tied", tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["text_config"]["mtp_num_hidden_layers"] = 0
    (ckpt / "config.json").write_text(json.dumps(raw))
    with caplog.at_level("INFO", logger="qwen35.loading.checkpoint"):
        model = load_model(ckpt)
    assert model.mtp is None and "under mtp.: multi-token-prediction head" in caplog.text
    dst = quantize_checkpoint(ckpt, tmp_path / "q", QuantConfig(8))
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(k.startswith("mtp.") for k in index)


@pytest.mark.parametrize("name, drop, message", [
    ("dense-tied", ["mtp.layers.0.self_attn.k_norm.weight"],
     r"multi-token-prediction head is incomplete: missing tensor\(s\) \['mtp\.layers\.0\.self_attn\.k_norm\.weight'\]"),
    ("dense-tied", ["mtp.fc.weight", "mtp.norm.weight"],
     r"missing tensor\(s\) \['mtp\.fc\.weight', 'mtp\.norm\.weight'\]"),
    ("moe-untied", ["mtp.layers.0.mlp.experts.3.up_proj.weight"],
     r"'mtp\.layers\.0\.mlp\.experts': expected (quantized )?gate/up/down weights for experts 0\.\.5"),
    ("moe-untied", ["mtp.layers.0.mlp.shared_expert_gate.weight"], r"mtp\.layers\.0\.mlp\.shared_expert_gate\.weight"),
])
@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "int8"])
def test_partial_mtp_head_is_an_error_naming_the_tensor(reference_checkpoint, tmp_path, name, drop, message,
                                                         quantized):
    ckpt = _copy(reference_checkpoint, name, tmp_path)
    _rewrite(ckpt, lambda t: [t.pop(k) for k in drop])
    if quantized:
        ckpt = quantize_checkpoint(ckpt, tmp_path / "q", QuantConfig(8))
    with pytest.raises(CheckpointError, match=message):
        load_model(ckpt)


def _quantized_kinds(model) -> dict[str, type]:
    return {n: type(m) for n, m in model.mtp.named_modules() if isinstance(m, (nn.Linear, Int8Linear, Int4Linear,
                                                                              QuantExperts))}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_keeps_and_quantizes_the_head(reference_checkpoint, tmp_path, name, bits):
    """`quantize_checkpoint` stores the head's large linears and experts quantized (norms, router and shared-expert
    gate as they are), loading restores them, the result is the in-memory `quantize`'s (fp32), and the head's
    output stays close to the bf16 head's on the same input."""
    src = reference_checkpoint(name)[0]
    cfg = QuantConfig(bits, 32)
    dst = quantize_checkpoint(src, tmp_path / "q", cfg)  # bf16
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    mtp = {k for k in index if k.startswith("mtp.")}
    assert {"mtp.fc.qweight", "mtp.fc.scales", "mtp.layers.0.self_attn.q_proj.qweight",
            "mtp.layers.0.self_attn.o_proj.qweight", "mtp.norm.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight",
            "mtp.layers.0.self_attn.q_norm.weight", "mtp.layers.0.input_layernorm.weight"} <= mtp
    assert not any(k.endswith(("fc.weight", "_proj.weight")) and "shared_expert_gate" not in k for k in mtp)
    if name.startswith("moe"):
        assert {"mtp.layers.0.mlp.experts.5.down_proj.qweight", "mtp.layers.0.mlp.gate.weight",
                "mtp.layers.0.mlp.shared_expert_gate.weight", "mtp.layers.0.mlp.shared_expert.up_proj.qweight"} <= mtp

    base = load_model(src, dtype=torch.bfloat16)
    loaded = load_model(dst, dtype=torch.bfloat16)
    kinds = _quantized_kinds(loaded)
    assert kinds["fc"] in (Int8Linear, Int4Linear) and kinds["layers.0.self_attn.k_proj"] in (Int8Linear, Int4Linear)
    if name.startswith("moe"):
        assert kinds["layers.0.mlp.experts"] is QuantExperts and issubclass(kinds["layers.0.mlp.gate"], nn.Linear)
        assert issubclass(kinds["layers.0.mlp.shared_expert_gate"], nn.Linear)
    else:
        assert kinds["layers.0.mlp.down_proj"] in (Int8Linear, Int4Linear)
    assert loaded.mtp.norm.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.mtp.pre_fc_norm_hidden.weight, base.mtp.pre_fc_norm_hidden.weight)
    in_memory = quantize(load_model(src, dtype=torch.float32), bits, 32)
    assert _quantized_kinds(in_memory) == kinds
    fp32 = load_model(quantize_checkpoint(src, tmp_path / "q32", cfg, dtype=torch.float32), dtype=torch.float32)
    assert torch.equal(_head_output(fp32), _head_output(in_memory))
    inputs = _head_input(base, batch=8, t=1)  # a draft step's shape (see the report on multi-row int4 products)
    out, want = _head_output(loaded, inputs), _head_output(base, inputs)
    error = ((out.float() - want.float()).norm() / want.float().norm()).item()
    assert error < (0.03 if bits == 8 else 0.15), error


@pytest.mark.parametrize("name", NAMES)
def test_save_then_load_round_trip_keeps_the_head(reference_checkpoint, tmp_path, name):
    src = reference_checkpoint(name)[0]
    model = load_model(src, dtype=torch.float32)
    out = save_model(model, tmp_path / "saved", torch.float32)
    assert json.loads((out / "config.json").read_text())["text_config"]["mtp_num_hidden_layers"] == 1
    written, official = _mtp_in_file(out), _mtp_in_file(src)
    assert sorted(written) == sorted(official)  # the official names, per-expert experts included
    assert all(torch.equal(written[k], official[k]) for k in official)
    again = load_model(out, dtype=torch.float32)
    assert all(torch.equal(p, q) for p, q in zip(model.mtp.parameters(), again.mtp.parameters(), strict=True))
    assert torch.equal(_head_output(model), _head_output(again))


@pytest.mark.parametrize("name", NAMES)
def test_planned_weights_count_the_head(reference_checkpoint, name):
    model = load_model(reference_checkpoint(name)[0], dtype=torch.float32)
    params = {id(p): p for p in model.parameters()}
    assert weight_bytes(model.config, 4) == sum(p.numel() * 4 for p in params.values())
    head = sum(p.numel() for p in model.mtp.parameters())
    assert weight_bytes(model.config, 2) - weight_bytes(replace(model.config, mtp_num_hidden_layers=0), 2) == 2 * head
    cfg = QuantConfig(4, 32)
    assert (weight_bytes(model.config, 2, cfg) - weight_bytes(replace(model.config, mtp_num_hidden_layers=0), 2, cfg)
            < head)  # stored quantized: under a byte a weight
