"""client.upload / client.download and `fastvm cp` against a live server and one
shared VM: byte-identical round trips of a file and of a tree (symlinks, empty
dirs, modes, a 1 GiB sparse-ish file), missing paths, and the async client."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from fastvm import AsyncFastvmClient

BIG = 1 << 30


def make_tree(root: Path, big: bool) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "empty-nested" / "also-empty").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("alpha\n")
    (root / "sub" / "deeper" / "b.bin").write_bytes(os.urandom(70_000))
    (root / "exec.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "exec.sh").chmod(0o751)
    (root / "private").write_text("secret")
    (root / "private").chmod(0o600)
    (root / "link-rel").symlink_to("sub/a.txt")
    (root / "link-dir").symlink_to("sub")
    (root / "dangling").symlink_to("does-not-exist")
    if big:
        # 1 GiB, mostly zeros with a random 64 KiB block every 64 MiB.
        with open(root / "big.img", "wb") as f:
            f.truncate(BIG)
            for off in range(0, BIG, 64 << 20):
                f.seek(off)
                f.write(os.urandom(64 << 10))


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: Path) -> dict:
    """Every entry under root: kind, mode bits, link target or content digest."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, digest(p))
    return out


def test_file_round_trip(client, vm, tmp_path):
    src = tmp_path / "payload.bin"
    src.write_bytes(os.urandom(3 << 20) + b"tail")
    client.upload(vm.id, str(src), "/root/files-e2e/nested/payload.bin")
    out = client.vms.run(vm.id, command="sha256sum /root/files-e2e/nested/payload.bin")
    assert out.stdout.split()[0] == digest(src)
    back = tmp_path / "back" / "payload.bin"
    client.download(vm.id, "/root/files-e2e/nested/payload.bin", str(back))
    assert back.read_bytes() == src.read_bytes()


def test_tree_round_trip_with_1gib_sparse_file(client, vm, tmp_path):
    src = tmp_path / "tree"
    make_tree(src, big=True)
    t0 = time.monotonic()
    client.upload(vm.id, str(src), "/root/tree-e2e")
    t1 = time.monotonic()
    out = client.vms.run(vm.id, command="cd /root/tree-e2e && stat -c '%a %F %n' exec.sh private empty link-rel && sha256sum big.img")
    assert out.exit_code == 0, out.stderr
    assert "751 regular file exec.sh" in out.stdout and "600 regular file private" in out.stdout
    assert "directory empty" in out.stdout and "symbolic link link-rel" in out.stdout
    assert digest(src / "big.img") in out.stdout
    back = tmp_path / "back"
    client.download(vm.id, "/root/tree-e2e", str(back))
    t2 = time.monotonic()
    print(f"1 GiB tree: upload {t1 - t0:.1f} s, download {t2 - t1:.1f} s")
    assert snapshot(back) == snapshot(src)
    client.vms.run(vm.id, command="rm -rf /root/tree-e2e")


def test_download_missing_raises_file_not_found(client, vm, tmp_path):
    with pytest.raises(FileNotFoundError):
        client.download(vm.id, "/root/definitely/not/here", str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


async def test_async_round_trip(fastvm_env, vm, tmp_path):
    src = tmp_path / "t"
    make_tree(src, big=False)
    async with AsyncFastvmClient() as client:
        await client.upload(vm.id, str(src), "/root/async-tree")
        await client.download(vm.id, "/root/async-tree", str(tmp_path / "back"))
        with pytest.raises(FileNotFoundError):
            await client.download(vm.id, "/root/nope-async", str(tmp_path / "n"))
    assert snapshot(tmp_path / "back") == snapshot(src)


def cli(server, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FASTVM_BASE_URL=server.base_url, FASTVM_API_KEY=server.api_key)
    proc = subprocess.run([str(server.binary), *args], env=env, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc


def test_cli_cp_both_ways(fastvm_server, client, vm, tmp_path):
    src = tmp_path / "cli-tree"
    make_tree(src, big=False)
    cli(fastvm_server, "cp", "-q", str(src), f"{vm.id}:/root/cli-tree")
    cli(fastvm_server, "cp", "-q", f"{vm.id}:/root/cli-tree", str(tmp_path / "cli-back"))
    assert snapshot(tmp_path / "cli-back") == snapshot(src)
    f = tmp_path / "one.bin"
    f.write_bytes(os.urandom(1 << 20))
    cli(fastvm_server, "cp", "-q", str(f), f"{vm.id}:/root/cli-one/one.bin")
    cli(fastvm_server, "cp", "-q", f"{vm.id}:/root/cli-one/one.bin", str(tmp_path / "one-back.bin"))
    assert (tmp_path / "one-back.bin").read_bytes() == f.read_bytes()
    env = dict(os.environ, FASTVM_BASE_URL=fastvm_server.base_url, FASTVM_API_KEY=fastvm_server.api_key)
    missing = subprocess.run([str(fastvm_server.binary), "cp", f"{vm.id}:/root/nope", str(tmp_path / "n")], env=env, capture_output=True)
    assert missing.returncode != 0 and b"no such file" in missing.stderr
