"""The door, as pure ASGI middleware (it runs before routing and body parsing):

header count and size caps (431), Host-header allowlist (DNS rebinding), API key on every route but /health and the
chat page with its static files (constant-time compare), and the body cap: a declared Content-Length over the limit
is refused before a byte is read; a chunked body is counted while it streams in and refused the moment it passes the
limit, so it is never buffered whole; a body that takes longer than `read_timeout` is a 408 (slowloris).
"""

from __future__ import annotations

import asyncio
import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen35.server.errors import error_body_for
from qwen35.server.settings import ServerSettings
from qwen35.server.web import is_public


def _host_name(host: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1'."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    def __init__(self, app: ASGIApp, settings: ServerSettings):
        self.app, self.settings = app, settings
        self.allowed = None if settings.allowed_hosts is None else {h.lower() for h in settings.allowed_hosts}
        self.key = settings.api_key.encode() if settings.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if len(scope["headers"]) > self.settings.max_header_count or \
                sum(len(k) + len(v) for k, v in scope["headers"]) > self.settings.max_header_bytes:
            await _reject(scope, send, 431, f"the request has {len(scope['headers'])} headers; at most "
                          f"{self.settings.max_header_count} headers of {self.settings.max_header_bytes} bytes in all "
                          "are accepted")
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = _host_name(headers.get("host", "").strip()).lower()
        if self.allowed is not None and host not in self.allowed:
            await _reject(scope, send, 403, f"Host header {host[:64]!r} is not allowed on this server (DNS-rebinding "
                          f"guard); use one of {sorted(self.allowed)} or start it with --allowed-host")
            return
        if self.key is not None and not is_public(scope["path"]) and not self._authorized(headers):
            await _reject(scope, send, 401, "a valid API key is required: send 'Authorization: Bearer <key>' or "
                          "'x-api-key: <key>'")
            return
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _reject(scope, send, 413, f"the request body has {int(declared)} bytes; the limit is {limit} bytes")
            return
        body, more = bytearray(), True
        try:
            async with asyncio.timeout(self.settings.read_timeout):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":  # the client left mid-body: no one to answer
                        return
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > limit:
                        await _reject(scope, send, 413, f"the request body is over the limit of {limit} bytes")
                        return
        except TimeoutError:
            await _reject(scope, send, 408, f"the request body did not arrive within {self.settings.read_timeout:g} s "
                          "(slow or stalled client); send it at once")
            return
        await self.app(scope, _replay(bytes(body), receive), send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        auth = headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
        return hmac.compare_digest(given.strip().encode(), self.key)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body already read, as one message; after it, the real receive (so disconnects are still seen)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


async def _reject(scope: Scope, send: Send, status: int, message: str) -> None:
    payload = json.dumps(error_body_for(scope["path"], status, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if status in (408, 431):  # the rest of this request may still be on its way: do not read it as the next one
        headers.append((b"connection", b"close"))
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
