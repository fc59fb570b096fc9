"""Per-layer inference state, built from the hybrid layer pattern.

Full-attention layers keep K/V (B, Hkv, S, hd); Gated DeltaNet layers keep the last K-1 pre-conv inputs
(B, C, K-1) and the recurrent state (B, Hv, dk, dv) in fp32. `ModelCache` owns one per layer plus what the
whole batch shares: how many real tokens each sequence has seen (for positions) and which cached slots are real
(left padding, so sequences of different lengths run in one batch exactly as they would alone), and each
sequence's rope offset: after a prompt with images, positions continue at seen + rope_delta (M-RoPE).
The recurrent state cannot be trimmed: a cache is only ever extended, never rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwen35.config import ModelConfig


@dataclass
class KVCache:
    """Keys (after norm and RoPE) and values of one full-attention layer, in buffers that grow by doubling.

    Decode writes one slot in place instead of copying the whole history every token.
    """

    k: torch.Tensor | None = None  # (B, Hkv, capacity, hd); slots [0, length) are filled
    v: torch.Tensor | None = None
    length: int = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's K/V (B, Hkv, T, hd) and return views of the whole history."""
        self.reserve(k.shape[2], k)
        end = self.length + k.shape[2]
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reserve(self, n: int, like: torch.Tensor) -> None:
        """Room for n more slots, and always one spare: a compiled decode step then never grows the buffers nor
        sees them exactly full (either would re-specialise its graph). `like`: a (B, Hkv, any, hd) key."""
        end = self.length + n
        if self.k is not None and end < self.k.shape[2]:
            return
        shape = (*like.shape[:2], max(end + 1, 2 * self.length, 256), like.shape[3])
        grown_k, grown_v = like.new_empty(shape), like.new_empty(shape)
        if self.k is not None:
            grown_k[:, :, : self.length] = self.k[:, :, : self.length]
            grown_v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = grown_k, grown_v

    def nbytes(self) -> int:
        """Bytes of the filled slots."""
        return sum(t[:, :, : self.length].numel() * t.element_size() for t in (self.k, self.v) if t is not None)


@dataclass
class DeltaCache:
    """Short-conv history and recurrent state of one Gated DeltaNet layer."""

    conv: torch.Tensor | None = None  # (B, C, K-1), activation dtype
    state: torch.Tensor | None = None  # (B, Hv, dk, dv), fp32

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv, self.state) if t is not None)


LayerCache = KVCache | DeltaCache


@dataclass
class ModelCache:
    """All layers' state for a batch of sequences."""

    layers: list[LayerCache]
    seen: torch.Tensor  # (B,) real (non-pad) tokens consumed per sequence
    valid: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.bool))  # (B, S) real slots
    rope_delta: torch.Tensor | None = None  # (B,) position shift after images (None: all zero, text only)

    @property
    def length(self) -> int:
        """Slots consumed (pads included); the same for every sequence of the batch."""
        return self.valid.shape[1]

    def reserve(self, n: int, like: torch.Tensor) -> None:
        """Room for n more tokens in every K/V buffer (see `KVCache.reserve`)."""
        for layer in self.layers:
            if isinstance(layer, KVCache):
                layer.reserve(n, like)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def make_cache(config: ModelConfig, batch_size: int = 1, device: torch.device | str = "cpu") -> ModelCache:
    """An empty cache with one entry per layer, chosen by `config.layer_types`."""
    layers: list[LayerCache] = [KVCache() if t == "full_attention" else DeltaCache() for t in config.layer_types]
    return ModelCache(layers=layers, seen=torch.zeros(batch_size, dtype=torch.long, device=device),
                      valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=device))


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
    for i, first in enumerate(caches[0].layers):
        parts = [c.layers[i] for c in caches]
        if isinstance(first, KVCache):
            k = torch.cat([_pad_left(p.k[:, :, : p.length], length - p.length, 2) for p in parts])
            v = torch.cat([_pad_left(p.v[:, :, : p.length], length - p.length, 2) for p in parts])
            layers.append(KVCache(k, v, length))
        else:
            layers.append(DeltaCache(torch.cat([p.conv for p in parts]), torch.cat([p.state for p in parts])))
    valid = torch.cat([_pad_left(c.valid, length - c.length, 1, False) for c in caches])
    delta = None
    if any(c.rope_delta is not None for c in caches):
        delta = torch.cat([torch.zeros_like(c.seen) if c.rope_delta is None else c.rope_delta for c in caches])
    return ModelCache(layers, torch.cat([c.seen for c in caches]), valid, delta)


def select_rows(cache: ModelCache, rows: list[int]) -> ModelCache:
    """Keep only `rows` of the batch, then drop leading slots that no remaining row uses."""
    index = torch.tensor(rows, device=cache.seen.device)
    valid = cache.valid[index]
    used = valid.any(0)
    start = int(used.float().argmax()) if bool(used.any()) else cache.length
    layers: list[LayerCache] = []
    for layer in cache.layers:
        if isinstance(layer, KVCache):
            layers.append(KVCache(layer.k[index, :, start: layer.length], layer.v[index, :, start: layer.length],
                                  layer.length - start))
        else:
            layers.append(DeltaCache(layer.conv[index], layer.state[index]))
    delta = None if cache.rope_delta is None else cache.rope_delta[index]
    return ModelCache(layers, cache.seen[index], valid[:, start:], delta)


def is_finite(cache: ModelCache) -> bool:
    """No NaN/Inf in any layer's state (a state that is not finite must never be reused)."""
    for layer in cache.layers:
        tensors = (layer.k[:, :, : layer.length], layer.v[:, :, : layer.length]) if isinstance(layer, KVCache) \
            else (layer.conv, layer.state)
        if any(t is not None and not bool(torch.isfinite(t).all()) for t in tensors):
            return False
    return True
