"""Builds qwen35's CPU kernels (`kernels/*.cpp`) once per machine into ~/.cache/qwen35, and loads them.

The build directory is keyed by everything that makes the binary (sources, flags, torch version, the sources'
path), so an extension already built there is imported directly: torch's `load()` and ninja run only to build
one. (Run on every start, a different ninja on PATH — an activated venv against `make chat` — rebuilt it all:
ninja versions read each other's build logs as changed commands.) `make install` builds it ahead of the first
prompt with `python -m qwen35.ops.build`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)
NAME = "qwen35_cpu_kernels"
SOURCES = Path(__file__).with_name("kernels")
FLAGS = ["-O3", "-march=native", "-fopenmp"]
# The compiler's time for one build, in core-seconds of a 2 GHz Zen server (measured: 270 alone, 320 two at a
# time): each of the 8 files parses torch's headers (40-55 s); ninja compiles them in parallel, one per core.
BUILD_CORE_SECONDS = 320


def build_dir() -> Path:
    """Where this checkout's kernels are built: keyed by the sources, flags, torch version and the sources' path
    (torch's builder rebuilds when one build directory is reached from another checkout's sources)."""
    files = sorted(SOURCES.glob("*.[ch]*"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files) + " ".join(FLAGS).encode()
                            + torch.__version__.encode() + str(SOURCES.resolve()).encode()).hexdigest()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qwen35" / f"kernels-{digest[:16]}"


def compiling_message() -> str:
    """What a first build costs, said before it starts: ninja compiles the files in parallel, one per core."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    minutes = max(1, round(BUILD_CORE_SECONDS / min(usable, len(list(SOURCES.glob("*.cpp")))) / 60))
    return (f"compiling qwen35's CPU kernels for this machine (once, about {minutes} minute{'s' * (minutes > 1)} "
            f"on {usable} core{'s' * (usable > 1)})")


def compiling() -> bool:
    """Whether some process is building the kernels now (it holds the build lock): a loading server says so."""
    try:
        import fcntl

        with open(build_dir() / "qwen35.lock") as probe:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except (ImportError, OSError):  # no lock file: nothing was ever built here; no fcntl: not POSIX
        return False
    return False


def load_or_build() -> ModuleType:
    """The extension, built first where it is missing; raises where it cannot be built (no compiler, say)."""
    import fcntl  # POSIX; elsewhere the ImportError falls back like a missing compiler

    build = build_dir()
    build.mkdir(parents=True, exist_ok=True)
    library = build / f"{NAME}.so"
    with open(build / "qwen35.lock", "w") as held:  # an OS lock: released even if this process is killed
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another process is %s; waiting for it…", compiling_message())
            fcntl.flock(held, fcntl.LOCK_EX)
        # torch's own lock file outlives a build that was killed (Ctrl-C on first use), and every later load
        # would wait on it forever; holding ours, no other qwen35 process is building, so it is stale
        (build / "lock").unlink(missing_ok=True)
        if library.exists():
            try:
                return _import(library)
            except ImportError as e:  # a link cut short by a kill: build it again
                log.warning("the built kernels in %s do not load (%s); building them again", build, e)
                library.unlink()
        return _build(build)


def _import(library: Path) -> ModuleType:
    """The built extension, imported as torch's `load()` does after a build, without running ninja first."""
    spec = importlib.util.spec_from_file_location(NAME, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"{library} is not a Python extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(build: Path) -> ModuleType:
    from torch.utils.cpp_extension import load

    log.warning("%s…", compiling_message())
    start = time.monotonic()
    sources = sorted(str(f) for f in SOURCES.glob("*.cpp"))
    with _own_ninja_first(), _progress(build, len(sources), start):
        module = load(name=NAME, sources=sources, build_directory=str(build), verbose=False, extra_cflags=FLAGS,
                      extra_ldflags=["-fopenmp"])
    log.warning("compiled qwen35's CPU kernels in %.0f s (into %s)", time.monotonic() - start, build)
    return module


@contextmanager
def _own_ninja_first() -> Iterator[None]:
    """The build runs the ninja installed with qwen35 (pip's), whichever one PATH has first, and also where the
    environment is not activated (`make chat`): a build resumed by another ninja would start over."""
    import ninja

    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR:
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


@contextmanager
def _progress(build: Path, files: int, start: float) -> Iterator[None]:
    """A line each time ninja finishes a file (its object appears): minutes with no sign of life read as a hang."""
    done = threading.Event()

    def watch() -> None:
        seen = 0
        while not done.wait(2.0):
            compiled = len(list(build.glob("*.o")))
            if compiled != seen:
                seen = compiled
                log.warning("  %d of %d files compiled (%.0f s)", compiled, files, time.monotonic() - start)

    watcher = threading.Thread(target=watch, name="qwen35-kernels-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def main() -> None:
    """`make install`: build the kernels now, not behind the first prompt. Never fails the install: where they
    cannot run, qwen35 uses PyTorch's kernels, and this says why."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger("qwen35").setLevel(logging.INFO)
    from qwen35.ops.cpu import kernel_isa

    if (isa := kernel_isa()) is not None:
        print(f"qwen35's CPU kernels: ready, {isa.upper()} ({build_dir()})")
    else:
        print("qwen35's CPU kernels: not used on this machine (see above); PyTorch's kernels run instead")


if __name__ == "__main__":
    main()
