"""End-to-end fixtures: a live ``fastvm serve`` booting real QEMU microVMs.

One server per pytest session, on a free port, with a fresh data dir:

* the binary is ``$FASTVM_BIN``, else ``<repo>/target/release/fastvm``, else
  ``<repo>/target/debug/fastvm`` (``<repo>`` is computed from this file's path);
* guest images come from ``$FASTVM_TEST_IMAGES`` (default
  ``/var/tmp/fastvm-test-images``), shared between runs;
* without a binary the e2e tests skip, unless ``FASTVM_E2E=1`` (CI) where they
  fail: CI must never silently skip them.

Every e2e test runs with ``FASTVM_API_KEY`` / ``FASTVM_BASE_URL`` pointing at the
server, so ``FastvmClient()`` works exactly as the docs show. At teardown every
VM of the (fresh) org is deleted through the API, the server gets SIGTERM then
SIGKILL, and any QEMU still listed in ``DATA/vms/*/qemu.pid`` is killed.

``FASTVM_E2E_KEEP=1`` keeps the temp dir (data dir and server.log) for debugging.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from fastvm import VM, FastvmClient

REPO_ROOT = Path(__file__).resolve().parents[4]
DEFAULT_IMAGE_DIR = "/var/tmp/fastvm-test-images"
STARTUP_TIMEOUT = 60.0


def find_fastvm_binary() -> tuple[Path | None, list[Path]]:
    """The fastvm binary to test and the paths looked at."""
    explicit = os.environ.get("FASTVM_BIN")
    if explicit:
        p = Path(explicit)
        return (p if p.is_file() and os.access(p, os.X_OK) else None), [p]
    candidates = [REPO_ROOT / "target" / "release" / "fastvm", REPO_ROOT / "target" / "debug" / "fastvm"]
    for p in candidates:
        if p.is_file() and os.access(p, os.X_OK):
            return p, candidates
    return None, candidates


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _is_qemu(pid: int, data_dir: Path) -> bool:
    """True when ``pid`` is a QEMU of ``data_dir`` (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"qemu" in cmdline and os.fsencode(str(data_dir)) in cmdline


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


@dataclass
class LiveServer:
    """A running ``fastvm serve`` and how to reach it."""

    binary: Path
    root: Path  # temp dir holding data/ and server.log
    data_dir: Path
    log_path: Path
    image_dir: Path
    port: int = 0
    proxy_port: int = 0
    # Where the bucket-mount tests' S3 server (moto, see ``moto_s3``) listens: the
    # server allows that loopback endpoint (--allow-bucket-endpoint).
    moto_port: int = field(default_factory=lambda: _free_port())
    # ...and of the stand-in GCS (token endpoint + XML API, see fake_gcs.py).
    gcs_port: int = field(default_factory=lambda: _free_port())
    # The snapshot-import tests' registries (docker-registry, plain HTTP; the
    # second one with basic auth): the server speaks HTTP to them (--insecure-registry).
    registry_port: int = field(default_factory=lambda: _free_port())
    registry_auth_port: int = field(default_factory=lambda: _free_port())
    registry_token_port: int = field(default_factory=lambda: _free_port())
    api_key: str = ""
    process: subprocess.Popen | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def qemu_pids(self) -> dict[str, int]:
        """VM id -> pid from DATA/vms/*/qemu.pid (the ones still alive)."""
        out: dict[str, int] = {}
        for pidfile in self.data_dir.glob("vms/*/qemu.pid"):
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            if _pid_alive(pid) and _is_qemu(pid, self.data_dir):
                out[pidfile.parent.name] = pid
        return out

    # -- start / stop ------------------------------------------------------------

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTVM_") or k == "FASTVM_AGENT_BIN"}
        env.setdefault("RUST_LOG", "info")
        env["NO_COLOR"] = "1"
        last_error = ""
        for _attempt in range(3):
            self.port = _free_port()
            self.proxy_port = _free_port()
            log = open(self.log_path, "ab")
            self.process = subprocess.Popen(
                [
                    str(self.binary),
                    "serve",
                    "--data-dir", str(self.data_dir),
                    "--listen", f"127.0.0.1:{self.port}",
                    "--proxy-listen", f"127.0.0.1:{self.proxy_port}",
                    "--metrics-listen", "127.0.0.1:0",
                    "--image-dir", str(self.image_dir),
                    # Guests' allowed DNS queries go nowhere: never the host's resolver.
                    "--dns-upstream", "127.0.0.1:9",
                    "--allow-bucket-endpoint", f"http://127.0.0.1:{self.moto_port}",
                    "--allow-bucket-endpoint", f"http://127.0.0.1:{self.gcs_port}",
                    "--insecure-registry", f"127.0.0.1:{self.registry_port}",
                    "--insecure-registry", f"127.0.0.1:{self.registry_auth_port}",
                    "--insecure-registry", f"127.0.0.1:{self.registry_token_port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Own session: a Ctrl-C on pytest must not stop the server before
                # the teardown below has deleted the VMs through the API.
                start_new_session=True,
            )
            log.close()
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    last_error = f"fastvm serve exited with {self.process.returncode}"
                    break
                try:
                    r = httpx.get(f"{self.base_url}/healthz", timeout=2.0)
                    if r.status_code == 200 and r.json().get("status") == "ok":
                        self.api_key = (self.data_dir / "admin-api-key").read_text().strip()
                        return
                except (httpx.HTTPError, ValueError, OSError):
                    pass
                time.sleep(0.1)
            else:
                last_error = f"/healthz did not answer within {STARTUP_TIMEOUT:.0f} s"
                self._stop_process()
            # "address in use" races on the free port are retried; anything else too,
            # a few times, and then reported with the server's log.
        raise RuntimeError(f"{last_error}; server log {self.log_path}:\n{_tail(self.log_path)}")

    def delete_all_vms(self) -> None:
        """Delete every VM of the org through the API (the data dir is fresh, so
        these are exactly the VMs this session launched)."""
        if not self.api_key or self.process is None or self.process.poll() is not None:
            return
        headers = {"Authorization": f"Bearer {self.api_key}"}
        try:
            with httpx.Client(base_url=self.base_url, headers=headers, timeout=30.0) as http:
                for vm in http.get("/v1/vms").json():
                    try:
                        http.delete(f"/v1/vms/{vm['id']}")
                    except httpx.HTTPError:
                        pass
        except (httpx.HTTPError, ValueError, TypeError, KeyError):
            pass

    def _stop_process(self) -> None:
        p = self.process
        if p is None or p.poll() is not None:
            return
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)
        except ProcessLookupError:
            pass

    def _kill_leftover_qemu(self) -> None:
        pids = list(self.qemu_pids().values())
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _pid_alive(p)]
            time.sleep(0.1)
        for pid in pids:
            if _is_qemu(pid, self.data_dir):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.delete_all_vms()
        finally:
            self._stop_process()
            self._kill_leftover_qemu()
            if os.environ.get("FASTVM_E2E_KEEP") != "1":
                shutil.rmtree(self.root, ignore_errors=True)


