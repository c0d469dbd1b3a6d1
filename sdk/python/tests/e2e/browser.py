"""Shared helpers of the browser tests: a headless Chromium (Debian's
``chromium``) driven over the DevTools protocol with ``websocket-client``.

``launch_browser(tmp_path)`` starts one on about:blank and yields a :class:`Cdp`
client of its page. Set-up installs what is missing: ``apt-get install
chromium`` (as root) and ``pip install websocket-client``. Under
``FASTVM_E2E=1`` a browser that cannot be had fails the test; otherwise it
skips. The browser only ever talks to 127.0.0.1: every other host is mapped
to nothing and proxied to a dead port.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def unavailable(msg: str) -> None:
    if os.environ.get("FASTVM_E2E") == "1":
        pytest.fail(msg + " [FASTVM_E2E=1: e2e tests must run]", pytrace=False)
    pytest.skip(msg)


def find_chromium() -> str | None:
    explicit = os.environ.get("FASTVM_TEST_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def ensure_chromium() -> str:
    found = find_chromium()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"], env=env, check=False)
        found = find_chromium()
    if found is None:
        unavailable("no chromium for the browser test (apt-get install chromium, or set FASTVM_TEST_CHROMIUM)")
    assert found is not None
    return found


def ensure_websocket_client() -> Any:
    try:
        return importlib.import_module("websocket")
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "websocket-client"], check=False)
        importlib.invalidate_caches()
        try:
            return importlib.import_module("websocket")
        except ImportError:
            unavailable("the browser test needs websocket-client (pip install websocket-client)")
    raise AssertionError("unreachable")


class Cdp:
    """A minimal DevTools protocol client on one page target."""

    def __init__(self, websocket: Any, url: str) -> None:
        # No Origin header: Chromium refuses DevTools connections from other origins.
        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.next_id = 0
        # Every event the page sent while we waited for answers (method, params).
        self.events: list[dict] = []

    def call(self, method: str, **params: Any) -> dict:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def errors(self) -> list[str]:
        """Script exceptions, console errors and browser-logged errors
        (Content-Security-Policy violations, failed loads) seen so far."""
        out = []
        for ev in self.events:
            p = ev.get("params", {})
            if ev["method"] == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif ev["method"] == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append("console.error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif ev["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                e = p["entry"]
                out.append(f"log ({e.get('source')}): {e.get('text')} {e.get('url', '')}".rstrip())
        return out

    def eval(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or expression}; page:\n{self.screen()}")
            time.sleep(0.2)

    def screen(self) -> str:
        """What the page shows (its text); subclasses show more specific state."""
        return str(self.eval("document.body ? document.body.innerText.slice(0, 4000) : '(no body)'"))

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"screenshot: {path}")
        return path

    def close(self) -> None:
        self.ws.close()


@contextlib.contextmanager
def launch_browser(tmp_path: Path, cdp_class: type[Cdp] = Cdp, window_size: str = "1000,640") -> Iterator[Cdp]:
    """A headless Chromium on about:blank, driven over DevTools; its log is
    ``tmp_path/chromium.log``. Only 127.0.0.1 is reachable from it."""
    chromium = ensure_chromium()
    websocket = ensure_websocket_client()
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    args = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-domain-reliability",
        "--disable-breakpad",
        "--no-pings",
        "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
        # Nothing but this machine: other hosts resolve to nothing, and go to a dead proxy.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=127.0.0.1",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        f"--window-size={window_size}",
        "about:blank",
    ]
    log = open(tmp_path / "chromium.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    cdp = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"chromium did not start; log: {(tmp_path / 'chromium.log').read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=30).json()
        page = next(t for t in targets if t.get("type") == "page")
        cdp = cdp_class(websocket, page["webSocketDebuggerUrl"])
        cdp.call("Page.enable")
        cdp.call("Runtime.enable")
        cdp.call("Log.enable")
        yield cdp
    finally:
        if cdp is not None:
            cdp.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
