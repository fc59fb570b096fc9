"""Per-layer inference state, built from the hybrid layer pattern.

Full-attention layers keep K/V (B, Hkv, S, hd); Gated DeltaNet layers keep the last K-1 pre-conv inputs
(B, C, K-1) and the recurrent state (B, Hv, dk, dv) in fp32. `ModelCache` owns one per layer plus what the
whole batch shares: how many real tokens each sequence has seen (for positions) and which cached slots are real
(left padding, so sequences of different lengths run in one batch exactly as they would alone), and each
sequence's rope offset: after a prompt with images, positions continue at seen + rope_delta (M-RoPE).
The recurrent state cannot be trimmed: a cache is extended, and rolled back only within a verify pass of
speculative decoding (`track`, `rollback`), which records the state after each of its tokens.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from qwen35.config import ModelConfig
from qwen35.ops.cpu import empty_on_huge_pages


class QuantKV(NamedTuple):
    """8-bit keys or values: int8 `q` (B, Hkv, S, hd) and one fp32 `scale` per token and head (B, Hkv, S, 1)."""

    q: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.to(torch.float32) * self.scale).to(dtype)


def quantize_kv(x: torch.Tensor) -> QuantKV:
    """Symmetric int8 per token and head: scale = amax / 127 over the head dimension."""
    scale = (x.float().abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    return QuantKV(torch.round(x.float() / scale).to(torch.int8), scale)


@dataclass
class KVCache:
    """Keys (after norm and RoPE) and values of one full-attention layer, in buffers that grow by doubling, or
    straight to `capacity` slots when the context is planned (the pages are only touched as slots fill, so a
    short conversation costs what it uses, and a long one is never copied on the way).

    Decode writes one slot in place instead of copying the whole history every token.
    """

    k: torch.Tensor | None = None  # (B, Hkv, capacity, hd); slots [0, length) are filled
    v: torch.Tensor | None = None
    length: int = 0
    capacity: int = 0  # slots to allocate when growing (the planned context + 1); 0: double
    bits: int = 16  # 8: int8 `k`/`v` with fp32 scales per token and head (B, Hkv, capacity, 1)
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    stepwise: bool = False  # a verify pass: attention query by query, as decode steps compute it

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor | QuantKV, torch.Tensor | QuantKV]:
        """Append this step's K/V (B, Hkv, T, hd) and return views of the whole history (`QuantKV` pairs for an
        8-bit cache: attention reads them block by block, never a dequantized copy of the whole history)."""
        end = self.length + k.shape[2]
        if self.bits == 16:
            self.reserve(k.shape[2], k)
            self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
            self.length = end
            return self.k[:, :, :end], self.v[:, :, :end]
        qk, qv = quantize_kv(k), quantize_kv(v)
        self.reserve(k.shape[2], qk.q)
        self.k[:, :, self.length:end], self.k_scale[:, :, self.length:end] = qk
        self.v[:, :, self.length:end], self.v_scale[:, :, self.length:end] = qv
        self.length = end
        return (QuantKV(self.k[:, :, :end], self.k_scale[:, :, :end]),
                QuantKV(self.v[:, :, :end], self.v_scale[:, :, :end]))

    def tensors(self) -> list[torch.Tensor]:
        """The filled slots of every buffer (K, V and, at 8 bits, their scales)."""
        return [t[:, :, : self.length] for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]

    def reserve(self, n: int, like: torch.Tensor) -> None:
        """Room for n more slots, and always one spare: a compiled decode step then never grows the buffers nor
        sees them exactly full (either would re-specialise its graph). `like`: a (B, Hkv, any, hd) key."""
        end = self.length + n
        if self.k is not None and end < self.k.shape[2]:
            return
        slots = max(end + 1, self.capacity or 2 * self.length, 256)
        if self.k is None:
            shape = (*like.shape[:2], 0, like.shape[3])
            self.k, self.v = like.new_empty(shape), like.new_empty(shape)
            if self.bits == 8:
                self.k_scale, self.v_scale = (like.new_empty(shape[:3] + (1,), dtype=torch.float32) for _ in range(2))
        grown = []
        for t in (self.k, self.v, self.k_scale, self.v_scale):
            if t is None:
                grown.append(None)
                continue
            buffer = _buffer(t, (*t.shape[:2], slots, t.shape[3]))
            buffer[:, :, : self.length] = t[:, :, : self.length]
            grown.append(buffer)
        self.k, self.v, self.k_scale, self.v_scale = grown

    def nbytes(self) -> int:
        """Bytes of the filled slots."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


