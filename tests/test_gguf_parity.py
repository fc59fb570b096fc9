"""GGUF parity with llama.cpp itself.

* Its converter (`convert_hf_to_gguf.py`, fetched with the llama-cpp-python sdist) on tiny random checkpoints with
  the real vocabulary, dense and MoE: our logits from the F16 file equal transformers' on the original with the
  file's f16 rounding applied; tokenizer, chat template and the MTP head come through.
* Its runtime (llama-cpp-python, built from source by `make bench`: 30 min on 2 cores, too long for CI, so these
  skip without it): our logits against llama.cpp's on the same Q8_0 / Q4_0 files and on files we export, and the
  greedy token at each of 32 steps (equal unless the top two are closer than the logit difference: a tie).
"""

from __future__ import annotations

import copy
import json
import shutil

import gguf
import numpy as np
import pytest
import torch

import qwen35
from gguf_reference import convert, llama_quantize, real_vocab_checkpoint, tiny_tokenizer
from qwen35.files import CheckpointError, checkpoint_name
from qwen35.loading import load_model, load_vision, preprocessor_config
from qwen35.loading.gguf import gguf_config, open_gguf
from qwen35.loading.gguf_export import export_gguf
from qwen35.loading.gguf_names import EXPERT_MARK, name_map
from qwen35.models import Qwen35Model
from qwen35.tokenizer import Tokenizer, build_qwen35_tokenizer
from qwen35.vision import ImageProcessor

PROMPT = "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n<|im_start|>assistant\n"
TEXTS = [PROMPT, "Hello world! 你好 café cafe\u0301", "def f(x):\n\treturn x ** 2\r\n", "👨‍👩‍👧‍👦 ２０２４年 'll 'D",
         "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen35-tokenizer")
    build_qwen35_tokenizer(path)
    return path


def f16_rounded(ref, gguf_path) -> None:
    """Round the reference's weights as the file stores them (F16 tensors only), in place."""
    f = open_gguf(gguf_path)
    with torch.device("meta"):
        meta = Qwen35Model(gguf_config(f))
    types = {}
    for g, ours in name_map(meta, f.arch).items():
        if g in f.tensors:
            if EXPERT_MARK in ours:
                prefix, part = ours.split(EXPERT_MARK)
                ours = f"{prefix}.{'down_proj' if part == 'down' else 'gate_up_proj'}"
            types[ours] = f.tensors[g].tensor_type.name
    with torch.no_grad():
        for name, p in ref.named_parameters():
            ours = checkpoint_name(name)
            if ours is not None and types.get(ours) == "F16":
                p.copy_(p.half().float())


@pytest.mark.parametrize("name", ["dense-tied", "moe-untied"])
def test_converter_f16_file_matches_transformers(name, converted):
    ckpt, path, ref = converted(name)
    ref = copy.deepcopy(ref)
    ours = qwen35.load(path, dtype="float32", cache_ram=0)
    direct = qwen35.load(ckpt, dtype="float32", cache_ram=0)
    ids = torch.tensor([direct.tokenizer.encode(PROMPT)])
    f16_rounded(ref, path)
    with torch.no_grad():
        want = ref(input_ids=ids).logits[0]
        got = ours.model.forward(ids)[0]
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    mtp, mtp_direct = ours.model.mtp.state_dict(), direct.model.mtp.state_dict()
    for key, value in mtp_direct.items():  # the head: f16-rounded matrices, norms through +1 and -1
        assert torch.allclose(mtp[key], value, rtol=1e-3, atol=1e-6), key
    for text in TEXTS:
        assert ours.tokenizer.encode(text) == direct.tokenizer.encode(text), text
    assert ours.tokenizer.chat_template == direct.tokenizer.chat_template
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.tokenizer.encode_chat(messages) == direct.tokenizer.encode_chat(messages)


def test_mmproj_vision_tower(reference_checkpoint, tmp_path):
    """llama.cpp's converter writes the vision projector of a tiny checkpoint; loaded beside a GGUF of its text
    model (given, or found next to it) it gives the checkpoint's own tower: same processor, same image features
    within f16 rounding."""
    source, _ = reference_checkpoint("dense-tied")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    (ckpt / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                                                               "patch_size": 16, "merge_size": 2}))
    mmproj = convert(ckpt, tmp_path / "mmproj-tiny.gguf", mmproj=True)
    text = export_gguf(load_model(ckpt, dtype=torch.float32), tiny_tokenizer(), tmp_path / "tiny.gguf", "f16")
    found = qwen35.load(text, dtype="float32", cache_ram=0)  # the only mmproj*.gguf beside it
    given = qwen35.load(text, dtype="float32", cache_ram=0, mmproj=mmproj)
    vision = load_vision(ckpt, dtype=torch.float32)
    assert found.processor == given.processor == ImageProcessor.from_config(preprocessor_config(ckpt), vision.config)
    grids = torch.tensor([[1, 4, 6]])
    x = torch.randn(24, vision.config.patch_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = vision(x, grids), given.vision(x, grids)
    assert (got - want).abs().max() < 1e-2 * want.abs().max()
    with pytest.raises(CheckpointError, match="not a vision projector"):
        qwen35.load(text, dtype="float32", cache_ram=0, mmproj=text)


def _llama(path, n_ctx: int = 256):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make bench builds it)")
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=1, n_threads_batch=1)


