"""Safe, streaming extraction of a tar archive received from a VM.

The archive comes from a machine we do not trust, so every member is checked
before it touches the disk. A member is REFUSED (``UnsafeArchiveError``, extraction
stops) when:

* its name is absolute (``/etc/passwd``, ``C:\\x``) or has a ``..`` component;
* its parent directory resolves outside the destination (through a symlink
  extracted earlier);
* it is a symlink whose target is absolute or resolves outside the destination;
* it is a hard link whose target name is absolute, has ``..``, or resolves outside.

Accepted members are then extracted with ``tarfile``'s ``filter="data"`` when the
running Python has it (3.12, and 3.10.12+/3.11.4+ backports), which also drops
device files and unsafe mode bits; otherwise only regular files, directories and
links are extracted, with setuid/setgid/sticky bits cleared.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from typing import BinaryIO, Iterator

from ._exceptions import UnsafeArchiveError

HAS_DATA_FILTER = hasattr(tarfile, "data_filter")

_DRIVE = re.compile(r"^[A-Za-z]:")


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _unsafe_name(name: str) -> str | None:
    norm = name.replace("\\", "/")
    if norm.startswith("/") or _DRIVE.match(norm):
        return "absolute path"
    if ".." in norm.split("/"):
        return "'..' component"
    return None


def check_member(member: tarfile.TarInfo, root: str) -> None:
    """Raise ``UnsafeArchiveError`` if extracting ``member`` under ``root`` (a
    realpath) could write or point outside ``root``."""
    reason = _unsafe_name(member.name)
    if reason:
        raise UnsafeArchiveError(f"refusing tar member {member.name!r}: {reason}")
    parent = os.path.realpath(os.path.join(root, os.path.dirname(member.name)))
    if not _within(parent, root):
        raise UnsafeArchiveError(f"refusing tar member {member.name!r}: its directory resolves outside the destination")
    if member.issym():
        link = member.linkname
        if link.startswith("/") or _DRIVE.match(link):
            raise UnsafeArchiveError(f"refusing symlink {member.name!r} -> {link!r}: absolute target")
        if not _within(os.path.realpath(os.path.join(parent, link)), root):
            raise UnsafeArchiveError(f"refusing symlink {member.name!r} -> {link!r}: points outside the destination")
    elif member.islnk():
        link = member.linkname
        reason = _unsafe_name(link)
        if reason:
            raise UnsafeArchiveError(f"refusing hard link {member.name!r} -> {link!r}: {reason}")
        if not _within(os.path.realpath(os.path.join(root, link)), root):
            raise UnsafeArchiveError(f"refusing hard link {member.name!r} -> {link!r}: points outside the destination")


def safe_extract(fileobj: BinaryIO, dest: str) -> None:
    """Extract the tar stream ``fileobj`` into ``dest`` (created if missing), reading
    it sequentially (no seeking, nothing buffered on disk but the extracted files)."""
    os.makedirs(dest, exist_ok=True)
    root = os.path.realpath(dest)
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            check_member(member, root)
            if HAS_DATA_FILTER:
                try:
                    tar.extract(member, root, filter="data")
                except tarfile.FilterError as exc:
                    raise UnsafeArchiveError(f"refusing tar member {member.name!r}: {exc}") from exc
            elif member.isfile() or member.isdir() or member.issym() or member.islnk():
                member.mode &= 0o777  # drop setuid / setgid / sticky
                if member.isdir():
                    member.mode |= 0o700  # we must be able to write into it
                tar.extract(member, root, set_attrs=not member.issym())


class IterReader(io.RawIOBase):
    """Read-only file object over an iterator of ``bytes`` chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n
