"""The tokenizer and chat template of a GGUF file, rebuilt from its metadata as a Hugging Face `tokenizers` BPE.

llama.cpp's converter stores a byte-level BPE vocabulary as `tokenizer.ggml.tokens` (the vocabulary strings of
`tokenizer.json`, in id order, padded with `[PADn]` entries of type UNUSED up to the embedding size), the token
types (CONTROL / USER_DEFINED for added tokens), the merges as "left right" strings, and names the pre-tokenizer
(`tokenizer.ggml.pre`) by its regex family. With Qwen3.5's regex (`qwen35`; `qwen2` for Qwen2/3-style files), NFC
and byte-level pre-tokenization and decoding, this is the same tokenizer as the checkpoint's `tokenizer.json`
(tests/test_gguf.py compares them on the real 248k vocabulary).
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from qwen35.files import CheckpointError
from qwen35.loading.gguf import GGUFFile
from qwen35.tokenizer import Tokenizer

PRE_TOKENIZERS = {  # tokenizer.ggml.pre -> the Split regex of tokenizer.json
    "qwen35": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+",
}
NORMAL, UNUSED, CONTROL, USER_DEFINED = 1, 5, 3, 4  # gguf.TokenType values
IM_END = "<|im_end|>"


def gguf_tokenizer(f: GGUFFile) -> Tokenizer:
    """Our `Tokenizer` (chat template included) from the file's `tokenizer.*` metadata."""
    model = f.value("tokenizer.ggml.model", kind=str)
    pre = f.value("tokenizer.ggml.pre", "default", kind=str)
    if model != "gpt2" or pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{f.path}: tokenizer {model!r} with pre-tokenizer {pre!r} is not supported (Qwen3.5 "
                              f"files use 'gpt2' with {' or '.join(map(repr, PRE_TOKENIZERS))})")
    tokens = f.value("tokenizer.ggml.tokens", kind=list)
    types = f.value("tokenizer.ggml.token_type", [NORMAL] * len(tokens), kind=list)
    merges = f.value("tokenizer.ggml.merges", [], kind=list)
    if len(types) != len(tokens) or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(f"{f.path}: tokenizer.ggml.tokens ({len(tokens)}) and token_type ({len(types)}) "
                              "do not match")
    vocab, added = {}, []
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (CONTROL, USER_DEFINED):
            added.append((i, AddedToken(token, special=kind == CONTROL, normalized=False)))
        elif kind != UNUSED:
            vocab.setdefault(token, i)
    try:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        hf = HFTokenizer(BPE(vocab, pairs, fuse_unk=False, byte_fallback=False, ignore_merges=False))
    except Exception as e:  # the Rust side raises a bare Exception for a merge naming an unknown token
        raise CheckpointError(f"{f.path}: the tokenizer metadata do not form a BPE vocabulary ({e})") from None
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZERS[pre]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    _add_at_ids(f, hf, added)
    eos = [v for v in (f.value("tokenizer.ggml.eos_token_id", None, kind=int),) if v is not None]
    eos += [i for i in (hf.token_to_id(IM_END),) if i is not None]
    template = f.value("tokenizer.chat_template", None, kind=str)
    return Tokenizer(hf, template, eos, source=str(f.path))


def _add_at_ids(f: GGUFFile, hf: HFTokenizer, added: list[tuple[int, AddedToken]]) -> None:
    """Register the added tokens in id order; `tokenizers` gives each the next free id, which is its own in every
    Qwen file (they follow the BPE vocabulary): anything else is refused rather than silently renumbered."""
    for want, token in added:
        (hf.add_special_tokens if token.special else hf.add_tokens)([token])
        if hf.token_to_id(token.content) != want:
            raise CheckpointError(f"{f.path}: added token {token.content!r} is at id {want}, which the vocabulary "
                                  f"layout cannot keep (got {hf.token_to_id(token.content)})")
