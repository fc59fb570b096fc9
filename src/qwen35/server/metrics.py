"""Prometheus metrics of one server, in its own registry (no process-wide globals): GET /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from qwen35.runtime import Event
from qwen35.runtime.prefix_cache import PrefixCache

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qwen35_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("qwen35_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("qwen35_generation_tokens", "tokens generated", registry=r)
        self.errors = Counter("qwen35_sequence_errors", "sequences ended by an error (NaN/Inf logits, failed step)",
                              registry=r)
        self.queue_depth = Gauge("qwen35_queue_depth", "sequences waiting for a batch slot", registry=r)
        self.batch_size = Gauge("qwen35_batch_size", "sequences in the running batch", registry=r)
        self.ttft = Histogram("qwen35_time_to_first_token_seconds", "request arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("qwen35_request_latency_seconds", "request arrival to last token",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.prefix = {name: Gauge(f"qwen35_prefix_cache_{name}", text, registry=r) for name, text in (
            ("hits", "prompts that resumed from a snapshot"), ("misses", "prompts that found no snapshot"),
            ("reused_tokens", "prompt tokens restored from snapshots"),
            ("computed_tokens", "prompt tokens computed (not restored)"),
            ("warmed_tokens", "tokens prefilled while idle: replies as the next turn renders them"),
            ("snapshot_bytes", "host memory held by prefix snapshots"), ("snapshots", "prefix snapshots held"),
            ("evictions", "snapshots evicted to stay in the budget"))}

    def on_cache(self, cache: PrefixCache | None) -> None:
        """The prefix cache's running totals (gauges: the cache keeps the counts, across API and server use)."""
        if cache is None:
            return
        stats = cache.stats
        for name in ("hits", "misses", "reused_tokens", "computed_tokens", "warmed_tokens", "evictions"):
            self.prefix[name].set(getattr(stats, name))
        self.prefix["snapshot_bytes"].set(cache.nbytes)
        self.prefix["snapshots"].set(len(cache))

    def on_step(self, running: int, waiting: int, events: list[Event]) -> None:
        """Called by the engine thread after every step."""
        self.batch_size.set(running)
        self.queue_depth.set(waiting)
        produced = sum(1 for e in events if e.token >= 0)
        if produced:
            self.generated_tokens.inc(produced)
        failed = sum(1 for e in events if e.finish_reason == "error")
        if failed:
            self.errors.inc(failed)

    def render(self) -> bytes:
        return generate_latest(self.registry)
