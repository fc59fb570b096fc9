"""A scripted OpenAI-compatible endpoint on loopback: a transparent, deterministic stand-in judge or contestant.

It exists to test and demonstrate the arena pipeline without a real judge model (the built-in nano model cannot
judge). As a judge it prefers the answer that covers more distinct words of the user prompt (3 or more more:
"much better"; 1–2: "better"; equal: tie) — a rule, not a judgment of quality. It can inject failures (HTTP
503s with Retry-After, unparsable verdicts) and position bias, and it counts requests, so tests can check
retries and resume.
Run it by hand with `python -m qwen35.eval.scripted --port 8009`; it stops by itself after `--seconds`.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from qwen35.eval.judge import verdict_json

WORD = re.compile(r"[a-z]{3,}")
_SECTION = re.compile(r"<\|The Start of Assistant ([AB])'s Answer\|>\n(.*?)\n<\|The End of Assistant \1's Answer\|>",
                      re.S)


@dataclass
class Script:
    """What the endpoint does; counters are read by tests."""

    fail_first: int = 0  # answer HTTP 503 to this many requests first (retries must cover them)
    retry_after: int = 0  # the Retry-After header (seconds) sent with those failures
    unparsable_every: int = 0  # every n-th judge reply has no verdict (0 = never)
    slot_a_bias: int = 0  # added to slot A's coverage: > 0 makes the judge position-biased
    reply_words: int = 12  # contestant mode: words per reply
    answer_letter: str | None = None  # contestant mode: end with "Answer: <letter>" (benchmark runs)
    delay_s: float = 0.0
    requests: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)  # the Authorization header of each request
    lock: threading.Lock = field(default_factory=threading.Lock)


def coverage(prompt: str, answer: str) -> int:
    return len(set(WORD.findall(prompt.lower())) & set(WORD.findall(answer.lower())))


def judge_reply(user: str, script: Script, n: int) -> str:
    if script.unparsable_every and n % script.unparsable_every == 0:
        return "I cannot decide between these two answers."
    prompt = user.split("<|The Start of Assistant A's Answer|>")[0]
    sections = dict(_SECTION.findall(user))
    a = coverage(prompt, sections.get("A", "")) + script.slot_a_bias
    b = coverage(prompt, sections.get("B", ""))
    d = a - b
    label = "A>>B" if d >= 3 else "A>B" if d > 0 else "A=B" if d == 0 else "B>A" if d > -3 else "B>>A"
    return f"Coverage of the prompt's words: A {a}, B {b}.\n{verdict_json(label)}\n[[{label}]]"


def contestant_reply(messages: list[dict[str, str]], model: str, script: Script) -> str:
    """A reply that covers a model-dependent number of the prompt's distinct words (so models differ)."""
    words = list(dict.fromkeys(WORD.findall(messages[-1]["content"].lower())))
    cover = words[:2 + len(model) % 6]
    filler = ["indeed"] * max(0, script.reply_words - len(cover))
    answer = f"\nAnswer: {script.answer_letter}" if script.answer_letter else ""
    return f"{model} says: " + " ".join(cover + filler) + answer


def make_handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _send(self, code: int, data: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            blob = json.dumps(data).encode()
            self.send_response(code)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            try:
                self.wfile.write(blob)
            except BrokenPipeError:  # the client went away (a test killed it): nothing to answer
                pass

        def do_GET(self) -> None:
            self._send(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with script.lock:
                script.requests += 1
                n = script.requests
                script.bodies.append(body)
                script.auth.append(self.headers.get("Authorization"))
            if script.delay_s:
                time.sleep(script.delay_s)
            if n <= script.fail_first:
                return self._send(503, {"error": {"message": "scripted failure"}},
                                  {"Retry-After": str(script.retry_after)} if script.retry_after else None)
            messages = body.get("messages") or []
            model = str(body.get("model", "scripted"))
            is_judge = any(m.get("role") == "system" and "judge" in m.get("content", "") for m in messages)
            text = judge_reply(messages[-1]["content"], script, n) if is_judge else \
                contestant_reply(messages, model, script)
            self._send(200, {"id": f"cmpl-{n}", "object": "chat.completion", "model": f"scripted-{model}",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": sum(len(m.get("content", "").split()) for m in messages),
                                       "completion_tokens": len(text.split()), "total_tokens": 0}})

    return Handler


class ScriptedServer:
    """`with ScriptedServer(Script()) as s:` serves on 127.0.0.1 (s.url ends in /v1) and shuts down after
    `max_seconds` even if the caller forgets, so a test can never hang on it."""

    def __init__(self, script: Script | None = None, port: int = 0, max_seconds: float = 120.0):
        self.script = script or Script()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), make_handler(self.script))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.timer = threading.Timer(max_seconds, self.httpd.shutdown)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ScriptedServer":
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8009)
    p.add_argument("--seconds", type=float, default=600.0, help="stop by itself after this long")
    args = p.parse_args()
    with ScriptedServer(port=args.port, max_seconds=args.seconds) as s:
        print(f"scripted endpoint at {s.url} for {args.seconds:.0f} s", flush=True)
        s.thread.join()


if __name__ == "__main__":
    main()
