"""Headless Chromium for the chat-page tests: Debian's `chromium` and `chromium-driver` driven by Selenium, with
the browser's network log kept so a test can say which addresses the page contacted. Skips (with the reason)
where they are not installed: `make browser` installs them (apt-get, as root)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
MISSING = ("headless Chromium is not installed (Debian packages chromium and chromium-driver; `make browser` "
           "installs them as root)")
DOCS = Path(__file__).resolve().parents[1] / "docs"


def chromium(downloads: Path, width: int = 1280, height: int = 860) -> Any:
    """A headless Chromium session (no background traffic of its own) saving downloads in `downloads`; skips
    when Chromium is missing."""
    if not (CHROMIUM and DRIVER):
        pytest.skip(MISSING)
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions", "--metrics-recording-only",
                 "--hide-scrollbars", "--force-device-scale-factor=1", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    driver.set_window_size(width, height)
    return driver


def requested_urls(driver: Any) -> list[tuple[str, dict[str, str]]]:
    """(url, headers) of every request the page sent since the last call (the DevTools network log); all of
    them, since the session started, accumulate in `driver.requests`."""
    out = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            request = message["params"]["request"]
            out.append((request["url"], request.get("headers", {})))
    driver.requests = getattr(driver, "requests", []) + out
    return out


class ScriptedRunner:
    """Stands in for the engine: every sequence gets the tokens of `text` then end-of-turn (a reply the nano
    model would never write: thinking, code, math, hostile HTML). Set `text` before each request."""

    draining = False

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.text, self.delay = tokenizer, "", 0.0  # seconds between tokens
        self.tasks: dict[str, asyncio.Task] = {}

    def submit(self, requests: list[Any]) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        tokens = self.tokenizer.encode(self.text) + [self.tokenizer.eos_token_ids[0]]
        for request in requests:
            self.tasks[request.id] = asyncio.get_running_loop().create_task(self._feed(queue, request.id, tokens))
        return queue

    async def _feed(self, queue: asyncio.Queue, seq_id: str, tokens: list[int]) -> None:
        from qwen35.runtime import Event

        for token in tokens:
            if self.delay:
                await asyncio.sleep(self.delay)
            queue.put_nowait(Event(seq_id, token))

    def release(self, seq_ids: list[str]) -> None:
        for seq_id in seq_ids:
            task = self.tasks.pop(seq_id, None)
            if task is not None:
                task.cancel()

    def stop(self) -> None:
        pass
