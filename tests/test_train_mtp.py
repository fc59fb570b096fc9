"""The multi-token-prediction head in training: its loss is logged and falls, head-only training leaves the body
bit-identical, draft accuracy is a rate (1.0 where drafts must match) and its chained draft is the cached one."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from qwen35.cache import make_cache
from qwen35.models import Qwen35Model
from qwen35.train.mtp import (chained_drafts, draft_accuracy, freeze_body, greedy_examples, head_objective,
                              save_with_head, with_head)
from qwen35.train.trainer import TrainConfig, init_weights, mtp_hidden, standard_objective, train
from test_train import TINY, VAL, WORKER, _free_port, batch_fn, tiny_model

TINY_MTP = dataclasses.replace(TINY, mtp_num_hidden_layers=1)


def tiny_mtp_model(seed: int = 0) -> Qwen35Model:
    model = Qwen35Model(TINY_MTP)
    init_weights(model, seed)
    return model


def test_mtp_loss_is_logged_and_falls(tmp_path):
    model = tiny_mtp_model()
    history = train(model, batch_fn, VAL, TrainConfig(steps=30, lr=1e-2, warmup_steps=5, eval_every=10,
                                                      log_every=10, save_every=1000), tmp_path, log=lambda _: None)
    assert all("mtp_loss" in r for r in history) and "val_mtp_loss" in history[-1]
    assert history[-1]["mtp_loss"] < history[0]["mtp_loss"] - 0.5
    assert history[-1]["val_mtp_loss"] < history[0]["mtp_loss"]


def test_mtp_loss_uses_the_token_after_next_where_it_has_a_target():
    model = tiny_mtp_model()
    x, y = batch_fn(0, 0, 0, 1)
    y = y.clone()
    y[:, :10] = -100  # like an SFT prompt: no loss there
    total, n, metrics = standard_objective(0.3)(model, (x, y))
    hidden = model.features(x)
    logits = model.lm_head(mtp_hidden(model, hidden[:, :-1], x[:, 1:]))
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(metrics["mtp_loss"], expected)
    torch.testing.assert_close(total, metrics["loss"] + 0.3 * metrics["mtp_loss"])
    assert n == int((y != -100).sum())


def test_head_only_training_leaves_the_body_bit_identical(tmp_path):
    body = tiny_model()
    model = with_head(body, seed=1)
    assert model.mtp is not None and body.mtp is None
    assert freeze_body(model) and all(n.startswith("mtp.") for n, p in model.named_parameters() if p.requires_grad)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in body.state_dict().items():
        assert torch.equal(v, before[k]), k
    history = train(model, batch_fn, VAL, TrainConfig(steps=20, lr=1e-2, warmup_steps=3, eval_every=10,
                                                      log_every=10, save_every=1000, weight_decay=0.1),
                    tmp_path, log=lambda _: None, objective=head_objective("self"))
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("mtp."):
            continue
        assert torch.equal(after[k], v), k
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("mtp."))
    assert history[-1]["mtp_loss"] < history[0]["mtp_loss"]
    assert "val_mtp_ce" in history[-1] and 0 <= history[-1]["mtp_agree"] <= 1


def test_draft_accuracy_is_one_where_drafts_must_match_and_a_rate_otherwise():
    model = tiny_mtp_model()
    batches = [batch_fn(i, 0, 0, 1) for i in range(2)]
    acc = draft_accuracy(model, batches)
    for k in ("depth_1", "depth_2", "chain_1", "chain_2"):
        assert 0.0 <= acc[k] <= 1.0
    assert acc["positions_1"] == sum(int((y[:, 1:] != -100).sum()) for _, y in batches)
    assert acc["chain_2"] <= min(acc["depth_1"], acc["depth_2"])
    with torch.no_grad():  # zero final norms: all logits 0, every argmax is token 0 for body and head alike
        model.norm.weight.fill_(-1.0)
        model.mtp.norm.weight.fill_(-1.0)
    acc = draft_accuracy(model, batches)
    assert acc["depth_1"] == acc["depth_2"] == acc["chain_2"] == 1.0


def test_chained_draft_equals_cached_draft_calls():
    """Depth 2 in one masked call = the head's cached first pass over positions 0..i, then its own token and state."""
    model = tiny_mtp_model(seed=3)
    x, _ = batch_fn(5, 0, 0, 1)
    x = x[:1, :12]
    with torch.no_grad():
        hidden, first, second = chained_drafts(model, x)
        d1 = model.lm_head(first).argmax(-1)
        for i in (0, 4, 10):
            cache = make_cache(model.config, draft_layers=1)
            pos = torch.arange(i + 1)[None]
            out = model.draft(x[:, 1:i + 2], hidden[:, :i + 1], cache, pos[None].expand(3, 1, i + 1),
                              torch.ones(1, i + 1, dtype=torch.bool))
            torch.testing.assert_close(out, first[:, :i + 1], atol=1e-5, rtol=1e-4)
            step = model.draft(d1[:, i:i + 1], first[:, i:i + 1], cache, torch.full((3, 1, 1), i + 1),
                               torch.ones(1, i + 2, dtype=torch.bool))
            torch.testing.assert_close(step, second[:, i:i + 1], atol=1e-5, rtol=1e-4)


