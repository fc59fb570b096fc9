"""Weight-only quantized linear layers on PyTorch's packed CPU kernels (int8 per channel, int4 per group).

Stored form (what checkpoints hold, portable): int8 `qweight` (N, K) + `scales` (N,); int4 `qweight` (N, K/2)
uint8 with two 4-bit values per byte (low nibble = even column), `scales` and `zeros` (N, K/G), where
w = (q - 8) * scale + zero. The kernels' own packed layouts are derived from that at load time, never saved.
The layers run on qwen35's own CPU kernels (`qwen35.ops.cpu`) where they are available, else on PyTorch's.
Few activation rows (decode) go to streaming GEMV kernels; many rows (prefill) dequantize 256 weight rows at a
time into a GEMM, never the whole matrix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.files import release_freed_memory
from qwen35.ops.cpu import compute_dtype, fast_path, gemv_rows, kernels, quantized_rows, tiled_linear

TILE_ROWS = 256  # weight rows dequantized at once for a many-row (prefill) product
LAYOUT_ROWS = 4096  # rows per block while building a kernel layout (a multiple of 16)
TRIM_EVERY = 128 << 20  # bytes gathered on huge pages between returns of the freed copies to the OS


def int8_quantize(weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Symmetric per output channel: w = q * scale, q in [-127, 127]."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
    return {"qweight": torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), "scales": scales.to(dtype)}


def int4_quantize(weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Asymmetric groups of `group_size` along K: w = (q - 8) * scale + zero, q in [0, 15], nibble-packed."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-10)
    q = torch.round((w - lo[..., None]) / scales[..., None]).clamp(0, 15).reshape(n, k)
    return {"qweight": pack_nibbles(q), "scales": scales.to(dtype), "zeros": (lo + 8 * scales).to(dtype)}


def dequantize(parts: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """The plain reference: stored parts -> fp32 (N, K) weight."""
    if "zeros" not in parts:
        return parts["qweight"].float() * parts["scales"].float()[:, None]
    q = unpack_nibbles(parts["qweight"]).float()
    n = q.shape[0]
    w = (q.reshape(n, -1, group_size) - 8) * parts["scales"].float()[..., None] + parts["zeros"].float()[..., None]
    return w.reshape(n, -1)


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """Activations as the int8/int4 decode kernels see them (the plain reference): each row in blocks of 32
    columns, rounded to int8 with scale amax/127 (llama.cpp's Q8_0), returned dequantized in fp32."""
    m, k = x.shape
    xf = F.pad(x.float(), (0, -k % 32)).view(m, -1, 32)
    d = xf.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(xf / d.clamp(min=1e-30)), 0.0)
    return (q * d).view(m, -1)[:, :k]


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8, low nibble first."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) int32 in [0, 15]."""
    low, high = packed & 15, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


def row_index(index: torch.Tensor | slice, n: int) -> torch.Tensor:
    """Rows as the kernels' dequantizers take them: int64, contiguous."""
    return torch.arange(*index.indices(n)) if isinstance(index, slice) else index.to(torch.long).contiguous()


