"""The web console in a real browser: headless Chromium (Debian's ``chromium``)
driven over the DevTools protocol (``websocket-client``), against a live server
and a real guest.

The page ``/console#session=<token>`` must show a working terminal: typing
``echo $((6*7))`` + Enter prints 42; resizing the window resizes the guest's
terminal (``stty size``); a used token leaves the page disconnected with the
reconnect field shown. Screenshots are written to the test's temp dir (their
paths are printed).

Set-up installs what is missing: ``apt-get install chromium`` (as root) and
``pip install websocket-client``. Under ``FASTVM_E2E=1`` a browser that cannot
be had fails the test; otherwise it skips. The browser only ever talks to
127.0.0.1: every other host is mapped to nothing and proxied to a dead port.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from fastvm import FastvmClient

from .browser import Cdp, launch_browser


class ConsolePage(Cdp):
    """The console page's terminal, read through ``window.fastvmConsole``."""

    def screen(self) -> str:
        """Every line of the terminal's buffer (scrollback included)."""
        return self.eval(
            "(() => { const c = window.fastvmConsole; if (!c) return '(no console)';"
            " const b = c.term.buffer.active; const out = [];"
            " for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));"
            " return out.join('\\n'); })()"
        )

    def type_text(self, text: str) -> None:
        self.eval("window.fastvmConsole.term.focus(); true")
        self.call("Input.insertText", text=text)

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call(
                "Input.dispatchKeyEvent",
                type=kind,
                key="Enter",
                code="Enter",
                windowsVirtualKeyCode=13,
                nativeVirtualKeyCode=13,
                **({"text": "\r"} if kind == "keyDown" else {}),
            )



@pytest.fixture
def browser(tmp_path: Path, fastvm_server) -> Iterator[ConsolePage]:
    with launch_browser(tmp_path, ConsolePage) as cdp:
        assert isinstance(cdp, ConsolePage)
        yield cdp


def _stty_size(cdp: ConsolePage, marker: int) -> tuple[int, int]:
    """Run `stty size` in the guest through the page; its answer (rows, cols)."""
    # The marker line is computed by the shell, so it never matches the typed command.
    cdp.type_text(f"stty size; echo size-done-$(({marker}*2))")
    cdp.press_enter()
    want = f"size-done-{marker * 2}"
    cdp.wait_for(f"(() => {{ const c = window.fastvmConsole; const b = c.term.buffer.active; for (let i = 0; i < b.length; i++) if (b.getLine(i).translateToString(true) === {json.dumps(want)}) return true; return false; }})()", what=want)
    lines = cdp.screen().split("\n")
    at = lines.index(want)
    rows, cols = lines[at - 1].split()
    return int(rows), int(cols)


def test_web_console_in_a_real_browser(client: FastvmClient, vm, browser: ConsolePage, fastvm_server, tmp_path: Path) -> None:
    token = client.vms.console_token(vm.id)
    assert token.token.startswith("fvc_") and token.expires_in_sec == 60
    assert token.websocket_path == f"/v1/vms/{vm.id}/console"
    url = f"{fastvm_server.base_url}/console#session={token.token}"
    browser.call("Page.navigate", url=url)
    browser.wait_for("window.fastvmConsole && window.fastvmConsole.state === 'open'", what="the console to connect")
    # The token left the address bar as soon as the page read it.
    assert "session=" not in browser.eval("location.href")
    browser.wait_for("window.fastvmConsole.term.buffer.active.getLine(window.fastvmConsole.term.buffer.active.cursorY + window.fastvmConsole.term.buffer.active.baseY).translateToString(true).endsWith('# ')", what="the shell prompt")

    browser.type_text("echo $((6*7))")
    browser.press_enter()
    browser.wait_for(
        "(() => { const b = window.fastvmConsole.term.buffer.active; for (let i = 0; i < b.length; i++) if (b.getLine(i).translateToString(true) === '42') return true; return false; })()",
        what="42 on the page",
    )
    screen = browser.screen()
    assert "echo $((6*7))" in screen and "\n42\n" in screen + "\n"
    # The rows are drawn in the terminal's monospace font (the page's policy lets
    # xterm.js style them), not in the page's proportional one.
    font = browser.eval("getComputedStyle(document.querySelector('.xterm-rows')).fontFamily")
    assert "Mono" in font or "monospace" in font, font

    # The terminal fills the window, and the guest knows its size.
    cols0, rows0 = browser.eval("[window.fastvmConsole.term.cols, window.fastvmConsole.term.rows]")
    assert cols0 > 80 and rows0 > 20, (cols0, rows0)
    assert _stty_size(browser, 1) == (rows0, cols0)
    browser.screenshot(tmp_path / "console.png")

    # A smaller window: the page refits and the guest's terminal follows.
    browser.call("Emulation.setDeviceMetricsOverride", width=640, height=400, deviceScaleFactor=1, mobile=False)
    browser.wait_for(f"window.fastvmConsole.term.cols !== {cols0} && window.fastvmConsole.term.rows !== {rows0}", what="the terminal to refit")
    time.sleep(0.5)  # let the last resize message go out before typing
    cols1, rows1 = browser.eval("[window.fastvmConsole.term.cols, window.fastvmConsole.term.rows]")
    assert cols1 < cols0 and rows1 < rows0
    assert _stty_size(browser, 2) == (rows1, cols1)
    browser.screenshot(tmp_path / "console-resized.png")

    # The token was spent: the same URL again (a fresh page load) is refused,
    # and the page offers an explicit reconnect.
    browser.call("Emulation.clearDeviceMetricsOverride")
    browser.call("Page.navigate", url="about:blank")
    browser.wait_for("location.href === 'about:blank'")
    browser.call("Page.navigate", url=url)
    browser.wait_for("window.fastvmConsole && window.fastvmConsole.state === 'closed'", what="the refused reconnect")
    assert browser.eval("document.getElementById('reconnect').hidden") is False
    assert "disconnected" in browser.eval("document.getElementById('status').textContent")
    # Reconnect with a new token pasted into the page.
    fresh = client.vms.console_token(vm.id)
    browser.eval(
        "(() => { const f = document.getElementById('session');"
        f" f.value = {json.dumps(f'{fastvm_server.base_url}/console#session={fresh.token}')};"
        " document.getElementById('reconnect').requestSubmit(); return true; })()"
    )
    browser.wait_for("window.fastvmConsole.state === 'open'", what="the explicit reconnect")
    browser.wait_for(
        "window.fastvmConsole.term.buffer.active.getLine(window.fastvmConsole.term.buffer.active.cursorY + window.fastvmConsole.term.buffer.active.baseY).translateToString(true).endsWith('# ')",
        what="the prompt after reconnecting",
    )
    browser.type_text("echo again-$((20+1))")
    browser.press_enter()
    browser.wait_for(
        "(() => { const b = window.fastvmConsole.term.buffer.active; for (let i = 0; i < b.length; i++) if (b.getLine(i).translateToString(true) === 'again-21') return true; return false; })()",
        what="again-21 after reconnecting",
    )


def test_console_page_and_assets_are_served_with_a_strict_policy(fastvm_server) -> None:
    r = httpx.get(f"{fastvm_server.base_url}/console")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert r.headers["cache-control"] == "no-store"
    for asset, kind in [("xterm.js", "javascript"), ("addon-fit.js", "javascript"), ("console.js", "javascript"), ("xterm.css", "css")]:
        a = httpx.get(f"{fastvm_server.base_url}/console/{asset}")
        assert a.status_code == 200 and kind in a.headers["content-type"], asset
        assert f"/console/{asset}" in r.text