@dataclass
class DeltaCache:
    """Short-conv history and recurrent state of one Gated DeltaNet layer."""

    conv: torch.Tensor | None = None  # (B, C, K-1), activation dtype
    state: torch.Tensor | None = None  # (B, Hv, dk, dv), fp32
    trail: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # a verify pass: (conv, state) after each token
    splits: tuple[int, ...] = ()  # a prefill forward's offsets (tokens into it) whose states it also keeps
    kept: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (conv, state) at each split

    def tensors(self) -> list[torch.Tensor]:
        """The state's buffers (conv history, recurrent state), once it has them."""
        return [t for t in (self.conv, self.state) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


LayerCache = KVCache | DeltaCache


@dataclass
class ModelCache:
    """All layers' state for a batch of sequences."""

    layers: list[LayerCache]
    seen: torch.Tensor  # (B,) real (non-pad) tokens consumed per sequence
    valid: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.bool))  # (B, S) real slots
    rope_delta: torch.Tensor | None = None  # (B,) position shift after images (None: all zero, text only)
    draft: list[KVCache] = field(default_factory=list)  # the MTP head's K/V (speculative decoding): one slot behind
    hidden: torch.Tensor | None = None  # (B, H) each sequence's last final hidden state, whose MTP slot waits for
    # the token after it
    verifying: bool = False  # between `track` and `rollback`

    @property
    def length(self) -> int:
        """Slots consumed (pads included); the same for every sequence of the batch."""
        return self.valid.shape[1]

    def reserve(self, n: int, like: torch.Tensor) -> None:
        """Room for n more tokens in every K/V buffer of the model (see `KVCache.reserve`)."""
        for layer in self.layers:
            if isinstance(layer, KVCache):
                layer.reserve(n, like)

    def nbytes(self) -> int:
        extra = 0 if self.hidden is None else self.hidden.numel() * self.hidden.element_size()
        return sum(layer.nbytes() for layer in self.layers + self.draft) + extra

    def track(self) -> None:
        """Start a verify pass: the next forward runs its tokens one by one and records the DeltaNet states."""
        self.verifying = True
        for layer in self.layers:
            if isinstance(layer, KVCache):
                layer.stepwise = True
            else:
                layer.trail = []

    def capture(self, offsets: list[int]) -> None:
        """The next forward also keeps every DeltaNet layer's state `offsets` tokens into it (increasing, inside
        it): a prefix snapshot there costs a copy, not a forward cut in two; [] ends it."""
        for layer in self.layers:
            if isinstance(layer, DeltaCache):
                layer.splits, layer.kept = tuple(offsets), []

    def captured(self, index: int, drop: int, hidden: torch.Tensor | None) -> "ModelCache":
        """One sequence's state `drop` tokens before the end of the last forward, its `index`-th capture: the
        DeltaNet states kept there, K/V views without the last `drop` slots (copy before they are written again),
        `hidden` the final hidden state there (a cache with MTP layers)."""
        layers: list[LayerCache] = []
        for layer in self.layers + self.draft:
            if isinstance(layer, KVCache):
                layers.append(_kv(layer.bits, layer.length - drop, [t[:, :, :-drop] for t in layer.tensors()]))
            else:
                layers.append(DeltaCache(*layer.kept[index]))
        n = len(self.layers)
        return ModelCache(layers[:n], self.seen - drop, self.valid[:, :-drop], self.rope_delta, layers[n:], hidden)

    def rollback(self, keep: list[int], t: int) -> None:
        """End a verify pass of t tokens keeping the first keep[b] of sequence b (1..t): DeltaNet states as after
        them; K/V trimmed to the longest kept, each sequence's kept slots moved to the end (its rejected ones
        before them become invalid slots, like left padding), so every sequence's last token is the last slot."""
        rows, longest, start = range(len(keep)), max(keep), self.length - t
        self.verifying = False
        for layer in self.layers:
            if isinstance(layer, DeltaCache):
                steps = layer.trail + [(layer.conv, layer.state)]
                if len(set(keep)) == 1:  # one position for all: its buffers as they are
                    layer.conv, layer.state = steps[keep[0] - 1]
                else:
                    layer.conv = torch.stack([steps[keep[b] - 1][0][b] for b in rows])
                    layer.state = torch.stack([steps[keep[b] - 1][1][b] for b in rows])
                layer.trail = None
                continue
            layer.stepwise = False
            for b in (b for b in rows if keep[b] < longest):
                for buf in (layer.k, layer.v, layer.k_scale, layer.v_scale):
                    if buf is not None:
                        buf[b, :, start + longest - keep[b]:start + longest] = buf[b, :, start:start + keep[b]].clone()
            layer.length = start + longest
        valid = self.valid[:, :start + longest].clone()
        for b in rows:
            valid[b, start:start + longest - keep[b]] = False
        self.valid = valid
        self.seen = self.seen - torch.tensor([t - k for k in keep], device=self.seen.device)

    def plan(self, context: int | None) -> "ModelCache":
        """Grow K/V straight to `context` + 1 slots (None: by doubling); returns self."""
        for layer in self.layers + self.draft:
            if isinstance(layer, KVCache):
                layer.capacity = 0 if context is None else context + 1
        return self


