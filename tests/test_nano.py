"""The built-in nano model: official layout, the reference loads it with the same logits, the card is true."""

from __future__ import annotations

import json
import re

import pytest
import torch

from qwen35.default_model import default_model_path
from qwen35.loading import load_model


@pytest.fixture(scope="module")
def nano():
    return default_model_path()


def test_official_layout_and_size(nano):
    names = {p.name for p in nano.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", "MODEL_CARD.md"} <= names
    config = json.loads((nano / "config.json").read_text())
    assert config["model_type"] == "qwen3_5"
    types = config["text_config"]["layer_types"]
    assert types.count("linear_attention") == 3 * types.count("full_attention")
    assert sum(p.stat().st_size for p in nano.iterdir()) < 40 * 2**20
    params = sum(p.numel() for p in load_model(nano).parameters())
    assert 9e6 < params < 30e6


def test_transformers_loads_it_with_the_same_logits(nano):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(nano, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(nano)
    from qwen35.api import load

    ours = load(nano, dtype="float32", device="cpu")
    text = "The history of London begins with a Roman settlement on the Thames."
    ids = hf_tok(text).input_ids
    assert ids == ours.tokenizer.encode(text)
    with torch.no_grad():
        err = (ref(torch.tensor([ids])).logits[0] - ours.logits(ids)).abs().max().item()
    assert err <= 1e-4


def test_model_card_holds_the_measured_figures(nano):
    figures = json.loads((nano / "training_figures.json").read_text())
    card = (nano / "MODEL_CARD.md").read_text()
    q = figures["quality"]
    assert f"{100 * q['both']:.0f}%" in card and f"{100 * q['ended_with_im_end']:.0f}%" in card
    assert str(figures["pretrain"]["final"]["loss"]) in card and "qwen35 train nano" in card
    assert q["prompts"] == 50
    assert re.search(r"can and cannot do", card)


def test_chat_thinking_is_off_by_default(nano):
    from qwen35.tokenizer import Tokenizer

    prompt = Tokenizer.from_dir(nano).apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
