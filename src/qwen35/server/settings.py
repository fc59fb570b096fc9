"""Server settings: every limit a request is checked against, in one frozen place (the CLI fills it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen35.vision.fetch import ImagePolicy

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ServerSettings:
    """Limits and security switches of one server. Defaults follow reliability.md section 7."""

    model_name: str = "qwen35-nano"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, every route but /health needs it
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS  # Host-header allowlist; None turns the check off
    max_body_bytes: int = 2 * 1024 * 1024
    max_n: int = 8
    max_logprobs: int = 20
    max_stop: int = 4
    max_stop_chars: int = 256
    max_running: int = 32  # sequences decoded together in one batched step
    max_queue: int = 256  # sequences waiting for a slot; beyond that new requests get 503
    prefill_chunk: int = 256  # prompt tokens per step, so a long prompt does not stall running streams
    max_backlog: int = 8192  # undelivered events of one request (a client that stopped reading) before abort
    drain_timeout: float = 30.0  # seconds in-flight work may finish after SIGTERM
    read_timeout: float = 30.0  # seconds a client has to send its headers, and again its body (slowloris)
    max_header_bytes: int = 32 * 1024  # all request headers together (431 beyond)
    max_header_count: int = 100
    images: ImagePolicy = field(default_factory=ImagePolicy)  # image sources and caps: no files, no remote URLs

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_n", "max_stop", "max_stop_chars", "max_running", "max_queue",
                     "prefill_chunk", "max_backlog", "max_header_bytes", "max_header_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"server setting {name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.max_logprobs <= 20:
            raise ValueError(f"server setting max_logprobs={self.max_logprobs} must be in [0, 20]")
        if self.drain_timeout < 0:
            raise ValueError(f"server setting drain_timeout={self.drain_timeout} must be >= 0")
        if not self.read_timeout > 0:
            raise ValueError(f"server setting read_timeout={self.read_timeout} must be > 0")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty; give a non-empty key or leave --api-key out")
