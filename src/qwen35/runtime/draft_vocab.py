"""A trimmed draft vocabulary for speculative decoding: the LM head restricted to the N most frequent tokens.

Drafting (the MTP head) ends in the LM head, 248,320 rows: for the small models that product is most of a draft
token's cost. `DraftHead` holds only the rows of chosen token ids, in the original head's own format (bf16/fp32
weight, or the int8/int4 kernel layouts of `qwen35.quant.linear`), so it runs on the same kernels and gives each
kept row's logit bit for bit as the full head does; `greedy` maps its argmax back to full-vocabulary ids.
Verification always runs the full head, so which tokens are kept changes only how often drafts are accepted,
never the output.

`draft_vocabulary(tokenizer, n)` gives the N most frequent ids for a tokenizer's vocabulary from the lists shipped
in `qwen35/assets/draft_vocab` (built by scripts/build_draft_vocab.py from assistant replies), or None when no
list was built for exactly that vocabulary (`vocab_fingerprint`): ids of another vocabulary would be noise.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwen35.ops.cpu import Linear
from qwen35.quant.linear import Int4Linear, Int8Linear, pack_nibbles

ROW_MULTIPLE = 16  # the int8/int4 kernels work in tiles of 16 weight rows (`Int4Linear.supports`, `own_kernel`)
FINGERPRINT_PREFIX = "vocab-sha256:"
ASSETS = "assets/draft_vocab"
PACK_CHUNK_ROWS = 4096  # rows unpacked at once from PyTorch's int4 layout (a multiple of 32)


# ---------------------------------------------------------------------------------------------------------------
# The trimmed head


class DraftHead(nn.Module):
    """The LM head over `ids` only: `head(hidden (B, T, H)) -> logits (B, T, N)`, column j the logit of token
    `head.ids[j]` exactly as the full head computes it; `head.greedy(hidden) -> (B, T)` full-vocabulary ids.

    `lm_head`: the model's head, a `Linear` (tied to the embedding or not) or an `Int8Linear`/`Int4Linear`
    (`qwen35.quantize(..., head=8/4)`); a `Qwen35Model` or `qwen35.load` handle is read for its `lm_head`.
    The kept rows are copied once, in the same format (a tied embedding's table is only read); the row count is
    padded to a multiple of 16 with copies of the first row, and those columns are cut off again.
    """

    def __init__(self, lm_head: nn.Module, ids: torch.Tensor | list[int]):
        super().__init__()
        lm_head = _head_of(lm_head)
        ids = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
        vocab = _out_features(lm_head)
        if ids.numel() == 0:
            raise ValueError("a draft head needs at least one token id")
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}); got {int(ids.min())}..{int(ids.max())}")
        if ids.unique().numel() != ids.numel():
            raise ValueError("token ids must be distinct")
        self.n = ids.numel()
        rows = torch.cat([ids, ids[:1].expand(-self.n % ROW_MULTIPLE)])
        self.register_buffer("ids", ids.to(_device_of(lm_head)))
        self.proj = trimmed_linear(lm_head, rows)

    @property
    def vocab_size(self) -> int:
        return self.n

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.proj(hidden)
        return logits if logits.shape[-1] == self.n else logits[..., :self.n]

    @torch.no_grad()
    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """The most likely kept token at each position, as a full-vocabulary id (B, T)."""
        return self.ids[self.forward(hidden).argmax(-1)]

    def extra_repr(self) -> str:
        return f"n={self.n}, rows={_out_features(self.proj)}"


def _head_of(module: Any) -> nn.Module:
    """The LM head itself, given it or a model / load handle holding one."""
    for _ in range(3):
        if isinstance(module, (nn.Linear, Int8Linear, Int4Linear)):
            return module
        inner = getattr(module, "lm_head", None)
        module = inner if inner is not None else getattr(module, "model", None)
    raise TypeError("DraftHead needs the model's lm_head: an nn.Linear, Int8Linear or Int4Linear")


def _out_features(module: nn.Module) -> int:
    return module.out_features


def _device_of(module: nn.Module) -> torch.device:
    return next(module.buffers(), None).device if not isinstance(module, nn.Linear) else module.weight.device


@torch.no_grad()
def trimmed_linear(head: nn.Module, rows: torch.Tensor) -> nn.Module:
    """A layer of the same kind and format as `head` with only weight rows `rows` (in that order)."""
    rows = rows.to(torch.long)
    if isinstance(head, nn.Linear):
        out = Linear(head.in_features, rows.numel(), bias=head.bias is not None, device="meta")
        out.weight = nn.Parameter(head.weight.detach().index_select(0, rows.to(head.weight.device)),
                                  requires_grad=False)
        if head.bias is not None:
            out.bias = nn.Parameter(head.bias.detach()[rows.to(head.bias.device)], requires_grad=False)
        return out
    if isinstance(head, Int8Linear):
        return Int8Linear(*int8_rows(head, rows))
    if isinstance(head, Int4Linear):
        return Int4Linear(*int4_rows(head, rows), head.group_size)
    raise TypeError(f"cannot trim a {type(head).__name__}: expected nn.Linear, Int8Linear or Int4Linear")


def _tile_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of a 16-row tile layout ((N/16, 16 * C * 4) bytes: per tile and column block, 4 bytes per row) as
    (len(rows), C, 4): row i is tile i // 16, lane i % 16."""
    tiles = packed.shape[0]
    blocks = packed.shape[1] // 64
    return packed.view(tiles, blocks, 16, 4)[rows // 16, :, rows % 16, :]


def int8_rows(head: Int8Linear, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored parts (int8 qweight (n, K), scales (n,)) of `rows`, exactly as quantized."""
    rows = rows.to(head.scales.device)
    if not head.own_kernel:
        return head.qweight[rows].contiguous(), head.scales[rows].contiguous()
    shifted = _tile_rows(head.packed, rows).reshape(rows.numel(), head.in_features)  # q + 128 (see int8_kernel_layout)
    return (shifted ^ 0x80).view(torch.int8).contiguous(), head.scales[rows].contiguous()


def int4_rows(head: Int4Linear, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stored parts (nibble-packed qweight (n, K/2), scales and zeros (n, K/G)) of `rows`, exactly."""
    n = rows.numel()
    if head.own_kernel:
        m = _tile_rows(head.packed, rows).to(torch.int32)  # (n, K/8, 4): bytes (c0|c4) (c1|c5) (c2|c6) (c3|c7)
        lo = (m[..., 0::2] & 15) | ((m[..., 1::2] & 15) << 4)  # stored bytes (c0|c1) (c2|c3)
        hi = (m[..., 0::2] >> 4) | (m[..., 1::2] & 0xF0)  # stored bytes (c4|c5) (c6|c7)
        qweight = torch.cat([lo, hi], dim=-1).reshape(n, head.in_features // 2).to(torch.uint8)
        scales = head.scales[rows // 16, :, rows % 16].contiguous()  # tile tables (N/16, K/G, 16) -> (n, K/G)
        zeros = head.zeros[rows // 16, :, rows % 16].contiguous()
        return qweight, scales, zeros
    stored = getattr(head, "stored", None)
    if stored is not None:  # a tied embedding on PyTorch's kernel keeps its stored parts
        return stored.qweight[rows].contiguous(), stored.scales[rows].contiguous(), stored.zeros[rows].contiguous()
    q = torch.empty(n, head.in_features, dtype=torch.uint8)
    order = rows.argsort()
    sorted_rows = rows[order]
    for start in range(0, head.out_features, PACK_CHUNK_ROWS):  # PyTorch's layout is read a block of rows at a time
        stop = min(start + PACK_CHUNK_ROWS, head.out_features)
        lo, hi = torch.searchsorted(sorted_rows, torch.tensor([start, stop])).tolist()
        if lo < hi:
            q[order[lo:hi]] = int4pack_block(head.packed, start, stop)[sorted_rows[lo:hi] - start]
    scales, zeros = head.scales_zeros[:, rows].transpose(0, 1).unbind(-1)  # (K/G, N, 2) -> (n, K/G) each
    return pack_nibbles(q), scales.contiguous(), zeros.contiguous()


def int4pack_block(packed: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop (start a multiple of PACK_CHUNK_ROWS) of `_convert_weight_to_int4pack_for_cpu`'s layout as
    (rows, K) uint8 in [0, 15]. That layout differs with the CPU's vector width (blocks of 32 rows on AVX2, other
    blocks on AVX-512), so it is not assumed: packing probe matrices of the same shape gives where each value
    lands (`_int4pack_order`), and the block is checked by packing it again."""
    k = packed.shape[1] * 2
    raw = packed.reshape(-1)[start * k // 2:stop * k // 2]
    nibbles = torch.stack([raw & 15, raw >> 4], dim=-1).reshape(-1)
    q = torch.empty((stop - start) * k, dtype=torch.uint8)
    q[_int4pack_order(stop - start, k)] = nibbles
    q = q.view(stop - start, k)
    again = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    if not torch.equal(again.reshape(-1), raw):
        raise RuntimeError("PyTorch's int4 packing is not row-block local here: cannot read rows back")
    return q


@functools.lru_cache(maxsize=2)
def _int4pack_order(n: int, k: int) -> torch.Tensor:
    """For each nibble of the packed (n, k) layout (low nibble first), the flat index of the value it holds."""
    index = torch.arange(n * k, dtype=torch.int64)
    order = torch.zeros(n * k, dtype=torch.int64)
    for digit in range(max(1, ((n * k - 1).bit_length() + 3) // 4)):
        probe = ((index >> (4 * digit)) & 15).view(n, k).to(torch.int32)
        raw = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).reshape(-1)
        order |= torch.stack([raw & 15, raw >> 4], dim=-1).reshape(-1).to(torch.int64) << (4 * digit)
    return order


# ---------------------------------------------------------------------------------------------------------------
# Which vocabulary: fingerprints, and the shipped frequency lists


def vocab_fingerprint(spec: dict | str | Path | Any) -> str:
    """"vocab-sha256:<hex>" of a tokenizer's whole vocabulary, id for id (model vocabulary and added tokens).

    `spec`: a parsed `tokenizer.json`, its path or its directory, a `tokenizers.Tokenizer` or a qwen35
    `Tokenizer`. Only the token -> id table counts, not how the file is written (merge notation, key order,
    normalizer options), so the offline-built Qwen3.5 tokenizer.json and the Hub's agree.
    """
    if not isinstance(spec, dict):
        spec = _tokenizer_json(spec)
    model = spec.get("model") or {}
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        table = {int(i): str(tok) for tok, i in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [token, score] in id order
        table = {i: str(entry[0]) for i, entry in enumerate(vocab)}
    else:
        raise ValueError("tokenizer.json has no model vocabulary")
    for added in spec.get("added_tokens") or ():
        table[int(added["id"])] = str(added["content"])
    digest = hashlib.sha256()
    for i in sorted(table):
        digest.update(f"{i}\x1f{table[i]}\x1e".encode("utf-8", "surrogatepass"))
    return FINGERPRINT_PREFIX + digest.hexdigest()


def _tokenizer_json(source: Any) -> dict:
    for name in ("_tk", "tokenizer"):  # a qwen35 Tokenizer (or a transformers one) wraps a tokenizers.Tokenizer
        inner = getattr(source, name, None)
        if inner is not None and hasattr(inner, "to_str"):
            source = inner
            break
    if hasattr(source, "to_str"):
        return json.loads(source.to_str())
    path = Path(source)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: need a tokenizer.json or the directory holding one")
    return _read_json_cached(str(path.resolve()), path.stat().st_mtime_ns, path.stat().st_size)


@functools.lru_cache(maxsize=4)
def _read_json_cached(path: str, mtime_ns: int, size: int) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=32)
def _fingerprint_of_file(path: str, mtime_ns: int, size: int) -> str:
    return vocab_fingerprint(_read_json_cached(path, mtime_ns, size))


def _fingerprint(source: Any) -> str:
    if isinstance(source, str) and source.startswith(FINGERPRINT_PREFIX):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: need a tokenizer.json, its directory or a fingerprint")
        stat = path.stat()
        return _fingerprint_of_file(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    return vocab_fingerprint(source)


def shipped_lists() -> dict[str, dict[str, str]]:
    """The frequency lists in the package: fingerprint -> their metadata (name, file, counts, sources)."""
    return dict(_index())


@functools.cache
def _index() -> tuple[tuple[str, dict[str, str]], ...]:
    from safetensors import safe_open

    found = []
    root = resources.files("qwen35").joinpath(ASSETS)
    if not root.is_dir():
        return ()
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".safetensors"):
            continue
        with resources.as_file(entry) as path, safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        if "fingerprint" in meta:
            found.append((meta["fingerprint"], {**meta, "file": entry.name}))
    return tuple(found)


@functools.cache
def _load_ids(file: str) -> torch.Tensor:
    from safetensors.torch import load

    data = resources.files("qwen35").joinpath(ASSETS, file).read_bytes()
    return load(data)["ids"].to(torch.long)


def draft_vocabulary(tokenizer: Any, n: int) -> torch.LongTensor | None:
    """The `n` most frequent token ids of `tokenizer`'s vocabulary, most frequent first (control tokens such as
    <|im_end|>, <think>, <tool_call> always at the front), or None when no shipped list was built for exactly this
    vocabulary. `tokenizer`: a directory with tokenizer.json, the file, its `vocab_fingerprint`, or a tokenizer
    object. A list holds at most its built length (65,536 ids for Qwen3.5's, the whole 12,288 for nano's):
    asking for more gives all of it."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    meta = dict(_index()).get(_fingerprint(tokenizer))
    if meta is None:
        return None
    return _load_ids(meta["file"])[:n].clone()
