"""client.upload / client.download: file and directory transfer through signed URLs.

Upload, file:      presign(remote) -> PUT file bytes to upload_url -> VM fetches download_url to remote.
Upload, directory: presign(tmp) -> PUT a tar of the directory (rooted at ./, as
                   ``tar -C dir -cf - .`` would make it) with its exact Content-Length ->
                   VM fetches to tmp -> exec ``mkdir -p DEST && tar -xf TMP -C DEST``, then
                   ``rm -f TMP``. The archive is made in Python (``_sized_tar``: a first pass
                   sizes it from lstat, the second streams it and fails if the tree changed
                   in between), so no ``tar`` binary is needed on the client, and S3 presigned
                   PUTs, which require a Content-Length, work.
Download:          presign(remote) -> files/export(remote, upload_url): the server classifies
                   the path in the VM (missing: 404 FILE_NOT_FOUND -> FileNotFoundError) and
                   streams the file, or a tar of the directory rooted at ./, over its agent
                   channel into the staging object -> stream GET download_url into the local
                   file, or into a safe client-side tar extraction. (The spec's VM-side
                   ``curl -T -`` to upload_url needs guest network; export does not.)

Everything streams: no temporary copy on the client, memory bounded by chunk size.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shlex
import uuid
from typing import TYPE_CHECKING, AsyncIterator, Iterator

from . import _sized_tar
from ._exceptions import FileTransferError, NotFoundError
from ._tar import IterReader, safe_extract
from .models import ExecVMResponse

if TYPE_CHECKING:
    from ._client import AsyncFastvmClient, FastvmClient

CHUNK = 1024 * 1024
OCTET = "application/octet-stream"

def _vm_tmp_path() -> str:
    # /var/tmp: on the VM disk (the guest /tmp is a RAM tmpfs, too small for big trees).
    return f"/var/tmp/.fastvm-upload-{uuid.uuid4().hex}.tar"


def _extract_command(tmp: str, dest: str) -> str:
    t, d = shlex.quote(tmp), shlex.quote(dest)
    return f"mkdir -p {d} && tar -xf {t} -C {d}; rc=$?; rm -f {t}; exit $rc"


def _check(result: ExecVMResponse, what: str) -> None:
    if result.timed_out:
        raise FileTransferError(f"{what} timed out in the VM", exit_code=result.exit_code, stderr=result.stderr)
    if result.exit_code not in (0, None):
        raise FileTransferError(f"{what} failed in the VM (exit {result.exit_code})", exit_code=result.exit_code, stderr=result.stderr)


def _missing(path: str, where: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, f"No such file or directory ({where})", path)


def _classify_local(local_path: str) -> str:
    if os.path.isdir(local_path):
        return "dir"
    if os.path.isfile(local_path):
        return "file"
    raise _missing(local_path, "local")


def _export_kind(exported: object, remote_path: str) -> str:
    kind = exported.get("kind") if isinstance(exported, dict) else None
    if kind not in ("file", "directory"):
        raise FileTransferError(f"download: unexpected export answer {exported!r}")
    return "dir" if kind == "directory" else "file"


def _missing_remote(e: NotFoundError, remote_path: str) -> Exception:
    if e.code == "FILE_NOT_FOUND":
        return _missing(remote_path, "in the VM")
    return e


def _prepare_local_file(local_path: str) -> None:
    parent = os.path.dirname(os.path.abspath(local_path))
    os.makedirs(parent, exist_ok=True)


# --- sync -------------------------------------------------------------------------


def _file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _tar_plan(directory: str) -> _sized_tar.Plan:
    try:
        return _sized_tar.plan(directory)
    except OSError as e:
        raise FileTransferError(f"cannot read {directory!r} for the upload: {e}") from e


def _tar_chunks(p: _sized_tar.Plan) -> Iterator[bytes]:
    """The sized archive, chunk by chunk; FileTransferError if the tree changed or is unreadable."""
    try:
        yield from _sized_tar.stream(p)
    except OSError as e:
        raise FileTransferError(f"cannot read {p.directory!r} for the upload: {e}") from e


def upload(client: FastvmClient, vm_id: str, local_path: str, remote_path: str, *, fetch_timeout_sec: int, exec_timeout_sec: int) -> None:
    kind = _classify_local(local_path)
    target = remote_path if kind == "file" else _vm_tmp_path()
    p = _tar_plan(local_path) if kind == "dir" else None
    presign = client.vms.files.presign(vm_id, path=target)
    if p is None:
        client._put_signed(presign.upload_url, _file_chunks(local_path), content_type=OCTET, length=os.path.getsize(local_path))
    else:
        chunks = _tar_chunks(p)
        try:
            client._put_signed(presign.upload_url, chunks, content_type=OCTET, length=p.size)
        finally:
            chunks.close()  # type: ignore[attr-defined]
    fetched = client.vms.files.fetch(vm_id, url=presign.download_url, path=target, timeout_sec=fetch_timeout_sec)
    _check(fetched, "fetch")
    if kind == "dir":
        result = client.vms.run(vm_id, command=_extract_command(target, remote_path), timeout_sec=exec_timeout_sec)
        _check(result, "extract")


def download(client: FastvmClient, vm_id: str, remote_path: str, local_path: str, *, exec_timeout_sec: int) -> None:
    presign = client.vms.files.presign(vm_id, path=remote_path)
    try:
        exported = client.vms.files.export(vm_id, path=remote_path, url=presign.upload_url, timeout_sec=exec_timeout_sec)
    except NotFoundError as e:
        raise _missing_remote(e, remote_path) from None
    kind = _export_kind(exported, remote_path)
    with client._get_signed_stream(presign.download_url) as response:
        if kind == "dir":
            safe_extract(IterReader(response.iter_bytes(CHUNK)), local_path)  # type: ignore[arg-type]
        else:
            _prepare_local_file(local_path)
            with open(local_path, "wb") as f:
                for chunk in response.iter_bytes(CHUNK):
                    f.write(chunk)


# --- async ------------------------------------------------------------------------


async def _afile_chunks(path: str) -> AsyncIterator[bytes]:
    with open(path, "rb") as f:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk


async def _atar_chunks(p: _sized_tar.Plan) -> AsyncIterator[bytes]:
    """``_tar_chunks`` run in a worker thread, chunk by chunk."""
    chunks = _tar_chunks(p)
    done = object()
    try:
        while (chunk := await asyncio.to_thread(next, chunks, done)) is not done:
            yield chunk  # type: ignore[misc]
    finally:
        chunks.close()


async def aupload(client: AsyncFastvmClient, vm_id: str, local_path: str, remote_path: str, *, fetch_timeout_sec: int, exec_timeout_sec: int) -> None:
    kind = _classify_local(local_path)
    target = remote_path if kind == "file" else _vm_tmp_path()
    p = await asyncio.to_thread(_tar_plan, local_path) if kind == "dir" else None
    presign = await client.vms.files.presign(vm_id, path=target)
    if p is None:
        await client._put_signed(presign.upload_url, _afile_chunks(local_path), content_type=OCTET, length=os.path.getsize(local_path))
    else:
        chunks = _atar_chunks(p)
        try:
            await client._put_signed(presign.upload_url, chunks, content_type=OCTET, length=p.size)
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
    fetched = await client.vms.files.fetch(vm_id, url=presign.download_url, path=target, timeout_sec=fetch_timeout_sec)
    _check(fetched, "fetch")
    if kind == "dir":
        result = await client.vms.run(vm_id, command=_extract_command(target, remote_path), timeout_sec=exec_timeout_sec)
        _check(result, "extract")


async def adownload(client: AsyncFastvmClient, vm_id: str, remote_path: str, local_path: str, *, exec_timeout_sec: int) -> None:
    presign = await client.vms.files.presign(vm_id, path=remote_path)
    try:
        exported = await client.vms.files.export(vm_id, path=remote_path, url=presign.upload_url, timeout_sec=exec_timeout_sec)
    except NotFoundError as e:
        raise _missing_remote(e, remote_path) from None
    kind = _export_kind(exported, remote_path)
    async with client._get_signed_stream(presign.download_url) as response:
        if kind == "dir":
            await _aextract(response.aiter_bytes(CHUNK), local_path)
        else:
            _prepare_local_file(local_path)
            with open(local_path, "wb") as f:
                async for chunk in response.aiter_bytes(CHUNK):
                    await asyncio.to_thread(f.write, chunk)


async def _aextract(chunks: AsyncIterator[bytes], dest: str) -> None:
    """Feed an async byte stream through a pipe into ``safe_extract`` running in a thread."""
    read_fd, write_fd = os.pipe()

    def extract() -> None:
        with open(read_fd, "rb") as reader:
            safe_extract(reader, dest)  # closing the reader makes further writes fail fast

    task = asyncio.ensure_future(asyncio.to_thread(extract))
    try:
        with open(write_fd, "wb") as writer:
            async for chunk in chunks:
                if task.done():
                    break
                try:
                    await asyncio.to_thread(writer.write, chunk)
                except BrokenPipeError:
                    break
    except BrokenPipeError:
        pass
    finally:
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # mark retrieved when another error is propagating
    task.result()
