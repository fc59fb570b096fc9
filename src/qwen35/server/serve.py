"""`qwen35 serve`: settings from the command line, uvicorn, and a graceful SIGTERM.

On SIGTERM (or Ctrl-C) the server stops listening and the runner stops admitting; in-flight requests finish for
up to --drain-timeout seconds, then end with finish_reason "abort"; the process then exits 0.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable
from types import FrameType

import uvicorn
from rich.console import Console

from qwen35.api import Qwen35
from qwen35.server.app import ServerState, create_app
from qwen35.server.protocol import uvicorn_config
from qwen35.server.settings import LOOPBACK_HOSTS, ServerSettings


class DrainingServer(uvicorn.Server):
    """uvicorn's server, told to drain the engine on the first exit signal and to stop if loading failed; it says
    "serving on …" once the socket is bound (uvicorn logs a bind failure and exits instead)."""

    def __init__(self, config: uvicorn.Config, state: ServerState, console: Console):
        super().__init__(config)
        self.state, self.console = state, console

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        port = self.servers[0].sockets[0].getsockname()[1]  # the one picked when --port is 0
        self.console.print(f"serving {self.state.settings.model_name} on http://{self.config.host}:{port}/v1 "
                           f"(OpenAI-compatible; chat page at http://{self.config.host}:{port}/; Ctrl-C or SIGTERM "
                           "drains and stops)", highlight=False)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.runner is not None:
            self.state.runner.begin_drain(self.state.settings.drain_timeout)
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.state.load_error is not None:
            self.should_exit = True
        return await super().on_tick(counter)


def serve(settings: ServerSettings, load: Callable[[], Qwen35], console: Console, verbose: bool = False) -> None:
    """Run until SIGTERM / Ctrl-C; raises ValueError when the model fails to load."""
    if settings.host not in LOOPBACK_HOSTS:
        console.print(f"[bold yellow]warning:[/] binding {settings.host} exposes the server to the network"
                      + ("" if settings.api_key else " with NO API key: anyone who can reach it can use it; "
                         "set --api-key"), highlight=False)
    app = create_app(settings, load)
    state: ServerState = app.state.server
    config = uvicorn_config(app, settings, log_level="info" if verbose else "warning",
                            timeout_graceful_shutdown=int(settings.drain_timeout) + 5)
    signal.signal(signal.SIGTERM, _after_drain)  # uvicorn re-raises the signal once drained: exit 0, not -15
    DrainingServer(config, state, console).run()
    if state.load_error is not None:
        raise ValueError(f"the model failed to load: {state.load_error}")


def _after_drain(sig: int, frame: FrameType | None) -> None:
    """SIGTERM outside uvicorn's own handler (only after a graceful shutdown): nothing left to do."""
