"""client.snapshot_imports.* and client.build(image_ref=...) against a live server,
with images pushed by the test to real registries (docker-registry) on this machine.

Every import pulls over plain HTTP (the server runs with --insecure-registry for
both test registries), unpacks the layers on the worker, makes a root disk, boots
it once (our agent as PID 1: the images hold busybox only) and captures it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from fastvm import NotFoundError, Snapshot

from . import oci_registry as oci


def _api(server):
    return httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=60
    )


def _wait(client, imp_id: str, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    imp = client.snapshot_imports.retrieve(imp_id)
    while imp.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"import {imp_id} still {imp.status}: {imp.events}"
        time.sleep(0.5)
        imp = client.snapshot_imports.retrieve(imp_id)
    return imp


def _run(client, vm_id: str, command: str) -> str:
    r = client.vms.run(vm_id, command=command)
    assert r.exit_code == 0, (command, r.stdout, r.stderr)
    return r.stdout


def test_busybox_image_builds_boots_and_runs_as_the_image_user(client, fastvm_server, oci_registries) -> None:
    ref = oci_registries["images"]["busybox"]
    snap = client.build(image_ref=ref)
    assert isinstance(snap, Snapshot) and snap.status in (None, "ready")
    imports = [i for i in client.snapshot_imports.list() if i.snapshot_id == snap.id]
    assert len(imports) == 1
    imp = imports[0]
    assert imp.status == "succeeded" and imp.error is None
    assert imp.machine_name == "c1m2" and imp.disk_gi_b == 10
    phases = [(e.phase, e.status) for e in imp.events]
    for want in [("pull", "completed"), ("export", "completed"), ("saving", "completed"), ("warming", "completed"), ("done", "completed")]:
        assert want in phases, phases
    logs = _api(fastvm_server).get(f"/v1/snapshot-imports/{imp.id}/logs")
    assert logs.status_code == 200 and "layer 1/1" in logs.text, logs.text

    vm = client.vms.launch(snapshot_id=snap.id, env_vars={"FROM_LAUNCH": "yes"})
    try:
        assert vm.status == "running"
        assert vm.source_name and "busybox" in vm.source_name
        # The image's User, WorkingDir and Env are the defaults of every exec.
        assert _run(client, vm.id, "id -un; id -u; pwd; echo $GREETING; echo $FROM_LAUNCH; echo $HOME") == (
            "app\n1000\n/home/app\nhello from the image\nyes\n/home/app\n"
        )
        assert _run(client, vm.id, "cat /etc/passwd") == oci.PASSWD
        # The agent configured the network without any tool of the image.
        assert "nameserver" in _run(client, vm.id, "cat /etc/resolv.conf")
        assert _run(client, vm.id, "ls /bin/busybox /proc/1/status >/dev/null && echo ok") == "ok\n"
        # The disk is the requested size (made at full size: nothing in the image grows it).
        df = _run(client, vm.id, "df -k / | tail -1").split()
        assert int(df[1]) > 9 * 1024 * 1024, df
    finally:
        client.vms.delete(vm.id)

    # A second import of the same image reuses the cached layers.
    again = client.snapshot_imports.create(source={"type": "image", "image": ref}, name="busybox-again")
    assert again.status == "pending" and again.name == "busybox-again"
    again = _wait(client, again.id)
    assert again.status == "succeeded", again.error
    pull = [e for e in again.events if (e.phase, e.status) == ("pull", "completed")]
    assert pull and "(1 from the cache), 0 bytes downloaded" in (pull[0].message or ""), pull

    # Delete cascades to the snapshot.
    for i in (imp, again):
        assert client.snapshot_imports.delete(i.id).deleted is True
        with pytest.raises(NotFoundError):
            client.snapshot_imports.retrieve(i.id)
    with pytest.raises(NotFoundError):
        client.snapshots.retrieve(snap.id)


def test_layered_images_apply_whiteouts_links_and_modes(client, oci_registries) -> None:
    images = oci_registries["images"]
    expect = oci.LAYERED_EXPECT
    # OCI index (arm64 listed first; gzip, zstd and plain layers), then a Docker
    # manifest list of Docker v2 manifests.
    for ref in (images["layered"], images["docker_list"]):
        snap = client.build(image_ref=ref)
        vm = client.vms.launch(snapshot_id=snap.id)
        try:
            assert _run(client, vm.id, "pwd") == "/data\n"
            assert _run(client, vm.id, "test -e /PLATFORM || echo amd64-picked") == "amd64-picked\n"
            for path, (content, mode) in expect["files"].items():
                assert _run(client, vm.id, f"cat {path}") == content, path
                assert _run(client, vm.id, f"stat -c %a {path}").strip() == format(mode, "o"), path
            for path, (uid, gid) in expect["owners"].items():
                assert _run(client, vm.id, f"stat -c '%u %g' {path}") == f"{uid} {gid}\n", path
            for path, target in expect["symlinks"].items():
                assert _run(client, vm.id, f"readlink {path}") == target + "\n", path
            for a, b in expect["hardlinks"]:
                assert _run(client, vm.id, f"stat -c %i {a}") == _run(client, vm.id, f"stat -c %i {b}")
            for path in expect["absent"]:
                assert _run(client, vm.id, f"test -e {path} && echo present || echo absent") == "absent\n", path
            for d, names in expect["dir_listings"].items():
                assert _run(client, vm.id, f"ls -A {d}").split() == names
            assert _run(client, vm.id, "/data/exec") == "layer3-script\n"
            assert _run(client, vm.id, "ls -A /data | grep -c '^.wh.' || true").strip() == "0"
        finally:
            client.vms.delete(vm.id)
            for i in client.snapshot_imports.list():
                if i.snapshot_id == snap.id:
                    client.snapshot_imports.delete(i.id)


def test_hostile_layers_stay_inside_the_root_disk(client, fastvm_server, oci_registries) -> None:
    passwd = Path("/etc/passwd").read_bytes()
    before = hashlib.sha256(passwd).hexdigest()
    ref = oci_registries["images"]["hostile"]
    imp = client.snapshot_imports.create(source={"type": "image", "image": ref})
    imp = _wait(client, imp.id)
    assert imp.status == "succeeded", imp.error
    # Nothing landed on the host: not through `..`, not through symlinks.
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == before
    assert not Path("/tmp/fastvm-escape-marker").exists()
    for name in ("escape-dotdot", "escape2", "fastvm-escape-up"):
        hits = [p for p in (fastvm_server.data_dir / "imports").rglob(name)] if (fastvm_server.data_dir / "imports").exists() else []
        assert not hits, hits
        for parent in (fastvm_server.data_dir, fastvm_server.data_dir.parent, Path("/")):
            assert not (parent / name).exists(), parent / name
    logs = _api(fastvm_server).get(f"/v1/snapshot-imports/{imp.id}/logs").text
    assert "skipped" in logs, logs
    vm = client.vms.launch(snapshot_id=imp.snapshot_id)
    try:
        assert _run(client, vm.id, "cat /hostile-ok") == "the image itself is fine\n"
        # The absolute symlink resolved inside the image's root.
        out = _run(client, vm.id, "cat /tmp/fastvm-escape-marker 2>/dev/null; ls / | grep -c escape || true")
        assert "fastvm-escape-dotdot" not in out
        # Hard links to /etc/passwd are the image's own file (or were skipped).
        out = _run(client, vm.id, "cat /passwd-link 2>/dev/null || echo skipped")
        assert out in (oci.PASSWD, "skipped\n"), out
    finally:
        client.vms.delete(vm.id)
        client.snapshot_imports.delete(imp.id)


def test_import_errors_are_clear(client, fastvm_server, oci_registries) -> None:
    host = oci_registries["open"].host
    api = _api(fastvm_server)
    cases = [
        ({"source": {"type": "image", "image": f"{host}/nope/missing:1"}}, "not found"),
        # The index names the platforms it has.
        ({"source": {"type": "image", "image": oci_registries["images"]["layered"], "platform": "linux/s390x"}}, "it has: linux/arm64, linux/amd64"),
        ({"source": {"type": "image", "image": oci_registries["private"]}}, "credentials"),
        (
            {"source": {"type": "image", "image": oci_registries["private"], "registryUsername": "puller", "registryPassword": "wrong"}},
            "credentials",
        ),
    ]
    for body, needle in cases:
        r = api.post("/v1/snapshot-imports", json=body)
        assert r.status_code == 201, r.text
        imp = _wait(client, r.json()["id"])
        assert imp.status == "failed", (body, imp)
        assert needle in (imp.error or ""), (needle, imp.error)
        assert "s3cret" not in (imp.error or "") and "wrong" not in r.text
        assert [e.phase for e in imp.events][-1] == "done"
        assert imp.snapshot_id is None
        client.snapshot_imports.delete(imp.id)
    # Bad requests are refused before anything starts.
    for body, status, code in [
        ({"source": {"type": "image"}}, 400, None),
        ({"source": {"type": "image", "image": "x"}, "diskGiB": 0}, 400, None),
        ({"source": {"type": "image", "image": "x"}, "machineType": "c99"}, 400, "INVALID_MACHINE_TYPE"),
        ({"source": {"type": "image", "image": "x"}, "diskGiB": 100000}, 400, None),
        ({"source": {"type": "dockerfile", "contextRef": "abc"}}, 400, "INVALID_CONTEXT_REF"),
        # A well-formed ref with nothing uploaded to it.
        ({"source": {"type": "dockerfile", "contextRef": "ctx_" + "0" * 32}}, 400, "INVALID_CONTEXT_REF"),
        ({"source": {"type": "dockerfile", "contextRef": "ctx_x", "dockerfilePath": "../Dockerfile"}}, 400, None),
    ]:
        r = api.post("/v1/snapshot-imports", json=body)
        assert r.status_code == status, (body, r.text)
        if code:
            assert r.json()["error"]["code"] == code
    presigned = api.post("/v1/snapshot-imports/context-presign", json={"sizeBytes": 10})
    assert presigned.status_code == 200 and presigned.json()["contextRef"].startswith("ctx_"), presigned.text
    too_big = api.post("/v1/snapshot-imports/context-presign", json={"sizeBytes": 1 << 40})
    assert too_big.status_code == 400, too_big.text
    assert api.get("/v1/snapshot-imports/not-a-uuid").status_code == 404
    assert api.post(f"/v1/snapshot-imports/{'0' * 8}-0000-4000-8000-{'0' * 12}/cancel").status_code == 404


def test_private_registry_and_cancel_frees_everything(client, fastvm_server, oci_registries) -> None:
    user, password = oci_registries["credentials"]
    ref = oci_registries["private"]
    imp = client.snapshot_imports.create(
        source={"type": "image", "image": ref, "registry_username": user, "registry_password": password},
        name="private",
    )
    assert imp.source.registry_username == user
    # Cancel once the image is pulled (the build VM may be booting).
    deadline = time.monotonic() + 120
    while True:
        cur = client.snapshot_imports.retrieve(imp.id)
        if any((e.phase, e.status) == ("pull", "completed") for e in cur.events) or cur.status in ("failed", "succeeded"):
            break
        assert time.monotonic() < deadline, cur.events
        time.sleep(0.2)
    assert cur.status not in ("failed",), cur.error
    cancelled = client.snapshot_imports.cancel(imp.id)
    if cur.status != "succeeded":
        assert cancelled.status == "cancelled" and cancelled.snapshot_id is None
        assert [(e.phase, e.status) for e in cancelled.events][-1] == ("done", "cancelled")
        # Its build VM and scratch files go.
        deadline = time.monotonic() + 30
        while (fastvm_server.data_dir / "vms" / imp.id).exists() or (fastvm_server.data_dir / "imports" / imp.id).exists():
            assert time.monotonic() < deadline, "the cancelled import left files behind"
            time.sleep(0.2)
        assert imp.id not in fastvm_server.qemu_pids()
        r = _api(fastvm_server).post(f"/v1/snapshot-imports/{imp.id}/cancel")
        assert r.status_code == 409 and r.json()["error"]["code"] == "INVALID_STATE"
    client.snapshot_imports.delete(imp.id)
    assert os.path.isdir(fastvm_server.data_dir / "oci" / "blobs" / "sha256")



def test_token_auth_registry(client, oci_registries) -> None:
    """A registry with the Bearer token flow: the worker answers its challenge
    with a token fetched with the import's credentials."""
    ref = oci_registries["tokened"]
    user, password = oci_registries["token_credentials"]
    tokens = oci_registries["token_server"]
    for creds in [{}, {"registry_username": user, "registry_password": "nope"}]:
        imp = _wait(client, client.snapshot_imports.create(source={"type": "image", "image": ref, **creds}).id)
        assert imp.status == "failed" and "credentials" in (imp.error or ""), imp.error
        assert "nope" not in (imp.error or "")
        client.snapshot_imports.delete(imp.id)
    issued_before = len(tokens.issued)
    imp = client.snapshot_imports.create(
        source={"type": "image", "image": ref, "registry_username": user, "registry_password": password}
    )
    done = _wait(client, imp.id)
    assert done.status == "succeeded", done.error
    # The pull went through the token service, as this user, for this repository.
    assert (user, "repository:tokened/busybox:pull") in tokens.issued[issued_before:], tokens.issued
    client.snapshot_imports.delete(done.id)