def make_cache(config: ModelConfig, batch_size: int = 1, device: torch.device | str = "cpu",
               kv_bits: int = 16, draft_layers: int = 0) -> ModelCache:
    """An empty cache with one entry per layer, chosen by `config.layer_types`, and `draft_layers` K/V layers for
    the MTP head (speculative decoding); K/V at `kv_bits` (16 or 8)."""
    if kv_bits not in (8, 16):
        raise ValueError(f"kv_bits={kv_bits} is not supported: use 16 (the activation dtype) or 8")
    layers: list[LayerCache] = [KVCache(bits=kv_bits) if t == "full_attention" else DeltaCache()
                                for t in config.layer_types]
    return ModelCache(layers=layers, seen=torch.zeros(batch_size, dtype=torch.long, device=device),
                      valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
                      draft=[KVCache(bits=kv_bits) for _ in range(draft_layers)])


def _buffer(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A new K/V buffer of `like`'s dtype: K and V on 2 MB pages where they can be, as a decode step reads every
    filled slot (one 0.8B layer over 8-bit keys: 32K 1.70 -> 1.43 ms, 128K 5.2 -> 4.9 ms); the 8-bit scales
    (last dim 1), a 64th of them, on ordinary pages, where a part-filled 2 MB page would cost more."""
    return empty_on_huge_pages(like, shape) if like.shape[-1] > 1 else like.new_empty(shape)


def _kv(bits: int, length: int, tensors: list[torch.Tensor]) -> KVCache:
    """A K/V layer of `length` slots in the buffers `tensors` (K, V and, at 8 bits, their scales)."""
    k, v, *scales = tensors
    return KVCache(k, v, length, bits=bits, k_scale=scales[0] if scales else None,
                   v_scale=scales[1] if scales else None)


def _pad_left(t: torch.Tensor, n: int, dim: int, value: float | bool = 0) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([torch.full(shape, value, dtype=t.dtype, device=t.device), t], dim=dim)


def merge_caches(caches: list[ModelCache]) -> ModelCache:
    """One batch from caches of different lengths: shorter K/V histories are left-padded with invalid slots.

    DeltaNet states have no length axis and simply stack. Each row then continues exactly as it would alone.
    """
    length = max(c.length for c in caches)
    layers: list[LayerCache] = []
    for i, first in enumerate(caches[0].layers + caches[0].draft):
        parts = [(c.layers + c.draft)[i] for c in caches]
        if isinstance(first, KVCache):  # each cache's left pad, also for MTP layers one slot shorter than it
            columns = zip(*[[_pad_left(t, length - c.length, 2) for t in p.tensors()] for c, p in zip(caches, parts)])
            layers.append(_kv(first.bits, length - caches[0].length + first.length, [torch.cat(c) for c in columns]))
        else:
            layers.append(DeltaCache(torch.cat([p.conv for p in parts]), torch.cat([p.state for p in parts])))
    valid = torch.cat([_pad_left(c.valid, length - c.length, 1, False) for c in caches])
    delta = None
    if any(c.rope_delta is not None for c in caches):
        delta = torch.cat([torch.zeros_like(c.seen) if c.rope_delta is None else c.rope_delta for c in caches])
    hidden = torch.cat([c.hidden for c in caches]) if caches[0].hidden is not None else None
    n = len(caches[0].layers)
    return ModelCache(layers[:n], torch.cat([c.seen for c in caches]), valid, delta, layers[n:], hidden)


class BufferPool:
    """The K/V buffers of the last retired one-sequence cache, handed to the next `select_rows` that plans buffers
    of the same shape (a snapshot's restore) instead of new ones.

    Why: a new buffer's pages fault in as they are first written, and page faults are dear on virtual machines:
    restoring a 2,014-token 0.8B snapshot into new context-sized buffers took 70 ms here (2 MB pages, 24 of
    them), after 15 s idle 170-220 ms; into recycled ones 10 ms. It holds one sequence's K/V at most (`give`
    replaces what it held), pages that sequence had already made resident; a sequence that starts without a
    snapshot clears it first, so two sequences' K/V are never resident for one.
    """

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def give(self, cache: ModelCache) -> None:
        """Keep the K/V buffers of `cache`, which nobody uses any more (a batch's are let go: no restore has
        their shape)."""
        if cache.seen.shape[0] != 1:
            return
        buffers = [t for layer in cache.layers + cache.draft if isinstance(layer, KVCache)
                   for t in (layer.k, layer.v, layer.k_scale, layer.v_scale) if t is not None]
        with self._lock:
            self._free = buffers

    def take(self, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A held buffer of this shape and `like`'s dtype (its contents stale), else a new one (`_buffer`)."""
        with self._lock:
            for i, t in enumerate(self._free):
                if t.shape == shape and t.dtype == like.dtype and t.device == like.device:
                    return self._free.pop(i)
        return _buffer(like, shape)

    def clear(self) -> None:
        with self._lock:
            self._free = []

    def __len__(self) -> int:
        return len(self._free)


def select_rows(cache: ModelCache, rows: list[int], context: int | None = None,
                pool: BufferPool | None = None) -> ModelCache:
    """Keep only `rows` of the batch, then drop leading slots that no remaining row uses. With `context`, K/V go
    straight into buffers planned for it (`ModelCache.plan`; from `pool` where it holds some): one copy, where a
    tight copy would be copied again into them by the next step's `reserve` (a 3,700-token restore: 26 -> 13 ms)."""
    index = torch.tensor(rows, device=cache.seen.device)
    valid = cache.valid[index]
    used = valid.any(0)
    start = int(used.float().argmax()) if bool(used.any()) else cache.length
    layers: list[LayerCache] = []
    for layer in cache.layers + cache.draft:
        if isinstance(layer, KVCache):
            kept = layer.length - start
            if context is None:
                layers.append(_kv(layer.bits, kept, [t[index, :, start:] for t in layer.tensors()]))
                continue
            shapes = [(len(rows), t.shape[1], max(context, kept) + 1, t.shape[3]) for t in layer.tensors()]
            buffers = [_buffer(t, shape) if pool is None else pool.take(t, shape)
                       for t, shape in zip(layer.tensors(), shapes)]
            for buffer, t in zip(buffers, layer.tensors()):
                for i, row in enumerate(rows):
                    buffer[i, :, :kept] = t[row, :, start:]
            layers.append(_kv(layer.bits, kept, buffers))
        else:
            layers.append(DeltaCache(layer.conv[index], layer.state[index]))
    delta = None if cache.rope_delta is None else cache.rope_delta[index]
    hidden = None if cache.hidden is None else cache.hidden[index]
    n = len(cache.layers)
    return ModelCache(layers[:n], cache.seen[index], valid[:, start:], delta, layers[n:], hidden).plan(context)


def is_finite(cache: ModelCache) -> bool:
    """No NaN/Inf in any layer's state (a state that is not finite must never be reused)."""
    for layer in cache.layers + cache.draft:
        if any(not bool(torch.isfinite(t).all()) for t in layer.tensors()):
            return False
    return cache.hidden is None or bool(torch.isfinite(cache.hidden).all())
