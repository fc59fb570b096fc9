"""The `qwen35` command line, run as a user would (subprocesses on the built-in default model), and through `main`
in this process where a process of its own proves nothing more (the same parser, commands and exit codes)."""

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
    out = run("info", "--bits", "4")
    assert out.returncode == 0, out.stderr
    for text in ("2 x (3 DeltaNet + 1 attention)", "parameters", "int4", "K/V", "per token", "total"):
        assert text in out.stdout


def test_quantize_writes_a_checkpoint_that_info_and_generate_read(run, tmp_path, in_process):
    from qwen35.default_model import default_model_path

    nano = str(default_model_path())
    out = run("quantize", nano, str(tmp_path / "q"), "--bits", "4", "--group-size", "32", "--head", "4")
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"], config["head"]) == (4, 32, 4)
    # the written checkpoint read back by the same commands, in this process (no torch import per command)
    assert "int4" in in_process("info", "--model", str(tmp_path / "q")).stdout
    gen = in_process("generate", "Once upon a time", "--model", str(tmp_path / "q"), "--temperature", "0",
                     "--max-tokens", "4")
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr
    bad = in_process("quantize", nano, str(tmp_path / "r"), "--head", "6")
    assert bad.returncode != 0 and "invalid choice" in bad.stderr


def test_one_shot_chat_prints_a_reply_and_exits(run):
    out = run("chat", "-p", "Hello!", "--think", "off", "--max-tokens", "8", "--seed", "1", "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


@pytest.mark.slow
def test_generate_compiled_reads_as_eager(run, in_process):
    args = ("generate", "Once upon a time", "--temperature", "0", "--max-tokens", "8", "--dtype", "float32")
    eager, compiled = in_process(*args), run(*args, "--compile", timeout=300)
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout and eager.stdout.strip()


def test_generate_is_greedy_reproducible(run, in_process):
    """The same text from a fresh process and from another run in this one."""
    a = run("generate", "Once upon a time", "--temperature", "0", "--max-tokens", "8")
    b = in_process("generate", "Once upon a time", "--temperature", "0", "--max-tokens", "8")
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()


def test_interactive_commands(in_process):
    script = "/think off\nhi\n\"\"\"\nline one\nline two\n\"\"\"\n/thinking\n/system be brief\n/reset\n/help\n/exit\n"
    out = in_process("chat", "--max-tokens", "4", stdin=script)
    assert out.returncode == 0, out.stderr
    for text in ("thinking off", "system prompt set", "conversation cleared", "/think on|off"):
        assert text in out.stdout


def test_end_of_input_leaves_cleanly(in_process):
    assert in_process("chat", stdin="").returncode == 0


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
def test_bad_input_is_a_clear_error(in_process, args, message):
    out = in_process(*args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


# -- in-process checks: the parser, the chat loop and the line reader called directly (no torch import per check) --

def _main(*args: str) -> int:
    from qwen35.cli.main import main

    with pytest.raises(SystemExit) as exit:
        main(list(args))
    return exit.value.code


@pytest.mark.parametrize("args, message", [
    (["chat", "--device", "mps", "-p", "x"], "Apple's GPU (mps) is not supported; run on the CPU with --device cpu"),
    (["chat", "--device", "GPU", "-p", "x"], "supported are cpu, cuda and cuda:N"),
    (["serve", "--port", "99999"], "'99999' is not a TCP port: give 0-65535"),
    (["arena", "stats", "5", "-1", "2"], "'-1' is not a count"),
    (["arena", "stats", "0", "0", "0"], "no decisive games in 0 0 0"),
])
def test_usage_mistakes_are_one_line(capsys, args, message):
    assert _main(*args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_arena_stats_of_few_or_one_sided_counts(capsys):
    from qwen35.cli.main import main

    main(["arena", "stats", "3", "0", "0"])  # no result of 3 games reaches p <= 0.05: the design has no power
    out = capsys.readouterr().out
    assert "power of this design: 0.00" in out and "sign test (ties dropped), two-sided p = 0.2500" in out
    main(["arena", "stats", "10", "0", "2"])
    out = capsys.readouterr().out
    assert "None" not in out and "prompts for 80% power: — (not estimable" in out
    assert "CI 80.7–100.0%" in out  # a rate's interval stays within 100%


def test_version_and_defaults_in_help(capsys, monkeypatch):
    from importlib.metadata import version

    monkeypatch.setenv("COLUMNS", "200")
    assert _main("--version") == 0
    assert capsys.readouterr().out.strip() == f"qwen35 {version('qwen35')}"
    assert _main("chat", "--help") == 0
    chat = " ".join(capsys.readouterr().out.split())
    assert "(default: bfloat16)" in chat and "(default: None)" not in chat and "(default: False)" not in chat
    assert _main("serve", "--help") == 0
    assert "TCP port (0 picks a free one) (default: 8000)" in " ".join(capsys.readouterr().out.split())


def test_serve_flags_reach_the_server_settings():
    from qwen35.cli.main import build_parser
    from qwen35.cli.serve import settings_from_args

    args = build_parser().parse_args(["serve", "--read-timeout", "2.5", "--max-batch", "4"])
    settings = settings_from_args(args)
    assert (settings.read_timeout, settings.max_running, settings.host) == (2.5, 4, "127.0.0.1")


def test_serve_announces_only_once_bound(capsys, default_model):
    import io
    import socket
    import threading

    import uvicorn
    from rich.console import Console

    from qwen35.server import ServerSettings, create_app
    from qwen35.server.serve import DrainingServer, serve

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert _main("serve", "--port", str(port)) == 2  # the CLI checks the address before loading anything
        err = capsys.readouterr().err.strip()
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err and "\n" not in err, err
        console = Console(file=io.StringIO(), width=200)
        previous = signal.getsignal(signal.SIGTERM)
        try:
            with pytest.raises(SystemExit):  # the server itself, should the port be taken after that check
                serve(ServerSettings(port=port), lambda: default_model, console)
        finally:
            signal.signal(signal.SIGTERM, previous)
        assert "serving" not in console.file.getvalue()

    app = create_app(ServerSettings(model_name="nano"), lambda: default_model)
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"), app.state.server,
                            console)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()[1]
        assert f"serving nano on http://127.0.0.1:{bound}/v1" in console.file.getvalue()  # the real port of --port 0
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_chat_prompt_dash_reads_stdin_and_think_on_needs_a_thinking_mode(capsys, monkeypatch, default_model):
    import io

    from qwen35.api import Piece

    sent = []
    monkeypatch.setattr("qwen35.cli.chat.load_for", lambda args, console: default_model)
    monkeypatch.setattr(default_model, "stream_chat", lambda messages, **kw: sent.append(messages) or
                        iter([Piece("answer", "fine")]))
    monkeypatch.setattr("sys.stdin", io.StringIO("a message\nfrom a pipe\n"))
    from qwen35.cli.main import main

    main(["chat", "-p", "-"])
    assert sent[0][-1]["content"] == "a message\nfrom a pipe\n" and capsys.readouterr().out == "fine\n"
    assert _main("chat", "-p", "x", "--think", "on") == 2  # the built-in model was trained with thinking off
    assert "this model has no thinking mode" in capsys.readouterr().err and len(sent) == 1


def test_fit_history_drops_whole_oldest_turns():
    from qwen35.cli.chat import fit_history, reply_reserve

    def turn(n: int) -> list[dict]:
        return [{"role": "user", "content": "u" * n}, {"role": "assistant", "content": "a" * n},
                {"role": "tool", "content": "t" * n}]

    history = turn(10) + turn(20) + turn(30) + [{"role": "user", "content": "q" * 5}]

    def count(messages: list[dict]) -> int:
        return 7 + sum(len(m["content"]) for m in messages)  # 7: the system prompt

    assert fit_history(history, count, 1000, 100) == (history, 0)
    assert fit_history(history, count, 250, 100) == (history[6:], 2)  # 192, then 162 > 150: the first two go
    assert fit_history(history, count, 112, 100) == (history[9:], 3)
    with pytest.raises(ValueError, match="takes 12 tokens; 11 fit"):
        fit_history(history, count, 111, 100)
    assert (reply_reserve(512, 4096), reply_reserve(100_000, 4096)) == (512, 1024)


def test_chat_drops_the_oldest_turns_when_the_context_is_full(monkeypatch, default_model):
    import dataclasses
    import io

    from rich.console import Console

    from qwen35.cli.chat import chat_loop

    small = dataclasses.replace(default_model.config, max_position_embeddings=256)  # fills in 3 messages
    monkeypatch.setattr(default_model, "config", small)
    monkeypatch.setattr(default_model.model, "config", small)
    monkeypatch.setattr(default_model, "context", 256)
    script = iter(["word " * 90] * 3 + ["word " * 300, "/think on", "hello"])
    sent, stream_chat = [], default_model.stream_chat
    monkeypatch.setattr(default_model, "stream_chat", lambda messages, **kw: sent.append(messages) or
                        stream_chat(messages, **kw))

    def read_line(first: bool) -> str:
        return next(script) if first else ""

    console = Console(file=io.StringIO(), width=300)
    with pytest.raises(StopIteration):  # the script ran out: every message was answered or refused, no exit
        chat_loop(default_model, read_line, console, {"max_tokens": 8, "temperature": 0.0}, False, None, [])
    out = console.file.getvalue()
    assert "dropped the oldest turn to fit the 256-token context" in out, out
    assert [len(messages) for messages in sent[:3]] == [1, 3, 3]  # the third message went with the second turn
    assert "your message is too long for this model" in out and "248 fit (256-token context, 8 kept" in out, out
    assert "this model has no thinking mode" in out and sent[-1][-1]["content"] == "hello" and len(sent) == 4


def test_terminal_reader_edits_recalls_and_takes_a_long_paste_whole():
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from qwen35.cli.reader import TerminalLines, read_message

    left, up, paste = "\x1b[D", "\x1b[A", "x" * 5000 + "\nsecond line"
    with create_pipe_input() as keys:
        read_line = TerminalLines(keys, DummyOutput())
        for typed, message in [("helo" + left + "l\r", "hello"),  # the arrow key edits the line
                               (up + "!\r", "hello!"),  # and recalls the last message
                               ("\x1b[200~" + paste + "\x1b[201~\r", paste),  # over 4,095 characters, newlines kept
                               ('"""\rone\rtwo\r"""\r', "one\ntwo")]:  # the triple-quote block still works
            keys.send_text(typed)
            assert read_message(read_line) == message
        keys.send_text("\x04")  # Ctrl-D: end of input
        assert read_message(read_line) is None


def test_chat_think_budget_reaches_the_engine_and_notices_are_shown(capsys, monkeypatch, default_model):
    from qwen35.api import Piece

    seen = []
    monkeypatch.setattr("qwen35.cli.chat.load_for", lambda args, console: default_model)
    monkeypatch.setattr("qwen35.cli.chat.has_thinking_mode", lambda model: True)
    monkeypatch.setattr(default_model, "stream_chat", lambda messages, **kw: seen.append(kw) or iter(
        [Piece("thinking", "hmm"), Piece("answer", "", "length", notice="max_tokens ran out while thinking")]))
    from qwen35.cli.main import main

    main(["chat", "-p", "x", "--think", "on", "--think-budget", "64"])
    assert seen[0]["thinking_budget"] == 64 and seen[0]["enable_thinking"] is True
    assert "max_tokens ran out while thinking" in capsys.readouterr().err
    assert _main("chat", "-p", "x", "--think-budget", "-3") == 2
    assert "--think-budget -3 is invalid" in capsys.readouterr().err
