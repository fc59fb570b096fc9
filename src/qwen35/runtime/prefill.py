"""The prefill driver: a prompt into a cache in chunks that bound activation memory (with images: their features
and multimodal positions). The engine calls it one chunk per step; benchmarks call `prefill` whole."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwen35.cache import ModelCache
from qwen35.config import ModelConfig
from qwen35.models import Qwen35Model
from qwen35.models.vision import ImageInputs

PREFILL_ACTIVATIONS = 1 << 20  # prompt tokens x hidden size per prefill forward: bounds activation memory


def prefill_chunk(model: Qwen35Model, ids: torch.Tensor, cache: ModelCache, start: int, end: int,
                  images: ImageInputs | None = None,
                  capture: Sequence[int] = ()) -> tuple[torch.Tensor, list[ModelCache]]:
    """Prompt ids[:, start:end] (B=1 with images) into the cache; returns the chunk's last logits (B, 1, V) and,
    for each prompt position of `capture` (inside the chunk), the state there (`ModelCache.captured`: views, to
    copy before the cache's next step) - one forward, not one cut at each snapshot point.

    With images, the chunk's image tokens take their features and every token its M-RoPE position; the last chunk
    records the rope delta in the cache so decoding continues at the right positions. A cache with MTP layers
    (speculative decoding) has the head catch up over the chunk (`mtp_catch_up`).
    """
    end = min(end, ids.shape[1])
    embeds = positions = None
    if images is not None:
        image_id = model.config.image_token_id
        first = int((ids[0, :start] == image_id).sum())
        count = int((ids[0, start:end] == image_id).sum())
        embeds = model.embed(ids[:, start:end], images.features[first:first + count])
        positions = images.positions[:, None, max(start - 1, 0):end].to(ids.device)
    else:
        base = cache.seen if cache.rope_delta is None else cache.seen + cache.rope_delta
        positions = (base[:, None] + torch.arange(-min(start, 1), end - start, device=ids.device))[None]
        positions = positions.expand(3, *positions.shape[1:])
    hidden = cache.hidden
    cache.capture([p - start for p in capture])
    x = model.features(ids[:, start:end], cache, position_ids=positions[..., min(start, 1):], inputs_embeds=embeds)
    if cache.draft:
        mtp_catch_up(model, cache, ids[:, max(start, 1):end], x, hidden, positions[..., :-1])
    states = [cache.captured(i, end - p, x[:, p - start - 1] if cache.draft else None) for i, p in enumerate(capture)]
    cache.capture([])
    if images is not None and end >= ids.shape[1]:
        cache.rope_delta = torch.full_like(cache.seen, images.rope_delta)
    return model.lm_head(x[:, -1:]), states


def mtp_catch_up(model: Qwen35Model, cache: ModelCache, next_ids: torch.Tensor, x: torch.Tensor,
                 hidden: torch.Tensor | None, positions: torch.Tensor) -> None:
    """The MTP head over a prefilled chunk: each token's hidden state (the one before the chunk, `hidden`, then
    the chunk's own `x` but its last) paired with the token after it, at that token's position; the chunk's last
    hidden state waits in `cache.hidden` for the token after it."""
    pairs = x[:, :-1] if hidden is None else torch.cat([hidden[:, None], x[:, :-1]], dim=1)
    if pairs.shape[1]:
        model.draft(next_ids, pairs, cache, positions, cache.valid[:, :cache.length - 1])
    cache.hidden = x[:, -1]


def prefill_chunk_size(config: ModelConfig) -> int:
    """512 prompt tokens per forward, halved until tokens x hidden size fits PREFILL_ACTIVATIONS: 512 at 0.8B
    and 2B, 256 at 4B and 9B (measured at 4B int4: peak RSS 0.07 GB lower, prefill speed within the noise;
    at 0.8B, 256 was 4% slower over 4096 tokens)."""
    chunk = 512
    while chunk > 64 and chunk * config.hidden_size > PREFILL_ACTIVATIONS:
        chunk //= 2
    return chunk


def prefill(model: Qwen35Model, ids: torch.Tensor, cache: ModelCache, chunk: int | None = None,
            images: ImageInputs | None = None) -> torch.Tensor:
    """Feed prompt ids (B, T) into the cache in chunks (default: `prefill_chunk_size`); returns the last
    position's logits (B, V)."""
    chunk = chunk or prefill_chunk_size(model.config)
    logits = None
    for start in range(0, ids.shape[1], chunk):
        logits, _ = prefill_chunk(model, ids, cache, start, start + chunk, images)
    assert logits is not None, "prefill needs at least one token"
    return logits[:, -1]
