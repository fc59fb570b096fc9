"""The quantized decode kernels alone: int8 and int4 (g64) layers as the model holds them, on random weights.

Prints ms per pass and GB/s of weights read for: the 0.8B body's int4 or int8 shapes (one pass over 24 layers'
matrices, ~280 or ~500 MB, so they stream from memory) at 1, 4 and 16 activation rows; one 4096x1024 matrix
repeated (cache-resident: the kernels' arithmetic rate) on 1 and 2 threads; and the prefill tiles (all rows
dequantized 256 at a time). Then one JSON line. Run it on two checkouts to compare kernels:

    python benchmarks/bench_gemv.py
"""

from __future__ import annotations

import json
import time

import torch

from qwen35.quant.linear import int4_quantize, int8_quantize, make_linear

H, I = 1024, 3584  # the 0.8B's hidden and MLP sizes
DELTANET = [(6144, H), (2048, H), (H, 2048), (I, H), (I, H), (H, I)]  # qkv, z, out, gate, up, down
ATTENTION = [(4096, H), (512, H), (512, H), (H, 2048), (I, H), (I, H), (H, I)]  # q (with gate), k, v, o, MLP


def layer(n: int, k: int, bits: int):
    w = torch.randn(n, k, dtype=torch.bfloat16)
    return make_linear(int8_quantize(w, torch.bfloat16) if bits == 8 else int4_quantize(w, 64, torch.bfloat16), 64)


def nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.buffers())


def best_of(fn, reps: int = 5) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    results = {}
    for bits in (4, 8):
        body = [layer(n, k, bits) for n, k in (DELTANET * 3 + ATTENTION) * 6]  # 18 DeltaNet + 6 attention layers
        size = sum(map(nbytes, body))
        torch.set_num_threads(2)
        for m in (1, 4, 16):
            xs = {k: torch.randn(m, k, dtype=torch.bfloat16) for k in (H, I, 2048)}
            t = best_of(lambda: [lin(xs[lin.in_features]) for lin in body])
            results[f"int{bits} body M={m}"] = (t * 1e3, size / t / 1e9)
        one = layer(4096, H, bits)
        x = torch.randn(1, H, dtype=torch.bfloat16)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            t = best_of(lambda: [one(x) for _ in range(100)]) / 100
            results[f"int{bits} 4096x1024 cached, {threads} thread(s)"] = (t * 1e3, nbytes(one) / t / 1e9)
        torch.set_num_threads(2)
        big = layer(9216, 2560, bits)
        t = best_of(lambda: [big.rows(slice(s, s + 256)) for s in range(0, 9216, 256)])
        results[f"int{bits} 9216x2560 dequantized in 256-row tiles"] = (t * 1e3, nbytes(big) / t / 1e9)
    width = max(map(len, results))
    for name, (ms, gbs) in results.items():
        print(f"{name:<{width}}  {ms:8.2f} ms  {gbs:6.1f} GB/s")
    print(json.dumps({"benchmark": "gemv", "results": {k: {"ms": round(v[0], 3), "gbs": round(v[1], 2)}
                                                        for k, v in results.items()}}))


if __name__ == "__main__":
    main()
