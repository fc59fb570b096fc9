"""Continuous batching: a scheduler that never touches tensors and an engine that runs the model for it."""

from qwen35.engine.engine import Engine, Event
from qwen35.engine.scheduler import Scheduler, Sequence

__all__ = ["Engine", "Event", "Scheduler", "Sequence"]
