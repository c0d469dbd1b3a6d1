"""A tar of a local directory whose exact size is known before a byte is read.

Directory uploads PUT this archive with a Content-Length (S3 presigned PUTs require one),
without a temporary copy on the client:

* pass 1 (:func:`plan`) walks the tree with ``lstat`` only (no file data is read) and
  computes the exact archive size from the headers ``tarfile`` would write;
* pass 2 (:func:`stream`) walks it again in the same order and yields the archive. A tree
  that changed in between (an entry appeared or disappeared, a type, size or symlink target
  differs, a file is shorter or longer than its size) raises ``FileTransferError`` before
  a wrong byte count could be sent (the PUT then fails: nothing reaches the VM).

The archive is the one ``tar -C DIR -cf - .`` would make for the VM's ``tar -x``: members
rooted at ``./`` (``./``, ``./sub/``, ``./sub/file``), POSIX pax format (long and non-ASCII
names in pax headers), regular files, directories, symlinks (not followed), FIFOs and device
nodes; sockets are skipped like GNU tar does; hard links are stored as separate copies.
Headers are ``tarfile``'s own (``TarInfo.tobuf``), data is padded to 512 bytes, and the end
is two zero blocks plus tarfile's padding to a 10240-byte record, so ``tarfile`` reads it
back and its size equals what ``tarfile.open(mode="w")`` would produce for the same members.
No ``tar`` binary is needed on the client.
"""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from ._exceptions import FileTransferError

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 20 blocks
FORMAT = tarfile.PAX_FORMAT
ENCODING = "utf-8"
ERRORS = "surrogateescape"
CHUNK = 1024 * 1024


class _Entry(NamedTuple):
    rel: str  # "" for the root, else "sub/file"
    type: bytes
    size: int
    linkname: str
    header_len: int


@dataclass
class Plan:
    """The result of pass 1: what will be archived, and the exact archive size."""

    directory: str
    entries: list[_Entry]
    size: int


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _walk(directory: str, rel: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of the directory and everything under it, pre-order,
    children sorted by name. Symlinks are not followed."""
    path = os.path.join(directory, rel) if rel else directory
    st = os.lstat(path)
    yield rel, st
    if stat.S_ISDIR(st.st_mode):
        with os.scandir(path) as it:
            names = sorted(e.name for e in it)
        for name in names:
            yield from _walk(directory, f"{rel}/{name}" if rel else name)


def _tarinfo(directory: str, rel: str, st: os.stat_result) -> tarfile.TarInfo | None:
    """The member for one entry, or None for a socket (skipped)."""
    info = tarfile.TarInfo("." if not rel else f"./{rel}")
    mode = st.st_mode
    info.mode = stat.S_IMODE(mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.mtime = int(st.st_mtime)
    info.uname = info.gname = ""
    if stat.S_ISREG(mode):
        info.type, info.size = tarfile.REGTYPE, st.st_size
    elif stat.S_ISDIR(mode):
        info.type = tarfile.DIRTYPE  # tobuf() names it "./rel/"
    elif stat.S_ISLNK(mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(os.path.join(directory, rel))
    elif stat.S_ISFIFO(mode):
        info.type = tarfile.FIFOTYPE
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    else:
        return None
    return info


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(FORMAT, ENCODING, ERRORS)


def archive_size(member_bytes: int) -> int:
    """Size of an archive whose members (headers + padded data) take ``member_bytes``:
    two zero blocks, then zeros up to a whole record (``TarFile.close``)."""
    end = member_bytes + 2 * BLOCK
    return -(-end // RECORD) * RECORD


def plan(directory: str) -> Plan:
    """Pass 1: lstat every entry, compute the exact archive size. Reads no file data."""
    entries: list[_Entry] = []
    total = 0
    for rel, st in _walk(directory):
        info = _tarinfo(directory, rel, st)
        if info is None:
            continue
        header_len = len(_header(info))
        entries.append(_Entry(rel, info.type, info.size, info.linkname, header_len))
        total += header_len + _padded(info.size)
    return Plan(directory, entries, archive_size(total))


def _changed(directory: str, rel: str, why: str) -> FileTransferError:
    shown = os.path.join(directory, rel) if rel else directory
    return FileTransferError(
        f"{shown!r} {why} during the upload (the archive size is computed before streaming); "
        "upload it again once the directory is stable"
    )


def _file_data(path: str, size: int, directory: str, rel: str) -> Iterator[bytes]:
    """Exactly ``size`` bytes of the file; FileTransferError if it is shorter or longer."""
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise _changed(directory, rel, f"shrank (was {size} bytes)")
            left -= len(chunk)
            yield chunk
        if f.read(1):
            raise _changed(directory, rel, f"grew (was {size} bytes)")


def stream(p: Plan) -> Iterator[bytes]:
    """Pass 2: the archive, exactly ``p.size`` bytes, in chunks of about CHUNK bytes."""
    directory = p.directory
    buf = bytearray()
    members = 0  # bytes of headers and padded data made so far
    planned = iter(p.entries)
    walk = _walk(directory)
    while True:
        try:
            rel, st = next(walk)
        except StopIteration:
            break
        except FileNotFoundError as e:
            raise _changed(directory, os.path.relpath(e.filename or directory, directory), "disappeared") from None
        info = _tarinfo(directory, rel, st)
        if info is None:
            continue
        want = next(planned, None)
        if want is None:
            raise _changed(directory, rel, "appeared")
        if want.rel != rel:
            raise FileTransferError(
                f"{directory!r} changed during the upload: found {rel!r} where {want.rel!r} was expected "
                "(an entry appeared or disappeared; the archive size is computed before streaming); "
                "upload it again once the directory is stable"
            )
        if info.type != want.type:
            raise _changed(directory, rel, "changed type")
        if info.size != want.size:
            raise _changed(directory, rel, f"changed size ({want.size} -> {info.size} bytes)")
        if info.linkname != want.linkname:
            raise _changed(directory, rel, "changed its symlink target")
        header = _header(info)
        if len(header) != want.header_len:
            raise _changed(directory, rel, "changed metadata")
        buf += header
        if info.type == tarfile.REGTYPE and info.size:
            for chunk in _file_data(os.path.join(directory, rel), info.size, directory, rel):
                buf += chunk
                if len(buf) >= CHUNK:
                    members += len(buf)
                    yield bytes(buf)
                    buf.clear()
            buf += bytes(_padded(info.size) - info.size)
        if len(buf) >= CHUNK:
            members += len(buf)
            yield bytes(buf)
            buf.clear()
    gone = next(planned, None)
    if gone is not None:
        raise _changed(directory, gone.rel, "disappeared")
    members += len(buf)
    if archive_size(members) != p.size:  # not with an unchanged tree: a bug, never a wrong length
        raise FileTransferError(f"sized tar of {directory!r}: {archive_size(members)} bytes made, {p.size} planned")
    buf += bytes(p.size - members)
    yield bytes(buf)
