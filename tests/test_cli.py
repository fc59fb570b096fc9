"""The `qwen35` command line, run as a user would (subprocesses on the built-in default model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest


@pytest.fixture()
def run():
    env = {**os.environ, "COLUMNS": "120"}

    def go(*args: str, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "qwen35", *args], input=stdin, capture_output=True,
                              text=True, env=env, timeout=timeout)

    go.env = env
    return go


def test_info_shows_pattern_parameters_memory_and_kv(run):
    out = run("info")
    assert out.returncode == 0, out.stderr
    for text in ("2 x (3 DeltaNet + 1 attention)", "parameters", "int4", "K/V", "per token"):
        assert text in out.stdout


def test_quantize_writes_a_checkpoint_that_info_and_generate_read(run, tmp_path):
    from qwen35.default_model import default_model_path

    nano = str(default_model_path())
    out = run("quantize", nano, str(tmp_path / "q"), "--bits", "4", "--group-size", "32", "--head", "4")
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"], config["head"]) == (4, 32, 4)
    assert "int4" in run("info", "--model", str(tmp_path / "q")).stdout
    gen = run("generate", "Once upon a time", "--model", str(tmp_path / "q"), "--temperature", "0", "--max-tokens", "4")
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr
    bad = run("quantize", nano, str(tmp_path / "r"), "--head", "6")
    assert bad.returncode != 0 and "invalid choice" in bad.stderr


def test_one_shot_chat_prints_a_reply_and_exits(run):
    out = run("chat", "-p", "Hello!", "--think", "off", "--max-tokens", "8", "--seed", "1", "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


@pytest.mark.slow
def test_generate_compiled_reads_as_eager(run):
    args = ("generate", "Once upon a time", "--temperature", "0", "--max-tokens", "8", "--dtype", "float32")
    eager, compiled = run(*args), run(*args, "--compile", timeout=300)
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout and eager.stdout.strip()


def test_generate_is_greedy_reproducible(run):
    a = run("generate", "Once upon a time", "--temperature", "0", "--max-tokens", "8")
    b = run("generate", "Once upon a time", "--temperature", "0", "--max-tokens", "8")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()


def test_interactive_commands(run):
    script = "/think off\nhi\n\"\"\"\nline one\nline two\n\"\"\"\n/thinking\n/system be brief\n/reset\n/help\n/exit\n"
    out = run("chat", "--max-tokens", "4", stdin=script)
    assert out.returncode == 0, out.stderr
    for text in ("thinking off", "system prompt set", "conversation cleared", "/think on|off"):
        assert text in out.stdout


def test_end_of_input_leaves_cleanly(run):
    assert run("chat", stdin="").returncode == 0


def test_ctrl_c_stops_the_reply_not_the_program(run):
    proc = subprocess.Popen([sys.executable, "-m", "qwen35", "chat", "--think", "off", "--max-tokens", "100000",
                             "--temperature", "1", "--ignore-eos"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=run.env,
                            # a shell's background job (CI run with `&`) inherits SIGINT ignored, and so would this
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "/help" in proc.stdout.readline()  # the banner: the model is loaded
    proc.stdin.write("write forever\n")
    proc.stdin.flush()
    time.sleep(3)  # well into a reply that would run ~13 s (to the 4096-token context)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate("/exit\n", timeout=60)
    assert proc.returncode == 0, err
    assert "[stopped]" in out


@pytest.mark.parametrize("args, message", [
    (["chat", "-m", "/no/such/dir", "-p", "x"], "neither a local directory"),
    (["chat", "-p", "x", "--top-p", "2"], "sampling option top_p=2.0"),
])
def test_bad_input_is_a_clear_error(run, args, message):
    out = run(*args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
