"""The Qwen3.5 text decoder (dense `qwen3_5` and MoE `qwen3_5_moe`), top to bottom.

A stack of pre-norm residual blocks; `config.layer_types[i]` picks the token mixer of block i: Gated DeltaNet
(linear attention with a fixed-size recurrent state) or gated full attention with partial, interleaved
multimodal RoPE. Parameter names are the reference's (`model.language_model.` stripped), so official
checkpoints load without renaming. The model only does math: state lives in a `ModelCache` passed in, and
each op (linear, norm, attention, the DeltaNet mixer, a whole decode step) comes from `qwen35.ops`, which picks
its kernel (qwen35's CPU kernels for decode steps where they run, else PyTorch's, the reference).
Shapes: B batch, T new tokens, S cached slots, H hidden, hd head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen35.cache import DeltaCache, KVCache, ModelCache, make_cache
from qwen35.config import ModelConfig
from qwen35.ops import causal_conv1d, chunk_gated_delta_rule, recurrent_gated_delta_rule
from qwen35.ops.attention import attention, k_length
from qwen35.ops.cpu import Linear, prepare_compile, rms_norm, scale_rows
from qwen35.ops.decode import NativeDecode
from qwen35.ops.deltanet import gated_deltanet_mix


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: y = x_hat * (1 + w), computed in fp32 and cast back at the end."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, offset=1.0)


class GatedRMSNorm(nn.Module):
    """DeltaNet output norm: (w * cast(x_hat)) * silu(z), with a plain (not 1 + w) weight shared by all heads."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = scale_rows(xf, torch.rsqrt(xf.pow(2).mean(-1) + self.eps))
        return ((self.weight * xf.to(x.dtype)) * F.silu(z.float())).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inner, bias=False)
        self.up_proj = Linear(hidden, inner, bias=False)
        self.down_proj = Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """All routed experts as stacked weights: gate_up_proj (E, 2I, H) with rows [gate; up], down_proj (E, H, I)."""

    def __init__(self, n: int, hidden: int, inner: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(n, hidden, inner))

    def forward(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (N, H); index, weight (N, k): each token's chosen experts and their mixing weights."""
        out = torch.zeros_like(x)
        for e in index.unique().tolist():
            token, slot = torch.where(index == e)
            gate, up = F.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e]) * weight[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


class SparseMoE(nn.Module):
    """Softmax router, top-k renormalised, plus a shared expert scaled by a sigmoid gate."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h = config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.gate = Linear(h, config.num_experts, bias=False)
        self.experts = Experts(config.num_experts, h, config.moe_intermediate_size)
        self.shared_expert = MLP(h, config.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(h, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = self.gate(flat)
        weight, index = torch.softmax(logits, dim=-1, dtype=torch.float).topk(self.top_k, dim=-1)
        weight = (weight / weight.sum(-1, keepdim=True)).to(logits.dtype)
        out = self.experts(flat, index, weight)
        out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(x.shape)


class Rotary:
    """cos/sin (B, T, rotary_dim) for positions (3, B, T) = (t, h, w), with interleaved M-RoPE sections.

    Frequency i follows axis h when i % 3 == 1 and i < 3*s_h, axis w when i % 3 == 2 and i < 3*s_w, else t;
    for text the three axes are equal and this is ordinary RoPE. The inverse frequencies and each frequency's
    axis are made once per device: made at each call they were two thirds of its time (~50 us, four calls in a
    speculative step of the nano).
    """

    def __init__(self, config: ModelConfig):
        self.config = config
        self.tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(inverse frequencies (rd/2,) fp32, the position axis of each (rd/2,))."""
        if device not in self.tables:
            c, rd = self.config, self.config.rotary_dim
            inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, rd, 2, dtype=torch.float, device=device) / rd))
            _, s_h, s_w = c.mrope_section
            axis = [1 if i % 3 == 1 and i < 3 * s_h else 2 if i % 3 == 2 and i < 3 * s_w else 0 for i in range(rd // 2)]
            self.tables[device] = inv_freq, torch.tensor(axis, device=device)
        return self.tables[device]

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, axis = self.table(positions.device)
        freqs = positions.float()[axis].permute(1, 2, 0) * inv_freq  # (B, T, rd/2): frequency i at its axis
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotary_cos_sin(config: ModelConfig, positions: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`Rotary` without a model to hold its tables (training, tests)."""
    return Rotary(config)(positions, dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first rotary_dim channels of x (B, heads, T, hd); the rest pass through."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    x1, x2 = rot[..., : rd // 2], rot[..., rd // 2:]
    cos, sin = cos[:, None], sin[:, None]
    return torch.cat([rot * cos + torch.cat([-x2, x1], dim=-1) * sin, rest], dim=-1)


class GatedAttention(nn.Module):
    """GQA softmax attention with q/k RMSNorm, partial RoPE and a per-head sigmoid output gate."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = Linear(h, 2 * self.n_heads * hd, bias=False)  # per head: [query | gate]
        self.k_proj = Linear(h, self.n_kv * hd, bias=False)
        self.v_proj = Linear(h, self.n_kv * hd, bias=False)
        self.o_proj = Linear(self.n_heads * hd, h, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: KVCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, gate = self.q_proj(x).view(b, t, self.n_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(self.k_proj(x).view(b, t, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None and cache.stepwise and t > 1:
            o = torch.cat([self.attend(q[:, :, j:j + 1], *cache.update(k[:, :, j:j + 1], v[:, :, j:j + 1]), mask, j)
                           for j in range(t)], dim=2)
        else:
            if cache is not None:
                k, v = cache.update(k, v)
            o = attention(q, k, v, mask)
        o = o.transpose(1, 2).reshape(b, t, -1) * torch.sigmoid(gate.reshape(b, t, -1))
        return self.o_proj(o)

    @staticmethod
    def attend(q: torch.Tensor, k, v, mask: torch.Tensor | None, j: int) -> torch.Tensor:
        """Query j of a stepwise (verify) pass against the keys up to itself, exactly as a decode step computes it:
        its row of the causal mask, or None where every key is real."""
        if mask is not None:
            mask = mask[:, :, j:j + 1, :k_length(k)]
            mask = None if bool(mask.all()) else mask
        return attention(q, k, v, mask)


class GatedDeltaNet(nn.Module):
    """Linear attention with a delta-rule recurrent state, a short causal conv on q/k/v and a gated output norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h = config.hidden_size
        self.hk, self.hv = config.linear_num_key_heads, config.linear_num_value_heads
        self.dk, self.dv = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_dim, self.value_dim = self.hk * self.dk, self.hv * self.dv
        channels = 2 * self.key_dim + self.value_dim
        self.in_proj_qkv = Linear(h, channels, bias=False)  # [q (Hk*dk) | k (Hk*dk) | v (Hv*dv)]
        self.in_proj_z = Linear(h, self.value_dim, bias=False)
        self.in_proj_b = Linear(h, self.hv, bias=False)
        self.in_proj_a = Linear(h, self.hv, bias=False)
        self.conv1d = nn.Conv1d(channels, channels, config.linear_conv_kernel_dim, groups=channels, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.hv))
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.norm = GatedRMSNorm(self.dv, config.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, h, bias=False)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None, cache: DeltaCache | None) -> torch.Tensor:
        if pad_mask is not None:  # zero inputs at left pads: the state then stays exactly as at a sequence start
            x = x * pad_mask[..., None].to(x.dtype)
        qkv, z, b, a = self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)
        if cache is not None and cache.trail is not None and x.shape[1] > 1:  # a verify pass: token by token,
            step = [t.split(1, dim=1) for t in (qkv, z, b, a)]  # the states after each but the last kept
            o = torch.cat([self.mix_step(*(t[j].contiguous() for t in step), cache, keep=j > 0)
                           for j in range(x.shape[1])], dim=1)
        elif cache is not None and cache.splits:  # a prefill that keeps the states at these offsets too
            bounds, parts = [0, *cache.splits, x.shape[1]], []
            for start, end in zip(bounds, bounds[1:]):
                parts.append(self.mix_step(*(t[:, start:end].contiguous() for t in (qkv, z, b, a)), cache))
                if end < x.shape[1]:  # a copy: a one-token step after it updates the state in place
                    cache.kept.append((cache.conv.clone(), cache.state.clone()))
            o = torch.cat(parts, dim=1)
        else:
            o = self.mix_step(qkv, z, b, a, cache)
        return self.out_proj(o)

    def mix_step(self, qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                 cache: DeltaCache | None, keep: bool = False) -> torch.Tensor:
        """The mixer on its kernel; `keep`: the state before it goes to `cache.trail`, so a verify pass can roll
        back to any of its tokens."""
        return gated_deltanet_mix(qkv, z, b, a, cache, self.conv1d.weight.squeeze(1), self.A_log, self.dt_bias,
                                  self.norm.weight, self.norm.eps, plain=self.mix, keep=keep)

    def mix(self, qkv: torch.Tensor, z: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
            cache: DeltaCache | None) -> torch.Tensor:
        """The token mixer between the projections (B, T, .) and out_proj: short conv, L2-normalised q and k, the
        gated delta rule (decay g = -exp(A_log) * softplus(a + dt_bias), write strength beta = sigmoid(b)), then
        the gated norm. Returns (B, T, Hv*dv) and advances the cache."""
        batch, t, _ = qkv.shape
        conv_state = cache.conv if cache is not None else None
        mixed, conv_state = causal_conv1d(qkv, self.conv1d.weight.squeeze(1), conv_state)
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = _l2norm(q.reshape(batch, t, self.hk, self.dk).float()) * self.dk ** -0.5
        k = _l2norm(k.reshape(batch, t, self.hk, self.dk).float())
        v = v.reshape(batch, t, self.hv, self.dv)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # log decay <= 0
        state = cache.state if cache is not None else None
        rule = recurrent_gated_delta_rule if (state is not None and t == 1) else chunk_gated_delta_rule
        o, state = rule(q, k, v, g, beta, state)
        if cache is not None:
            cache.conv, cache.state = conv_state, state
        return self.norm(o, z.view(batch, t, self.hv, self.dv)).reshape(batch, t, self.value_dim)


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return scale_rows(x, torch.rsqrt((x * x).sum(-1) + eps))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(config)
        else:
            self.self_attn = GatedAttention(config)
        self.mlp = SparseMoE(config) if config.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope, attn_mask, pad_mask, cache) -> torch.Tensor:
        u = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            x = x + self.linear_attn(u, pad_mask, cache)
        else:
            x = x + self.self_attn(u, rope, attn_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MultiTokenPredictor(nn.Module):
    """The multi-token-prediction head (`mtp.*`): from the final hidden state at position t (after `norm`) and the
    embedding of token t+1, a hidden state whose logits (the shared LM head) predict token t+2. Both inputs are
    normed, concatenated [embedding | hidden], projected back to H by `fc`, then one full-attention decoder
    layer with its own K/V (at position t) and `norm`. Read from vLLM's qwen3_5_mtp.py; draft token i+1 chains
    from draft i's output hidden state. The engine keeps its K/V one slot behind the model's (`ModelCache.hidden`
    holds the last position's hidden state until the token after it is known)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.pre_fc_norm_embedding = RMSNorm(h, eps)
        self.pre_fc_norm_hidden = RMSNorm(h, eps)
        self.fc = Linear(2 * h, h, bias=False)
        self.layers = nn.ModuleList(DecoderLayer(config, "full_attention") for _ in range(config.mtp_num_hidden_layers))
        self.norm = RMSNorm(h, eps)
        self.config = config
        self.decode_step = NativeDecode(self)  # drafts and catch-ups: its layer natively where it can

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, rope, attn_mask: torch.Tensor | None,
                caches: list[KVCache] | None) -> torch.Tensor:
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        run = self.run_layers if caches is None else self.decode_step
        return self.norm(run(x, rope, attn_mask, None, caches))

    def run_layers(self, x: torch.Tensor, rope, attn_mask, pad_mask, caches: list[KVCache] | None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, attn_mask, pad_mask, caches[i] if caches is not None else None)
        return x

    def _apply(self, fn, recurse: bool = True):  # new tensors, which decode_step must see
        self.decode_step.reset()
        return super()._apply(fn, recurse)


class Qwen35Model(nn.Module):
    """Token ids -> next-token logits. Tied heads share the embedding matrix."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, t) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = MultiTokenPredictor(config) if config.mtp_num_hidden_layers else None  # None: no head in it
        self.rotary = Rotary(config)
        self.decode_step = NativeDecode(self)  # one token per sequence: `run_layers`, natively where it can
        self.decode_layers = self.decode_step  # what decode steps run: `compile_decode` swaps in a compiled one

    def compile_decode(self) -> None:
        """Decode steps through torch.compile, compiled now (about a minute): fewer Python and dispatch costs
        per token. `dynamic`: one graph however long the cache grows (MoE routing splits it per layer); a batch
        of several sequences, or padded ones, compiles a second graph when first seen. Prefill stays eager.
        `emulate_precision_casts`: fused kernels still round where eager does (the fp32 short conv's bf16 result
        before its SiLU); skipping it moved one bf16 ulp there, enough to flip MoE routing against eager."""
        prepare_compile()
        self.decode_layers = torch.compile(self.run_layers, dynamic=True, options={"emulate_precision_casts": True})
        device = self.norm.weight.device
        with torch.inference_mode():
            cache, ids = make_cache(self.config, device=device), torch.arange(1, 6, device=device)[None]
            # sizes no model dimension has: the tracer would take a length or capacity that equals one for it
            cache.reserve(300, self.empty_key(1, self.norm.weight))
            self(ids, cache)
            self(ids[:, :1], cache)

    def empty_key(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """A (B, Hkv, 0, hd) key in `like`'s dtype and device: the shape K/V buffers are reserved for."""
        return like.new_empty(batch, self.config.num_key_value_heads, 0, self.config.head_dim)

    def run_layers(self, x: torch.Tensor, rope, attn_mask, pad_mask, cache: ModelCache | None) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, attn_mask, pad_mask, cache.layers[i] if cache is not None else None)
        return x

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), ...: new tensors, which decode_step must see
        self.decode_step.reset()
        return super()._apply(fn, recurse)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, H); image features (n, H) replace the `<|image_pad|>` tokens, in order."""
        x = self.embed_tokens(input_ids)
        if image_features is None:
            return x
        mask = input_ids == self.config.image_token_id
        n = int(mask.sum())
        if n != image_features.shape[0]:
            raise ValueError(f"{n} image tokens in the input but {image_features.shape[0]} image features; each "
                             "image needs exactly as many <|image_pad|> tokens as it has merged patches")
        return x.masked_scatter(mask[..., None], image_features.to(x.dtype))

    def forward(self, input_ids: torch.Tensor, cache: ModelCache | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                last_only: bool = False, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T or 1, V).

        attention_mask (B, T): 1 for real tokens, 0 for left padding (None: all real). position_ids (3, B, T)
        overrides the default text positions (multimodal inputs); inputs_embeds (B, T, H) the token embeddings
        (see `embed`). With a cache, the new tokens continue it, shifted by the cache's rope_delta.
        """
        x = self.features(input_ids, cache, attention_mask, position_ids, inputs_embeds)
        return self.lm_head(x[:, -1:] if last_only else x)

    def features(self, input_ids: torch.Tensor, cache: ModelCache | None = None,
                 attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                 inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` up to the final norm: hidden states (B, T, H), what the LM head and the MTP head read."""
        b, t = input_ids.shape
        real = (torch.ones(b, t, dtype=torch.bool, device=input_ids.device) if attention_mask is None
                else attention_mask.bool())
        seen = cache.seen if cache is not None else torch.zeros(b, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            pos = (seen[:, None] + real.long().cumsum(1) - 1).clamp(min=0)
            if cache is not None and cache.rope_delta is not None:
                pos = pos + cache.rope_delta[:, None]
            position_ids = pos[None].expand(3, b, t)
        past_valid = cache.valid if cache is not None else real[:, :0]
        valid = torch.cat([past_valid, real], dim=1)  # (B, S + T)
        attn_mask = None if bool(valid.all()) else _attention_mask(valid, t)  # None: causal (`ops.attention`)
        pad_mask = None if bool(real.all()) else real

        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        rope = self.rotary(position_ids, x.dtype)
        run = self.run_layers
        if cache is not None and (t == 1 or cache.verifying):  # grown here, not inside a compiled decode step
            cache.reserve(t, self.empty_key(b, x))
            run = self.decode_layers if t == 1 else self.decode_step  # a verify pass: natively where it can
        x = run(x, rope, attn_mask, pad_mask, cache)
        if cache is not None:
            cache.seen = seen + real.sum(1)
            cache.valid = valid
        return self.norm(x)

    def draft(self, next_ids: torch.Tensor, hidden: torch.Tensor, cache: ModelCache, position_ids: torch.Tensor,
              valid: torch.Tensor) -> torch.Tensor:
        """The MTP head over T positions: next_ids (B, T) the token after each, hidden (B, T, H) their final hidden
        states, position_ids (3, B, T) theirs. Appends T slots to the head's K/V (`cache.draft`); valid (B, S + T)
        says which of its S + T slots are real. Returns its hidden states (B, T, H)."""
        t = next_ids.shape[1]
        attn_mask = None if bool(valid.all()) else _attention_mask(valid, t)
        rope = self.rotary(position_ids, hidden.dtype)
        for layer in cache.draft:
            layer.reserve(t, self.empty_key(hidden.shape[0], hidden))
        return self.mtp(self.embed_tokens(next_ids), hidden, rope, attn_mask, cache.draft)


def _attention_mask(valid: torch.Tensor, t: int) -> torch.Tensor:
    """(B, 1, T, S+T) boolean: causal over slots, real keys only; a query always sees itself (pads stay finite)."""
    total = valid.shape[1]
    q_slot = torch.arange(total - t, total, device=valid.device)[:, None]
    k_slot = torch.arange(total, device=valid.device)[None, :]
    allowed = (k_slot <= q_slot)[None] & valid[:, None, :]
    return (allowed | (k_slot == q_slot)[None])[:, None]
