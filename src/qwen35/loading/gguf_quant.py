"""GGUF tensor data -> our weights: dense tensors, or the stored parts of our int8/int4 layers.

What each block type becomes (docs/gguf.md has the measured cost of each):

* F32, F16, BF16: dense, as they are (cast to the load dtype).
* Q4_0 (32 weights, an fp16 scale d, w = d (q - 8)): int4 with groups of 32, `scale = d`, `zero = 0`: the same 4-bit
  values, no second rounding. Exact at dtype float32/float16; at bfloat16 (our kernels' scale type) d is rounded
  to bf16 (relative error at most 2^-9, per block).
* Q4_1 (w = d q + m): int4 g32 with `scale = d`, `zero = m + 8 d`: the same 4-bit values; the zero is one rounding.
* Q8_0 (32 weights, an fp16 scale each): our int8 has one scale per row, so the weights are dequantized exactly
  and rounded again per row (not exact).
* K-quants, IQ types, Q5_0/Q5_1 and the rest `gguf` can dequantize: dequantized with `gguf.quants.dequantize`
  (llama.cpp's reference routines in numpy) and re-quantized: to int4 g32 at 4 bits or fewer, to int8 above.
"""

from __future__ import annotations

import numpy as np
import torch

from qwen35.files import CheckpointError
from qwen35.quant.linear import Int4Linear, int4_quantize, int8_quantize, pack_nibbles

GROUP = 32  # int4 group size of every GGUF-born layer: Q4_0/Q4_1's block, and the finest our kernels take
DENSE = {"F32", "F16", "BF16"}
EXACT_INT4 = {"Q4_0", "Q4_1"}
CHUNK_ROWS = 16384  # rows converted at once: 64 MB of fp32 at width 1024
INT8_TYPES = {"Q8_0", "Q8_1", "Q8_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K"}  # more than 4 bits a weight: int8


def dense(t, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reader tensor's values in `dtype`, numpy order (rows first), converted CHUNK_ROWS rows at a time into
    the final buffer: a whole 248k-row table in fp32 at once cost 1-3 GB beyond the loaded model."""
    shape = tuple(int(d) for d in reversed(t.shape))
    data = t.data.reshape(-1, t.data.shape[-1])
    out = torch.empty((data.shape[0], shape[-1]), dtype=dtype)
    for start in range(0, data.shape[0], CHUNK_ROWS):
        out[start:start + CHUNK_ROWS] = _dense_rows(t, data[start:start + CHUNK_ROWS])
    return out.reshape(shape)


def _dense_rows(t, data: np.ndarray) -> torch.Tensor:
    kind = t.tensor_type.name
    if kind in ("F32", "F16"):
        return torch.from_numpy(np.array(data, dtype=np.float32))
    if kind == "BF16":
        return torch.from_numpy(np.array(data).view(np.int16)).view(torch.bfloat16).float()
    import gguf

    try:
        values = gguf.quants.dequantize(data, t.tensor_type)
    except NotImplementedError:
        raise CheckpointError(f"tensor '{t.name}' is of type {kind}, which the gguf package cannot dequantize; "
                              "re-quantize the model to a common type (Q4_K_M, Q8_0, ...)") from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))


def quant_parts(t, data: np.ndarray, dtype: torch.dtype, bits: int | None = None) -> dict[str, torch.Tensor]:
    """Stored int8/int4 parts for one (rows, cols) quantized matrix; `data` is its block bytes (rows, row bytes),
    already permuted if the tensor needed it. `bits` forces int8 (8) where int4 cannot hold the shape. Rows are
    converted CHUNK_ROWS at a time (each format is row-local), so no whole fp32 copy exists."""
    rows, cols = data.shape[0], int(t.shape[0])
    int4_ok = Int4Linear.supports(rows, cols, GROUP) and bits != 8
    pieces = [_parts_rows(t, data[a:a + CHUNK_ROWS], cols, dtype, int4_ok) for a in range(0, rows, CHUNK_ROWS)]
    return pieces[0] if len(pieces) == 1 else {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}


def _parts_rows(t, data: np.ndarray, cols: int, dtype: torch.dtype, int4_ok: bool) -> dict[str, torch.Tensor]:
    kind = t.tensor_type.name
    if kind in EXACT_INT4 and int4_ok:
        return _q4_parts(kind, torch.from_numpy(np.array(data)), data.shape[0], cols, dtype)
    w = _dense_rows(t, data)
    if kind in INT8_TYPES or not int4_ok:
        return int8_quantize(w, dtype)
    return int4_quantize(w, GROUP, dtype)


def _q4_parts(kind: str, raw: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Q4_0 / Q4_1 blocks re-laid as our int4: the 4-bit values unchanged (block byte j holds weight j in its low
    nibble and weight j + 16 in its high one; ours packs two neighbours per byte)."""
    head = 2 if kind == "Q4_0" else 4
    blocks = raw.view(rows, cols // 32, head + 16)
    d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
    qs = blocks[..., head:]
    q = torch.cat([qs & 15, qs >> 4], dim=-1).reshape(rows, cols)
    if kind == "Q4_0":
        zero = torch.zeros_like(d)
    else:
        zero = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float() + 8 * d
    return {"qweight": pack_nibbles(q), "scales": d.to(dtype), "zeros": zero.to(dtype)}


def permute_blocks(data: np.ndarray, dim: int, index: torch.Tensor, block: int) -> np.ndarray | None:
    """Rows (dim 0) or columns (dim 1, whole blocks only) of quantized block bytes reordered; None when a column
    permutation does not move whole blocks (then the tensor is dequantized first)."""
    if dim == 0:
        return data[index.numpy()]
    starts = index.view(-1, block) if index.numel() % block == 0 else None
    if starts is None or not torch.equal(starts - starts[:, :1], torch.arange(block).expand_as(starts)) or \
            bool((starts[:, 0] % block).any()):
        return None
    per_block = data.shape[1] // (index.numel() // block)
    blocks = data.reshape(data.shape[0], -1, per_block)
    return np.ascontiguousarray(blocks[:, (starts[:, 0] // block).numpy()]).reshape(data.shape)
