"""Loader and config errors: every bad checkpoint gives a clear error naming the file and tensor, never a crash."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import VOCAB
from qwen35.config import ConfigError, load_config
from qwen35.loading import (CheckpointError, available_vision, load_model, preprocessor_config, resolve_checkpoint,
                            save_model)
from qwen35.sampling import SamplingParams


@pytest.fixture()
def ckpt(reference_checkpoint, tmp_path) -> Path:
    """A writable copy of a tiny official checkpoint."""
    src = reference_checkpoint("dense-tied")[0]
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _rewrite(ckpt: Path, edit) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def _logits(model, n=20):
    ids = torch.arange(n)[None] % VOCAB
    with torch.no_grad():
        return model(ids)


def test_sharded_checkpoint_equals_single_file(ckpt, tmp_path):
    tensors = load_file(ckpt / "model.safetensors")
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    shutil.copytree(ckpt, sharded)
    (sharded / "model.safetensors").unlink()
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, sharded / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = load_model(ckpt, dtype=torch.float32), load_model(sharded, dtype=torch.float32)
    assert torch.equal(_logits(a), _logits(b))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", torch.float16])
def test_dtypes(ckpt, dtype):
    model = load_model(ckpt, dtype=dtype)
    want = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    assert all(p.dtype == want for p in model.parameters())
    assert torch.isfinite(_logits(model)).all()


def test_tied_head_shares_embedding(ckpt):
    model = load_model(ckpt, dtype=torch.float32)
    assert model.lm_head.weight is model.embed_tokens.weight


def test_skips_vision_tensors_and_a_head_the_config_lacks(ckpt, caplog):
    """The vision tower loads apart; `mtp.*` tensors load only when config.json has the head (test_mtp_loading)."""
    _edit_config(ckpt, lambda t: t.update(mtp_num_hidden_layers=0))
    with caplog.at_level("INFO"):
        model = load_model(ckpt, dtype=torch.float32)
    assert model.mtp is None
    assert "mtp." in caplog.text and "model.visual." in caplog.text


def test_missing_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.language_model.layers.1.linear_attn.A_log"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.1\.linear_attn\.A_log"):
        load_model(ckpt)


def test_unexpected_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.language_model.layers.0.bogus.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.language_model\.layers\.0\.bogus"):
        load_model(ckpt)


def test_wrong_shape(ckpt):
    _rewrite(ckpt, lambda t: t.update({"model.language_model.norm.weight": torch.zeros(7)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.language_model\.norm\.weight' has shape \(7,\)"):
        load_model(ckpt)


def test_truncated_file_names_the_tensor(ckpt):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.*' is truncated"):
        load_model(ckpt)


@pytest.mark.parametrize("content", [b"", b"\x00" * 3, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}", b"\xff" * 64])
def test_garbage_file(ckpt, content):
    (ckpt / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*re-download"):
        load_model(ckpt)


def test_index_naming_a_missing_shard(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00002.safetensors"):
        load_model(ckpt)


def test_pickle_weights_are_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(ckpt)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="llama"), r"'model_type' = 'llama'"),
    (lambda c: c["text_config"].update(num_key_value_heads=3), r"'num_attention_heads' = 4 .*divisible by num_key_value_heads \(3\)"),
    (lambda c: c["text_config"].update(layer_types=["linear_attention"] * 3), r"'layer_types'.*exactly num_hidden_layers \(4\)"),
    (lambda c: c["text_config"].update(layer_types=["mamba"] * 4), r"'layer_types\[0\]' = 'mamba'"),
    (lambda c: c["text_config"].update(hidden_size=-5), r"'hidden_size' = -5"),
    (lambda c: c["text_config"].update(hidden_size="64"), r"'hidden_size' = '64'"),
    (lambda c: c["text_config"].pop("linear_num_key_heads"), r"'linear_num_key_heads' is missing"),
    (lambda c: c["text_config"]["rope_parameters"].update(rope_type="yarn"), r"rope_type' = 'yarn'"),
    (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[1, 1, 1]), r"mrope_section' = \[1, 1, 1\]"),
    (lambda c: c["text_config"].update(hidden_act="gelu"), r"'hidden_act' = 'gelu'"),
])
def test_bad_config_names_field_and_value(ckpt, edit, message):
    raw = json.loads((ckpt / "config.json").read_text())
    edit(raw)
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message):
        load_config(ckpt)


def test_corrupt_config_json(ckpt):
    (ckpt / "config.json").write_text("{ nope")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_config(ckpt)


def test_layer_pattern_from_interval_when_list_absent(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    raw["text_config"].pop("layer_types")
    raw["text_config"]["full_attention_interval"] = 2
    (ckpt / "config.json").write_text(json.dumps(raw))
    assert load_config(ckpt).layer_types == ("linear_attention", "full_attention") * 2


def test_save_then_load_round_trip(ckpt, tmp_path):
    model = load_model(ckpt, dtype=torch.float32)
    again = load_model(save_model(model, tmp_path / "again", torch.float32), dtype=torch.float32)
    assert torch.equal(_logits(model), _logits(again))


def test_repo_id_resolves_from_the_hf_cache(ckpt, tmp_path, monkeypatch):
    """A repo id is looked up in the normal Hugging Face cache (here a cache made by hand, offline)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = tmp_path / "hub"
    repo = hub / "models--Qwen--Qwen3.5-Tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(ckpt, repo / "snapshots" / ("0" * 40))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    path = resolve_checkpoint("Qwen/Qwen3.5-Tiny")
    assert (path / "config.json").exists()
    assert torch.isfinite(_logits(load_model(path))).all()


