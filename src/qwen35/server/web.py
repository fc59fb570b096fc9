"""The chat page: GET / and its assets under /web/static/, plus GET /web/config (what the page needs to know).

The assets are static files built from web/ (web/build.sh bundles the npm libraries; the bundle is committed, so
nothing is fetched at install or run time). The page and its assets need no API key (they hold no secrets; the
page asks for the key and sends it as a header); /web/config and the API do. Every answer here carries a strict
Content-Security-Policy: scripts and styles only from this server, no inline script, no eval, and the page may
connect only to the server it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
ASSETS = "/web/static"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; font-src 'self'; "
       "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "max_tokens")


def is_public(path: str) -> bool:
    """Paths served without an API key: the page and its static assets (and /health)."""
    return path in ("/", "/health") or path.startswith(ASSETS + "/")


class _Assets(StaticFiles):
    """StaticFiles (path containment, ETags) with the page's security headers on every answer."""

    async def get_response(self, path: str, scope: Any) -> Any:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def install_web(app: FastAPI, state: Any) -> None:
    """Add the page, its assets and /web/config to `app` (`state` is the app's ServerState)."""
    app.mount(ASSETS, _Assets(directory=STATIC), name="web-static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)

    @app.get("/web/config", include_in_schema=False)
    async def config() -> JSONResponse:
        qwen, _ = state.ready()
        return JSONResponse(web_config(qwen, state.settings.model_name), headers={"Cache-Control": "no-store"})


def web_config(qwen: Any, model_name: str) -> dict[str, Any]:
    """The page's defaults and switches: sampling from the checkpoint's generation_config.json, whether the model
    has a vision tower (images) and a thinking mode, and its context."""
    from qwen35.cli.chat import has_thinking_mode

    defaults = {name: getattr(qwen.defaults, name) for name in SAMPLING}
    return {"model": model_name, "vision": qwen.vision is not None, "thinking": has_thinking_mode(qwen),
            "context": qwen.context, "defaults": defaults}
