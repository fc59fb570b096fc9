"""Decode-speed CPU kernels (`kernels/*.cpp`), compiled on first use, and the linear and norm ops that use them.

The extension is built once per machine with `-march=native` into ~/.cache/qwen35 by `make install`, or else on
first use (a few minutes on 2 cores; needs a C++ compiler): see `qwen35.ops.build`. Where it cannot be used — no
compiler, a CPU without AVX2 and FMA, or `QWEN35_KERNELS=0` — every caller falls back to PyTorch's own kernels (same
math, equal up to bf16 rounding). They are written for AVX-512 BF16 and VNNI (Zen 4, Sapphire Rapids on) and, on
256-bit vectors, for AVX2 + FMA (Haswell, Zen 1 on): `kernel_isa` says which one runs.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)
GEMV_ROWS = 16  # up to this many activation rows the streaming kernels; above, GEMM (prefill)
FP32_TILE_ROWS = 8192  # weight rows converted at once where bf16 products run in fp32 (`linear_in_fp32`)
HUGE_PAGE = 2 << 20  # bytes of a transparent huge page (x86-64, and most arm64 kernels)
NORM_ROWS = 256  # the fused RMSNorm runs rows one after another: for long prefills PyTorch's is faster


def release_thread_pool() -> None:
    """Free the calling thread's OpenMP worker pool when compute moves on to another thread (after loading on a
    server worker thread, before the API's warm-up thread). Each thread that ran a parallel region keeps a pool of
    libgomp workers (PyTorch's CPU build), and once libgomp manages more threads than there are CPUs it stops
    spin-waiting between regions: every region then wakes its workers from a futex. A 1,024-token 0.8B int4
    prefill on a thread started after loading on the main thread took 6.0-6.9 s, 4.6 s with the main thread's
    pool freed first (2-core Zen 4). A no-op where libgomp is not loaded."""
    if (pause := _omp_pause()) is not None:
        pause(1)  # omp_pause_soft: this thread's pool only; recreated on its next parallel region


@functools.cache
def _omp_pause() -> Callable[[int], int] | None:
    """libgomp's omp_pause_resource_all, looked up once (every server request frees its worker's pool)."""
    try:
        return ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD).omp_pause_resource_all
    except (OSError, AttributeError):
        return None


@functools.cache
def kernels() -> ModuleType | None:
    """The compiled extension, or None where it is unavailable (the reason is logged once)."""
    if os.environ.get("QWEN35_KERNELS", "1") == "0":
        log.info("qwen35 CPU kernels are off (QWEN35_KERNELS=0); using PyTorch's kernels")
        return None
    if not cpu_supported():
        log.info("qwen35 CPU kernels need AVX2 and FMA, which this CPU lacks; using PyTorch's kernels")
        return None
    try:
        from qwen35.ops.build import load_or_build

        module = load_or_build()
    except Exception as e:  # a missing compiler or ninja: fall back, say why  # noqa: BLE001
        log.warning("qwen35 CPU kernels could not be built (%s); using PyTorch's kernels", e)
        return None
    if not module.available():
        log.warning("qwen35 CPU kernels were compiled without AVX2 (a compiler older than this CPU?); "
                    "using PyTorch's kernels")
        return None
    _register_ops(module)
    return module


def empty_on_huge_pages(like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """An uninitialised tensor of `like`'s dtype and device: on 2 MB pages (`kernels/memory.cpp`) where it spans
    one and the kernels run here, else an ordinary allocation. For buffers streamed whole, as weights and K/V are:
    on 4 KB pages every page costs the stream a TLB walk."""
    nbytes = like.element_size() * math.prod(shape)
    big = like.device.type == "cpu" and nbytes >= HUGE_PAGE and not torch.compiler.is_compiling()
    k = kernels() if big else None
    return like.new_empty(shape) if k is None else k.huge_page_empty(nbytes).view(like.dtype).view(shape)


def has_kernels() -> bool:
    """Whether the kernels run here; `prepare_compile` makes it a constant to torch.compile (which cannot trace
    the build)."""
    return kernels() is not None


def prepare_compile() -> None:
    """Before torch.compile traces the model: marked here, not at import, because marking imports torch._dynamo
    (~70 MB and a second of import that eager use never needs)."""
    torch.compiler.assume_constant_result(has_kernels)  # sets a flag on the function itself
    torch.compiler.assume_constant_result(native_bf16)


def _register_ops(module: ModuleType) -> None:
    """The kernels as PyTorch operators (`torch.ops.qwen35.*`) with shape-only fakes, so torch.compile traces
    through them; eager calls go straight to the extension (no dispatcher cost)."""

    def define(fake, mutates: tuple[str, ...] = ()) -> None:
        schema = torch.library.infer_schema(fake, mutates_args=mutates)
        name = fake.__name__
        torch.library.custom_op(f"qwen35::{name}", getattr(module, name), mutates_args=mutates,
                                schema=schema).register_fake(fake)

    def linear_bf16(x: Tensor, w: Tensor) -> Tensor:
        return x.new_empty(x.shape[0], w.shape[0])

    def linear_int8(x: Tensor, packed: Tensor, scales: Tensor) -> Tensor:
        return x.new_empty(x.shape[0], 16 * packed.shape[0])  # tiles of 16 rows

    def linear_int4(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, G: int) -> Tensor:
        return x.new_empty(x.shape[0], 16 * packed.shape[0])  # tiles of 16 rows

    def rms_norm(x: Tensor, w: Tensor, eps: float, offset: float) -> Tensor:
        return torch.empty_like(x)

    def deltanet_decode(qkv: Tensor, z: Tensor, b: Tensor, a: Tensor, conv_state: Tensor, conv_w: Tensor,
                        A_log: Tensor, dt_bias: Tensor, state: Tensor, state_out: Tensor | None, norm_w: Tensor,
                        eps: float) -> Tensor:
        return torch.empty_like(z)

    def attention_decode(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, scale: float,
                         k_scale: Tensor | None, v_scale: Tensor | None) -> Tensor:
        return torch.empty_like(q)

    def chunk_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor | None,
                         chunk: int) -> tuple[Tensor, Tensor]:
        return torch.empty_like(v), q.new_empty(v.shape[0], v.shape[2], k.shape[3], v.shape[3])

    for fake in (linear_bf16, linear_int8, linear_int4, rms_norm, attention_decode, chunk_delta_rule):
        define(fake)
    define(deltanet_decode, ("conv_state", "state", "state_out"))


def cpu_supported() -> bool:
    """Whether this CPU has what the kernels are written for: AVX-512 BF16 and VNNI, or else AVX2 and FMA."""
    return avx512_build() or {"avx2", "fma"} <= _cpu_flags()


def avx512_build() -> bool:
    """Whether the kernels built here would be their AVX-512 BF16 build, read from the CPU's flags (nothing is
    built or loaded: the memory planner asks before any model is)."""
    return {"avx512_bf16", "avx512_vnni"} <= _cpu_flags()


def kernel_isa() -> str | None:
    """Which build of the kernels runs here: "avx512", "avx2", or None (PyTorch's kernels)."""
    k = kernels()
    return k.isa() if k is not None else None


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX). Without it oneDNN emulates some bf16
    ops very slowly: the depthwise conv took 62 ms a step on 2 AVX2 cores against 0.4 ms in fp32. A plain
    function over a cached one, as `has_kernels`: torch.compile traces into a cached function (reading
    /proc/cpuinfo, a graph break) however it is marked, but takes a marked plain one as a constant."""
    return _native_bf16()


@functools.cache
def _native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype to compute a product or conv of `x` in: fp32 for bf16 on a CPU without bf16 hardware (rounded
    back once), else x's own."""
    emulated = x.dtype == torch.bfloat16 and x.device.type == "cpu" and not native_bf16()
    return torch.float32 if emulated else x.dtype


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def fast_path(x: torch.Tensor) -> ModuleType | None:
    """The kernels, if this activation may use them: bf16 on the CPU, inference (no autograd graph).
    Under torch.compile, the same functions as registered operators."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        return None
    if torch.compiler.is_compiling():
        return torch.ops.qwen35 if has_kernels() else None
    return kernels()


def one_token_each(x: torch.Tensor) -> bool:
    """A decode step's activation, (B, 1, ...): one token per sequence. Such inputs stay on the kernels at any
    batch size, so each sequence gets the bits it gets alone (a prefill, (B, T, ...), need not)."""
    return x.dim() >= 3 and x.shape[1] == 1


def gemv_rows(x: torch.Tensor) -> torch.Tensor | None:
    """x as (rows, K) when the streaming kernels take it: up to GEMV_ROWS rows, or a decode step of any batch
    size. Else None: a prefill, for GEMM."""
    rows = x.numel() // x.shape[-1]
    if rows <= GEMV_ROWS or one_token_each(x):
        return x.reshape(rows, -1).contiguous()
    return None


def quantized_rows(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, K) for qwen35's int8/int4 kernels, decode and prefill rows alike: the kernels round each row to
    int8 per 32 values and run VNNI dot products, all rows in one pass over the weights, and compute each row the
    same way whatever the row count. Against dequantized tiles through PyTorch's GEMM, on a 2-core Zen 4 (0.8B
    shapes, a quarter of the body) they took 12.5 / 34 / 143 / 499 ms at 16 / 64 / 256 / 1,024 rows (int4 g64)
    against 66 / 98 / 221 / 720 ms; on a 2-core Xeon with AMX, against oneDNN's bf16 GEMM on the tiles, int4 g64
    1024 -> 3584 1.0 / 3.9 / 8.0 ms at 64 / 256 / 512 rows against 2.7 / 6.6 / 10.5, 3584 -> 1024 8.6 against
    6.4 at 512, the 4B's 2560 -> 9216 23.3 against 31.3 at 256 (its prefill chunk)."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def in_row_blocks(flat: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`product` over blocks of GEMV_ROWS rows. A kernel computes each row the same way in any block of up to
    GEMV_ROWS, so every sequence of a batched decode gets the bits it gets alone (batch invariance); GEMM's
    blocking would change them with the batch size."""
    if flat.shape[0] <= GEMV_ROWS:
        return product(flat)
    return torch.cat([product(flat[i:i + GEMV_ROWS]) for i in range(0, flat.shape[0], GEMV_ROWS)])


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T; decode-shaped products go to the streaming GEMV kernel. Reference: `F.linear`."""
    k = fast_path(x)
    trains = torch.is_grad_enabled() and weight.requires_grad
    flat = None if k is None or trains or weight.dtype != torch.bfloat16 else gemv_rows(x)
    if flat is not None:
        out = in_row_blocks(flat, lambda rows: k.linear_bf16(rows, weight))
        return out.reshape(*x.shape[:-1], weight.shape[0])
    if weight.dtype == torch.bfloat16 and not trains and x.numel() // x.shape[-1] > GEMV_ROWS \
            and compute_dtype(x) == torch.float32:
        return linear_in_fp32(x, weight)
    return F.linear(x, weight)


def linear_in_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """bf16 x @ weight^T computed in fp32 and rounded once: for prefill rows on CPUs without bf16 hardware, where
    oneDNN emulates bf16 GEMM (a 0.8B MLP product of 64 rows on 2 AVX2 cores: 69 ms, 26 ms converting to fp32).
    Not for decode rows: converting every weight each token (1 GB for the tied 0.8B head) cost more than it
    saved. Weights convert FP32_TILE_ROWS rows at a time, never a whole large matrix."""
    out = tiled_linear(x.reshape(-1, x.shape[-1]).float(), weight.shape[0], lambda a, b: weight[a:b].float(),
                       FP32_TILE_ROWS)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def tiled_linear(x: torch.Tensor, out_features: int, rows: Callable[[int, int], torch.Tensor],
                 tile: int) -> torch.Tensor:
    """x (M, K) @ W^T where `rows(start, end)` gives W[start:end] in x's dtype: `tile` weight rows at a time, so
    no converted or dequantized copy of a whole matrix exists."""
    out = x.new_empty(x.shape[0], out_features)
    for start in range(0, out_features, tile):
        end = min(start + tile, out_features)
        out[:, start:end] = F.linear(x, rows(start, end))
    return out


def scale_rows(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x * s[..., None], s of x's shape less its last dim. Expanded first: PyTorch splits the broadcast of a
    trailing 1 badly over threads (a 4-D fp32 product of 1M elements on 2 cores: 0.4-1.2 ms, expanded 0.1)."""
    return x * s.unsqueeze(-1).expand_as(x)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """x_hat * (offset + w), in fp32, cast back once: offset 1 is Qwen3.5's zero-centred norm."""
    xf = x.float()
    xf = scale_rows(xf, torch.rsqrt(xf.pow(2).mean(-1) + eps))
    return (xf * (offset + weight.float())).type_as(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 1.0) -> torch.Tensor:
    k = fast_path(x)
    if k is None or weight.dtype != torch.bfloat16 or (torch.is_grad_enabled() and weight.requires_grad) \
            or (x.numel() // x.shape[-1] > NORM_ROWS and not one_token_each(x)):
        return rms_norm_reference(x, weight, eps, offset)
    return k.rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), weight, eps, offset).view(x.shape)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same math) whose decode-shaped products use the GEMV kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight) if self.bias is None else F.linear(x, self.weight, self.bias)

    def decode_operands(self) -> tuple[int, int, list[torch.Tensor]] | None:
        """How the decode plan (`qwen35.ops.decode`) calls this layer, or None when the kernel does not apply."""
        ok = self.bias is None and self.weight.dtype == torch.bfloat16 and self.weight.device.type == "cpu"
        return (0, 0, [self.weight]) if ok else None

