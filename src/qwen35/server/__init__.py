"""`qwen35 serve`: an OpenAI-compatible HTTP server over the continuous-batching engine."""

from qwen35.server.app import create_app
from qwen35.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
