"""A content-hash cache in SQLite: a re-run, or a run after a crash, only fills the gaps.

Keys are hashes of everything that determines a result (model identity, sampling, messages, judge prompt
version); each result is committed as soon as it exists, so a killed run loses at most the calls in flight.
Failed calls are not cached: a re-run tries them again.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any


def content_key(*parts: Any) -> str:
    """sha256 of the canonical JSON of `parts`."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class Cache:
    """key -> JSON value, grouped by stage ("answer", "judgment", "bench"); safe for one process at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None)  # autocommit: every put is durable at once
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, stage TEXT NOT NULL, "
                        "value TEXT NOT NULL, created REAL NOT NULL)")

    def get(self, key: str) -> Any | None:
        row = self.db.execute("SELECT value FROM results WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, stage: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?)",
                        (key, stage, json.dumps(value, ensure_ascii=False), time.time()))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
