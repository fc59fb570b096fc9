"""GGUF: the built-in model exported and loaded back (F16 / Q8_0 / Q4_0), per-type weight conversion, entry points.

Exports go through `qwen35.loading.gguf_export`, loads through `qwen35.load`; parity with llama.cpp's own converter
and runtime is in test_gguf_parity.py.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

import qwen35
from qwen35.loading.gguf import open_gguf
from qwen35.loading.gguf_export import export_gguf
from qwen35.loading.gguf_quant import quant_parts
from qwen35.quant.linear import dequantize

TEXTS = ["Hello, how are you?",
         "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
         "def f(x):\n\treturn x ** 2  # square\r\n", "café cafe\u0301 3.14159 ２０２４年 你好 👨‍👩‍👧", "   \n\n\n"]


@pytest.fixture(scope="module")
def nano():
    return qwen35.load(None, dtype="float32", cache_ram=0)


@pytest.fixture(scope="module")
def exported(nano, tmp_path_factory):
    """nano as F16, Q8_0 and Q4_0 files."""
    root = tmp_path_factory.mktemp("gguf")
    return {k: export_gguf(nano.model, nano.tokenizer, root / f"nano-{k}.gguf", k, nano.defaults)
            for k in ("f16", "q8_0", "q4_0")}


def forward(m, text: str = TEXTS[1]) -> torch.Tensor:
    with torch.no_grad():
        return m.model.forward(torch.tensor([m.tokenizer.encode(text)]))[0]


def test_f16_round_trip_matches_the_checkpoint(nano, exported):
    g = qwen35.load(exported["f16"], dtype="float32", cache_ram=0)
    assert replace(g.config, model_type=nano.config.model_type) == nano.config  # text-only type in a GGUF
    ours, theirs = dict(g.model.named_parameters()), dict(nano.model.named_parameters())
    assert ours.keys() == theirs.keys() and any(k.startswith("mtp.") for k in ours)
    for name, p in theirs.items():  # nano is bf16: exact in f16 unless tiny; the norms go through +1 and -1
        assert torch.allclose(ours[name], p, rtol=1e-3, atol=1e-6), name
    assert (forward(g) - forward(nano)).abs().max() < 1e-3
    for text in TEXTS:
        assert g.tokenizer.encode(text) == nano.tokenizer.encode(text)
    assert g.tokenizer.chat_template == nano.tokenizer.chat_template
    assert set(g.tokenizer.eos_token_ids) == set(nano.tokenizer.eos_token_ids)
    assert g.defaults == nano.defaults
    messages = [{"role": "user", "content": "Name a colour."}]
    assert g.chat(messages, max_tokens=12, temperature=0).text == nano.chat(messages, max_tokens=12,
                                                                             temperature=0).text


def _file_weight(path, name: str) -> np.ndarray:
    t = open_gguf(path).tensors[name]
    return gguf.quants.dequantize(t.data, t.tensor_type)


def test_q4_0_is_relaid_without_rounding(exported):
    """float32 load: our int4 weight equals llama.cpp's dequantized Q4_0 bit for bit; bf16: only the fp16 block
    scale is rounded (<= 2^-9 relative), and the bf16 weight read back once more."""
    name = "blk.0.ffn_up.weight"
    want = torch.from_numpy(_file_weight(exported["q4_0"], name))
    for dtype, tol in (("float32", 0.0), ("bfloat16", 2 ** -8)):
        m = qwen35.load(exported["q4_0"], dtype=dtype, cache_ram=0)
        layer = m.model.layers[0].mlp.up_proj
        assert type(layer).__name__ == "Int4Linear" and layer.group_size == 32
        got = layer.rows(slice(None)).float()
        assert ((got - want).abs() <= tol * want.abs() + 1e-12).all(), dtype


def test_q8_0_becomes_int8_with_one_rounding(exported):
    name = "blk.0.ffn_down.weight"
    want = torch.from_numpy(_file_weight(exported["q8_0"], name))
    m = qwen35.load(exported["q8_0"], dtype="float32", cache_ram=0)
    layer = m.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "Int8Linear"
    step = want.abs().amax(dim=1, keepdim=True) / 127
    assert ((layer.rows(slice(None)).float() - want).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_files_generate(nano, exported, kind):
    g = qwen35.load(exported[kind], dtype="bfloat16", cache_ram=0)
    logits, ref = forward(g).float(), forward(nano)
    assert torch.isfinite(logits).all()
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= (0.9 if kind == "q8_0" else 0.6), agree


# per type: (block bytes, byte offsets of fp16 scales in a block), llama.cpp's layouts (ggml-common.h)
BLOCKS = {"Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)), "Q6_K": (210, (208,)), "IQ4_NL": (18, (0,)),
          "IQ4_XS": (136, (0,)), "Q5_0": (22, (0,)), "Q2_K": (84, (80, 82)), "Q3_K": (110, (108,))}


@pytest.mark.parametrize("kind", sorted(BLOCKS))
def test_k_and_iq_types_dequantize_then_requantize(kind):
    """Random blocks of each type: our layer's weight is gguf's dequantization, rounded once to int4 g32 (<= 4-bit
    types) or int8 per row (more bits)."""
    size, scales = BLOCKS[kind]
    qtype = gguf.GGMLQuantizationType[kind]
    per_block = gguf.GGML_QUANT_SIZES[qtype][0]
    rows, cols = 32, 512
    raw = np.random.default_rng(0).integers(0, 256, (rows, cols // per_block, size), dtype=np.uint8)
    for offset in scales:  # sane fp16 scales (random bytes would be NaN or huge)
        raw[..., offset:offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    data = raw.reshape(rows, -1)
    t = SimpleNamespace(name="w", tensor_type=qtype, shape=np.array([cols, rows]))
    parts = quant_parts(t, data, torch.float32)
    want = torch.from_numpy(gguf.quants.dequantize(data, qtype))
    got = dequantize(parts, 32)
    if "zeros" in parts:
        bound = parts["scales"].repeat_interleave(32, dim=1) / 2
        assert gguf.GGML_QUANT_SIZES[qtype][1] * 8 / per_block <= 4.6
    else:
        bound = parts["scales"][:, None].expand_as(want) / 2
    assert ((got - want).abs() <= bound * (1 + 1e-5) + 1e-6).all()


def test_cli_info_and_chat_take_a_gguf(exported):
    info = subprocess.run([sys.executable, "-m", "qwen35", "info", "-m", str(exported["q4_0"])],
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "GGUF tensors" in info.stdout and "Q4_0" in info.stdout
    chat = subprocess.run([sys.executable, "-m", "qwen35", "chat", "-m", str(exported["f16"]), "-p", "Hi",
                           "--temperature", "0", "--max-tokens", "8"], capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()


def test_export_command_writes_each_type(tmp_path):
    out = tmp_path / "nano.gguf"
    done = subprocess.run([sys.executable, "-m", "qwen35", "export", "--gguf", str(out), "--type", "q8_0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    types = {t.tensor_type.name for t in open_gguf(out).tensors.values()}
    assert types == {"F32", "F16", "Q8_0"}


def test_export_of_a_quantized_model(tmp_path):
    """Our int4 checkpoint (g32, int8 head) exported as F16: the file holds its dequantized weights, so the model
    loaded back computes what the quantized one computes."""
    q = qwen35.quantize(qwen35.load(None, dtype="bfloat16", cache_ram=0), bits=4, group_size=32, head=8)
    g = qwen35.load(export_gguf(q.model, q.tokenizer, tmp_path / "int4.gguf", "f16"), dtype="bfloat16", cache_ram=0)
    ours, theirs = forward(g).float(), forward(q).float()
    assert (ours - theirs).abs().max() < 0.05 * (theirs.max() - theirs.min())
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9
