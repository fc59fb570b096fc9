"""The engine thread: all torch work runs here, off the asyncio loop, one `engine.step()` after another.

Requests talk to it through a command inbox (add / abort), so the scheduler is only ever touched by this thread;
events come back per step through `loop.call_soon_threadsafe` into one asyncio queue per request. The engine
never knows about HTTP and requests never touch tensors.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable

from qwen35.runtime import Engine, Event, Request
from qwen35.server.errors import APIError

log = logging.getLogger("qwen35.server")
STEP_FAILED = "the model step failed (see the server log); the request was ended"


class Runner:
    """Owns the engine and its thread. `submit` and `abort` are called on the asyncio loop thread."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, max_queue: int, max_backlog: int,
                 on_step: Callable[[int, int, list[Event]], None] = lambda running, waiting, events: None):
        self.engine, self.loop, self.max_queue, self.max_backlog = engine, loop, max_queue, max_backlog
        self.on_step = on_step  # metrics hook: (running, waiting, events), called on the engine thread
        self._inbox: queue.SimpleQueue[Request | str] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._queued: set[str] = set()  # submitted, no token yet (guarded by _lock)
        self._queues: dict[str, asyncio.Queue[Event]] = {}  # seq id -> its request's queue (loop thread only)
        self._drain_deadline: float | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="qwen35-engine", daemon=True)
        self._thread.start()

    # -- loop thread --------------------------------------------------------------------------------------------
    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def queued(self) -> int:
        with self._lock:
            return len(self._queued)

    def submit(self, requests: list[Request]) -> asyncio.Queue[Event]:
        """Queue the sequences of one request; 503 when the server drains or the queue is full."""
        if self.draining:
            raise APIError(503, "the server is shutting down and takes no new requests; retry on another "
                           "instance or later", headers={"Retry-After": "5"})
        with self._lock:
            if len(self._queued) + len(requests) > self.max_queue:
                raise APIError(503, f"the server is busy: the queue is full ({self.max_queue} waiting sequences); "
                               "retry later", headers={"Retry-After": "1"})
            self._queued.update(r.id for r in requests)
        events: asyncio.Queue[Event] = asyncio.Queue()
        for request in requests:
            self._queues[request.id] = events
            self._inbox.put(request)
        self._wake.set()
        return events

    def release(self, seq_ids: list[str]) -> None:
        """The request is done with these sequences (finished, failed or the client left): abort what still runs."""
        for seq_id in seq_ids:
            if self._queues.pop(seq_id, None) is not None:
                self._inbox.put(seq_id)
        self._wake.set()

    def begin_drain(self, timeout: float) -> None:
        """Stop admitting; what runs may finish for `timeout` seconds, then ends with finish_reason "abort"."""
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + timeout
            self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            target = self._queues.get(event.seq_id)
            if target is None:
                continue
            if target.qsize() >= self.max_backlog:  # the client stopped reading: end it, bounded memory
                log.warning("request %s fell %d events behind; aborting it", event.seq_id, target.qsize())
                target.put_nowait(Event(event.seq_id, -1, "abort", error="the client read too slowly"))
                self.release([event.seq_id])
                continue
            target.put_nowait(event)
            if event.finish_reason is not None:
                self._queues.pop(event.seq_id, None)

    # -- engine thread ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopped:
            events = self._apply_commands()
            if self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
                events += [Event(seq_id, -1, "abort") for seq_id in self.engine.reset()]
            if self.engine.has_work():
                try:
                    events += self.engine.step()
                except Exception:  # noqa: BLE001 - one failed step must not take the server down
                    log.exception("engine step failed; ending the requests in it")
                    events += [Event(s, -1, "error", error=STEP_FAILED) for s in self.engine.reset()]
            if events:
                with self._lock:
                    self._queued.difference_update(e.seq_id for e in events)
                self.loop.call_soon_threadsafe(self._deliver, events)
            sched = self.engine.scheduler
            self.on_step(len(sched.running), len(sched.waiting), events)
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def _apply_commands(self) -> list[Event]:
        events: list[Event] = []
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return events
            if isinstance(command, str):
                self.engine.abort(command)
                with self._lock:
                    self._queued.discard(command)
                continue
            try:
                self.engine.add(command)
            except (ValueError, OverflowError) as e:
                events.append(Event(command.id, -1, "error", error=str(e)))