def test_save_with_head_keeps_the_body_bytes(tmp_path):
    from qwen35.loading import save_model

    body = tiny_model()
    src = save_model(body, tmp_path / "src", torch.bfloat16)
    (src / "training_figures.json").write_text("{}")
    model = with_head(body)
    counts = save_with_head(src, model, tmp_path / "out")
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert set(b) - set(a) == {f"mtp.{k}" for k in model.mtp.state_dict()}
    assert counts["head_tensors"] == len(set(b) - set(a))
    for k, v in a.items():
        assert b[k].dtype == v.dtype and torch.equal(b[k], v), k
    assert all(b[k].dtype == torch.bfloat16 for k in b)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["mtp_num_hidden_layers"] == 1
    assert (tmp_path / "out" / "training_figures.json").read_text() == "{}"


MTP_WORKER = WORKER.replace("from test_train import tiny_model, batch_fn, VAL",
                            "from test_train_mtp import tiny_mtp_model as tiny_model\n"
                            "from test_train import batch_fn, VAL")


def test_two_gloo_processes_train_the_head_in_lockstep(tmp_path):
    """DDP and FSDP2 with the head: its loss runs outside the wrapped forward, its gradients still sync."""
    script = tmp_path / "worker.py"
    script.write_text(MTP_WORKER.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    start = tiny_mtp_model().state_dict()
    for kind in ("ddp", "fsdp2"):
        a = load_file(tmp_path / kind / "rank0.safetensors")
        b = load_file(tmp_path / kind / "rank1.safetensors")
        assert any(k.startswith("mtp.") for k in a), kind
        for name in a:
            assert torch.equal(a[name], b[name]), (kind, name)
        assert all(not torch.equal(a[n], start[n]) for n in a if n.startswith("mtp.") and a[n].ndim == 2), kind


def test_the_built_in_nano_ships_a_head_and_its_card_holds_the_figures():
    from qwen35.default_model import default_model_path

    nano = default_model_path()
    config = json.loads((nano / "config.json").read_text())
    assert config["text_config"]["mtp_num_hidden_layers"] == 1
    names = set(load_file(nano / "model.safetensors"))
    assert {"mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight",
            "mtp.layers.0.self_attn.q_proj.weight", "mtp.layers.0.mlp.down_proj.weight"} <= names
    m = json.loads((nano / "training_figures.json").read_text())["mtp"]
    card = (nano / "MODEL_CARD.md").read_text()
    assert "## Multi-token prediction head" in card and m["command"] in card
    greedy = m["draft_accuracy"]["greedy_heldout"]
    assert f"{100 * greedy['depth_1']:.1f}%" in card and f"{100 * greedy['depth_2']:.1f}%" in card
    assert 0 < greedy["chain_2"] <= greedy["depth_2"] <= greedy["depth_1"] <= 1


def test_the_head_learns_from_the_models_own_greedy_replies(default_model):
    """The training text is the model's greedy reply to each prompt, 16 replies at a time in the engine's batch:
    the same tokens as each prompt alone (`chat`, greedy), the loss on the reply only; and a checkpoint that
    has a head gets a new one (the recipe starts from scratch)."""
    qwen, prompts = default_model, ["Tell me about the sea.", "hi", "What is a hybrid model?"] * 6
    examples = greedy_examples(qwen.model, qwen.tokenizer, prompts, 12)
    assert len(examples) == len(prompts)
    for prompt, (ids, mask) in zip(prompts[:3], examples[:3]):
        alone = qwen.chat([{"role": "user", "content": prompt}], temperature=0, max_tokens=12, enable_thinking=False,
                          repetition_penalty=1.0)  # the card's default is 1.1; the drafts are plain greedy
        reply = ids[mask.index(1):]
        assert qwen.tokenizer.decode(reply, skip_special_tokens=True).strip() == alone.text.strip()
        assert mask == [0] * (len(ids) - len(reply)) + [1] * len(reply) and 0 < len(reply) <= 12
    fresh = with_head(qwen.model, seed=3)
    assert fresh is not qwen.model and not torch.equal(fresh.mtp.fc.weight, qwen.model.mtp.fc.weight)
