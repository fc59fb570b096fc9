"""The read-bandwidth probe the benchmarks state decode's shares against: the fastest honest read this machine
does, 2 threads (or --threads) over a 512 MB buffer, best of several passes.

Which read is fastest depends on the CPU: on the 2-core AVX-512 Xeon a PyTorch sum read bf16 at 46.1 GB/s and
int64 at 26.4 GB/s (issue 22), while on an AVX2 EPYC the bf16 sum is emulated and far slower than int64's or
fp32's. So the probe sums the same buffer read as each dtype once, keeps the fastest, and times that one after.
"""

from __future__ import annotations

import time

import torch

DTYPES = (torch.int64, torch.float32, torch.bfloat16)


class ReadProbe:
    """`ReadProbe(threads)()` -> GB/s; the buffer (zeros: no denormals, no special values) is held by the probe."""

    def __init__(self, threads: int, nbytes: int = 512 << 20):
        self.threads = threads
        self.data = torch.zeros(nbytes // 8, dtype=torch.int64)
        speeds = {dtype: self._read(self.data.view(dtype), passes=1) for dtype in DTYPES}
        self.dtype = max(speeds, key=speeds.get)

    def __call__(self, passes: int = 5) -> float:
        return self._read(self.data.view(self.dtype), passes)

    def _read(self, view: torch.Tensor, passes: int) -> float:
        torch.set_num_threads(self.threads)
        best = float("inf")
        for _ in range(passes):
            start = time.perf_counter()
            view.sum()
            best = min(best, time.perf_counter() - start)
        return view.numel() * view.element_size() / best / 1e9

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"sum of {dtype} over {self.data.nbytes >> 20} MB, {self.threads} threads"
