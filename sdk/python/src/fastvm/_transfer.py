"""client.upload / client.download: file and directory transfer through signed URLs.

Upload, file:      presign(remote) -> PUT file bytes to upload_url -> VM fetches download_url to remote.
Upload, directory: presign(tmp) -> PUT the stdout of ``tar -C dir -cf - .`` -> VM fetches
                   to tmp -> exec ``mkdir -p DEST && tar -xf TMP -C DEST``, then ``rm -f TMP``.
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
import subprocess
import tempfile
import uuid
from typing import TYPE_CHECKING, AsyncIterator, Iterator

from ._exceptions import FileTransferError, NotFoundError
from ._tar import IterReader, safe_extract
from .models import ExecVMResponse

if TYPE_CHECKING:
    from ._client import AsyncFastvmClient, FastvmClient

CHUNK = 1024 * 1024
OCTET = "application/octet-stream"

# macOS bsdtar would otherwise add AppleDouble "._*" entries.
_TAR_ENV = {**os.environ, "COPYFILE_DISABLE": "1"}


def _tar_argv(directory: str) -> list[str]:
    return ["tar", "-C", directory, "-cf", "-", "."]


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


def _tar_chunks(directory: str) -> Iterator[bytes]:
    """stdout of ``tar -C directory -cf - .``, chunk by chunk; raises on tar failure."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(_tar_argv(directory), stdout=subprocess.PIPE, stderr=err, env=_TAR_ENV)
        try:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(CHUNK):
                yield chunk
            rc = proc.wait()
            if rc != 0:
                err.seek(0)
                raise FileTransferError(f"local tar of {directory!r} failed (exit {rc})", exit_code=rc, stderr=err.read().decode(errors="replace"))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def upload(client: FastvmClient, vm_id: str, local_path: str, remote_path: str, *, fetch_timeout_sec: int, exec_timeout_sec: int) -> None:
    kind = _classify_local(local_path)
    target = remote_path if kind == "file" else _vm_tmp_path()
    presign = client.vms.files.presign(vm_id, path=target)
    if kind == "file":
        client._put_signed(presign.upload_url, _file_chunks(local_path), content_type=OCTET, length=os.path.getsize(local_path))
    else:
        chunks = _tar_chunks(local_path)
        try:
            client._put_signed(presign.upload_url, chunks, content_type=OCTET)
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


async def _atar_chunks(directory: str) -> AsyncIterator[bytes]:
    with tempfile.TemporaryFile() as err:
        proc = await asyncio.create_subprocess_exec(*_tar_argv(directory), stdout=subprocess.PIPE, stderr=err, env=_TAR_ENV)
        try:
            assert proc.stdout is not None
            while chunk := await proc.stdout.read(CHUNK):
                yield chunk
            rc = await proc.wait()
            if rc != 0:
                err.seek(0)
                raise FileTransferError(f"local tar of {directory!r} failed (exit {rc})", exit_code=rc, stderr=err.read().decode(errors="replace"))
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def aupload(client: AsyncFastvmClient, vm_id: str, local_path: str, remote_path: str, *, fetch_timeout_sec: int, exec_timeout_sec: int) -> None:
    kind = _classify_local(local_path)
    target = remote_path if kind == "file" else _vm_tmp_path()
    presign = await client.vms.files.presign(vm_id, path=target)
    if kind == "file":
        await client._put_signed(presign.upload_url, _afile_chunks(local_path), content_type=OCTET, length=os.path.getsize(local_path))
    else:
        chunks = _atar_chunks(local_path)
        try:
            await client._put_signed(presign.upload_url, chunks, content_type=OCTET)
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
