"""Checkpoint files: which ones hold the weights, what their tensors are called, and that each is a regular file
(below both `loading` and `quant`, which read checkpoints).

Opening a FIFO blocks until a writer appears (forever, for a stray `mkfifo model.safetensors`), a device such as
/dev/zero reads without end, and a directory is never a checkpoint file: each is refused up front, by name.
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
from pathlib import Path

SKIPPED_PREFIXES = {"model.visual.": "vision tower (loaded beside the text model by `load_vision`)"}
MTP_PREFIX = "mtp."  # the multi-token-prediction head: top-level in the official files, `Qwen35Model.mtp` here
KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class NotRegularFileError(ValueError):
    """A checkpoint path that exists but is not a regular file; opening it could block or never end."""


def regular_file_exists(path: Path) -> bool:
    """Like `Path.is_file`, but an entry that is there and not a regular file is an error rather than absent.

    Symlinks are followed (the Hugging Face cache links each file to a blob)."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in KINDS if test(mode)), "not a regular file")
        raise NotRegularFileError(f"{path} is {kind}, not a regular file: it cannot be read as a checkpoint file; "
                                  "replace it with the real file (re-download the checkpoint)")
    return True


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message says which file and tensor, and what to do."""


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by `model.safetensors.index.json`, else all."""
    index = directory / "model.safetensors.index.json"
    if regular_file_exists(index):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: not a valid shard index ({e!r}); re-download it") from None
        missing = [n for n in names if not regular_file_exists(directory / n)]
        if missing:
            raise CheckpointError(f"{index} names shard(s) {missing} that are not in {directory}; "
                                  "the download is incomplete")
        return [directory / n for n in names]
    files = sorted(f for f in directory.glob("*.safetensors") if regular_file_exists(f))
    if not files:
        found = sorted(p.name for p in directory.iterdir())[:10]
        hint = " (pickle .bin files are never loaded: convert them to safetensors)" if any(
            n.endswith((".bin", ".pt", ".pth")) for n in found) else ""
        raise CheckpointError(f"{directory}: no *.safetensors weights found (files: {found}){hint}")
    return files


def checkpoint_name(name: str) -> str | None:
    """Official name -> our parameter name; None for tensors we knowingly skip. The MTP head's names
    (`mtp.fc.weight`, `mtp.layers.0.self_attn.q_proj.weight`, ...) are ours as they are."""
    if any(name.startswith(p) for p in SKIPPED_PREFIXES):
        return None
    if name.startswith(MTP_PREFIX):
        return name
    for prefix in ("model.language_model.", "model."):  # multimodal layout, then text-only (CausalLM) layout
        if name.startswith(prefix):
            return name[len(prefix):]
    return name  # lm_head.weight


HEAP_MMAP_THRESHOLD = 128 << 10  # glibc's own starting value, kept


def steady_heap() -> None:
    """Serve blocks of HEAP_MMAP_THRESHOLD bytes and up (activations, K/V) from their own pages, handed back when
    freed. glibc raises that threshold by itself to the largest block freed so far (up to 32 MiB), after which a
    prefill's freed temporaries stay in the heap, as many as chance leaves there: a 0.8B int4 run's peak RSS was
    -2 to +10 % off the planner's at 4K-16K tokens, -3 to 0 % with it kept (six runs each; prefill time +3 %, in
    the noise). A MALLOC_MMAP_THRESHOLD_ the user set stays; a no-op where there is no glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, HEAP_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def release_freed_memory() -> None:
    """Hand heap pages freed by loading back to the OS (glibc keeps them otherwise: measured ~0.2 GB after the
    248k-token tokenizer.json parse alone). A no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
