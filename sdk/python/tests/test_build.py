import io
import zipfile

import httpx
import pytest

from fastvm import BuildError, FastvmError, Snapshot

SNAP = {"id": "snp_1", "name": "built", "status": "ready", "createdAt": "t"}


def test_build_from_image(client, server):
    server.on("POST", "/v1/snapshot-imports", (202, {"id": "imp_1", "status": "pending"}))
    server.on("GET", "/v1/snapshot-imports/imp_1", {"id": "imp_1", "status": "running"}, {"id": "imp_1", "status": "succeeded", "snapshotId": "snp_1"})
    server.on("GET", "/v1/snapshots/snp_1", SNAP)
    snap = client.build(image_ref="python:3.13-slim", disk_gi_b=20, name="py", poll_interval=0.001)
    assert isinstance(snap, Snapshot) and snap.id == "snp_1"
    assert server.json(server.requests[0]) == {
        "machineType": "c1m2",
        "diskGiB": 20,
        "name": "py",
        "source": {"type": "image", "image": "python:3.13-slim"},
    }
    assert server.calls()[-1] == ("GET", "/v1/snapshots/snp_1")


def test_build_from_dockerfile(client, server, tmp_path):
    ctx = tmp_path / "my-app"
    (ctx / "src").mkdir(parents=True)
    (ctx / "src" / "app.py").write_text("print('hi')")
    (ctx / "Dockerfile").write_text("FROM old")
    server.on("POST", "/v1/snapshot-imports/context-presign", {"contextRef": "ctx_1", "uploadUrl": "http://storage.test/ctx?sig=1", "expiresInSec": 60, "maxUploadBytes": 10**8})
    server.on("PUT", "/ctx", httpx.Response(200))
    server.on("POST", "/v1/snapshot-imports", {"id": "imp_2", "status": "succeeded", "snapshotId": "snp_1"})
    server.on("GET", "/v1/snapshots/snp_1", SNAP)
    snap = client.build(dockerfile="FROM alpine\nCOPY src /src\n", context_dir=str(ctx), machine_type="c2m4")
    assert snap.id == "snp_1"
    presign, put, create, _ = server.requests
    size = server.json(presign)["sizeBytes"]
    assert put.headers["Content-Type"] == "application/zip"
    assert "Authorization" not in put.headers
    assert len(put.content) == size == int(put.headers["Content-Length"])
    with zipfile.ZipFile(io.BytesIO(put.content)) as zf:
        assert sorted(zf.namelist()) == ["Dockerfile", "src/app.py"]
        assert zf.read("Dockerfile") == b"FROM alpine\nCOPY src /src\n"  # given text wins
        assert zf.read("src/app.py") == b"print('hi')"
    assert server.json(create) == {
        "machineType": "c2m4",
        "source": {"type": "dockerfile", "contextRef": "ctx_1", "dockerfilePath": "Dockerfile"},
    }


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_build_failure_raises(client, server, status):
    server.on("POST", "/v1/snapshot-imports", {"id": "imp_3", "status": "pending"})
    server.on("GET", "/v1/snapshot-imports/imp_3", {"id": "imp_3", "status": status, "error": "pull failed: not found"})
    with pytest.raises(BuildError) as info:
        client.build("nope:latest", poll_interval=0.001)
    assert isinstance(info.value, FastvmError)
    assert status in str(info.value)
    if status == "failed":
        assert "pull failed: not found" in str(info.value)
    assert info.value.snapshot_import.status == status


def test_build_deadline(client, server):
    server.on("POST", "/v1/snapshot-imports", {"id": "imp_4", "status": "pending"})
    server.on("GET", "/v1/snapshot-imports/imp_4", {"id": "imp_4", "status": "running"})
    with pytest.raises(BuildError):
        client.build("alpine", poll_interval=0.001, timeout=0.02)


def test_build_argument_validation(client):
    with pytest.raises(ValueError):
        client.build()
    with pytest.raises(ValueError):
        client.build("alpine", dockerfile="FROM x")
    with pytest.raises(ValueError):
        client.build("alpine", context_dir=".")
