"""uvicorn's HTTP/1.1 protocol (h11) with the server's own answers where uvicorn would write plain text:

- a request whose headers are not all in within `read_timeout` seconds gets a 408 and the socket is closed
  (uvicorn waits forever: 32 slowloris sockets stayed open); the body has its own deadline in `guard.py`;
- a malformed request (garbage request line, bad Content-Length, headers over the size cap) gets a 400 in the
  OpenAI error envelope instead of uvicorn's text/plain, and is logged at debug level, not as a warning.

Everything else is uvicorn's. `uvicorn_config` is the one place a server's uvicorn settings are made.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from qwen35.server.errors import error_body
from qwen35.server.settings import ServerSettings

MALFORMED = "Invalid HTTP request received."  # what uvicorn logs before sending its 400


def raw_response(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response in the envelope, for writing before h11 has a request to answer."""
    body = json.dumps(error_body(status, message)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


class QuietMalformed(logging.LoggerAdapter):
    """uvicorn's logger, with its warning for each malformed request (any client can send one) at debug."""

    @property
    def level(self) -> int:  # uvicorn reads `logger.level`
        return self.logger.level

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG if msg == MALFORMED else level, msg, *args, **kwargs)


class Protocol(H11Protocol):
    def __init__(self, *args: Any, read_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.logger = QuietMalformed(self.logger, {})
        self.read_timeout = read_timeout
        self._deadline: Any = None  # asyncio.TimerHandle while a request's headers are awaited

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:  # the next request on a kept-alive socket
            self._arm()
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the headers are in (or the connection is done)
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self.transport.write(raw_response(400, "Bad Request", "malformed HTTP request (request line, headers or "
                                          "Content-Length), or headers over the size limit; send valid HTTP/1.1"))
        self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(raw_response(408, "Request Timeout", f"the request headers did not arrive within "
                                              f"{self.read_timeout:g} s; send the whole request at once"))
            self.transport.close()


def uvicorn_config(app: Any, settings: ServerSettings, **options: Any) -> uvicorn.Config:
    """uvicorn settings of a server: our protocol, header limits, the address from `settings`."""
    options.setdefault("host", settings.host)
    options.setdefault("port", settings.port)
    return uvicorn.Config(app, http=functools.partial(Protocol, read_timeout=settings.read_timeout),  # type: ignore
                          h11_max_incomplete_event_size=settings.max_header_bytes, **options)
