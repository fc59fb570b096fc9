"""Token generation as a generator: chunked prefill, then one decode step per yielded token.

The engine knows nothing about text: it takes token ids and yields token ids. Detokenization, stop strings and
thinking/answer splitting happen in the layer above (`qwen35.api`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from qwen35.cache import ModelCache, make_cache
from qwen35.models import Qwen35Model
from qwen35.sampling import SamplingParams, sample

PREFILL_CHUNK = 512  # prompt tokens per forward during prefill: bounds activation memory on long prompts


def prefill(model: Qwen35Model, ids: torch.Tensor, cache: ModelCache, chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Feed prompt ids (B, T) into the cache in chunks; returns the last position's logits (B, V)."""
    logits = None
    for start in range(0, ids.shape[1], chunk):
        logits = model(ids[:, start:start + chunk], cache, last_only=True)
    assert logits is not None, "prefill needs at least one token"
    return logits[:, -1]


@torch.inference_mode()
def generate_tokens(model: Qwen35Model, prompt_ids: Sequence[int], params: SamplingParams,
                    eos_ids: Sequence[int] = (), sample_limit: int | None = None) -> Iterator[int]:
    """Yield sampled tokens one by one; stops after an EOS token (which is yielded) or `params.max_tokens`.

    `sample_limit` excludes ids >= it from sampling (the embedding rows past the tokenizer are untrained).
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    limit = model.config.max_position_embeddings
    if len(prompt_ids) >= limit:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this model's context is {limit} tokens")
    device = model.embed_tokens.weight.device
    cache = make_cache(model.config, 1, device)
    generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
    logits = prefill(model, torch.tensor([list(prompt_ids)], device=device), cache)[0]
    eos = set() if params.ignore_eos else set(eos_ids)
    generated: list[int] = []
    while True:
        if sample_limit is not None and sample_limit < logits.shape[-1]:
            logits[sample_limit:] = float("-inf")
        if not torch.isfinite(logits).any():
            raise FloatingPointError("the model produced no finite logits (NaN/Inf); the weights may be corrupt")
        token = sample(logits, torch.tensor(generated, dtype=torch.long, device=device), params, generator)
        generated.append(token)
        yield token
        if token in eos or len(generated) >= params.max_tokens or len(prompt_ids) + len(generated) >= limit:
            return
        logits = model(torch.tensor([[token]], device=device), cache)[0, -1]
