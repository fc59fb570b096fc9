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


HEAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its moving mmap threshold, fixed from the start


def steady_heap() -> None:
    """Fix glibc's mmap and trim thresholds at 32 MiB (the ceiling its moving threshold reaches anyway), so the
    heap behaves the same in every run: glibc otherwise raises the mmap threshold to the largest block freed so
    far, and how many of a prefill's freed temporaries then stay in the heap varied from run to run (a 0.8B int4
    run's peak RSS was -2 to +10 % off the planner's at 4K-16K tokens). Both, because a fixed mmap threshold also
    stops the trim threshold moving: at 128 KiB each, every temporary above 128 KiB was mapped and faulted in
    afresh, and freed top-of-heap pages were handed back at once: `y.float()` of a (512, 3584) bf16 tensor 0.18 ->
    2.6 ms, and a server's 1,909-token prompt 5.3 -> 9.5 s (its engine thread's arena trimmed hardest).
    MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ set by the user stay; a no-op where there is no glibc."""
    if {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & os.environ.keys():
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, HEAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, HEAP_THRESHOLD)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def release_freed_memory() -> None:
    """Hand heap pages freed by loading back to the OS (glibc keeps them otherwise: measured ~0.2 GB after the
    248k-token tokenizer.json parse alone). A no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
