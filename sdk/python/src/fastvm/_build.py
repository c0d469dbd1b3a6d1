"""client.build: snapshot from an OCI image or a Dockerfile, waited to completion.

image:      POST /v1/snapshot-imports {machineType, diskGiB?, name?, source: {type: "image", image}}
dockerfile: zip the context (into a SpooledTemporaryFile: in memory up to 32 MiB,
            then on disk) with the Dockerfile at its root -> presign_context(size)
            -> PUT the zip (application/zip) -> POST /v1/snapshot-imports with
            source {type: "dockerfile", contextRef, dockerfilePath: "Dockerfile"}
then poll GET /v1/snapshot-imports/{id} until succeeded (-> the Snapshot) or
failed / cancelled / deadline (-> BuildError).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import zipfile
from typing import IO, TYPE_CHECKING, Any, AsyncIterator, Iterator

from ._exceptions import BuildError
from .models import ContextPresignResponse, Snapshot, SnapshotImportResponse

if TYPE_CHECKING:
    from ._client import AsyncFastvmClient, FastvmClient

SPOOL_MAX = 32 * 1024 * 1024
CHUNK = 1024 * 1024
DOCKERFILE_NAME = "Dockerfile"
FAILED = frozenset({"failed", "cancelled"})


def _check_args(image_ref: str | None, dockerfile: str | None, context_dir: str | None) -> None:
    if (image_ref is None) == (dockerfile is None):
        raise ValueError("build() needs exactly one of image_ref or dockerfile")
    if context_dir is not None and dockerfile is None:
        raise ValueError("context_dir is only used with dockerfile")
    if context_dir is not None and not os.path.isdir(context_dir):
        raise NotADirectoryError(context_dir)


def zip_context(context_dir: str | None, dockerfile: str) -> tuple[IO[bytes], int]:
    """ZIP of ``context_dir`` plus ``dockerfile`` written as ``Dockerfile`` at the root
    (it replaces a ``Dockerfile`` of the context, if any). Returns (file at 0, size)."""
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX)  # type: ignore[assignment]
    with zipfile.ZipFile(spool, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        if context_dir is not None:
            for dirpath, dirnames, filenames in os.walk(context_dir):
                dirnames.sort()
                for filename in sorted(filenames):
                    full = os.path.join(dirpath, filename)
                    rel = os.path.relpath(full, context_dir).replace(os.sep, "/")
                    if rel == DOCKERFILE_NAME or not os.path.isfile(full):
                        continue  # replaced below / broken link / special file
                    zf.write(full, rel)
        zf.writestr(DOCKERFILE_NAME, dockerfile)
    size = spool.tell()
    spool.seek(0)
    return spool, size


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


async def _achunks(f: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


def _import_body(machine_type: str, disk_gi_b: int | None, name: str | None) -> dict[str, Any]:
    return {"machine_type": machine_type, "disk_gi_b": disk_gi_b, "name": name}


def _dockerfile_source(ctx: ContextPresignResponse) -> dict[str, Any]:
    return {"type": "dockerfile", "contextRef": ctx.context_ref, "dockerfilePath": DOCKERFILE_NAME}


def _check_size(ctx: ContextPresignResponse, size: int) -> None:
    if ctx.max_upload_bytes and size > ctx.max_upload_bytes:
        raise BuildError(f"build context is {size} bytes, over the server cap of {ctx.max_upload_bytes}")


def _done(imp: SnapshotImportResponse) -> bool:
    """True when succeeded; raises BuildError when failed or cancelled."""
    if imp.status in FAILED:
        raise BuildError(f"snapshot import {imp.id} {imp.status}: {imp.error or 'no error given'}", imp)
    if imp.status == "succeeded":
        if not imp.snapshot_id:
            raise BuildError(f"snapshot import {imp.id} succeeded without a snapshotId", imp)
        return True
    return False


def _timed_out(imp: SnapshotImportResponse, timeout: float) -> BuildError:
    return BuildError(f"snapshot import {imp.id} not finished after {timeout:g}s (status {imp.status!r})", imp)


def build(
    client: FastvmClient,
    image_ref: str | None,
    *,
    dockerfile: str | None,
    context_dir: str | None,
    machine_type: str,
    disk_gi_b: int | None,
    name: str | None,
    poll_interval: float,
    timeout: float,
) -> Snapshot:
    _check_args(image_ref, dockerfile, context_dir)
    deadline = time.monotonic() + timeout
    if image_ref is not None:
        imp = client.snapshot_imports.create(
            **_import_body(machine_type, disk_gi_b, name), source={"type": "image", "image": image_ref}
        )
    else:
        assert dockerfile is not None
        archive, size = zip_context(context_dir, dockerfile)
        with archive:
            ctx = client.snapshot_imports.presign_context(size_bytes=size)
            _check_size(ctx, size)
            client._put_signed(ctx.upload_url, _chunks(archive), content_type="application/zip", length=size)
        imp = client.snapshot_imports.create(**_import_body(machine_type, disk_gi_b, name), source=_dockerfile_source(ctx))
    while not _done(imp):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timed_out(imp, timeout)
        time.sleep(min(poll_interval, remaining))
        imp = client.snapshot_imports.retrieve(imp.id)
    return client.snapshots.retrieve(imp.snapshot_id)


async def abuild(
    client: AsyncFastvmClient,
    image_ref: str | None,
    *,
    dockerfile: str | None,
    context_dir: str | None,
    machine_type: str,
    disk_gi_b: int | None,
    name: str | None,
    poll_interval: float,
    timeout: float,
) -> Snapshot:
    _check_args(image_ref, dockerfile, context_dir)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    if image_ref is not None:
        imp = await client.snapshot_imports.create(
            **_import_body(machine_type, disk_gi_b, name), source={"type": "image", "image": image_ref}
        )
    else:
        assert dockerfile is not None
        archive, size = await asyncio.to_thread(zip_context, context_dir, dockerfile)
        with archive:
            ctx = await client.snapshot_imports.presign_context(size_bytes=size)
            _check_size(ctx, size)
            await client._put_signed(ctx.upload_url, _achunks(archive), content_type="application/zip", length=size)
        imp = await client.snapshot_imports.create(
            **_import_body(machine_type, disk_gi_b, name), source=_dockerfile_source(ctx)
        )
    while not _done(imp):
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise _timed_out(imp, timeout)
        await asyncio.sleep(min(poll_interval, remaining))
        imp = await client.snapshot_imports.retrieve(imp.id)
    return await client.snapshots.retrieve(imp.snapshot_id)
