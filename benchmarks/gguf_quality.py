"""What loading a GGUF of each llama.cpp type costs in quality: perplexity of llama.cpp and of qwen35 on the same file.

The built-in nano model is exported to F16 by `qwen35 export` (llama.cpp reads it: tests/test_gguf_parity.py), then
quantized by llama.cpp's own quantizer (llama-cpp-python, `make bench` builds it) to each type. For every file:
perplexity on the nano recipe's held-out prose as llama.cpp computes it, as qwen35 computes it after loading the
file (Q4_0/Q4_1 re-laid into int4 g32 exactly, Q8_0/Q5/Q6 rounded to int8 per row, K/IQ 4-bit and below rounded to
int4 g32: qwen35/loading/gguf_quant.py), and the change against the bf16 original. Prints a table, then JSON.

    python benchmarks/gguf_quality.py [--docs 40] [--types Q8_0,Q4_0,Q4_K_M,...]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import qwen35
from qwen35.loading.gguf import open_gguf
from qwen35.loading.gguf_export import export_gguf
from qwen35.train import data

TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_1", "Q4_0", "Q4_K_M", "Q4_K_S", "IQ4_NL", "IQ4_XS", "Q3_K_M"]


def nll_ours(model, docs: list[list[int]]) -> tuple[float, int]:
    total, count = 0.0, 0
    with torch.inference_mode():
        for doc in docs:
            logp = F.log_softmax(model(torch.tensor([doc]))[0].float(), -1)
            total += -logp[:-1].gather(1, torch.tensor(doc[1:])[:, None]).sum().item()
            count += len(doc) - 1
    return total, count


def nll_llama(path: Path, docs: list[list[int]], threads: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=1024, logits_all=True, verbose=False, n_threads=threads,
                          n_threads_batch=threads)
    total = 0.0
    for doc in docs:
        llm.reset()
        llm.eval(doc)
        logp = F.log_softmax(torch.from_numpy(np.array(llm.scores[:len(doc)], dtype=np.float32)), -1)
        total += -logp[:-1].gather(1, torch.tensor(doc[1:])[:, None]).sum().item()
    return total


def main() -> None:
    import llama_cpp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=40, help="held-out prose documents (each cut to 512 tokens)")
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    base = qwen35.load(None, dtype="bfloat16", cache_ram=0, draft=0)
    _, val = data.split(data.prose_texts(data.DataStats()), 0.02, 0)  # the nano recipe's held-out split
    docs = [base.tokenizer.encode(t)[:512] for t in val[: args.docs]]
    total, count = nll_ours(base.model, docs)
    bf16 = math.exp(total / count)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        full = qwen35.load(None, dtype="float32", cache_ram=0, draft=0)
        f16 = export_gguf(full.model, full.tokenizer, Path(tmp) / "nano-F16.gguf", "f16", full.defaults)
        for kind in args.types.split(","):
            path = f16
            if kind != "F16":
                path = Path(tmp) / f"nano-{kind}.gguf"
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
                if llama_cpp.llama_model_quantize(str(f16).encode(), str(path).encode(), params) != 0:
                    raise RuntimeError(f"llama.cpp could not quantize to {kind}")
            mix = Counter(t.tensor_type.name for t in open_gguf(path).tensors.values() if len(t.shape) > 1)
            ours = math.exp(nll_ours(qwen35.load(path, dtype="bfloat16", cache_ram=0, draft=0).model, docs)[0]
                            / count)
            theirs = math.exp(nll_llama(path, docs, args.threads) / count)
            rows.append({"type": kind, "matrices": dict(mix), "ppl_llama": theirs, "ppl_qwen35": ours,
                         "qwen35_vs_bf16_pct": 100 * (ours / bf16 - 1), "llama_vs_bf16_pct": 100 * (theirs / bf16 - 1),
                         "mb": path.stat().st_size / 2**20})
    print(f"bf16 original (qwen35): ppl {bf16:.3f} over {count} tokens of {len(docs)} held-out documents")
    print(f"{'type':<8} {'matrices in the file':<34} {'MB':>5} {'llama.cpp ppl':>13} {'vs bf16':>8} "
          f"{'qwen35 ppl':>10} {'vs bf16':>8}")
    for r in rows:
        mix = ", ".join(f"{n} {k}" for k, n in sorted(r["matrices"].items(), key=lambda kv: -kv[1]))
        print(f"{r['type']:<8} {mix:<34} {r['mb']:5.1f} {r['ppl_llama']:13.3f} {r['llama_vs_bf16_pct']:+7.2f}% "
              f"{r['ppl_qwen35']:10.3f} {r['qwen35_vs_bf16_pct']:+7.2f}%")
    print(json.dumps({"model": "nano", "bf16_ppl": bf16, "tokens": count, "results": rows}))


if __name__ == "__main__":
    main()