# ---------------------------------------------------------------------------
# Dockerfile builds: buildah in a builder VM of the worker; FROM images come
# from the test's registries through the worker (loopback, plain HTTP).

DOCKERFILE = """\
ARG REG
FROM ${REG}/busybox:1 AS base
USER root
ARG MSG=unset
RUN echo "msg=$MSG" > /greeting
# RUN steps have the builder VM's network: a fetch from a host off this one.
ARG URL
RUN wget -q -O /srv-fetched.txt "$URL" && cat /srv-fetched.txt
COPY hello.txt /srv/hello.txt
COPY --chmod=0755 tools/run.sh /usr/local/bin/run.sh
ADD data.tar /srv/data/

FROM base AS app
COPY --from=base /greeting /srv/greeting
WORKDIR /srv
ENV APP_MODE=built
RUN echo app > /srv/stage

FROM base AS other
RUN echo other > /srv/stage
"""


def _context(tmp: Path) -> Path:
    import io
    import tarfile

    ctx = tmp / "ctx"
    (ctx / "tools").mkdir(parents=True)
    (ctx / "hello.txt").write_text("hello from the context\n")
    (ctx / "tools" / "run.sh").write_text("#!/bin/sh\necho run.sh ran\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        data = b"inside a tar\n"
        info = tarfile.TarInfo("packed.txt")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    (ctx / "data.tar").write_bytes(buf.getvalue())
    return ctx


def _upload_context(client, api, ctx: Path, dockerfile: str, path: str = "Dockerfile") -> str:
    """Zip ctx (+ the Dockerfile at `path`), presign, PUT; the contextRef."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(ctx.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(ctx).as_posix())
        zf.writestr(path, dockerfile)
    body = buf.getvalue()
    ref = client.snapshot_imports.presign_context(size_bytes=len(body))
    put = httpx.put(ref.upload_url, content=body, headers={"Content-Type": "application/zip"}, timeout=60)
    assert put.status_code in (200, 201, 204), put.text
    return ref.context_ref


OUTSIDE_NS, OUTSIDE_VETH = "fvsdk-out", "fvsdk-h"
OUTSIDE_HOST, OUTSIDE_GW = "198.18.77.2", "198.18.77.1"


@pytest.fixture(scope="module")
def outside_http(tmp_path_factory):
    """An HTTP server as the internet would be to a guest: in network namespace
    fvsdk-out behind a veth, at 198.18.77.2:8080 (the benchmarking range: not
    this host's address, not a private range the egress guard refuses)."""
    import shutil
    import sys

    if os.geteuid() != 0 or not shutil.which("ip"):
        if os.environ.get("FASTVM_E2E") == "1":
            pytest.fail("the outside host needs root and iproute2 [FASTVM_E2E=1]", pytrace=False)
        pytest.skip("the outside host needs root and iproute2")
    root = tmp_path_factory.mktemp("outside")
    (root / "fetched.txt").write_text("fetched from outside\n")

    def ip(*args: str, check: bool = True) -> None:
        subprocess.run(["ip", *args], check=check, capture_output=True)

    # Leftovers of an aborted run go first.
    ip("netns", "del", OUTSIDE_NS, check=False)
    ip("link", "del", OUTSIDE_VETH, check=False)
    ip("netns", "add", OUTSIDE_NS)
    proc = None
    try:
        ip("link", "add", OUTSIDE_VETH, "type", "veth", "peer", "name", "eth0", "netns", OUTSIDE_NS)
        ip("addr", "add", f"{OUTSIDE_GW}/30", "dev", OUTSIDE_VETH)
        ip("link", "set", OUTSIDE_VETH, "up")
        ip("-n", OUTSIDE_NS, "addr", "add", f"{OUTSIDE_HOST}/30", "dev", "eth0")
        ip("-n", OUTSIDE_NS, "link", "set", "eth0", "up")
        ip("-n", OUTSIDE_NS, "link", "set", "lo", "up")
        ip("-n", OUTSIDE_NS, "route", "add", "default", "via", OUTSIDE_GW)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", OUTSIDE_NS, sys.executable, "-m", "http.server", "8080",
             "--bind", OUTSIDE_HOST, "--directory", str(root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        url = f"http://{OUTSIDE_HOST}:8080/fetched.txt"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(url, timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the outside HTTP server did not come up"
            time.sleep(0.1)
        yield url
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(5)
        ip("netns", "del", OUTSIDE_NS, check=False)
        ip("link", "del", OUTSIDE_VETH, check=False)


def test_dockerfile_build_multi_stage_args_target_and_context(client, fastvm_server, oci_registries, outside_http, tmp_path) -> None:
    host = oci_registries["open"].host
    ctx = _context(tmp_path)
    api = _api(fastvm_server)
    # Low level: build args, --target, a Dockerfile in a subdirectory.
    ref = _upload_context(client, api, ctx, DOCKERFILE, path="build/Dockerfile.app")
    imp = client.snapshot_imports.create(
        source={
            "type": "dockerfile",
            "context_ref": ref,
            "dockerfile_path": "build/Dockerfile.app",
            "build_args": {"REG": host, "MSG": "hi there", "URL": outside_http},
            "target": "app",
        },
        name="app-build",
    )
    assert imp.source.type == "dockerfile" and imp.source.target == "app"
    assert imp.source.build_args == {"REG": host, "MSG": "hi there", "URL": outside_http}
    assert imp.source.context_size_bytes and imp.source.context_size_bytes > 0
    done = _wait(client, imp.id, timeout=900)
    logs = api.get(f"/v1/snapshot-imports/{imp.id}/logs").text
    assert done.status == "succeeded", (done.error, logs[-4000:])
    phases = [(e.phase, e.status) for e in done.events]
    for want in [("builder", "completed"), ("fetch_context", "completed"), ("pull", "completed"),
                 ("build", "completed"), ("export", "completed"), ("warming", "completed"), ("done", "completed")]:
        assert want in phases, phases
    assert "STEP" in logs and f"{host}/busybox:1" in logs, logs[-4000:]
    # The "other" stage was not built (--target app stops there).
    assert "echo other" not in logs
    # The context ref was single-use.
    again = api.post("/v1/snapshot-imports", json={"source": {"type": "dockerfile", "contextRef": ref}})
    assert again.status_code == 400 and again.json()["error"]["code"] == "INVALID_CONTEXT_REF", again.text

    vm = client.vms.launch(snapshot_id=done.snapshot_id)
    try:
        assert vm.source_name == "app-build"
        out = _run(client, vm.id, "pwd; echo $APP_MODE; cat /srv/greeting /srv/stage /srv/hello.txt /srv/data/packed.txt; /usr/local/bin/run.sh; id -u")
        assert out == "/srv\nbuilt\nmsg=hi there\napp\nhello from the context\ninside a tar\nrun.sh ran\n0\n", out
        assert _run(client, vm.id, "cat /srv-fetched.txt") == "fetched from outside\n"
    finally:
        client.vms.delete(vm.id)
    client.snapshot_imports.delete(done.id)


def test_client_build_with_a_dockerfile_and_a_private_base(client, fastvm_server, oci_registries, tmp_path) -> None:
    """The spec's example (client.build(dockerfile=..., context_dir=...)), then
    a FROM on a registry with basic auth: credentials go to registryHost only."""
    host = oci_registries["open"].host
    ctx = _context(tmp_path)
    snap = client.build(
        dockerfile=f"FROM {host}/busybox:1\nUSER root\nCOPY hello.txt /hello.txt\nRUN wc -c /hello.txt > /size\n",
        context_dir=str(ctx),
    )
    assert isinstance(snap, Snapshot) and snap.status in (None, "ready")
    vm = client.vms.launch(snapshot_id=snap.id)
    try:
        assert _run(client, vm.id, "cat /hello.txt /size") == "hello from the context\n23 /hello.txt\n"
        # The Dockerfile's USER and the base image's Env are the exec defaults.
        assert _run(client, vm.id, "id -un; echo $GREETING") == "root\nhello from the image\n"
    finally:
        client.vms.delete(vm.id)

    user, password = oci_registries["credentials"]
    private = oci_registries["private"]
    auth_host = oci_registries["auth"].host
    api = _api(fastvm_server)
    df = f"FROM {private}\nUSER root\nRUN echo private > /which\n"
    # Without credentials the FROM pull is refused: a clear failure.
    ref = _upload_context(client, api, ctx, df)
    failed = _wait(client, client.snapshot_imports.create(source={"type": "dockerfile", "context_ref": ref}).id, 900)
    assert failed.status == "failed" and "credentials" in (failed.error or ""), failed.error
    assert [e.phase for e in failed.events if e.status == "failed"][0] == "pull", failed.events
    ref = _upload_context(client, api, ctx, df)
    imp = client.snapshot_imports.create(
        source={"type": "dockerfile", "context_ref": ref, "registry_host": auth_host,
                "registry_username": user, "registry_password": password},
    )
    assert imp.source.registry_host == auth_host and imp.source.registry_username == user
    done = _wait(client, imp.id, timeout=900)
    assert done.status == "succeeded", done.error
    assert password not in api.get(f"/v1/snapshot-imports/{imp.id}/logs").text
    assert password not in api.get(f"/v1/snapshot-imports/{imp.id}").text
    vm = client.vms.launch(snapshot_id=done.snapshot_id)
    try:
        assert _run(client, vm.id, "cat /which") == "private\n"
    finally:
        client.vms.delete(vm.id)


def test_dockerfile_failures_are_clear_and_cancel_frees_the_builder(client, fastvm_server, oci_registries, tmp_path) -> None:
    host = oci_registries["open"].host
    ctx = _context(tmp_path)
    api = _api(fastvm_server)
    before = set(fastvm_server.qemu_pids())
    # A failing RUN, through the CLI (zip, upload, create, follow): exit 1,
    # status failed, the step's output in the log, the exit in the error.
    (ctx / "Dockerfile").write_text(f"FROM {host}/busybox:1\nARG CODE\nRUN echo about to fail && exit $CODE\n")
    env = dict(os.environ, FASTVM_BASE_URL=fastvm_server.base_url, FASTVM_API_KEY=fastvm_server.api_key)
    proc = subprocess.run(
        [str(fastvm_server.binary), "import", "dockerfile", str(ctx / "Dockerfile"), "--build-arg", "CODE=7", "--name", "cli-fail"],
        env=env, capture_output=True, timeout=900,
    )
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, (proc.returncode, stderr)
    assert "context uploaded" in stderr and "the build failed (exit 7)" in stderr, stderr
    (ctx / "Dockerfile").unlink()
    failed = next(i for i in client.snapshot_imports.list() if i.name == "cli-fail")
    assert failed.status == "failed" and failed.snapshot_id is None
    assert failed.source.build_args == {"CODE": "7"}
    assert "the build failed (exit" in (failed.error or ""), failed.error
    assert "about to fail" in api.get(f"/v1/snapshot-imports/{failed.id}/logs").text
    # A context without the named Dockerfile.
    ref = _upload_context(client, api, ctx, "FROM scratch\n")
    missing = _wait(client, client.snapshot_imports.create(
        source={"type": "dockerfile", "context_ref": ref, "dockerfile_path": "nope/Dockerfile"}).id, 900)
    assert missing.status == "failed" and "no file nope/Dockerfile" in (missing.error or ""), missing.error
    # Not a ZIP at all.
    bad = client.snapshot_imports.presign_context(size_bytes=9)
    assert httpx.put(bad.upload_url, content=b"not a zip", headers={"Content-Type": "application/zip"}).status_code < 300
    notzip = _wait(client, client.snapshot_imports.create(source={"type": "dockerfile", "context_ref": bad.context_ref}).id, 900)
    assert notzip.status == "failed" and "ZIP" in (notzip.error or ""), notzip.error

    # Cancel in the middle of a long RUN: the builder VM and the scratch go.
    ref = _upload_context(client, api, ctx, f"FROM {host}/busybox:1\nRUN echo sleeping && sleep 600\n")
    imp = client.snapshot_imports.create(source={"type": "dockerfile", "context_ref": ref})
    deadline = time.monotonic() + 600
    while "sleeping" not in api.get(f"/v1/snapshot-imports/{imp.id}/logs").text:
        cur = client.snapshot_imports.retrieve(imp.id)
        assert cur.status not in ("failed", "succeeded"), cur.error
        assert time.monotonic() < deadline, cur.events
        time.sleep(0.5)
    cancelled = client.snapshot_imports.cancel(imp.id)
    assert cancelled.status == "cancelled"
    deadline = time.monotonic() + 60
    while set(fastvm_server.qemu_pids()) - before or (fastvm_server.data_dir / "imports" / f"{imp.id}-build").exists():
        assert time.monotonic() < deadline, ("the cancelled build left a VM or files", set(fastvm_server.qemu_pids()) - before)
        time.sleep(0.5)
    for i in (failed, missing, notzip, cancelled):
        client.snapshot_imports.delete(i.id)
