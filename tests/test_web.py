"""The chat page over plain HTTP: headers (CSP), which paths need the API key, the Host check, /web/config, and
the committed bundle (pinned versions, licences, rebuilt byte-identical by web/build.sh where npm is present)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from qwen35.server import ServerSettings
from qwen35.server.web import STATIC

from test_server import MODEL, running_server

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-web-test"


@pytest.fixture(scope="module")
def keyed(default_model):
    with running_server(ServerSettings(model_name=MODEL, api_key=KEY), lambda: default_model) as (url, state):
        yield url, state


def test_page_has_a_strict_csp_and_needs_no_key(keyed):
    url, _ = keyed
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = dict(d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'" and csp["connect-src"] == "'self'"
    assert csp["style-src"] == "'self'" and csp["form-action"] == "'none'" and csp["frame-ancestors"] == "'none'"
    assert "unsafe" not in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    for asset in ("app.js", "app.css", "katex/katex.min.css", "licenses/versions.json"):
        r = httpx.get(f"{url}/web/static/{asset}")
        assert r.status_code == 200 and r.headers["content-security-policy"], asset
    auth = {"Authorization": f"Bearer {KEY}"}
    for path in ("/web/static/../web.py", "/web/static/%2e%2e/web.py", "/web/static/..%2fweb.py"):
        assert httpx.get(url + path, headers=auth).status_code == 404, path  # nothing outside static/


def test_config_and_api_need_the_key_in_a_header(keyed, default_model):
    url, _ = keyed
    assert httpx.get(url + "/web/config").status_code == 401
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + f"/web/config?api_key={KEY}").status_code == 401  # never from the URL
    r = httpx.get(url + "/web/config", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    config = r.json()
    assert config["model"] == MODEL and config["vision"] is False and config["thinking"] is False
    assert config["context"] == default_model.context
    assert config["defaults"]["temperature"] == default_model.defaults.temperature
    assert config["defaults"]["max_tokens"] == default_model.defaults.max_tokens


def test_host_header_check_applies_to_the_page(keyed):
    url, _ = keyed
    for path in ("/", "/web/static/app.js"):
        assert httpx.get(url + path, headers={"Host": "evil.example"}).status_code == 403


def test_page_has_no_inline_script_or_style():
    html = (STATIC / "index.html").read_text()
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all("src=" in s for s in scripts)
    assert not re.search(r"<script\b[^>]*>\s*[^\s<]", html) and " style=" not in html and "<style" not in html
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers


def test_bundle_pins_and_licences():
    pins = json.loads((ROOT / "web/package.json").read_text())["devDependencies"]
    built = json.loads((STATIC / "licenses/versions.json").read_text())
    assert {name: v["version"] for name, v in built.items()} == pins
    lock = json.loads((ROOT / "web/package-lock.json").read_text())["packages"]
    assert all(lock[f"node_modules/{name}"]["version"] == version for name, version in pins.items())
    for name in ("marked", "highlight.js", "katex", "dompurify"):
        assert (STATIC / f"licenses/{name}.txt").stat().st_size > 500
    assert len(list((STATIC / "katex/fonts").glob("*.woff2"))) >= 20
    assert "url(fonts/" in (STATIC / "katex/katex.min.css").read_text()


@pytest.mark.slow
def test_bundle_rebuilds_byte_identical():
    if not (shutil.which("npm") and shutil.which("node")):
        pytest.skip("node and npm are not installed: the committed bundle cannot be rebuilt here")
    r = subprocess.run(["bash", str(ROOT / "web/build.sh"), "--check"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "the committed bundle is what the sources build" in r.stdout
