"""The one runtime under the Python API, the CLI and the server: a request record, a tensor-free scheduler, an
engine that runs the model for it (continuous batching), the prefill driver and the prefix cache (state snapshots a
new prompt resumes from). The API is the engine's client with one request (`run`); the server's engine thread is
its client with many."""

from qwen35.runtime.engine import Engine, Event, generate_tokens, run
from qwen35.runtime.prefix_cache import PrefixCache
from qwen35.runtime.request import Request
from qwen35.runtime.scheduler import Scheduler, Sequence

__all__ = ["Engine", "Event", "PrefixCache", "Request", "Scheduler", "Sequence", "generate_tokens", "run"]
