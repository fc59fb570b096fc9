"""Speculative decoding with the model's own multi-token-prediction (MTP) head: one decode step of the engine
that drafts k tokens with the head, verifies them in one forward of k + 1 tokens and keeps the longest agreeing
prefix, plus the token the verify pass itself samples after it.

Correctness never depends on the draft: every kept token is sampled from the model's own logits by the engine's
sampler, in order, exactly as plain decoding samples it, and a draft is accepted when it is the token sampled. As
the drafts are greedy (all their probability on one token), this is rejection sampling: a draft d is accepted
with probability p(d), and a rejected one is replaced by a token drawn from p without d, so the output
distribution is p. Since the verify pass computes the plain decode's logits bit for bit and the sampler draws
in the same order, the output is the plain decode's token for token: greedy, and sampled with the same seed. The verify
pass runs its tokens one by one inside each layer (`ModelCache.track`) but its linear layers on all of them at
once: on a CPU, decode is bound by reading the weights, so k + 1 tokens cost little more than one.

The head's state lives in the batch's `ModelCache`: its K/V (`cache.draft`) one slot behind the model's and the
final hidden state of each sequence's last token (`cache.hidden`), whose head slot waits for the token after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from qwen35.cache import ModelCache
from qwen35.models import Qwen35Model
from qwen35.ops import cpu
from qwen35.ops.cpu import GEMV_ROWS
from qwen35.quant.linear import Int4Linear, Int8Linear
from qwen35.runtime.draft_vocab import DraftHead, draft_vocabulary
from qwen35.runtime.scheduler import Sequence

if TYPE_CHECKING:
    from qwen35.runtime.engine import Event

MAX_DRAFT = 4
# The default where it was measured to pay (docs/speculative.md, benchmarks/bench_mtp.py, 2 cores), on a CPU with
# qwen35's kernels, whose decode is bound by reading the weights: bf16 weights of an official size (0.8B: 1.37x /
# 1.53x at acceptance 0.6 / 0.7 on a Xeon, 1.10x / 1.17x on a Zen 4, 1.42x / 1.59x on an AVX2 Zen 3) and int4
# weights from the 4B up on AVX-512 (4B int4, verify passes on the native plan: 1.11-1.33x / 1.18-1.49x on a
# Zen 4). Off where it did not pay: int4 below 4B (0.8B: 1.00-1.24x at 0.6 on a Zen 4, 1.17x on the Zen 3), int4
# on the AVX2 kernels (4B: a verify pass of 2 tokens 1.52x a step, 1.00x / 1.04x at 0.6 / 0.7), int8 (not
# measured since its kernel took activations to int8 as int4's does), the built-in nano, whose steps are Python
# overhead (0.92-1.02x at k = 2 with its retrained head, 2.1 tokens a step), CPUs without qwen35's kernels
# (PyTorch's on AVX2: a verify pass of 2 tokens cost 2.5x a step), and where it was not measured (GPU, fp32).
DEFAULT_DRAFT, DEFAULT_DRAFT_VOCAB = 2, 16384
INT4_FROM_HIDDEN = 2560  # the 4B's width
Sampler = Callable[[Sequence, torch.Tensor], "Event"]


class Speculator:
    """Drafts `k` tokens per sequence and step with `model.mtp`; `head`: the draft's LM head, hidden (B, T, H) ->
    token ids (B, T) (default: the argmax of the full LM head; `DraftHead` drafts over a trimmed vocabulary).

    A batch whose verify pass would exceed the decode kernels' rows (GEMV_ROWS: B x (k + 1)) drafts fewer tokens
    per sequence, down to none: past that the verify pass is a compute-bound matrix product, not a weight read.
    """

    def __init__(self, model: Qwen35Model, k: int, head: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if model.mtp is None:
            raise ValueError("this checkpoint has no multi-token-prediction head (no `mtp.*` tensors, or "
                             "mtp_num_hidden_layers is 0), so it cannot draft: run without --draft / draft=")
        if not 1 <= k <= MAX_DRAFT:
            raise ValueError(f"draft={k} is not supported: draft 1 to {MAX_DRAFT} tokens per step (0 turns it off)")
        self.model, self.k = model, k
        self.head = head or (lambda h: model.lm_head(h).float().argmax(-1))

    def tokens_for(self, batch: int) -> int:
        """How many tokens to draft for a batch of this size (0: a plain step)."""
        return max(0, min(self.k, GEMV_ROWS // batch - 1))

    def step(self, cache: ModelCache, running: list[Sequence], sample: Sampler) -> list[list[Event]]:
        """One decode step of the running batch: each sequence's events (1 to k + 1 tokens; its last one ends it
        or waits to be fed). `sample(seq, logits)` is the engine's sampler."""
        b, device = len(running), cache.seen.device
        k = self.tokens_for(b)
        x = torch.tensor([[s.generated[-1]] for s in running], device=device)
        base = cache.seen if cache.rope_delta is None else cache.seen + cache.rope_delta  # x's positions
        drafts = self.propose(cache, x, base, k).tolist()
        fed = torch.cat([x, torch.tensor(drafts, dtype=x.dtype, device=device).view(b, k)], dim=1)
        if k:
            cache.track()
        features = self.model.features(fed, cache)
        logits = self.model.lm_head(features)
        events = []
        for row, seq in enumerate(running):
            mine = []
            for j in range(k + 1):
                mine.append(sample(seq, logits[row, j]))
                if mine[-1].finish_reason is not None or j == k or mine[-1].token != drafts[row][j]:
                    break
            events.append(mine)
        keep = [len(mine) for mine in events]
        if k:
            cache.rollback(keep, k + 1)
        self.catch_up(cache, fed, features, base, keep)
        return events

    def propose(self, cache: ModelCache, x: torch.Tensor, base: torch.Tensor, k: int) -> torch.Tensor:
        """k tokens (B, k) by the head, each chained from the previous draft's hidden state. Its first forward
        pairs the last hidden state with `x` (at the position before x's): that slot of its K/V is real and
        kept (it runs with k = 0 too); the drafts' slots are dropped."""
        b, length = x.shape[0], cache.length
        hidden, token, drafts = cache.hidden[:, None], x, []
        for i in range(max(k, 1)):
            valid = torch.cat([cache.valid, cache.valid.new_ones(b, i)], dim=1)
            hidden = self.model.draft(token, hidden, cache, (base - 1 + i)[None, :, None].expand(3, b, 1), valid)
            if i < k:
                token = self.head(hidden)
                drafts.append(token)
        for layer in cache.draft:
            layer.length = length
        return torch.cat(drafts, dim=1) if drafts else x[:, :0]

    def catch_up(self, cache: ModelCache, fed: torch.Tensor, features: torch.Tensor, base: torch.Tensor,
                 keep: list[int]) -> None:
        """The head's slots for the kept tokens but each sequence's last: kept token j paired with kept token j+1
        (after `rollback` each sequence's kept slots end the cache, so a shorter one's first columns are holes,
        filled with its first pair and never read); the last kept token's hidden state waits in `cache.hidden`."""
        b, width = len(keep), max(keep) - 1
        kept = torch.tensor(keep, device=fed.device)
        if width:
            j = (torch.arange(width, device=fed.device)[None] - (width + 1 - kept)[:, None]).clamp(min=0)
            pairs = features.gather(1, j[..., None].expand(-1, -1, features.shape[-1]))
            positions = (base[:, None] + j)[None].expand(3, b, width)
            self.model.draft(fed[:, 1:].gather(1, j), pairs, cache, positions, cache.valid[:, :cache.length - 1])
        cache.hidden = features[torch.arange(b, device=fed.device), kept - 1]