def int4_kernel_layout(qweight: torch.Tensor) -> torch.Tensor:
    """Stored (N, K/2) nibbles (low = even column) -> the kernel's (see `int4_tile` in kernels/gemv.cpp),
    (N/16, 8K): tiles of 16 rows; per tile and 8 columns c.., 64 bytes, byte 4r + j = row r's column c+j |
    column c+4+j << 4."""
    def tiles(q: torch.Tensor) -> torch.Tensor:
        n, half = q.shape
        b = q.reshape(n, half // 4, 4)  # per 8 columns, 4 stored bytes: columns (0,1) (2,3) (4,5) (6,7)
        lo, hi = b[..., :2], b[..., 2:]  # columns 0-3, columns 4-7
        mixed = torch.stack([(lo & 15) | ((hi & 15) << 4), (lo >> 4) | (hi & 0xF0)], dim=-1)  # (n, K/8, 2, 2)
        return mixed.reshape(n // 16, 16, half // 4, 4).transpose(1, 2).reshape(n // 16, 8 * half * 2)
    return _by_row_blocks(qweight, tiles, 16 * qweight.shape[1])


def int8_kernel_layout(qweight: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 -> the kernel's (see `int8_tile` in kernels/gemv.cpp), (N/16, 16K) uint8: tiles of 16 rows;
    per tile and 4 columns c.., 64 bytes, byte 4r + j = row r's column c+j, as q + 128."""
    def tiles(q: torch.Tensor) -> torch.Tensor:
        n, k = q.shape
        shifted = q.view(torch.uint8) ^ 0x80  # two's complement with the sign bit flipped: q + 128
        return shifted.reshape(n // 16, 16, k // 4, 4).transpose(1, 2).reshape(n // 16, 16 * k)
    return _by_row_blocks(qweight, tiles, 16 * qweight.shape[1])


def _by_row_blocks(qweight: torch.Tensor, tiles: Callable[[torch.Tensor], torch.Tensor], width: int) -> torch.Tensor:
    """A layout of whole 16-row tiles built LAYOUT_ROWS rows at a time into its final buffer: whole-matrix
    temporaries made the 9B's 1 GB int8 head cost 3 GB more while loading."""
    out = torch.empty(qweight.shape[0] // 16, width, dtype=torch.uint8)
    for start in range(0, qweight.shape[0], LAYOUT_ROWS):
        out[start // 16:(start + LAYOUT_ROWS) // 16] = tiles(qweight[start:start + LAYOUT_ROWS])
    return out


def tile_table(table: torch.Tensor) -> torch.Tensor:
    """Scales or zeros (N, K/G) -> the int4 kernel's (N/16, K/G, 16): one tile's 16 rows side by side."""
    n, groups = table.shape
    return table.reshape(n // 16, 16, groups).transpose(1, 2).contiguous()


class Int8Linear(nn.Module):
    """y = x (q * scale)^T with int8 weights per output channel, on qwen35's kernel or `_weight_int8pack_mm`.

    On the kernel it holds only its layout (tiles of 16 rows, see `int8_kernel_layout`), built once at load.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.own_kernel = (kernels() is not None and scales.dtype == torch.bfloat16 and qweight.device.type == "cpu"
                           and self.out_features % 16 == 0 and self.in_features % 32 == 0)
        if self.own_kernel:
            self.register_buffer("packed", int8_kernel_layout(qweight))
        else:
            self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        k = fast_path(x) if self.own_kernel else None
        if not self.own_kernel:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales.to(x.dtype))
        elif k is not None:
            out = k.linear_int8(quantized_rows(x), self.packed, self.scales)
        else:
            out = tiled_linear(flat, self.out_features, lambda a, b: self.rows(slice(a, b)).to(x.dtype), TILE_ROWS)
        return out.reshape(*x.shape[:-1], self.out_features)

    def decode_operands(self) -> tuple[int, int, list[torch.Tensor]] | None:
        """How the decode plan (`qwen35.ops.decode`) calls this layer: on qwen35's kernel only."""
        return (1, 0, [self.packed, self.scales]) if self.own_kernel else None

    def rows(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Weight rows, dequantized to the scales' dtype (tiles of a prefill product; embedding lookups)."""
        if not self.own_kernel:
            return self.qweight[index].to(self.scales.dtype) * self.scales[index][:, None]
        return kernels().int8_dequantize(self.packed, self.scales, row_index(index, self.out_features))


class Int4Linear(nn.Module):
    """y = x W^T with 4-bit grouped weights, on qwen35's kernel or `aten._weight_int4pack_mm_for_cpu`.

    Holds only one kernel's own layout and scale/zero tables, built once from the portable stored parts (which
    are not kept: no second copy of the weights in memory; except a tied embedding's rows on PyTorch's kernel).
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 lookups: bool = False):
        super().__init__()
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.group_size = group_size
        self.own_kernel = (kernels() is not None and scales.dtype == torch.bfloat16 and qweight.device.type == "cpu"
                           and self.in_features % 128 == 0 and self.out_features % 16 == 0)
        if self.own_kernel:
            self.register_buffer("packed", int4_kernel_layout(qweight))
            self.register_buffer("scales", tile_table(scales))
            self.register_buffer("zeros", tile_table(zeros))
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(qweight), 1)
            self.pack_layout = int4pack_layout()  # how `packed_rows` reads it: PyTorch's varies with the CPU
            self.register_buffer("packed", packed)
            self.register_buffer("scales_zeros", torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous())
            if lookups:  # PyTorch's packed layout cannot give rows back: a tied embedding keeps the stored parts
                self.stored = StoredTable({"qweight": qweight, "scales": scales, "zeros": zeros}, group_size)

    @staticmethod
    def supports(out_features: int, in_features: int, group_size: int) -> bool:
        return out_features % 16 == 0 and in_features % group_size == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if not self.own_kernel:
            if gemv_rows(x) is not None:
                out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size,
                                                                   self.scales_zeros.to(x.dtype))
            else:  # PyTorch's int4 GEMM ran a 200-token 0.8B MLP product at 2.5x fp32 GEMM's time on AVX2
                dtype = compute_dtype(x)
                out = tiled_linear(flat.to(dtype), self.out_features, lambda a, b: self.packed_rows(a, b).to(dtype),
                                   TILE_ROWS).to(x.dtype)
        elif (k := fast_path(x)) is not None:
            out = k.linear_int4(quantized_rows(x), self.packed, self.scales, self.zeros, self.group_size)
        else:
            out = tiled_linear(flat, self.out_features, lambda a, b: self.rows(slice(a, b)).to(x.dtype), TILE_ROWS)
        return out.reshape(*x.shape[:-1], self.out_features)

    def packed_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of PyTorch's packed weight, dequantized in fp32."""
        q = int4pack_rows(self.packed, start, stop, self.pack_layout).view(stop - start, -1, self.group_size)
        scales, zeros = self.scales_zeros[:, start:stop].transpose(0, 1).float().contiguous().unbind(-1)
        # (q - 8) * scale + zero as one pass over the tile: q stays uint8 until addcmul promotes it
        return torch.addcmul((zeros - 8 * scales)[..., None], q, scales[..., None]).reshape(stop - start, -1)

    def decode_operands(self) -> tuple[int, int, list[torch.Tensor]] | None:
        """How the decode plan (`qwen35.ops.decode`) calls this layer: on qwen35's kernel only."""
        return (2, self.group_size, [self.packed, self.scales, self.zeros]) if self.own_kernel else None

    def rows(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Weight rows, dequantized to the scales' dtype (tiles of a prefill product; embedding lookups)."""
        if not self.own_kernel and isinstance(index, slice):
            return self.packed_rows(*index.indices(self.out_features)[:2]).to(self.scales_zeros.dtype)
        if not self.own_kernel:
            return self.stored.rows(index)
        return kernels().int4_dequantize(self.packed, self.scales, self.zeros, self.group_size,
                                         row_index(index, self.out_features))


def int4pack_rows(packed: torch.Tensor, start: int, stop: int,
                  layout: tuple[int, bool] | None = None) -> torch.Tensor:
    """Rows start:stop of `_convert_weight_to_int4pack_for_cpu`'s (N, K/2) output as (rows, K) uint8 in [0, 15].
    Read off that function's output, as PyTorch gives no unpacking. Its layout depends on the CPU kernels it
    dispatches to (`layout`, default `int4pack_layout()`: (block, halves)): blocks of `block` rows, each
    (K, block/2) bytes, byte (k, j) holding column k of rows j and j + block/2 (halves: AVX2, 32 rows; AVX-512,
    64) or of rows 2j and 2j + 1 (no vector kernels), the first row in the low nibble; the last N % block rows (a
    multiple of 16) are one block of their own, in pairs. Any start:stop: the blocks it falls in are read whole
    (prefill tiles start on a block)."""
    block, halves = layout or int4pack_layout()
    n, k = packed.shape[0], packed.shape[1] * 2
    flat, full, end = packed.reshape(-1), n // block * block, min(stop, n // block * block)  # full: whole blocks
    parts = []
    if start < end:
        first, last = start // block * block, -(-end // block) * block
        rows = _unpack_blocks(flat[first * k // 2:last * k // 2].view(-1, k, block // 2), halves)
        parts.append(rows.reshape(last - first, k)[start - first:end - first])
    if stop > full:
        rows = _unpack_blocks(flat[full * k // 2:].view(1, k, (n - full) // 2), False)
        parts.append(rows.reshape(n - full, k)[max(start, full) - full:stop - full])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _unpack_blocks(b: torch.Tensor, halves: bool) -> torch.Tensor:
    """(blocks, K, B/2) bytes -> (blocks, B, K) values: byte (k, j) holds rows j and j + B/2 (halves) or rows 2j
    and 2j + 1, the first in its low nibble."""
    if halves:  # (blocks, 2, K, B/2): nibble, column, row within the half
        return torch.stack([b & 15, b >> 4], dim=1).transpose(2, 3).reshape(b.shape[0], -1, b.shape[1])
    return torch.stack([b & 15, b >> 4], dim=-1).reshape(b.shape[0], b.shape[1], -1).transpose(1, 2)


@functools.cache
def int4pack_layout() -> tuple[int, bool]:
    """(block, halves) of `_convert_weight_to_int4pack_for_cpu`'s layout in this process (see `int4pack_rows`),
    read off a packed probe: PyTorch picks it by the CPU capability its kernels run at (AVX2: 32 rows in halves,
    AVX-512: 64, none: 32 in pairs) and says so nowhere. A layout none of them reads back raises: decoding it
    wrongly would give wrong products."""
    q = torch.randint(0, 16, (128 + 16, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    for layout in ((32, True), (64, True), (32, False), (64, False)):
        if packed.shape == (q.shape[0], q.shape[1] // 2) and torch.equal(int4pack_rows(packed, 0, len(q), layout), q):
            return layout
    raise RuntimeError(f"PyTorch {torch.__version__} packs int4 weights in a layout qwen35 cannot read back "
                       f"(CPU capability {torch.backends.cpu.get_cpu_capability()})")


def gather_on_huge_pages(model: nn.Module) -> None:
    """Move the kernel layouts of every Int8Linear/Int4Linear on qwen35's kernels into one block on 2 MB pages
    (`kernels/memory.cpp`), in module order: a decode token then streams one region instead of hundreds of
    1-3 MB ones on 4 KB pages (0.8B int4 body alone: 26 -> 30-31 GB/s, alternated in one process). One buffer
    at a time, each old one freed as it is replaced and returned to the OS every 128 MB: the load peak
    rises by about that much."""
    k = kernels()
    layers = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear)) and m.own_kernel]
    if k is None or not layers:
        return
    buffers = [(m, name) for m in layers for name, _ in m.named_buffers(recurse=False)]
    release_freed_memory()  # what loading left in the heap, before the block's pages add to it
    block = k.huge_page_empty(sum(_padded(getattr(m, name).nbytes) for m, name in buffers))
    start = trimmed = 0
    for m, name in buffers:
        old = getattr(m, name)
        setattr(m, name, block[start:start + old.nbytes].view(old.dtype).view(old.shape).copy_(old))
        start += _padded(old.nbytes)
        if start - trimmed > TRIM_EVERY:  # glibc keeps freed heap blocks: hand them back as we go
            release_freed_memory()
            trimmed = start


def _padded(nbytes: int) -> int:
    return -(-nbytes // 64) * 64  # each buffer starts on a cache line


class StoredTable(nn.Module):
    """A quantized table kept in the stored form, only ever read by rows (an untied embedding: its memory-mapped
    parts stay on disk but for the rows looked up)."""

    def __init__(self, parts: dict[str, torch.Tensor], group_size: int):
        super().__init__()
        self.group_size = group_size
        for name, t in parts.items():
            self.register_buffer(name, t)

    def rows(self, index: torch.Tensor | slice) -> torch.Tensor:
        parts = {name: t[index] for name, t in self.named_buffers()}
        return dequantize(parts, self.group_size).to(self.scales.dtype)


def make_linear(parts: dict[str, torch.Tensor], group_size: int, lookups: bool = False) -> nn.Module:
    """The kernel-backed layer for stored parts (int4 when `zeros` is present); `lookups`: its `rows` will be
    read too (a tied embedding)."""
    if "zeros" in parts:
        return Int4Linear(parts["qweight"], parts["scales"], parts["zeros"], group_size, lookups)
    return Int8Linear(parts["qweight"], parts["scales"])
