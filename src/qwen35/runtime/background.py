"""Idle-time work for the Python API's one-request runs: a finished reply's warm-up (`Request.followup`) runs on a
thread while the caller reads and types; the model's next use waits for it."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

from qwen35.ops.cpu import release_thread_pool


class Background:
    """One job at a time. `settle` waits for it; interpreter exit stops it between engine steps and waits (a
    thread still inside a torch op while the interpreter shuts down aborts the process)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        weakref.finalize(self, _halt, self._stop, self._threads)  # also runs at exit, while we are alive

    def start(self, work: Callable[[threading.Event], None]) -> None:
        """Run `work(stop)` on a thread after the previous job; `work` returns soon once `stop` is set."""
        self.settle()
        thread = threading.Thread(target=work, args=(self._stop,), name="qwen35-warm-up", daemon=True)
        self._threads.append(thread)
        release_thread_pool()  # the caller's, while it waits: the warm-up's is then libgomp's only one
        thread.start()

    def settle(self) -> None:
        while self._threads:
            self._threads.pop().join()


def _halt(stop: threading.Event, threads: list[threading.Thread]) -> None:
    stop.set()
    while threads:
        threads.pop().join()
