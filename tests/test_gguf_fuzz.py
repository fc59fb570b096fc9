"""Damaged and hostile GGUF files (the corruption classes of llama.cpp's test-gguf.cpp): every one is refused with a
`CheckpointError` naming the file and the problem, before anything large is allocated; none crashes the process.

The base file is a tiny Qwen3.5 (byte-level vocabulary, 4 layers, Q4_0 matrices) exported by qwen35, so each of
the 300+ mutated files loads in milliseconds; the loop runs in a fresh process that reports its peak memory.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import qwen35
from gguf_reference import tiny_tokenizer
from qwen35.config import ModelConfig
from qwen35.files import CheckpointError
from qwen35.loading.gguf import open_gguf
from qwen35.loading.gguf_export import export_gguf
from qwen35.models import Qwen35Model

CONFIG = dict(model_type="qwen3_5_text", vocab_size=320, hidden_size=32, num_hidden_layers=4,
              layer_types=["linear_attention"] * 3 + ["full_attention"], num_attention_heads=2, num_key_value_heads=1,
              head_dim=32, linear_num_key_heads=1, linear_num_value_heads=2, linear_key_head_dim=16,
              linear_value_head_dim=16, intermediate_size=64, tie_word_embeddings=True,
              rope_parameters={"rope_theta": 1e7, "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1]})


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Qwen35Model(ModelConfig.from_dict(CONFIG)).eval()
    return export_gguf(model, tiny_tokenizer(), tmp_path_factory.mktemp("fuzz") / "tiny.gguf", "q4_0")


def _u64(data: bytearray, offset: int, value: int) -> None:
    data[offset:offset + 8] = struct.pack("<Q", value % 2**64)


def mutations(path: Path) -> list[tuple[str, bytes]]:
    """(what, file bytes): truncations, random bytes in the header, and the targeted cases of test-gguf.cpp."""
    raw = path.read_bytes()
    f = open_gguf(path)
    data_start = min(t.data_offset for t in f.tensors.values())
    rng = np.random.default_rng(0)
    out = [(f"truncated to {n}", raw[:n]) for n in sorted(set(rng.integers(0, len(raw), 60).tolist()))]
    for i in range(140):
        b = bytearray(raw)
        for _ in range(int(rng.integers(1, 5))):
            b[int(rng.integers(0, data_start))] = int(rng.integers(0, 256))
        out.append((f"random header bytes #{i}", bytes(b)))
    for what, offset, value in (("magic", 0, None), ("version 0", 4, 0), ("version 99", 4, 99)):
        b = bytearray(raw)
        b[offset:offset + 4] = b"GGUX" if value is None else struct.pack("<I", value)
        out.append((what, bytes(b)))
    for field, offset in (("n_tensors", 8), ("n_kv", 16)):
        for value in (-1, 2**63, 2**32, len(f.tensors) + 1):
            b = bytearray(raw)
            _u64(b, offset, value)
            out.append((f"{field} = {value}", bytes(b)))
    for t in list(f.tensors.values())[::4]:  # tensor infos: name length, dims, type, offset
        parts = t.field.parts
        start = t.field.offset
        name_len, dims_at = 8 + len(bytes(parts[1])), t.field.offset + 8 + len(bytes(parts[1])) + 4
        for what, at, value, size in (("name length", start, 2**62, 8), ("n_dims", start + name_len, 2**31, 4),
                                      ("dim 10^12", dims_at, 10**12, 8), ("dim 2^63", dims_at, 2**63, 8),
                                      ("dim 0", dims_at, 0, 8),
                                      ("type 255", dims_at + 8 * len(t.shape), 255, 4),
                                      ("type Q4_0 on F32", dims_at + 8 * len(t.shape), 2, 4),
                                      ("offset past EOF", dims_at + 8 * len(t.shape) + 4, len(raw) * 2, 8)):
            b = bytearray(raw)
            b[at:at + size] = struct.pack("<Q" if size == 8 else "<I", value % 2 ** (8 * size))
            out.append((f"{t.name}: {what}", bytes(b)))
    arch = f.reader.fields["general.architecture"]
    b = bytearray(raw)
    at = arch.offset + 8 + len(b"general.architecture") + 4 + 8
    b[at:at + 6] = b"llama\0"
    out.append(("architecture 'llama'", bytes(b)))
    return out


WORKER = """
import json, resource, sys, traceback
from pathlib import Path
from qwen35.files import CheckpointError
from qwen35.loading.gguf_open import load_gguf
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
results = []
for path in sorted(Path(sys.argv[1]).glob("*.gguf")):
    try:
        load_gguf(path, "float32", "cpu", None, None, None)  # all that qwen35.load reads from a GGUF
        results.append([path.name, "loaded", ""])
    except CheckpointError as e:
        results.append([path.name, "CheckpointError", str(e)])
    except Exception as e:
        results.append([path.name, type(e).__name__, "".join(traceback.format_exception(e))[-1500:]])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"results": results, "peak_growth_kb": after - before}))
"""


def test_mutated_headers_are_refused_cleanly(base, tmp_path):
    cases = mutations(base)
    assert len(cases) >= 200
    names = {}
    for i, (what, data) in enumerate(cases):
        (tmp_path / f"case{i:03d}.gguf").write_bytes(data)
        names[f"case{i:03d}.gguf"] = what
    done = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]  # no crash, no abort
    report = json.loads(done.stdout.strip().splitlines()[-1])
    bad = [(names[n], kind, msg) for n, kind, msg in report["results"] if kind not in ("loaded", "CheckpointError")]
    assert not bad, bad[:3]
    for name, kind, message in report["results"]:
        if kind == "CheckpointError":
            assert name in message, (names[name], message)  # the message names the file
    refused = sum(kind == "CheckpointError" for _, kind, _ in report["results"])
    assert refused >= 150
    assert report["peak_growth_kb"] < 400_000  # no giant allocation: a 10^12-element header allocates nothing


@pytest.mark.parametrize("what, expect", [("dim 10^12", "reshape|impossible shape"), ("offset past EOF", "truncated"),
                                           ("type 255", "not a readable GGUF"), ("architecture 'llama'",
                                                                                 "is not Qwen3.5")])
def test_named_problems(base, tmp_path, what, expect):
    data = next(d for w, d in mutations(base) if w.endswith(what))
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=expect) as e:
        qwen35.load(path, dtype="float32", cache_ram=0)
    assert str(path) in str(e.value)


def test_text_model_given_as_mmproj(base, tmp_path):
    with pytest.raises(CheckpointError, match="not a vision projector") as e:
        qwen35.load(base, dtype="float32", cache_ram=0, mmproj=base)
    assert str(base) in str(e.value)
