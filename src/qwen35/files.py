"""Checkpoint files are opened only when they are regular files.

Opening a FIFO blocks until a writer appears (forever, for a stray `mkfifo model.safetensors`), a device such as
/dev/zero reads without end, and a directory is never a checkpoint file: each is refused up front, by name.
"""

from __future__ import annotations

import stat
from pathlib import Path

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