def test_repo_id_without_network_says_how_to_pass_a_path(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="no network connection.*pass the local directory"):
        resolve_checkpoint("Qwen/Qwen3.5-0.8B")


def test_bad_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a Hugging Face repo id"):
        resolve_checkpoint(str(tmp_path / "no" / "such" / "dir"))


def _edit_config(ckpt: Path, edit, where=lambda raw: raw["text_config"]) -> None:
    raw = json.loads((ckpt / "config.json").read_text())
    edit(where(raw))
    (ckpt / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("field, value, allowed", [
    ("max_position_embeddings", "4096", "an integer from 1 to"),  # loaded, then every request failed
    ("max_position_embeddings", -1, "an integer from 1 to"),
    ("rope_theta", 0, "a finite number > 0.0"),
    ("rms_norm_eps", float("nan"), "a finite number > 0.0"),
    ("hidden_size", True, "an integer"),
    ("head_dim", 32.0, "an integer"),
    ("tie_word_embeddings", "false", "one of \\[False, True\\]"),
    ("eos_token_id", "2", "an integer"),
    ("layer_types", ["linear_attention"] * 100_000, "a list of at most 1,024 items"),
])
def test_config_types_and_ranges_are_checked_at_load(ckpt, field, value, allowed):
    """Every config field is checked for type and range when the checkpoint loads, naming field, value and rule."""
    where = {"rope_theta": lambda raw: raw["text_config"]["rope_parameters"],
             "tie_word_embeddings": lambda raw: raw}.get(field, lambda raw: raw["text_config"])
    _edit_config(ckpt, lambda t: t.update({field: value}), where)
    with pytest.raises(ConfigError, match=rf"config\.json: config field '{field}(\[0\])?' = .* is not supported: "
                                          rf"{allowed}"):
        load_model(ckpt)


@pytest.mark.parametrize("layers", [10**9, 10**5])
def test_huge_layer_count_is_refused_before_anything_is_sized(ckpt, layers):
    """Without `layer_types` the pattern is built from num_hidden_layers: 10^9 grew 2.4 GB before any check."""
    _edit_config(ckpt, lambda t: (t.pop("layer_types"), t.update(num_hidden_layers=layers)))
    with pytest.raises(ConfigError, match=rf"'num_hidden_layers' = {layers} .*from 1 to 1,024"):
        load_model(ckpt)


@pytest.mark.parametrize("name, edit, message", [
    ("dense-tied", lambda t: (t.pop("layer_types"), t.update(num_hidden_layers=8)),
     r"num_hidden_layers = 8, but the weights hold 4 \(0\.\.3\) layers"),
    ("dense-tied", lambda t: t.update(vocab_size=301), r"vocab_size = 301, but embed_tokens\.weight .* \(300, 64\)"),
    ("moe-untied", lambda t: t.update(num_experts=8), r"num_experts = 8, but the weights hold 6 \(0\.\.5\) experts"),
])
def test_config_is_checked_against_the_weight_headers_before_the_model_is_built(reference_checkpoint, tmp_path,
                                                                                monkeypatch, name, edit, message):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference_checkpoint(name)[0], ckpt)
    _edit_config(ckpt, edit)

    def never(config):
        raise AssertionError("the model was built before config.json was compared with the weights")

    monkeypatch.setattr("qwen35.loading.checkpoint.Qwen35Model", never)
    with pytest.raises(CheckpointError, match=rf"config\.json: {message}.*do not match"):
        load_model(ckpt)


@contextmanager
def _writer_after(fifo: Path, seconds: float):
    """After `seconds`, a writer opens and closes the FIFO again and again, so code that opens it to read fails the
    test instead of hanging (a thread cannot rescue it: safetensors blocks in open() holding the GIL)."""
    writer = subprocess.Popen(["sh", "-c", f'sleep {seconds}; while :; do : > "$0"; done', str(fifo)])
    try:
        yield
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.parametrize("kind", ["fifo", "directory"])
@pytest.mark.parametrize("file, call", [
    ("config.json", load_model), ("model.safetensors", load_model), ("model.safetensors.index.json", load_model),
    ("preprocessor_config.json", preprocessor_config),
    ("generation_config.json", SamplingParams.from_generation_config),
])
def test_non_regular_files_are_refused_not_opened(ckpt, kind, file, call):
    path = ckpt / file
    path.unlink(missing_ok=True)
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    what = "a FIFO \\(named pipe\\)" if kind == "fifo" else "a directory"
    with _writer_after(path, 10), pytest.raises(ValueError, match=f"{file} is {what}, not a regular file"):
        call(ckpt)


@pytest.mark.parametrize("field, value", [("depth", 10**9), ("rope_parameters", {"rope_theta": "1e4"})])
def test_vision_config_types_and_ranges_are_checked_at_load(ckpt, field, value):
    """`load` reads the vision config (available_vision) before any image: a depth of 10^9 is refused there."""
    _edit_config(ckpt, lambda v: v.update({field: value}), lambda raw: raw["vision_config"])
    name = "depth" if field == "depth" else "rope_theta"
    with pytest.raises(ConfigError, match=rf"'vision_config\.{name}' = .* is not supported"):
        available_vision(ckpt)
