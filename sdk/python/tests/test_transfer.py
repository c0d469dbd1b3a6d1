import io
import os
import shlex
import subprocess
import tarfile

import httpx
import pytest

from fastvm import FileTransferError, UnsafeArchiveError
from fastvm._transfer import _extract_command

from .test_tar import make_tar

PRESIGN = {
    "uploadUrl": "http://storage.test/put/obj1?sig=abc",
    "downloadUrl": "http://storage.test/get/obj1?sig=abc",
    "expiresInSec": 600,
    "maxUploadBytes": 10**9,
}


def tar_members(data: bytes) -> dict:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else None) for m in tar}


# --- upload -----------------------------------------------------------------------


def test_upload_file(client, server, tmp_path):
    src = tmp_path / "config.toml"
    src.write_bytes(b"a = 1\n" * 1000)
    server.on("POST", "/v1/vms/vm-1/files/presign", PRESIGN)
    server.on("PUT", "/put/obj1", httpx.Response(200))
    server.on("POST", "/v1/vms/vm-1/files/fetch", {"exitCode": 0, "stdout": "", "stderr": ""})
    client.upload("vm-1", str(src), "/etc/app.toml")
    assert server.calls() == [
        ("POST", "/v1/vms/vm-1/files/presign"),
        ("PUT", "/put/obj1?sig=abc"),
        ("POST", "/v1/vms/vm-1/files/fetch"),
    ]
    presign, put, fetch = server.requests
    assert server.json(presign) == {"path": "/etc/app.toml"}
    assert put.url.host == "storage.test"
    assert "Authorization" not in put.headers  # signed URL: no API key leaks to storage
    assert put.headers["Content-Type"] == "application/octet-stream"
    assert put.headers["Content-Length"] == str(6000)
    assert put.content == src.read_bytes()
    assert server.json(fetch) == {"url": PRESIGN["downloadUrl"], "path": "/etc/app.toml", "timeoutSec": 600}


def test_upload_directory_streams_tar_and_extracts(client, server, tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "main.py").write_text("print(1)")
    (src / "pkg" / "mod.py").write_text("x = 2")
    server.on("POST", "/v1/vms/vm-1/files/presign", PRESIGN)
    server.on("PUT", "/put/obj1", httpx.Response(200))
    server.on("POST", "/v1/vms/vm-1/files/fetch", {"exitCode": 0})
    server.on("POST", "/v1/vms/vm-1/exec", {"exitCode": 0, "stdout": "", "stderr": ""})
    client.upload("vm-1", str(src), "/root/my src", fetch_timeout_sec=30, exec_timeout_sec=40)

    presign, put, fetch, run = server.requests
    tmp = server.json(presign)["path"]
    assert tmp.startswith("/var/tmp/.fastvm-upload-") and tmp.endswith(".tar")
    assert put.headers["Content-Length"] == str(len(put.content))  # sized before streaming (S3 needs it)
    assert "Transfer-Encoding" not in put.headers
    members = tar_members(put.content)
    assert members["./main.py"] == b"print(1)" and members["./pkg/mod.py"] == b"x = 2"
    assert server.json(fetch) == {"url": PRESIGN["downloadUrl"], "path": tmp, "timeoutSec": 30}
    body = server.json(run)
    assert body["timeoutSec"] == 40
    assert body["command"][:2] == ["sh", "-c"]
    script = body["command"][2]
    assert script.startswith("mkdir -p '/root/my src' && tar -xf " + shlex.quote(tmp) + " -C '/root/my src'")
    assert "rm -f " + tmp in script


@pytest.mark.parametrize("is_async", [False, True])
def test_upload_directory_changed_while_streaming_fails(client, aclient, server, tmp_path, monkeypatch, is_async):
    import asyncio

    from fastvm import _sized_tar

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    real_plan = _sized_tar.plan

    def plan_then_change(directory):
        p = real_plan(directory)
        (src / "a.txt").write_text("longer now")
        return p

    monkeypatch.setattr(_sized_tar, "plan", plan_then_change)
    server.on("POST", "/v1/vms/vm-1/files/presign", PRESIGN)
    server.on("PUT", "/put/obj1", httpx.Response(200))
    with pytest.raises(FileTransferError, match="a.txt' changed size"):
        if is_async:
            asyncio.run(aclient.upload("vm-1", str(src), "/root/src"))
        else:
            client.upload("vm-1", str(src), "/root/src")
    assert ("POST", "/v1/vms/vm-1/files/fetch") not in server.calls()