E2E_DIR = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: runs against a live fastvm server booting real VMs")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `-m "not e2e"` runs only the unit tests.
    for item in items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def fastvm_server() -> Iterator[LiveServer]:
    binary, looked = find_fastvm_binary()
    if binary is None:
        msg = (
            "no fastvm binary for the end-to-end tests (looked at "
            + ", ".join(str(p) for p in looked)
            + "); build it with `cargo build --release -p fastvm-cli` or set FASTVM_BIN"
        )
        if os.environ.get("FASTVM_E2E") == "1":
            pytest.fail(msg + " [FASTVM_E2E=1: e2e tests must run]", pytrace=False)
        pytest.skip(msg)
    root = Path(tempfile.mkdtemp(prefix="fastvm-e2e-"))
    # mkdtemp makes it 0700; each VM's QEMU runs as its own uid and must traverse it
    # to reach its files under data/ (the server refuses a data dir it cannot reach).
    root.chmod(0o711)
    server = LiveServer(
        binary=binary,
        root=root,
        data_dir=root / "data",
        log_path=root / "server.log",
        image_dir=Path(os.environ.get("FASTVM_TEST_IMAGES") or DEFAULT_IMAGE_DIR),
    )
    server.data_dir.mkdir()
    atexit.register(server.stop)  # in case the session dies before teardown
    try:
        server.start()
    except RuntimeError as exc:
        server.stop()
        pytest.fail(f"could not start {binary} serve: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def fastvm_env(fastvm_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> LiveServer:
    """Every e2e test sees FASTVM_API_KEY / FASTVM_BASE_URL of the live server."""
    monkeypatch.setenv("FASTVM_API_KEY", fastvm_server.api_key)
    monkeypatch.setenv("FASTVM_BASE_URL", fastvm_server.base_url)
    return fastvm_server


@pytest.fixture
def client(fastvm_env: LiveServer) -> Iterator[FastvmClient]:
    """A FastvmClient configured from the environment, as a user would build it."""
    c = FastvmClient()
    try:
        yield c
    finally:
        c.close()


@dataclass
class LaunchedVM:
    vm: VM
    http_status: int  # of the POST /v1/vms (201 or 202)


@pytest.fixture(scope="session")
def dev_launch(fastvm_server: LiveServer) -> Iterator[LaunchedVM]:
    """The session's shared VM: ``vms.launch(machine_type="c1m2", name="dev")``.
    Tests that use it must not change its state (no pause, delete, update)."""
    statuses: list[int] = []

    def record(response: httpx.Response) -> None:
        if response.request.method == "POST" and response.request.url.path == "/v1/vms":
            statuses.append(response.status_code)

    http = httpx.Client(event_hooks={"response": [record]})
    c = FastvmClient(api_key=fastvm_server.api_key, base_url=fastvm_server.base_url, http_client=http)
    try:
        vm = c.vms.launch(machine_type="c1m2", name="dev", poll_interval=0.5)
    finally:
        http.close()
    assert statuses, "the launch did not POST /v1/vms"
    yield LaunchedVM(vm=vm, http_status=statuses[0])


@pytest.fixture
def vm(dev_launch: LaunchedVM) -> VM:
    """The shared running VM (spec examples call it ``vm``)."""
    return dev_launch.vm


@pytest.fixture
def fresh_vm(client: FastvmClient) -> Iterator[VM]:
    """A VM of its own, for tests that change its state; deleted afterwards."""
    v = client.vms.launch(machine_type="c1m2", poll_interval=0.5)
    yield v
    try:
        client.vms.delete(v.id)
    except Exception:
        pass  # already deleted by the test, or the server teardown will


@dataclass
class MotoS3:
    """A moto S3 server with IAM authentication on (see ``moto_s3``)."""

    endpoint: str
    process: subprocess.Popen


@pytest.fixture(scope="session")
def moto_s3(fastvm_server: LiveServer) -> Iterator[MotoS3]:
    """moto's S3-compatible server on the port the live server allows as a bucket
    endpoint, started by this session and stopped after it. Authentication is
    enforced after the first 3 requests (INITIAL_NO_AUTH_ACTION_COUNT), which the
    tests spend on creating their first IAM user: from then on only that user's
    keys (and those it creates) are accepted."""
    binary = os.environ.get("FASTVM_TEST_MOTO") or shutil.which("moto_server")
    if not binary:
        msg = "no moto_server for the bucket-mount tests (set FASTVM_TEST_MOTO or pip install 'moto[server]')"
        if os.environ.get("FASTVM_E2E") == "1":
            pytest.fail(msg + " [FASTVM_E2E=1: e2e tests must run]", pytrace=False)
        pytest.skip(msg)
    log = open(fastvm_server.root / "moto.log", "ab")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
    proc = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(fastvm_server.moto_port)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
    )
    log.close()
    endpoint = f"http://127.0.0.1:{fastvm_server.moto_port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", fastvm_server.moto_port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not start: {_tail(fastvm_server.root / 'moto.log')}", pytrace=False)
            time.sleep(0.1)
    try:
        yield MotoS3(endpoint=endpoint, process=proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def fake_gcs(fastvm_server: LiveServer):
    """The stand-in GCS of fake_gcs.py on the port the live server allows."""
    from .fake_gcs import FakeGcs

    gcs = FakeGcs(fastvm_server.gcs_port)
    try:
        yield gcs
    finally:
        gcs.close()


@pytest.fixture(scope="session")
def oci_registries(fastvm_server: LiveServer):
    """Three local registries (docker-registry, plain HTTP) on the ports the
    live server treats as insecure: an open one with the ready-made test images
    pushed (oci_registry.push_all), one with basic auth (user ``puller``,
    password ``s3cret``) holding the busybox image, and one with the Bearer
    token flow (oci_registry.TokenServer; user ``tokener``) holding it too."""
    from . import oci_registry

    reason = oci_registry.unavailable_reason()
    if reason:
        if os.environ.get("FASTVM_E2E") == "1":
            pytest.fail(reason + " [FASTVM_E2E=1: e2e tests must run]", pytrace=False)
        pytest.skip(reason)
    auth = ("puller", "s3cret")
    with oci_registry.Registry(port=fastvm_server.registry_port) as open_reg, oci_registry.Registry(
        port=fastvm_server.registry_auth_port, auth=auth
    ) as auth_reg, oci_registry.TokenServer(users={"tokener": "t0ken-pass"}) as tokens, oci_registry.Registry(
        port=fastvm_server.registry_token_port, token=tokens
    ) as token_reg:
        images = oci_registry.push_all(open_reg.host)
        private = oci_registry.push_busybox_image(auth_reg.host, repo="private/busybox", tag="1", auth=auth)
        tokened = oci_registry.push_busybox_image(
            token_reg.host, repo="tokened/busybox", tag="1", auth=oci_registry.BearerAuth("tokener", "t0ken-pass")
        )
        yield {"open": open_reg, "auth": auth_reg, "images": images, "private": private, "credentials": auth,
               "token": token_reg, "token_server": tokens, "tokened": tokened, "token_credentials": ("tokener", "t0ken-pass")}
