"""`make install`: torch's CPU build first, and qwen35's kernels built once, then loaded without a build tool.

The kernel tests build a one-function stand-in (it includes Python.h, not torch's headers: a second, not minutes)
through the same `qwen35.ops.build` path; tests/test_cpu_kernels.py does it with the real kernels where they run.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAND_IN = r"""
#include <Python.h>
static PyObject* available(PyObject*, PyObject*) { Py_RETURN_FALSE; }
static PyMethodDef methods[] = {{"available", available, METH_NOARGS, ""}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef module = {PyModuleDef_HEAD_INIT, "qwen35_cpu_kernels", nullptr, -1, methods};
PyMODINIT_FUNC PyInit_qwen35_cpu_kernels() { return PyModule_Create(&module); }
"""
LOAD = """import sys, pathlib, qwen35.ops.build as build
build.SOURCES = pathlib.Path(sys.argv[1])
print(build.load_or_build().__file__)"""

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")


@pytest.fixture
def stand_in(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Kernel sources to build, and an environment whose cache is empty."""
    sources = tmp_path / "kernels"
    sources.mkdir()
    (sources / "module.cpp").write_text(STAND_IN)
    return sources, {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}


def fake_ninja(tmp_path: Path) -> tuple[Path, Path]:
    """A `ninja` that only leaves a mark and fails: (its directory, the mark)."""
    bin_dir, mark = tmp_path / "fake-bin", tmp_path / "ninja-ran"
    bin_dir.mkdir()
    (bin_dir / "ninja").write_text(f"#!/bin/sh\necho \"$@\" >> {mark}\nexit 1\n")
    (bin_dir / "ninja").chmod(0o755)
    return bin_dir, mark


def load(sources: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOAD, str(sources)], env=env, capture_output=True, text=True,
                          timeout=300)


@needs_compiler
def test_a_built_extension_loads_without_running_ninja(stand_in, tmp_path):
    """Built once, the extension is imported as it is: no ninja runs, so a different one on PATH (an activated
    venv against `make chat`) cannot start a rebuild. Here every ninja there is, PATH's and the `ninja` package's,
    is one that fails; before, each load ran ninja."""
    sources, env = stand_in
    first = load(sources, env)
    assert first.returncode == 0, first.stderr
    assert "compiling qwen35's CPU kernels for this machine (once, about" in first.stderr
    library = Path(first.stdout.strip())
    built_at = library.stat().st_mtime_ns

    bin_dir, mark = fake_ninja(tmp_path)
    package = tmp_path / "fake-packages" / "ninja"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"BIN_DIR = {str(bin_dir)!r}\n")
    start = time.monotonic()
    again = load(sources, {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
                           "PYTHONPATH": str(package.parent)})
    assert again.returncode == 0, again.stderr
    assert not mark.exists(), f"ninja ran: {mark.read_text()}"
    assert "compiling" not in again.stderr and library.stat().st_mtime_ns == built_at
    assert time.monotonic() - start < 30  # python and torch's import; the build is not rerun


@needs_compiler
def test_the_build_runs_qwen35s_own_ninja(stand_in, tmp_path):
    """Whichever ninja PATH has first (here one that fails), the build runs the one installed with qwen35."""
    sources, env = stand_in
    bin_dir, mark = fake_ninja(tmp_path)
    done = load(sources, {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"})
    assert done.returncode == 0, done.stderr
    assert not mark.exists()


@needs_compiler
def test_a_library_cut_short_is_built_again(stand_in):
    """A build killed while linking leaves a library that does not load: the next load builds it again."""
    sources, env = stand_in
    library = Path(load(sources, env).stdout.strip())
    library.write_bytes(library.read_bytes()[:64])
    again = load(sources, env)
    assert again.returncode == 0, again.stderr
    assert "do not load" in again.stderr and "compiling" in again.stderr


def test_a_loading_server_says_when_the_kernels_are_compiling(tmp_path, monkeypatch):
    """While a process builds (it holds the build lock), the loading server's 503 says so, and for how long."""
    import qwen35.ops.build as build
    from qwen35.server.app import ServerState
    from qwen35.server.errors import APIError
    from qwen35.server.settings import ServerSettings

    def loading() -> str:
        with pytest.raises(APIError) as e:
            ServerState(ServerSettings(), lambda: None).ready()
        assert e.value.status == 503
        return e.value.message

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert not build.compiling()  # nothing was ever built here
    build.build_dir().mkdir(parents=True)
    with open(build.build_dir() / "qwen35.lock", "w") as held:
        assert not build.compiling() and "starting" in loading()
        fcntl.flock(held, fcntl.LOCK_EX)
        assert build.compiling()
        assert "compiling qwen35's CPU kernels for this machine (once, about" in loading()
    assert not build.compiling()


def test_make_install_tries_the_cpu_index_then_builds_the_kernels(tmp_path):
    """The install (dry run) takes torch from PyTorch's CPU index (PyPI's Linux torch is the CUDA build) and
    builds the kernels; a GPU user names another index."""
    def dry_run(*assignments: str) -> str:
        return subprocess.run(["make", "-n", "-C", str(ROOT), "install", f"VENV={tmp_path / 'venv'}", *assignments],
                              capture_output=True, text=True, check=True).stdout

    commands = dry_run()
    assert '"torch==2.13.0" "https://download.pytorch.org/whl/cpu"' in commands
    assert commands.index("install_torch.sh") < commands.index("-m qwen35.ops.build")
    assert '"https://download.pytorch.org/whl/cu128"' in dry_run("TORCH_INDEX=https://download.pytorch.org/whl/cu128")


def probe_index(root: Path) -> str:
    """A local package index holding one tiny wheel, `qwen35-probe`: its URL."""
    wheel = root / "qwen35_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("qwen35_probe/__init__.py", "")
        z.writestr("qwen35_probe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: qwen35-probe\nVersion: 1.0\n")
        z.writestr("qwen35_probe-1.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: qwen35-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("qwen35_probe-1.0.dist-info/RECORD", "")
    page = root / "simple" / "qwen35-probe" / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text(f'<a href="{wheel.as_uri()}">{wheel.name}</a>\n')
    return (root / "simple").as_uri()


@pytest.mark.parametrize("reachable", [True, False])
def test_torch_comes_from_the_cpu_index_else_the_default_one_within_seconds(tmp_path, reachable):
    """scripts/install_torch.sh, run for real (pip's dry run, this machine's pip configuration set aside): the
    CPU index first; where it cannot be reached, pip's default index, seconds later, saying so; then the build."""
    default = probe_index(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DRY_RUN="1", PIP_INDEX_URL=default)
    cpu_index = default if reachable else "http://127.0.0.1:9/"  # the discard port: refused at once
    start = time.monotonic()
    done = subprocess.run(["bash", str(ROOT / "scripts" / "install_torch.sh"), sys.executable, "qwen35-probe==1.0",
                           cpu_index], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("installing it from pip's default index instead" in done.stdout) != reachable
    assert "torch 2." in done.stdout and "build" in done.stdout
    assert time.monotonic() - start < 30
