"""`qwen35 export --gguf OUT`: any model qwen35 loads, written as llama.cpp's converter would write it.

Metadata, tensor names and value transforms are the converter's (`gguf_names` undoes them on load), so llama.cpp,
Ollama and LM Studio read the file; the tokenizer goes in as byte-level BPE with the `qwen35` pre-tokenizer.
Tensors are written one at a time (the header first, from shapes alone), with `gguf.quants.quantize` for
Q8_0/Q4_0. A quantized qwen35 checkpoint is dequantized (to its scales' dtype) and rounded again for the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from qwen35.loading.gguf_names import EXPERT_MARK, name_map, to_gguf
from qwen35.loading.gguf_tokenizer import CONTROL, NORMAL, PRE_TOKENIZERS, UNUSED, USER_DEFINED
from qwen35.models import Qwen35Model
from qwen35.quant.linear import Int4Linear, Int8Linear
from qwen35.quant.quantize import SMALL, QuantEmbedding, QuantExperts
from qwen35.sampling import SamplingParams
from qwen35.tokenizer import Tokenizer

TYPES = {"f16": ("F16", 1), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2)}  # --type -> (GGML type, general.file_type)


def export_gguf(model: Qwen35Model, tokenizer: Tokenizer, out: str | Path, kind: str = "f16",
                defaults: SamplingParams | None = None, name: str = "qwen35",
                progress: Callable[[int, int], None] | None = None) -> Path:
    """Write `model` and `tokenizer` to `out` as a GGUF of type `kind` (f16, q8_0 or q4_0)."""
    import gguf

    if kind not in TYPES:
        raise ValueError(f"--type {kind!r} is not supported: use one of {sorted(TYPES)}")
    config = model.config
    arch = "qwen35moe" if config.is_moe else "qwen35"
    out = Path(out)
    writer = gguf.GGUFWriter(out, arch)
    _metadata(writer, config, arch, name, TYPES[kind][1], defaults)
    _vocabulary(writer, tokenizer, config.vocab_size)
    plan = _plan(model, arch, gguf.GGMLQuantizationType[TYPES[kind][0]])
    for gname, _, shape, qtype in plan:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor_info(gname, shape, np.dtype(np.float32), int(np.prod(shape)) // block * size, qtype)
    writer.write_header_to_file(out)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, (gname, get, shape, qtype) in enumerate(plan):
        data = get().numpy()
        if qtype.name == "F32":
            data = data.astype(np.float32)
        elif qtype.name == "F16":
            data = data.astype(np.float16)
        else:
            data = gguf.quants.quantize(data.astype(np.float32), qtype)
        writer.write_tensor_data(data)
        if progress:
            progress(i + 1, len(plan))
    writer.close()
    return out


def _metadata(w, config, arch: str, name: str, file_type: int, defaults: SamplingParams | None) -> None:
    layers, mtp = config.num_hidden_layers, config.mtp_num_hidden_layers
    w.add_name(name)
    w.add_block_count(layers + mtp)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_dimension_sections([*config.mrope_section, 0])
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_file_type(file_type)
    if mtp:
        w.add_nextn_predict_layers(mtp)
    w.add_ssm_conv_kernel(config.linear_conv_kernel_dim)
    w.add_ssm_state_size(config.linear_key_head_dim)
    w.add_ssm_group_count(config.linear_num_key_heads)
    w.add_ssm_time_step_rank(config.linear_num_value_heads)
    w.add_ssm_inner_size(config.linear_value_head_dim * config.linear_num_value_heads)
    recurrent = [t == "linear_attention" for t in config.layer_types] + [False] * mtp
    w.add_array(f"{arch}.attention.recurrent_layers", recurrent)  # no add_recurrent_layers in PyPI gguf 0.19.0
    w.add_full_attention_interval(4)
    w.add_rope_dimension_count(config.rotary_dim)
    if config.is_moe:
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    else:
        w.add_feed_forward_length(config.intermediate_size)
    w.add_quantization_version(2)
    if defaults is not None:
        if defaults.top_k:
            w.add_uint32("general.sampling.top_k", defaults.top_k)
        for key, value in (("temp", defaults.temperature), ("top_p", defaults.top_p), ("min_p", defaults.min_p),
                           ("penalty_repeat", defaults.repetition_penalty)):
            w.add_float32(f"general.sampling.{key}", float(value))


def _vocabulary(w, tokenizer: Tokenizer, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's converter stores a byte-level BPE (padded to the embedding's rows)."""
    raw = json.loads(tokenizer.to_json())
    split = next((p for p in raw.get("pre_tokenizer", {}).get("pretokenizers", []) if p.get("type") == "Split"), {})
    pre = next((k for k, v in PRE_TOKENIZERS.items() if split.get("pattern", {}).get("Regex") == v), None)
    if raw.get("model", {}).get("type") != "BPE" or pre is None:
        raise ValueError("only byte-level BPE tokenizers with the Qwen3.5 (or Qwen2) pre-tokenizer can be exported")
    by_id = {i: t for t, i in raw["model"]["vocab"].items()}
    added = {t["id"]: t for t in raw.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(CONTROL if added[i]["special"] else USER_DEFINED)
        else:
            tokens.append(by_id.get(i, f"[PAD{i}]"))
            types.append(NORMAL if i in by_id else UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw["model"].get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = tokenizer.token_to_id("<|endoftext|>")
    if eos is not None:
        w.add_eos_token_id(eos)
        w.add_pad_token_id(eos)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


def _plan(model: Qwen35Model, arch: str, target) -> list[tuple[str, Callable[[], torch.Tensor], list[int], object]]:
    """(GGUF name, fp32 getter in the file's layout, numpy-order shape, type) for every tensor, in model order."""
    import gguf

    config = model.config
    with torch.device("meta"):
        meta = Qwen35Model(config)
    if model.mtp is None:
        meta.mtp = None
    names = {ours: g for g, ours in name_map(meta, arch).items()}
    shapes = {n: list(p.shape) for n, p in meta.named_parameters()}
    plan = []
    for ours, get in _weights(model).items():
        shape = shapes[ours]
        if ours.endswith("experts.gate_up_proj"):
            half = [shape[0], shape[1] // 2, shape[2]]
            prefix = ours.removesuffix(".gate_up_proj") + EXPERT_MARK
            entries = [(names[prefix + "gate"], lambda g=get: g().chunk(2, dim=1)[0], half),
                       (names[prefix + "up"], lambda g=get: g().chunk(2, dim=1)[1], half)]
        elif ours.endswith("experts.down_proj"):
            entries = [(names[ours.removesuffix(".down_proj") + EXPERT_MARK + "down"], get, shape)]
        else:
            squeeze = ours.endswith("linear_attn.conv1d.weight")
            entries = [(names[ours], get, shape[:1] + shape[2:] if squeeze else shape)]
        leaf = ours.rsplit(".", 2)[-2] if ours.count(".") >= 2 else ""
        for gname, fetch, file_shape in entries:
            if len(file_shape) == 1 or "conv1d" in ours:
                qtype = gguf.GGMLQuantizationType.F32
            elif leaf in SMALL or file_shape[-1] % 32 or target.name == "F16":
                qtype = gguf.GGMLQuantizationType.F16
            else:
                qtype = target
            plan.append((gname, lambda o=ours, f=fetch: to_gguf(o, f(), config), file_shape, qtype))
    return plan


def _weights(model: Qwen35Model) -> dict[str, Callable[[], torch.Tensor]]:
    """Our name -> a function giving that weight as dense fp32 (quantized layers dequantized), in model order."""
    out: dict[str, Callable[[], torch.Tensor]] = {}
    tied = model.config.tie_word_embeddings
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear)) and not (name == "lm_head" and tied) and \
                not name.startswith("embed_tokens."):  # a tied table is reached first as the embedding's
            out[f"{name}.weight"] = lambda m=module: m.rows(slice(None)).float()
        elif isinstance(module, QuantExperts):
            out[f"{name}.gate_up_proj"] = lambda m=module: torch.stack([e.rows(slice(None)).float()
                                                                        for e in m.gate_up])
            out[f"{name}.down_proj"] = lambda m=module: torch.stack([e.rows(slice(None)).float() for e in m.down])
        elif isinstance(module, QuantEmbedding):
            table = module.table
            out["embed_tokens.weight"] = lambda t=table: t.rows(slice(None)).float()  # StoredTable or tied head
    for name, p in model.named_parameters():
        if name not in out:
            out[name] = lambda p=p: p.detach().float()
    return out
