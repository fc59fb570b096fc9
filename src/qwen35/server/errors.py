"""The OpenAI error envelope: `{"error": {"message", "type", "param", "code"}}`, for every failure path; on the
Anthropic routes (`/v1/messages...`) Anthropic's: `{"type": "error", "error": {"type", "message"}}`.

Messages say what was wrong and what to do; they never carry paths, stack traces or environment (those go to
the server log).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("qwen35.server")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
               413: "invalid_request_error", 431: "invalid_request_error",
               500: "server_error", 503: "unavailable_error"}
ANTHROPIC_PREFIX = "/v1/messages"
ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                   429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


class APIError(Exception):
    """A request failure with its HTTP status; raised anywhere in request handling, rendered by the app."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": status}}


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's envelope: other 4xx are invalid_request_error, other 5xx api_error."""
    kind = ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_body_for(path: str, status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The envelope the client of `path` parses: Anthropic's on its routes, OpenAI's everywhere else."""
    if path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"):
        return anthropic_error_body(status, message)
    return error_body(status, message, param)


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    return JSONResponse(error_body_for(path, status, message, param), status_code=status, headers=headers)


def sse_error(error: APIError) -> str:
    """An error after the 200 header went out: an SSE event in the envelope, the stream then ends with [DONE]."""
    return f"data: {json.dumps(error.body())}\n\n"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.headers, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}; see /v1/models, /v1/chat/completions, /v1/completions, "
                        "/v1/messages",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                               str(exc.detail))
        return error_response(exc.status_code, message, path=request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, "internal server error; the details are in the server log",
                              path=request.url.path)
