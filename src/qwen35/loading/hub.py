"""Resolve `--model`: a local checkpoint directory, or a Hugging Face repo id fetched into the normal HF cache."""

from __future__ import annotations

import re
from pathlib import Path

from qwen35.loading.gguf import is_gguf

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]  # never pickles
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_model(path_or_repo: str | Path) -> tuple[Path, bool]:
    """(path, whether it is GGUF): a GGUF file as it is, anything else `resolve_checkpoint`."""
    if is_gguf(path_or_repo):
        return Path(path_or_repo).expanduser(), True
    return resolve_checkpoint(path_or_repo), False


def resolve_checkpoint(path_or_repo: str | Path) -> Path:
    """A local directory is used as is; `org/name` is looked up in the HF cache, then downloaded if online."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo)
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    if not REPO_ID.match(text):
        raise FileNotFoundError(f"{text!r} is neither a local directory nor a Hugging Face repo id like "
                                "'Qwen/Qwen3.5-0.8B'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, allow_patterns=WEIGHT_PATTERNS, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(text, allow_patterns=WEIGHT_PATTERNS))
    except LocalEntryNotFoundError as e:  # raised when the hub cannot be reached
        raise ConnectionError(
            f"cannot download {text!r}: no network connection to the Hugging Face Hub and no cached copy "
            f"({e.__class__.__name__}). Download it on a connected machine (`hf download {text}`) and pass "
            "the local directory instead, e.g. --model /path/to/Qwen3.5-0.8B") from None
    except Exception as e:  # repo not found, gated, HTTP errors: say which and how to fix
        raise ConnectionError(f"cannot download {text!r} from the Hugging Face Hub: {e}. "
                              "Check the repo id, or pass a local checkpoint directory") from None
