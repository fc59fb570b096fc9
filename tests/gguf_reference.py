"""llama.cpp's side of the GGUF tests: its converter (from the llama-cpp-python source distribution, as
benchmarks/cpu_engines.py fetches it) and tiny random checkpoints with the real Qwen3.5 vocabulary, which the
converter needs (it identifies the pre-tokenizer by hashing the real token ids)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from conftest import make_reference, write_mtp
from qwen35.loading.gguf_tokenizer import PRE_TOKENIZERS
from qwen35.tokenizer import Tokenizer
from qwen35.tokenizer.vocab import SPECIAL_TOKENS, bytes_to_unicode

LLAMA_SRC = "llama-cpp-python==0.3.36"
CACHE = Path(os.environ.get("QWEN35_LLAMA_SRC", Path.home() / ".cache" / "qwen35-bench" / "src"))
REAL_VOCAB = 248320


def llama_source() -> Path:
    """llama.cpp as vendored by the llama-cpp-python sdist (converter + gguf-py); fetched once with pip (only the
    files the converter needs are unpacked), or the test is skipped when PyPI cannot be reached."""
    found = sorted(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if found:
        return found[-1].parent
    CACHE.mkdir(parents=True, exist_ok=True)
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                          LLAMA_SRC, "-d", str(CACHE)], capture_output=True, text=True)
    archives = sorted(CACHE.glob("llama_cpp_python-*.tar.gz"))
    if got.returncode or not archives:
        pytest.skip(f"llama.cpp's converter is not cached in {CACHE} and `pip download {LLAMA_SRC}` failed")
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(archives[-1]) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name
                   and m.name.split("/vendor/llama.cpp/", 1)[1].startswith(wanted)]
        tar.extractall(CACHE, members=members, filter="data")
    return sorted(CACHE.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))[-1].parent


def real_vocab_checkpoint(name: str, path: Path, tokenizer_dir: Path):
    """The tiny reference model `name` (tests/conftest.py) with the real 248,320-row vocabulary and an MTP head,
    saved in the official layout beside the real tokenizer files; returns the transformers model."""
    import conftest

    vocab, conftest.VOCAB = conftest.VOCAB, REAL_VOCAB
    try:
        ref = make_reference(name)
    finally:
        conftest.VOCAB = vocab
    ref.save_pretrained(path)
    write_mtp(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return ref


def convert(ckpt: Path, out: Path, outtype: str = "f16", mmproj: bool = False) -> Path:
    """llama.cpp's own `convert_hf_to_gguf.py` on a checkpoint directory (`mmproj`: its vision projector)."""
    src = llama_source()
    done = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(ckpt), "--outtype", outtype,
                           "--outfile", str(out)] + ["--mmproj"] * mmproj, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(src / "gguf-py")})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def llama_quantize(f16: Path, out: Path, ftype: str) -> Path:
    """llama.cpp's quantizer (llama-cpp-python's binding), e.g. ftype "Q4_K_M"."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) == 0, ftype
    return out


def tiny_tokenizer() -> Tokenizer:
    """Byte-level BPE over the 256 bytes (no merges) with Qwen3.5's pre-tokenizer and special tokens."""
    hf = HFTokenizer(BPE({c: b for b, c in bytes_to_unicode().items()}, []))
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZERS["qwen35"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return Tokenizer(hf, "{% for m in messages %}{{ m.content }}{% endfor %}", [256])
