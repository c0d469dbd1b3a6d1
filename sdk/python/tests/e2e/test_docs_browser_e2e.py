"""The API reference ``/docs`` in a real browser: headless Chromium (see
``browser.py``) against a live server.

The page renders the server's OpenAPI document with the vendored Redoc: the
operation list shows every operation's summary (e.g. "Launch a VM"), nothing
is loaded from anywhere but the server, and no script error or policy
violation is logged. A screenshot is written to the test's temp dir (its path
is printed).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx

from .browser import launch_browser


def test_api_reference_renders_every_operation(fastvm_server, tmp_path: Path) -> None:
    doc = httpx.get(f"{fastvm_server.base_url}/openapi.json").json()
    summaries = [op["summary"] for item in doc["paths"].values() for op in item.values()]
    assert len(summaries) >= 25 and "Launch a VM" in summaries

    with launch_browser(tmp_path, window_size="1280,900") as browser:
        browser.call("Page.navigate", url=f"{fastvm_server.base_url}/docs")
        # Redoc fetched /openapi.json and drew the tags, each with its
        # operations (method and path). Its sidebar lists a tag's operations
        # by summary once that tag is opened, one tag at a time: open each in
        # turn and collect what the sidebar shows.
        browser.wait_for("!!document.body && document.body.innerText.includes('/v1/vms/{id}/exec')", timeout=90, what="the operation list")
        sidebar = (
            "[...document.querySelectorAll('*')].filter(e => e.children.length === 0 && e.getBoundingClientRect().left < 290"
            " && e.getBoundingClientRect().width > 0).map(e => e.textContent.trim()).filter(t => t)"
        )
        text = ""
        for tag in [t["name"] for t in doc["tags"]]:
            clicked = browser.eval(
                f"(() => {{ const els = {sidebar.replace('.map(e => e.textContent.trim()).filter(t => t)', '')}"
                f".filter(e => e.textContent.trim() === {json.dumps(tag)}); els.forEach(e => e.click()); return els.length; }})()"
            )
            assert clicked == 1, f"sidebar entry of tag {tag!r}: {clicked} found"
            time.sleep(0.5)
            text += "\n".join(browser.eval(sidebar)) + "\n"
        for want in ("Launch a VM", "Register a service on a VM", "List snapshots"):
            assert want in text, f"{want!r} not rendered"
        missing = [s for s in summaries if s not in text]
        assert not missing, f"operations not rendered: {missing}"
        # The examples are shown, e.g. the launch request's machine type once
        # "Launch a VM" is opened from the sidebar.
        browser.eval(
            f"(() => {{ {sidebar.replace('.map(e => e.textContent.trim()).filter(t => t)', '')}"
            ".filter(e => ['vms', 'Launch a VM'].includes(e.textContent.trim())).forEach(e => e.click()); return true; })()"
        )
        browser.wait_for("document.body.innerText.includes('c1m2')", timeout=30, what="the launch example")
        assert browser.eval("document.title") == "Fast VM API reference"
        # Everything came from the server itself.
        origins = browser.eval(
            "[...new Set(performance.getEntriesByType('resource').map(e => new URL(e.name).origin))]"
        )
        assert set(origins) <= {fastvm_server.base_url}, origins
        names = browser.eval("performance.getEntriesByType('resource').map(e => new URL(e.name).pathname)")
        assert "/openapi.json" in names and any(re.fullmatch(r"/docs/redoc-[0-9.]+/redoc\.standalone\.js", n) for n in names), names
        browser.screenshot(tmp_path / "docs.png")
        # Search runs in Redoc's worker (a blob: URL the page's policy allows).
        errors = browser.errors()
        assert not errors, "the page logged errors:\n" + "\n".join(errors)


def test_docs_page_and_script_are_served_with_a_strict_policy(fastvm_server) -> None:
    r = httpx.get(f"{fastvm_server.base_url}/docs")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self';" in csp and "connect-src 'self'" in csp
    assert "unsafe-eval" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    m = re.search(r'src="(/docs/redoc-[0-9.]+/redoc\.standalone\.js)"', r.text)
    assert m, r.text
    js = httpx.get(f"{fastvm_server.base_url}{m.group(1)}")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "immutable" in js.headers["cache-control"]
    assert len(js.content) > 1_000_000
    # No API key needed, like /openapi.json.
    assert httpx.get(f"{fastvm_server.base_url}/openapi.json").status_code == 200