def test_upload_fetch_failure_raises(client, server, tmp_path):
    src = tmp_path / "f"
    src.write_text("x")
    server.on("POST", "/v1/vms/vm-1/files/presign", PRESIGN)
    server.on("PUT", "/put/obj1", httpx.Response(200))
    server.on("POST", "/v1/vms/vm-1/files/fetch", {"exitCode": 1, "stderr": "disk full"})
    with pytest.raises(FileTransferError) as info:
        client.upload("vm-1", str(src), "/x")
    assert info.value.exit_code == 1 and "disk full" in str(info.value)


def test_upload_missing_local_path(client, tmp_path):
    with pytest.raises(FileNotFoundError):
        client.upload("vm-1", str(tmp_path / "nope"), "/x")


# --- download ---------------------------------------------------------------------


def test_download_file(client, server, tmp_path):
    server.on("POST", "/v1/vms/vm-1/files/presign", PRESIGN)
    server.on("POST", "/v1/vms/vm-1/files/export", {"kind": "file", "sizeBytes": 900})
    server.on("GET", "/get/obj1", httpx.Response(200, content=b"log line\n" * 100))
    dest = tmp_path / "nested" / "out.log"
    client.download("vm-1", "/root/out.log", str(dest), exec_timeout_sec=55)
    assert dest.read_bytes() == b"log line\n" * 100
    presign, export, get = server.requests
    assert server.json(presign) == {"path": "/root/out.log"}
    assert server.json(export) == {"path": "/root/out.log", "url": PRESIGN["uploadUrl"], "timeoutSec": 55}
    assert "Authorization" not in get.headers


def test_download_directory(client, server, tmp_path):
    server.on("POST", "/v1/vms/vm-1/files/presign", PRESIGN)
    server.on("POST", "/v1/vms/vm-1/files/export", {"kind": "directory", "sizeBytes": 1})
    data = make_tar(("./", "dir", None), ("./a", "dir", None), ("./a/b.txt", "file", "bee"), ("./c.txt", "file", "sea"))
    server.on("GET", "/get/obj1", httpx.Response(200, content=data))
    client.download("vm-1", "/var/log", str(tmp_path / "backup"))
    assert (tmp_path / "backup" / "a" / "b.txt").read_text() == "bee"
    assert (tmp_path / "backup" / "c.txt").read_text() == "sea"


def test_download_directory_refuses_traversal(client, server, tmp_path):
    server.on("POST", "/v1/vms/vm-1/files/presign", PRESIGN)
    server.on("POST", "/v1/vms/vm-1/files/export", {"kind": "directory", "sizeBytes": 1})
    server.on("GET", "/get/obj1", httpx.Response(200, content=make_tar(("../evil", "file", "x"))))
    with pytest.raises(UnsafeArchiveError):
        client.download("vm-1", "/var/log", str(tmp_path / "backup"))
    assert not (tmp_path / "evil").exists()


def test_download_missing_raises_file_not_found(client, server, tmp_path):
    server.on("POST", "/v1/vms/vm-1/files/presign", PRESIGN)
    server.on(
        "POST",
        "/v1/vms/vm-1/files/export",
        httpx.Response(404, json={"error": {"code": "FILE_NOT_FOUND", "message": "no file"}}),
    )
    with pytest.raises(FileNotFoundError) as info:
        client.download("vm-1", "/nope", str(tmp_path / "x"))
    assert info.value.filename == "/nope"
    assert len(server.requests) == 2  # nothing downloaded


def test_download_missing_vm_is_not_file_not_found(client, server, tmp_path):
    from fastvm import NotFoundError

    server.on("POST", "/v1/vms/vm-1/files/presign", PRESIGN)
    server.on("POST", "/v1/vms/vm-1/files/export", httpx.Response(404, json={"error": {"code": "NOT_FOUND", "message": "no VM"}}))
    with pytest.raises(NotFoundError):
        client.download("vm-1", "/x", str(tmp_path / "x"))


def test_download_vm_side_failure(client, server, tmp_path):
    server.on("POST", "/v1/vms/vm-1/files/presign", PRESIGN)
    server.on(
        "POST",
        "/v1/vms/vm-1/files/export",
        httpx.Response(500, json={"error": {"code": "EXPORT_FAILED", "message": "cat: Permission denied"}}),
    )
    with pytest.raises(Exception) as info:
        client.download("vm-1", "/root/f", str(tmp_path / "x"))
    assert "Permission denied" in str(info.value)


def run_sh(script, env):
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True)


def test_extract_command(tmp_path):
    archive = tmp_path / "up load.tar"
    archive.write_bytes(make_tar(("./", "dir", None), ("./a.txt", "file", "A")))
    dest = tmp_path / "new dir" / "x"
    res = run_sh(_extract_command(str(archive), str(dest)), dict(os.environ))
    assert res.returncode == 0, res.stderr
    assert (dest / "a.txt").read_text() == "A"
    assert not archive.exists()
