import io
import os
import tarfile

import pytest

from fastvm import FileTransferError, UnsafeArchiveError
from fastvm._tar import IterReader, safe_extract


def make_tar(*members) -> bytes:
    """members: (name, kind, payload) with kind in file/dir/sym/hard/chr/fifo."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                data = payload.encode() if isinstance(payload, str) else payload
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
            elif kind == "sym":
                info.type = tarfile.SYMTYPE
                info.linkname = payload
            elif kind == "hard":
                info.type = tarfile.LNKTYPE
                info.linkname = payload
            elif kind == "chr":
                info.type = tarfile.CHRTYPE
                info.devmajor, info.devminor = 1, 3  # /dev/null
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info)
    return buf.getvalue()


def stream(data: bytes, chunk: int = 7):
    """A non-seekable reader over small chunks, as the HTTP body is."""
    return IterReader(iter([data[i : i + chunk] for i in range(0, len(data), chunk)]))


def test_extracts_normal_archive(tmp_path):
    data = make_tar(
        ("./", "dir", None),
        ("./sub", "dir", None),
        ("./sub/a.txt", "file", "alpha"),
        ("./top.bin", "file", b"\x00\x01"),
        ("./link", "sym", "sub/a.txt"),
        ("./sub/up", "sym", "../top.bin"),
        ("./hard", "hard", "./sub/a.txt"),
    )
    dest = tmp_path / "out"
    safe_extract(stream(data), str(dest))
    assert (dest / "sub" / "a.txt").read_text() == "alpha"
    assert (dest / "top.bin").read_bytes() == b"\x00\x01"
    assert os.readlink(dest / "link") == "sub/a.txt"
    assert (dest / "sub" / "up").read_bytes() == b"\x00\x01"
    assert (dest / "hard").read_text() == "alpha"


@pytest.mark.parametrize(
    "members",
    [
        [("/etc/evil", "file", "x")],
        [("../evil", "file", "x")],
        [("./a/../../evil", "file", "x")],
        [("a", "dir", None), ("a/..", "dir", None)],
        [("link", "sym", "/etc")],
        [("link", "sym", "../evil")],
        [("d", "dir", None), ("d/link", "sym", "../../evil")],
        [("hard", "hard", "/etc/passwd")],
        [("hard", "hard", "../evil")],
        # chain: "a" -> "." is harmless alone, but "a/b" -> ".." then escapes
        [("a", "sym", "."), ("a/b", "sym", "..")],
        # write through a symlinked directory that points outside
        [("out", "sym", ".."), ("out/evil", "file", "x")],
    ],
    ids=["absolute", "dotdot", "inner-dotdot", "dotdot-dir", "abs-symlink", "symlink-out", "nested-symlink-out", "abs-hardlink", "hardlink-out", "symlink-chain", "through-symlink"],
)
def test_refuses_unsafe_members(tmp_path, members):
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchiveError) as info:
        safe_extract(stream(make_tar(*members)), str(dest))
    assert isinstance(info.value, FileTransferError)
    assert not (tmp_path / "evil").exists()
    assert not os.path.lexists(tmp_path / "evil")


def test_refusal_stops_before_later_members(tmp_path):
    data = make_tar(("ok.txt", "file", "1"), ("../evil", "file", "x"), ("later.txt", "file", "2"))
    with pytest.raises(UnsafeArchiveError):
        safe_extract(stream(data), str(tmp_path / "d"))
    assert (tmp_path / "d" / "ok.txt").exists()
    assert not (tmp_path / "d" / "later.txt").exists()


def test_manual_fallback_without_data_filter(tmp_path, monkeypatch):
    import fastvm._tar as t

    monkeypatch.setattr(t, "HAS_DATA_FILTER", False)
    data = make_tar(("./sub", "dir", None), ("./sub/a.txt", "file", "alpha"), ("./link", "sym", "sub/a.txt"))
    safe_extract(stream(data), str(tmp_path / "ok"))
    assert (tmp_path / "ok" / "link").read_text() == "alpha"
    for bad in ([("/abs", "file", "x")], [("l", "sym", "../evil")], [("a", "sym", "."), ("a/b", "sym", "..")]):
        with pytest.raises(UnsafeArchiveError):
            safe_extract(stream(make_tar(*bad)), str(tmp_path / "bad"))
    assert not os.path.lexists(tmp_path / "evil")


@pytest.mark.parametrize("kind", ["chr", "fifo"])
@pytest.mark.parametrize("data_filter", [True, False])
def test_device_files_are_never_created(tmp_path, monkeypatch, kind, data_filter):
    import fastvm._tar as t

    if data_filter and not t.HAS_DATA_FILTER:
        pytest.skip("this Python has no tarfile data filter")
    monkeypatch.setattr(t, "HAS_DATA_FILTER", data_filter)
    dest = tmp_path / "d"
    try:
        safe_extract(stream(make_tar(("./ok", "file", "1"), ("./dev", kind, None))), str(dest))
    except UnsafeArchiveError:
        pass  # the data filter refuses; the fallback skips silently
    assert (dest / "ok").read_text() == "1"
    assert not os.path.lexists(dest / "dev")
