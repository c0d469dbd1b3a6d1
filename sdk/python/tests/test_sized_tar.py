"""The directory tar of uploads: exact size known before streaming, tree changes refused."""

import io
import os
import socket
import tarfile

import pytest

from fastvm import FileTransferError
from fastvm import _sized_tar


def build(root):
    p = _sized_tar.plan(str(root))
    data = b"".join(_sized_tar.stream(p))
    return p, data


def reference(root, p):
    """The same members written by tarfile itself (TarFile.addfile + close)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for e in p.entries:
            st = os.lstat(os.path.join(str(root), e.rel) if e.rel else str(root))
            info = _sized_tar._tarinfo(str(root), e.rel, st)
            if info.isreg():
                with open(os.path.join(str(root), e.rel), "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def tricky_tree(root):
    deep = root / ("d" * 90) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / ("f" * 200)).write_bytes(b"\x01" * 1000)
    (root / "empty").write_bytes(b"")
    (root / "exact512").write_bytes(b"\x02" * 512)
    (root / ("x" * 100)).write_bytes(b"100-byte name")
    (root / ("y" * 98)).write_bytes(b"98 + ./ = 100")
    (root / ("w" * 99)).write_bytes(b"99 + ./ = 101")
    (root / "empty dir").mkdir()
    (root / "naïve – 日本語.txt").write_text("non-ascii")
    os.close(os.open(os.path.join(os.fsencode(root), b"latin1-\xe9"), os.O_CREAT | os.O_WRONLY, 0o644))
    exe = root / "run.sh"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o750)
    (root / "link").symlink_to("empty")
    (root / "dangling-long-link").symlink_to("z" * 150)
    (root / "dirlink").symlink_to("d" * 90)
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    return sock


def test_size_is_exact_for_a_tricky_tree(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    sock = tricky_tree(root)
    try:
        p, data = build(root)
    finally:
        sock.close()
    assert p.size == len(data)
    assert len(data) % tarfile.RECORDSIZE == 0
    assert data == reference(root, p)  # byte for byte what tarfile writes
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar}
        names = [m.name for m in tar]
        long_file = "./" + "d" * 90 + "/" + "e" * 60 + "/" + "f" * 200
        assert tar.extractfile(members[long_file]).read() == b"\x01" * 1000
    assert names[0] == "." and all(n == "." or n.startswith("./") for n in names)
    assert members["./dangling-long-link"].linkname == "z" * 150
    assert members["./run.sh"].mode == 0o750
    assert members["./empty dir"].isdir() and members["./fifo"].isfifo()
    assert "./naïve – 日本語.txt" in members and os.fsdecode(b"./latin1-\xe9") in members
    assert not any("sock" in n for n in names)  # sockets are skipped, like GNU tar


@pytest.mark.parametrize("sizes", [[], [0], [1], [511, 512, 513], [10240 - 1536], [5 * 1024 * 1024 + 3]])
def test_size_is_exact_for_file_sizes(tmp_path, sizes):
    for i, n in enumerate(sizes):
        (tmp_path / f"f{i}").write_bytes(os.urandom(n))
    p, data = build(tmp_path)
    assert p.size == len(data) == len(reference(tmp_path, p))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for i, _n in enumerate(sizes):
            assert tar.extractfile(f"./f{i}").read() == (tmp_path / f"f{i}").read_bytes()


def test_gnu_tar_reads_it(tmp_path):
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.skip("no tar binary")
    root = tmp_path / "src"
    root.mkdir()
    (root / ("n" * 150)).write_text("long")
    (root / "sub").mkdir()
    (root / "sub" / "ü.txt").write_text("u")
    (root / "l").symlink_to("q" * 120)
    _, data = build(root)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xf", "-", "-C", str(out)], input=data, check=True)
    assert (out / ("n" * 150)).read_text() == "long"
    assert (out / "sub" / "ü.txt").read_text() == "u"
    assert os.readlink(out / "l") == "q" * 120


def _grow(d):
    (d / "a").write_bytes(b"longer than before")


def _appear_last(d):
    (d / "z-new").write_bytes(b"")


def _appear_middle(d):
    (d / "b-new").write_bytes(b"")


def _disappear(d):
    (d / "c").unlink()


def _relink(d):
    (d / "l").unlink()
    (d / "l").symlink_to("c")


def _retype(d):
    (d / "c").unlink()
    (d / "c").mkdir()


@pytest.mark.parametrize(
    "change, why",
    [(_grow, "changed size"), (_appear_last, "appeared"), (_appear_middle, "found"), (_disappear, "disappeared"), (_relink, "symlink target"), (_retype, "changed type")],
)
def test_a_changed_tree_is_an_error(tmp_path, change, why):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "c").write_bytes(b"c")
    (tmp_path / "l").symlink_to("a")
    p = _sized_tar.plan(str(tmp_path))
    change(tmp_path)
    with pytest.raises(FileTransferError) as info:
        b"".join(_sized_tar.stream(p))
    assert why in str(info.value) and "during the upload" in str(info.value)


def test_a_file_changing_while_read_is_an_error(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"0123456789")
    with pytest.raises(FileTransferError, match="shrank"):
        list(_sized_tar._file_data(str(f), 12, str(tmp_path), "f"))
    with pytest.raises(FileTransferError, match="grew"):
        list(_sized_tar._file_data(str(f), 8, str(tmp_path), "f"))