def _compare(path, tokenizer: Tokenizer, greedy: int = 32) -> tuple[float, int]:
    """qwen35 and llama.cpp on one file over a prompt and `greedy` tokens chosen by qwen35 (both read the same
    tokens): (the largest |logit difference| relative to the logit range, steps whose argmax differs although
    qwen35's top two are further apart than twice the largest difference seen, i.e. not a tie)."""
    llm = _llama(path)
    m = qwen35.load(path, dtype="float32", cache_ram=0, draft=0)
    ids = tokenizer.encode(PROMPT)
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    with torch.no_grad():
        ours = m.model.forward(torch.tensor([ids]))[0, :, :theirs.shape[1]].float()
    gap = (ours - theirs).abs().max().item()
    scale = (theirs.max() - theirs.min()).item()
    differ = 0
    for _ in range(greedy):
        theirs = torch.from_numpy(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
        with torch.no_grad():
            ours = m.model.forward(torch.tensor([ids]))[0, -1, :theirs.shape[0]].float()
        gap = max(gap, (ours - theirs).abs().max().item())
        top = ours.topk(2).values
        differ += int(ours.argmax() != theirs.argmax() and (top[0] - top[1]).item() > 2 * gap)
        ids.append(int(ours.argmax()))
        llm.eval([ids[-1]])
    return gap / scale, differ


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer_dir):
    """name -> (checkpoint directory, llama.cpp's F16 file of it, the transformers model), made once per module and
    worker."""
    made = {}

    def get(name: str):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            ref = real_vocab_checkpoint(name, root / "ckpt", tokenizer_dir)
            made[name] = root / "ckpt", convert(root / "ckpt", root / "F16.gguf"), ref
        return made[name]
    return get


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_llama_cpp_runs_our_export(kind, tmp_path):
    """The built-in model exported by us: llama.cpp reads it and computes what we compute."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make bench builds it)")
    nano = qwen35.load(None, dtype="float32", cache_ram=0)
    path = export_gguf(nano.model, nano.tokenizer, tmp_path / f"nano-{kind}.gguf", kind, nano.defaults)
    gap, differ = _compare(path, nano.tokenizer)
    assert gap < {"f16": 1e-3, "q8_0": 0.02, "q4_0": 0.05}[kind], gap
    assert differ == 0


@pytest.mark.parametrize("name", ["dense-tied", "moe-untied"])
@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0"])
def test_llama_cpp_quantized_file_same_logits(name, ftype, tmp_path, converted, monkeypatch):
    """llama.cpp's own converter and quantizer make the file. On these random models llama.cpp's arithmetic (8-bit
    activations in its quantized dot products) moves logits by 5-15% of their range from the file's exact
    dequantized weights, so the measure is that exact computation: qwen35 (Q4_0 re-laid exactly, Q8_0 and the
    quantizer's fallback types rounded once more) stays within twice llama.cpp's distance from it, its Q4_0 weights
    are the file's bit for bit, and it picks the same greedy tokens but for ties."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make bench builds it)")
    ckpt, f16, _ = converted(name)
    path = llama_quantize(f16, tmp_path / f"{ftype}.gguf", ftype)
    ids = Tokenizer.from_dir(ckpt).encode(PROMPT)
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1, n_threads_batch=1)
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    model = qwen35.load(path, dtype="float32", cache_ram=0, draft=0)
    ours = _logits(model, ids, theirs.shape[1])
    if ftype == "Q4_0":
        t = open_gguf(path).tensors["blk.3.attn_k.weight"]  # a full-attention layer in both configs
        assert t.tensor_type.name == "Q4_0"
        want = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
        assert torch.equal(model.model.layers[3].self_attn.k_proj.rows(slice(None)).float(), want)
    monkeypatch.setattr("qwen35.loading.gguf_load._parts", lambda *args: None)  # every tensor dequantized
    exact = _logits(qwen35.load(path, dtype="float32", cache_ram=0, draft=0), ids, theirs.shape[1])
    assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max()
    gap, differ = _compare(path, Tokenizer.from_dir(ckpt))
    assert differ == 0


def _logits(m, ids: list[int], vocab: int) -> torch.Tensor:
    with torch.no_grad():
        return m.model.forward(torch.tensor([ids]))[0, :, :vocab].float()