def make_speculator(model: Qwen35Model, tokenizer: object, draft: int | None = None,
                    draft_vocab: int | None = None) -> Speculator | None:
    """The speculator `load` gives a model: `draft` tokens per step (None: the measured default, see
    `pays_by_default`; 0: off), drafted over the `draft_vocab` most frequent tokens of the tokenizer's vocabulary
    (None: DEFAULT_DRAFT_VOCAB; 0: the full LM head; a vocabulary with no shipped list drafts over all)."""
    k = (DEFAULT_DRAFT if pays_by_default(model) else 0) if draft is None else draft
    if k == 0:
        return None
    n = DEFAULT_DRAFT_VOCAB if draft_vocab is None else draft_vocab
    if n < 0:
        raise ValueError(f"draft_vocab={n} is invalid: give 0 (the full vocabulary) or a token count")
    ids = draft_vocabulary(tokenizer, n) if n else None
    return Speculator(model, k, DraftHead(model.lm_head, ids).greedy if ids is not None else None)


def pays_by_default(model: Qwen35Model) -> bool:
    """A head, an official size (hidden 1024 and up), on a CPU where qwen35's kernels run (AVX-512 or AVX2), with a
    bf16 body, or on AVX-512 an int4 one from the 4B's width up (whatever the LM head's format): see DEFAULT_DRAFT.
    Without the kernels (bf16 emulated by PyTorch) a 0.8B verify pass of 2 tokens cost 2.5x a plain step (8.1 s
    against 3.2 s), on the AVX2 kernels (Zen 3) 1.16x; an int4 row costs the AVX2 kernel arithmetic that VNNI does
    in one instruction, so there a 4B int4 verify pass of 2 tokens cost 1.52x a step."""
    weight = model.embed_tokens.weight
    kinds = {type(m) for m in model.layers.modules() if isinstance(m, (Int4Linear, Int8Linear))}  # the body's
    hidden = model.config.hidden_size
    if model.mtp is None or weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or hidden < 1024 \
            or not cpu.has_kernels():
        return False
    return not kinds or (kinds == {Int4Linear} and hidden >= INT4_FROM_HIDDEN and cpu.kernel_isa() == "avx512")
