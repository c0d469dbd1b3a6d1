"""A real OCI registry on this machine, and images pushed to it by the tests
themselves: the material of the snapshot-import tests (the server pulls an
image from a registry and turns it into a bootable VM disk).

* :class:`Registry` runs Debian's ``docker-registry`` (distribution 2.8) on
  ``127.0.0.1:<free port>``, plain HTTP, filesystem storage in a temp dir,
  deletes enabled, optionally htpasswd basic auth.
* :class:`Layer` builds one layer's tar in memory (entries in the order given,
  hostile ones included) and :func:`push_image` pushes layers + config +
  manifest (OCI or Docker v2 schema 2), optionally behind a multi-platform
  index, through the registry HTTP API.
* ``push_busybox_image``, ``push_layered_image``, ``push_docker_image`` and
  ``push_hostile_image`` push ready-made images and return ``HOST/repo:tag``;
  their docstrings list what is inside.

Only the standard library and httpx. zstd layers use the ``zstandard`` module
when installed, else the ``zstd`` CLI; :data:`ZSTD_REASON` is ``None`` when one
of them is there (the ready-made images fall back to gzip otherwise). Basic
auth needs a bcrypt htpasswd line: the ``bcrypt`` module, else libxcrypt
(``libcrypt.so.1``, Debian 12's libc crypt, which does ``$2b$``) through
ctypes, else ``htpasswd -nbB`` (apache2-utils), else ``mkpasswd -m bcrypt``.

CLI: ``python sdk/python/tests/e2e/oci_registry.py serve [--port N] [--auth USER:PASS]``
starts a registry, pushes every ready-made image, prints one JSON line
``{"host": ..., "images": {name: ref}, ...}`` and runs until Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence, Union

import httpx

# ---------------------------------------------------------------------------
# media types

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = {
    "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "none": "application/vnd.docker.image.rootfs.diff.tar",
}
# What a client must Accept to get every kind back as pushed (distribution 2.8
# answers 404 to a client that does not accept an OCI manifest/index, and
# rewrites a Docker manifest list to its linux/amd64 entry for one that does
# not accept lists).
ACCEPT_ALL = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])

FIXED_MTIME = 1_700_000_000  # every entry's mtime: pushes are reproducible, same bytes same digests
CREATED = "2023-11-14T22:13:20Z"  # FIXED_MTIME as RFC 3339
SPOOL_MAX = 32 << 20  # layers above this go to a temp file instead of memory
CHUNK = 1 << 20

DEFAULT_REGISTRY_BIN = "/usr/bin/docker-registry"
HOST_BUSYBOX = "/bin/busybox"

# ---------------------------------------------------------------------------
# zstd


def _zstd_reason() -> str | None:
    try:
        import zstandard  # noqa: F401

        return None
    except ImportError:
        pass
    if shutil.which("zstd"):
        return None
    return "zstd layers need the zstandard module or the zstd CLI (apt-get install zstd); neither is here"


ZSTD_REASON: str | None = _zstd_reason()
ZSTD_AVAILABLE = ZSTD_REASON is None


def _zstd_compress(src: IO[bytes], dst: IO[bytes]) -> None:
    try:
        import zstandard
    except ImportError:
        zstandard = None  # type: ignore[assignment]
    if zstandard is not None:
        zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
        return
    exe = shutil.which("zstd")
    if not exe:
        raise RuntimeError(ZSTD_REASON or "no zstd")
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([exe, "-q", "-c", "-3", "--no-progress"], stdin=subprocess.PIPE, stdout=out)
        assert proc.stdin is not None
        try:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                proc.stdin.write(chunk)
        finally:
            proc.stdin.close()
        if proc.wait() != 0:
            raise RuntimeError(f"zstd exited with {proc.returncode}")
        out.seek(0)
        shutil.copyfileobj(out, dst, CHUNK)


# ---------------------------------------------------------------------------
# layers

Data = Union[bytes, str, Path]


def _norm(path: str) -> str:
    """Strip leading '/' only: '..' components are kept verbatim (hostile entries)."""
    p = path.lstrip("/")
    if not p:
        raise ValueError(f"empty entry name from {path!r}")
    return p


class Layer:
    """One layer: tar entries written in the order they are added.

    Names lose a leading ``/`` (``/bin/sh`` and ``bin/sh`` are the same entry) but
    are otherwise written verbatim, ``..`` included; parents are not created
    implicitly. ``hardlink`` targets and ``symlink`` targets are written verbatim
    too (a hard link's conventional target is archive-relative, ``bin/busybox``).
    Every entry has mtime :data:`FIXED_MTIME`; tar format is PAX (xattrs are
    ``SCHILY.xattr.*`` records). ``compression`` is ``"gzip"``, ``"zstd"`` or
    ``"none"``."""

    def __init__(self, compression: str = "gzip") -> None:
        if compression not in ("gzip", "zstd", "none"):
            raise ValueError(f"compression {compression!r}: gzip, zstd or none")
        self.compression = compression
        self.entries: list[tuple[tarfile.TarInfo, Data | None]] = []

    # -- builder ------------------------------------------------------------

    @staticmethod
    def _info(name: str, kind: bytes, mode: int, uid: int, gid: int, xattrs: dict[str, str] | None = None) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        ti.mtime = FIXED_MTIME
        if xattrs:
            ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        return ti

    def dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0, xattrs: dict[str, str] | None = None) -> Layer:
        self.entries.append((self._info(_norm(path), tarfile.DIRTYPE, mode, uid, gid, xattrs), None))
        return self

    def file(self, path: str, data: Data = b"", mode: int = 0o644, uid: int = 0, gid: int = 0, xattrs: dict[str, str] | None = None) -> Layer:
        """``data``: bytes, str (UTF-8), or a Path whose content is streamed from disk."""
        ti = self._info(_norm(path), tarfile.REGTYPE, mode, uid, gid, xattrs)
        if isinstance(data, str):
            data = data.encode()
        ti.size = data.stat().st_size if isinstance(data, Path) else len(data)
        self.entries.append((ti, data))
        return self

    def symlink(self, path: str, target: str, uid: int = 0, gid: int = 0) -> Layer:
        ti = self._info(_norm(path), tarfile.SYMTYPE, 0o777, uid, gid)
        ti.linkname = target
        self.entries.append((ti, None))
        return self

    def hardlink(self, path: str, target: str) -> Layer:
        ti = self._info(_norm(path), tarfile.LNKTYPE, 0o644, 0, 0)
        ti.linkname = target
        self.entries.append((ti, None))
        return self

    def node(self, path: str, kind: str = "chr", major: int = 0, minor: int = 0, mode: int = 0o600) -> Layer:
        """A device node or FIFO: ``kind`` is ``chr``, ``blk`` or ``fifo``."""
        types = {"chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}
        ti = self._info(_norm(path), types[kind], mode, 0, 0)
        ti.devmajor, ti.devminor = major, minor
        self.entries.append((ti, None))
        return self

    def whiteout(self, path: str) -> Layer:
        """Delete ``path`` (file or whole tree) of the lower layers: an empty ``dir/.wh.name``."""
        head, _, base = _norm(path).rstrip("/").rpartition("/")
        return self.file(f"{head}/.wh.{base}" if head else f".wh.{base}", b"")

    def opaque(self, dir: str) -> Layer:
        """Hide everything the lower layers have in ``dir``: ``dir/.wh..wh..opq``."""
        return self.file(f"{_norm(dir).rstrip('/')}/.wh..wh..opq", b"")

    def raw(self, info: tarfile.TarInfo, data: bytes | None = None) -> Layer:
        """An entry exactly as given (name untouched; size set from ``data``)."""
        if data is not None:
            info.size = len(data)
        self.entries.append((info, data))
        return self

    def extend(self, other: Layer) -> Layer:
        """Append (copies of) another layer's entries."""
        for ti, data in other.entries:
            self.entries.append((_copy_info(ti), data))
        return self

    # -- output -------------------------------------------------------------

    def write_tar(self, out: IO[bytes]) -> None:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for ti, data in self.entries:
                if isinstance(data, Path):
                    with data.open("rb") as f:
                        tf.addfile(ti, f)
                elif data is not None and ti.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    tf.addfile(ti, io.BytesIO(data))
                else:
                    tf.addfile(ti)

    def tar_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.write_tar(buf)
        return buf.getvalue()

    def build(self, media: str = "oci") -> Blob:
        """Tar, compress and hash: the blob to push (with its ``diff_id``)."""
        table = OCI_LAYER if media == "oci" else DOCKER_LAYER
        if self.compression not in table:
            raise ValueError(f"{media} manifests have no {self.compression} layer media type (use media='oci')")
        tar = tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX)
        self.write_tar(tar)
        diff_id = _hash_file(tar)
        if self.compression == "none":
            blob = tar
        else:
            blob = tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX)
            tar.seek(0)
            if self.compression == "gzip":
                with gzip.GzipFile(filename="", mode="wb", fileobj=blob, mtime=0) as gz:
                    shutil.copyfileobj(tar, gz, CHUNK)
            else:
                _zstd_compress(tar, blob)
            tar.close()
        digest = _hash_file(blob)
        size = blob.seek(0, io.SEEK_END)
        return Blob(media_type=table[self.compression], digest=digest, size=size, file=blob, diff_id=diff_id)


LayerSpec = Layer  # the name the brief used


def _copy_info(ti: tarfile.TarInfo) -> tarfile.TarInfo:
    new = tarfile.TarInfo(ti.name)
    for attr in ("type", "mode", "uid", "gid", "uname", "gname", "mtime", "size", "linkname", "devmajor", "devminor"):
        setattr(new, attr, getattr(ti, attr))
    new.pax_headers = dict(ti.pax_headers)
    return new


def _hash_file(f: IO[bytes]) -> str:
    f.seek(0)
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(CHUNK), b""):
        h.update(chunk)
    return "sha256:" + h.hexdigest()


@dataclass
class Blob:
    media_type: str
    digest: str
    size: int
    file: IO[bytes] | None = None
    data: bytes | None = None
    diff_id: str | None = None

    @classmethod
    def of(cls, media_type: str, data: bytes) -> Blob:
        return cls(media_type=media_type, digest="sha256:" + hashlib.sha256(data).hexdigest(), size=len(data), data=data)

    def chunks(self) -> Iterator[bytes]:
        if self.data is not None:
            yield self.data
            return
        assert self.file is not None
        self.file.seek(0)
        yield from iter(lambda: self.file.read(CHUNK), b"")  # type: ignore[union-attr]

    def descriptor(self) -> dict:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ---------------------------------------------------------------------------
# registry HTTP API


class RegistryError(RuntimeError):
    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


Auth = Union[tuple[str, str], httpx.Auth, None]


class BearerAuth(httpx.Auth):
    """The registry token flow (what docker and oci-client do): on a 401 with
    ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``, get a token
    from the realm with basic ``credentials`` and retry with it."""

    requires_response_body = True

    def __init__(self, user: str, password: str) -> None:
        self.credentials = (user, password)
        self._token: str | None = None

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        if self._token:
            request.headers["Authorization"] = f"Bearer {self._token}"
        response = yield request
        challenge = response.headers.get("www-authenticate", "")
        if response.status_code != 401 or not challenge.lower().startswith("bearer "):
            return
        params = dict(
            (k.strip(), v.strip().strip('"'))
            for k, v in (part.split("=", 1) for part in _split_challenge(challenge[7:]) if "=" in part)
        )
        realm = params.pop("realm", "")
        import base64

        basic = base64.b64encode(":".join(self.credentials).encode()).decode()
        tok = yield httpx.Request("GET", realm, params=params, headers={"Authorization": f"Basic {basic}"})
        if tok.status_code != 200:
            return
        self._token = tok.json().get("token")
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


def _split_challenge(s: str) -> list[str]:
    """`a="x,y",b="z"` -> ['a="x,y"', 'b="z"'] (commas inside quotes kept)."""
    parts, cur, quoted = [], "", False
    for ch in s:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return parts


def _client(auth: Auth) -> httpx.Client:
    return httpx.Client(auth=auth, timeout=httpx.Timeout(120.0, connect=10.0), trust_env=False)


def _check(resp: httpx.Response, what: str, *ok: int) -> httpx.Response:
    if resp.status_code not in ok:
        raise RegistryError(f"{what}: HTTP {resp.status_code} {resp.text[:500]}", resp.status_code)
    return resp


def _upload_blob(c: httpx.Client, host: str, repo: str, blob: Blob) -> None:
    base = f"http://{host}/v2/{repo}/blobs"
    head = c.head(f"{base}/{blob.digest}")
    if head.status_code == 200:
        return
    if head.status_code != 404:
        _check(head, f"HEAD blob {blob.digest}", 200, 404)
    start = _check(c.post(f"{base}/uploads/"), f"start upload to {repo}", 202)
    loc = httpx.URL(f"http://{host}/").join(start.headers["location"])
    url = loc.copy_merge_params({"digest": blob.digest})
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)}
    put = c.put(url, content=blob.chunks(), headers=headers)
    _check(put, f"PUT blob {blob.digest} ({blob.size} bytes)", 201)


def _put_manifest(c: httpx.Client, host: str, repo: str, ref: str, media_type: str, body: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    resp = c.put(f"http://{host}/v2/{repo}/manifests/{ref}", content=body, headers={"Content-Type": media_type})
    _check(resp, f"PUT manifest {repo}:{ref}", 201)
    got = resp.headers.get("docker-content-digest")
    if got and got != digest:
        raise RegistryError(f"registry says manifest digest {got}, we computed {digest}")
    return digest


def get_manifest(host: str, repo: str, ref: str, *, auth: Auth = None, accept: str = ACCEPT_ALL) -> tuple[dict, str, str]:
    """GET a manifest or index: (parsed JSON, media type, digest)."""
    with _client(auth) as c:
        r = _check(c.get(f"http://{host}/v2/{repo}/manifests/{ref}", headers={"Accept": accept}), f"GET manifest {repo}:{ref}", 200)
    digest = r.headers.get("docker-content-digest") or "sha256:" + hashlib.sha256(r.content).hexdigest()
    return r.json(), r.headers.get("content-type", ""), digest


def get_blob(host: str, repo: str, digest: str, *, auth: Auth = None) -> bytes:
    with _client(auth) as c:
        return _check(c.get(f"http://{host}/v2/{repo}/blobs/{digest}", follow_redirects=True), f"GET blob {digest}", 200).content


def delete_manifest(host: str, repo: str, digest: str, *, auth: Auth = None) -> None:
    """Delete a manifest by digest (distribution 2.8 cannot delete by tag); its tags go with it."""
    with _client(auth) as c:
        _check(c.delete(f"http://{host}/v2/{repo}/manifests/{digest}"), f"DELETE {repo}@{digest}", 202)


def list_tags(host: str, repo: str, *, auth: Auth = None) -> list[str]:
    with _client(auth) as c:
        return _check(c.get(f"http://{host}/v2/{repo}/tags/list"), f"tags of {repo}", 200).json().get("tags") or []


# ---------------------------------------------------------------------------
# push


class PushResult(str):
    """The digest the tag points to (the index's when there is one), with details:

    ``manifest_digest`` the real image's manifest, ``index_digest`` (or None),
    ``config_digest``, ``layers`` (list of :class:`Blob` descriptors, no data),
    ``diff_ids``, ``platforms`` {"os/arch": manifest digest} of the index."""

    manifest_digest: str
    index_digest: str | None
    config_digest: str
    layers: list[dict]
    diff_ids: list[str]
    platforms: dict[str, str]


def _image_config(config: dict | None, diff_ids: list[str], architecture: str, os_name: str) -> dict:
    cfg = dict(config or {})
    history = [{"created": CREATED, "created_by": f"fastvm test layer {i}"} for i in range(len(diff_ids))]
    return {
        "architecture": architecture,
        "os": os_name,
        "created": CREATED,
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }


def _push_single(c: httpx.Client, host: str, repo: str, ref: str | None, layers: Sequence[Layer], config: dict | None,
                 media: str, architecture: str, os_name: str) -> tuple[str, int, str, list[Blob]]:
    """Push one image manifest; (digest, size, config digest, layer blobs)."""
    built = [layer.build(media) for layer in layers]
    try:
        cfg = _image_config(config, [b.diff_id or "" for b in built], architecture, os_name)
        cfg_blob = Blob.of(OCI_CONFIG if media == "oci" else DOCKER_CONFIG, json.dumps(cfg, sort_keys=True).encode())
        for b in [*built, cfg_blob]:
            _upload_blob(c, host, repo, b)
        mt = OCI_MANIFEST if media == "oci" else DOCKER_MANIFEST
        manifest = {"schemaVersion": 2, "mediaType": mt, "config": cfg_blob.descriptor(), "layers": [b.descriptor() for b in built]}
        body = json.dumps(manifest, indent=2).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        _put_manifest(c, host, repo, ref or digest, mt, body)
        return digest, len(body), cfg_blob.digest, built
    finally:
        for b in built:
            b.close()


def push_image(registry_host: str, repo: str, tag: str | None, layers: Sequence[Layer], config: dict | None = None, *,
               media: str = "oci", auth: Auth = None, platform_index: Iterable[tuple[str, str]] | None = None,
               architecture: str = "amd64", os_name: str = "linux") -> PushResult:
    """Push an image; returns the digest ``tag`` now points to (a :class:`PushResult`).

    ``layers``: :class:`Layer` objects, bottom first, each compressed as its
    ``compression`` says. ``config``: the image config's ``config`` section
    (``Env``, ``WorkingDir``, ``User``, ``Cmd``, ``Entrypoint``, ...); the
    config also gets ``architecture``/``os`` (from ``architecture``/``os_name``), ``rootfs.diff_ids`` (sha256 of the
    uncompressed tars) and a ``history`` entry per layer. ``media``: ``"oci"``
    (OCI manifest/index) or ``"docker"`` (Docker v2 schema 2 manifest /
    manifest list; no zstd there). ``tag=None`` pushes by digest only.

    ``platform_index``, e.g. ``[("linux", "arm64"), ("linux", "amd64")]``: the
    tag points at an index (OCI image index or Docker manifest list, after
    ``media``) with one entry per pair, in that order. The entry equal to
    (``os_name``, ``architecture``) is this image; every other entry is a different
    one-layer image holding only ``/PLATFORM`` = ``"<arch>\\n"`` (config with
    that os/architecture, no busybox). Leave this image's platform out of the
    list to get an index without it."""
    if media not in ("oci", "docker"):
        raise ValueError("media is 'oci' or 'docker'")
    with _client(auth) as c:
        if platform_index is None:
            digest, _, cfg_digest, built = _push_single(c, registry_host, repo, tag, layers, config, media, architecture, os_name)
            res = PushResult(digest)
            res.index_digest, res.platforms = None, {}
        else:
            digest, size, cfg_digest, built = _push_single(c, registry_host, repo, None, layers, config, media, architecture, os_name)
            mt = OCI_MANIFEST if media == "oci" else DOCKER_MANIFEST
            entries, platforms = [], {}
            for p_os, p_arch in platform_index:
                if (p_os, p_arch) == (os_name, architecture):
                    d, s = digest, size
                else:
                    marker = Layer("gzip").file("PLATFORM", f"{p_arch}\n")
                    d, s, _, _ = _push_single(c, registry_host, repo, None, [marker], {"Env": ["PATH=/bin"]}, media, p_arch, p_os)
                entries.append({"mediaType": mt, "digest": d, "size": s, "platform": {"architecture": p_arch, "os": p_os}})
                platforms[f"{p_os}/{p_arch}"] = d
            imt = OCI_INDEX if media == "oci" else DOCKER_LIST
            body = json.dumps({"schemaVersion": 2, "mediaType": imt, "manifests": entries}, indent=2).encode()
            index_digest = "sha256:" + hashlib.sha256(body).hexdigest()
            _put_manifest(c, registry_host, repo, tag or index_digest, imt, body)
            res = PushResult(index_digest)
            res.index_digest, res.platforms = index_digest, platforms
    res.manifest_digest = digest
    res.config_digest = cfg_digest
    res.layers = [b.descriptor() for b in built]
    res.diff_ids = [b.diff_id or "" for b in built]
    return res


# ---------------------------------------------------------------------------
# ready-made images


class ImageRef(str):
    """``HOST/repo:tag``, with ``host``, ``repo``, ``tag``, ``push`` (the
    :class:`PushResult`), ``digest`` (what the tag points to), ``manifest_digest``
    (the linux/amd64 image manifest) and ``by_digest`` (``HOST/repo@<manifest_digest>``)."""

    host: str
    repo: str
    tag: str
    push: PushResult

    @classmethod
    def make(cls, host: str, repo: str, tag: str, push: PushResult) -> ImageRef:
        ref = cls(f"{host}/{repo}:{tag}")
        ref.host, ref.repo, ref.tag, ref.push = host, repo, tag, push
        return ref

    @property
    def digest(self) -> str:
        return str(self.push)

    @property
    def manifest_digest(self) -> str:
        return self.push.manifest_digest

    @property
    def by_digest(self) -> str:
        return f"{self.host}/{self.repo}@{self.push.manifest_digest}"


BUSYBOX_APPLETS = (
    "sh", "ash", "cat", "chmod", "chown", "cp", "cut", "date", "dd", "df", "du", "echo", "env", "false", "find", "grep",
    "head", "hostname", "id", "kill", "ln", "ls", "md5sum", "mkdir", "mount", "mv", "printf", "ps", "pwd", "readlink",
    "realpath", "rm", "rmdir", "sed", "sha256sum", "sleep", "sort", "stat", "sync", "tail", "tar", "tee", "test", "touch",
    "true", "umount", "uname", "uniq", "wc", "which", "whoami", "xargs",
)
PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1000:\n"
BUSYBOX_CONFIG = {"Env": ["PATH=/bin:/usr/bin", "GREETING=hello from the image"], "WorkingDir": "/home/app", "User": "app", "Cmd": ["/bin/sh"]}


def busybox_layer(compression: str = "gzip", busybox: str | Path = HOST_BUSYBOX) -> Layer:
    """The busybox base every ready-made image starts with (see :func:`push_busybox_image`)."""
    bb = Path(busybox)
    if not bb.is_file():
        raise FileNotFoundError(f"{bb}: install busybox-static (a static busybox the VM can run)")
    layer = Layer(compression)
    for d in ("bin", "dev", "etc", "home", "proc", "run", "sys", "usr", "usr/bin", "var"):
        layer.dir(d)
    layer.dir("home/app", 0o755, 1000, 1000).dir("root", 0o700).dir("tmp", 0o1777)
    layer.file("bin/busybox", bb, 0o755)
    for applet in BUSYBOX_APPLETS:
        layer.symlink(f"bin/{applet}", "busybox")
    layer.file("etc/passwd", PASSWD).file("etc/group", GROUP)
    return layer


def push_busybox_image(host: str, repo: str = "busybox", tag: str = "1", *, auth: Auth = None) -> ImageRef:
    """A minimal runnable image: OCI manifest (no index), one gzip layer.

    Layer (in order): dirs ``/bin /dev /etc /home /proc /run /sys /usr /usr/bin
    /var`` (0755 root), ``/home/app`` (0755, 1000:1000), ``/root`` (0700),
    ``/tmp`` (01777); ``/bin/busybox`` (0755, the host's static /bin/busybox);
    symlinks ``/bin/<applet> -> busybox`` (relative) for every name in
    :data:`BUSYBOX_APPLETS` (sh, ls, cat, echo, id, pwd, env, ...);
    ``/etc/passwd`` = :data:`PASSWD` (root 0 and app 1000, shells /bin/sh),
    ``/etc/group`` = :data:`GROUP` (0644).

    Config (:data:`BUSYBOX_CONFIG`): Env ``PATH=/bin:/usr/bin``,
    ``GREETING=hello from the image``; WorkingDir ``/home/app``; User ``app``;
    Cmd ``["/bin/sh"]``. So in the VM ``id -u`` as the image user is 1000,
    ``pwd`` is /home/app, ``echo $GREETING`` prints "hello from the image"."""
    push = push_image(host, repo, tag, [busybox_layer("gzip")], BUSYBOX_CONFIG, media="oci", auth=auth)
    return ImageRef.make(host, repo, tag, push)


LAYERED_CONFIG = {"Env": ["PATH=/bin:/usr/bin", "LAYERED=yes"], "WorkingDir": "/data", "Cmd": ["/bin/sh"]}
LAYERED_PLATFORMS = [("linux", "arm64"), ("linux", "amd64")]
# What the unpacked linux/amd64 rootfs of push_layered_image / push_docker_image holds.
LAYERED_EXPECT = {
    # path: (content, mode) of regular files
    "files": {
        "/etc/fastvm-release": ("fastvm layered image\n", 0o644),
        "/data/kept": ("kept from layer 1\n", 0o644),
        "/data/hardlink": ("kept from layer 1\n", 0o644),
        "/data/setuid": ("#!/bin/sh\necho setuid\n", 0o4755),
        "/data/secret": ("secret of app\n", 0o600),
        "/data/xattr": ("has an xattr\n", 0o644),
        "/data/overwritten": ("v2 from layer 2\n", 0o644),
        "/data/layer2": ("from layer 2\n", 0o644),
        "/data/layer3": ("from layer 3\n", 0o644),
        "/data/exec": ("#!/bin/sh\necho layer3-script\n", 0o755),
        "/opq/new": ("new from layer 2\n", 0o644),
    },
    "owners": {"/data/secret": (1000, 1000), "/data/kept": (0, 0)},
    "symlinks": {"/data/rel-link": "kept", "/abs": "/etc/fastvm-release"},
    "hardlinks": [("/data/kept", "/data/hardlink")],
    "xattrs": {"/data/xattr": {"user.fastvm": "yes"}},
    "absent": ["/data/deleted-file", "/data/deleted-tree", "/opq/old", "/opq/old-dir"],
    "dir_listings": {"/opq": ["new"]},
}


def layered_layers(media: str = "oci") -> list[Layer]:
    """The three layers of :func:`push_layered_image` (compressions after ``media``)."""
    if media == "oci":
        c1, c2, c3 = "gzip", ("zstd" if ZSTD_AVAILABLE else "gzip"), "none"
    else:
        c1 = c2 = c3 = "gzip"
    l1 = busybox_layer(c1)
    l1.file("etc/fastvm-release", "fastvm layered image\n")
    l1.dir("data")
    l1.file("data/kept", "kept from layer 1\n").hardlink("data/hardlink", "data/kept")
    l1.symlink("data/rel-link", "kept").symlink("abs", "/etc/fastvm-release")
    l1.file("data/setuid", "#!/bin/sh\necho setuid\n", 0o4755)
    l1.file("data/secret", "secret of app\n", 0o600, 1000, 1000)
    l1.file("data/xattr", "has an xattr\n", xattrs={"user.fastvm": "yes"})
    l1.file("data/overwritten", "v1 from layer 1\n")
    l1.file("data/deleted-file", "deleted by a whiteout in layer 2\n")
    l1.dir("data/deleted-tree").file("data/deleted-tree/a", "a\n").dir("data/deleted-tree/sub").file("data/deleted-tree/sub/b", "b\n")
    l1.dir("opq").file("opq/old", "old, hidden by the opaque marker of layer 2\n").dir("opq/old-dir").file("opq/old-dir/f", "f\n")
    l2 = Layer(c2).dir("data").whiteout("data/deleted-file").whiteout("data/deleted-tree")
    l2.dir("opq").opaque("opq").file("opq/new", "new from layer 2\n")
    l2.file("data/overwritten", "v2 from layer 2\n").file("data/layer2", "from layer 2\n")
    l3 = Layer(c3).dir("data").file("data/layer3", "from layer 3\n").file("data/exec", "#!/bin/sh\necho layer3-script\n", 0o755)
    return [l1, l2, l3]


def push_layered_image(host: str, repo: str = "layered", tag: str = "1", media: str = "oci", *, index: bool = True, auth: Auth = None) -> ImageRef:
    """Three layers exercising the overlay rules, behind a platform index.

    ``media="oci"`` (default): layer 1 gzip, layer 2 zstd (gzip when
    :data:`ZSTD_AVAILABLE` is false), layer 3 uncompressed; ``media="docker"``:
    all gzip (what :func:`push_docker_image` pushes). With ``index`` (default)
    the tag is an OCI index / Docker manifest list of :data:`LAYERED_PLATFORMS`
    = linux/arm64 first (a one-file image: ``/PLATFORM`` = ``"arm64\\n"``), then
    linux/amd64 = this image; ``ImageRef.manifest_digest`` is the amd64 one.

    Layer 1: the busybox base of :func:`push_busybox_image`, plus
    ``/etc/fastvm-release`` "fastvm layered image\\n"; ``/data/`` with
    ``kept`` ("kept from layer 1\\n"), ``hardlink`` (hard link to data/kept),
    ``rel-link -> kept`` (relative symlink), ``setuid`` (04755),
    ``secret`` (0600, 1000:1000), ``xattr`` (xattr ``user.fastvm=yes``),
    ``overwritten`` ("v1 ..."), ``deleted-file``, ``deleted-tree/{a,sub/b}``;
    ``/abs -> /etc/fastvm-release`` (absolute symlink); ``/opq/old``,
    ``/opq/old-dir/f``.
    Layer 2: ``/data/.wh.deleted-file``, ``/data/.wh.deleted-tree``,
    ``/opq/.wh..wh..opq`` then ``/opq/new``, ``/data/overwritten`` = "v2 from
    layer 2\\n", ``/data/layer2``.
    Layer 3: ``/data/layer3``, ``/data/exec`` (0755 script printing
    "layer3-script").

    Expected rootfs (:data:`LAYERED_EXPECT` has it as data): deleted-file,
    deleted-tree, /opq/old, /opq/old-dir absent; ``ls /opq`` is just ``new``;
    overwritten holds v2; kept and hardlink share an inode; no ``.wh.*`` file
    anywhere. Config (:data:`LAYERED_CONFIG`): Env PATH + ``LAYERED=yes``,
    WorkingDir /data, no User (root), Cmd ["/bin/sh"]."""
    platforms = LAYERED_PLATFORMS if index else None
    push = push_image(host, repo, tag, layered_layers(media), LAYERED_CONFIG, media=media, auth=auth, platform_index=platforms)
    return ImageRef.make(host, repo, tag, push)


def push_docker_image(host: str, repo: str = "docker-layered", tag: str = "1", *, index: bool = False, auth: Auth = None) -> ImageRef:
    """The layered image of :func:`push_layered_image` as Docker v2 schema 2,
    all three layers gzip (``application/vnd.docker.image.rootfs.diff.tar.gzip``),
    same content and expectations (:data:`LAYERED_EXPECT`). By default a plain
    manifest; ``index=True`` puts it behind a Docker manifest list
    (arm64 marker first, amd64 second)."""
    return push_layered_image(host, repo, tag, media="docker", index=index, auth=auth)


HOSTILE_MARKERS = {
    "../escape-dotdot": "fastvm-escape-dotdot\n",
    "a/../../escape2": "fastvm-escape2\n",
    "evil/tmp/fastvm-escape-marker": "fastvm-escape-marker\n",
    "up/fastvm-escape-up": "fastvm-escape-up\n",
}


def push_hostile_image(host: str, repo: str = "hostile", tag: str = "1", *, auth: Auth = None) -> ImageRef:
    """Busybox plus tar entries that try to get out of the rootfs. OCI, no index.

    Layer 1 (gzip): the busybox base of :func:`push_busybox_image` (its own
    ``/etc/passwd`` = :data:`PASSWD`). Config = :data:`BUSYBOX_CONFIG`.
    Layer 2 (gzip), in this order:

    * ``hostile-ok`` = "the image itself is fine\\n" (benign, 0644);
    * ``../escape-dotdot`` (file, "fastvm-escape-dotdot\\n");
    * ``a/../../escape2`` (file, "fastvm-escape2\\n"; no ``a`` dir exists);
    * ``evil -> /`` (symlink) then ``evil/tmp/fastvm-escape-marker``
      ("fastvm-escape-marker\\n"), i.e. through the symlink;
    * ``up -> ../../../../..`` (symlink) then ``up/fastvm-escape-up``
      ("fastvm-escape-up\\n");
    * ``passwd-link`` hard link to ``/etc/passwd`` (absolute linkname);
    * ``passwd-link2`` hard link to ``../../../etc/passwd``.

    Expectations of a safe importer: either it refuses the image with a clear
    error, or it imports it with nothing written or linked outside the rootfs:
    no file named escape-dotdot / escape2 / fastvm-escape-up anywhere on the
    host outside the VM disk, host ``/tmp/fastvm-escape-marker`` absent, the
    host's /etc/passwd untouched (same inode link count and content). Entries
    resolved inside the root are acceptable (``/tmp/fastvm-escape-marker`` in
    the guest via ``evil -> /``; passwd-link* then hold the *image's*
    :data:`PASSWD`, never the host's); entries skipped are too. ``hostile-ok``
    and busybox must be there if the import succeeds. Markers and contents:
    :data:`HOSTILE_MARKERS`."""
    evil = Layer("gzip").file("hostile-ok", "the image itself is fine\n")
    evil.file("../escape-dotdot", HOSTILE_MARKERS["../escape-dotdot"])
    evil.file("a/../../escape2", HOSTILE_MARKERS["a/../../escape2"])
    evil.symlink("evil", "/").file("evil/tmp/fastvm-escape-marker", HOSTILE_MARKERS["evil/tmp/fastvm-escape-marker"])
    evil.symlink("up", "../../../../..").file("up/fastvm-escape-up", HOSTILE_MARKERS["up/fastvm-escape-up"])
    evil.hardlink("passwd-link", "/etc/passwd").hardlink("passwd-link2", "../../../etc/passwd")
    push = push_image(host, repo, tag, [busybox_layer("gzip"), evil], BUSYBOX_CONFIG, media="oci", auth=auth)
    return ImageRef.make(host, repo, tag, push)


def push_all(host: str, *, auth: Auth = None) -> dict[str, ImageRef]:
    """Every ready-made image under its default name."""
    return {
        "busybox": push_busybox_image(host, auth=auth),
        "layered": push_layered_image(host, auth=auth),
        "docker": push_docker_image(host, auth=auth),
        "docker_list": push_docker_image(host, tag="list", index=True, auth=auth),
        "hostile": push_hostile_image(host, auth=auth),
    }


# ---------------------------------------------------------------------------
# htpasswd (bcrypt)


def _bcrypt_libxcrypt(password: str) -> str | None:
    try:
        lib = ctypes.CDLL("libcrypt.so.1")
        gensalt, crypt = lib.crypt_gensalt, lib.crypt
    except (OSError, AttributeError):
        return None
    gensalt.restype, gensalt.argtypes = ctypes.c_char_p, [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    crypt.restype, crypt.argtypes = ctypes.c_char_p, [ctypes.c_char_p, ctypes.c_char_p]
    salt = gensalt(b"$2b$", 5, None, 0)
    if not salt:
        return None
    out = crypt(password.encode(), salt)
    return out.decode() if out and out.startswith(b"$2") else None


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash (``$2b$``/``$2y$``, cost 5) the registry's htpasswd accepts."""
    try:
        import bcrypt

        return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    except ImportError:
        pass
    h = _bcrypt_libxcrypt(password)
    if h:
        return h
    if shutil.which("htpasswd"):
        out = subprocess.run(["htpasswd", "-nbB", "-C", "5", "u", password], capture_output=True, text=True, check=True).stdout
        return out.strip().split(":", 1)[1]
    if shutil.which("mkpasswd"):
        out = subprocess.run(["mkpasswd", "-m", "bcrypt", "-R", "5", password], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.startswith("$2"):
            return out.stdout.strip()
    raise RuntimeError("no bcrypt: install the bcrypt module (pip install bcrypt), apache2-utils or whois, or libcrypt1")


# ---------------------------------------------------------------------------
# the registry process


def unavailable_reason(binary: str | None = None) -> str | None:
    """Why :class:`Registry` cannot run here (None when it can)."""
    b = binary or os.environ.get("FASTVM_DOCKER_REGISTRY") or DEFAULT_REGISTRY_BIN
    if not (os.path.isfile(b) and os.access(b, os.X_OK)):
        return f"{b} missing: apt-get install docker-registry (scripts/install-deps)"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a YAML double-quoted scalar


def _b64url(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    """A registry token service (the Bearer flow of the distribution spec) in
    a thread of this process: ``GET /token?service=...&scope=...`` with basic
    auth of one of ``users`` answers a JWT (RS256, signed by a self-signed
    certificate the registry trusts) granting the asked actions; anything
    else answers 401. ``issued`` lists (user, scope) of every token given."""

    users: dict[str, str]
    service: str = "fastvm-test-registry"
    issuer: str = "fastvm-test-token-issuer"
    root: Path | None = None
    issued: list[tuple[str, str]] = field(default_factory=list)
    port: int = field(init=False, default=0)
    _server: object | None = field(init=False, default=None, repr=False)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def cert_path(self) -> Path:
        assert self.root is not None
        return self.root / "token-cert.pem"

    def start(self) -> TokenServer:
        import base64
        import datetime
        import http.server

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
        from cryptography.x509.oid import NameOID

        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="fastvm-token-"))
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.issuer)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                from urllib.parse import parse_qs, urlparse

                q = parse_qs(urlparse(self.path).query)
                user = ""
                header = self.headers.get("Authorization", "")
                if header.lower().startswith("basic "):
                    try:
                        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    except ValueError:
                        user, password = "", ""
                    if outer.users.get(user) != password:
                        user = ""
                if not user or q.get("service", [""])[0] != outer.service:
                    self.send_response(401)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b'{"details": "bad credentials"}')
                    return
                access = []
                for scope in q.get("scope", []):
                    kind, _, rest = scope.partition(":")
                    repo, _, actions = rest.rpartition(":")
                    access.append({"type": kind, "name": repo, "actions": actions.split(",")})
                    outer.issued.append((user, scope))
                t = int(time.time())
                claims = {"iss": outer.issuer, "sub": user, "aud": outer.service, "exp": t + 600, "nbf": t - 60,
                          "iat": t, "jti": secrets.token_hex(8), "access": access}
                head = {"typ": "JWT", "alg": "RS256", "x5c": [x5c]}
                signing = f"{_b64url(json.dumps(head).encode())}.{_b64url(json.dumps(claims).encode())}"
                sig = key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
                token = f"{signing}.{_b64url(sig)}"
                body = json.dumps({"token": token, "access_token": token, "expires_in": 600}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Registry:
    """``docker-registry serve`` on 127.0.0.1:<free port>, plain HTTP.

    ``with Registry() as reg: push_busybox_image(reg.host)``. Storage and
    ``registry.log`` are in a temp dir (``root``) removed at ``stop()`` unless
    ``keep`` (or ``FASTVM_E2E_KEEP=1``). ``auth=("user", "pass")`` turns on
    htpasswd basic auth (anonymous requests get 401); ``token=TokenServer(...)``
    the Bearer token flow against that (started) token service instead. The process is killed by
    its pid at ``stop()``, on ``__exit__`` and at interpreter exit."""

    auth: Auth = None
    port: int | None = None
    token: TokenServer | None = None
    root: Path | None = None
    keep: bool = False
    binary: str | None = None
    startup_timeout: float = 20.0
    host: str = field(init=False, default="")
    proc: subprocess.Popen | None = field(init=False, default=None, repr=False)
    _own_root: bool = field(init=False, default=False, repr=False)
    _log: IO[bytes] | None = field(init=False, default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def log_path(self) -> Path:
        assert self.root is not None
        return self.root / "registry.log"

    def log_text(self, tail: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-tail:])
        except OSError:
            return ""

    def _write_config(self, port: int) -> Path:
        assert self.root is not None
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  formatter: text",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {_yaml_str(str(data))}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: {_yaml_str(f'127.0.0.1:{port}')}",
            f"  secret: {_yaml_str(secrets.token_hex(16))}",
            "  headers:",
            "    X-Content-Type-Options: [nosniff]",
        ]
        if self.token is not None:
            lines += ["auth:", "  token:", f"    realm: {_yaml_str(self.token.realm)}",
                      f"    service: {_yaml_str(self.token.service)}", f"    issuer: {_yaml_str(self.token.issuer)}",
                      f"    rootcertbundle: {_yaml_str(str(self.token.cert_path))}"]
        elif isinstance(self.auth, tuple):
            user, password = self.auth
            htpasswd = self.root / "htpasswd"
            htpasswd.write_text(f"{user}:{bcrypt_hash(password)}\n")
            lines += ["auth:", "  htpasswd:", "    realm: fastvm-test", f"    path: {_yaml_str(str(htpasswd))}"]
        cfg = self.root / "config.yml"
        cfg.write_text("\n".join(lines) + "\n")
        return cfg

    def start(self) -> Registry:
        reason = unavailable_reason(self.binary)
        if reason:
            raise RuntimeError(reason)
        binary = self.binary or os.environ.get("FASTVM_DOCKER_REGISTRY") or DEFAULT_REGISTRY_BIN
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="fastvm-registry-"))
            self._own_root = True
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        last = ""
        for _attempt in range(5 if self.port is None else 1):
            port = self.port or _free_port()
            cfg = self._write_config(port)
            self._log = open(self.log_path, "ab")
            self.proc = subprocess.Popen([binary, "serve", str(cfg)], stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.host = f"127.0.0.1:{port}"
            atexit.register(self.stop)
            if self._wait_ready():
                return self
            last = self.log_text()
            self._kill()
            if "address already in use" not in last:
                break
        self.stop()
        raise RuntimeError(f"docker-registry did not start; its log:\n{last}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=2.0, trust_env=False) as c:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    return False
                try:
                    if c.get(f"{self.url}/v2/").status_code in (200, 401):
                        return True
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        return False

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        self._kill()
        atexit.unregister(self.stop)
        keep = self.keep or os.environ.get("FASTVM_E2E_KEEP") == "1"
        if self._own_root and self.root is not None and not keep:
            shutil.rmtree(self.root, ignore_errors=True)
            self._own_root = False

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="start a registry, push the ready-made images, print their refs as JSON, run until Ctrl-C")
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--auth", default=None, help="USER:PASS: htpasswd basic auth")
    serve.add_argument("--keep", action="store_true", help="keep the storage dir and log at exit")
    args = ap.parse_args(argv)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    reg = Registry(auth=auth, port=args.port, keep=args.keep)  # type: ignore[arg-type]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with reg:
        images = push_all(reg.host, auth=auth)  # type: ignore[arg-type]
        out = {
            "host": reg.host,
            "auth": list(auth) if auth else None,
            "pid": reg.pid,
            "root": str(reg.root),
            "log": str(reg.log_path),
            "zstd": ZSTD_AVAILABLE,
            "images": {k: str(v) for k, v in images.items()},
            "digests": {k: v.digest for k, v in images.items()},  # what each tag points to (an index for layered, docker_list)
            "manifest_digests": {k: v.manifest_digest for k, v in images.items()},  # the linux/amd64 image manifests
        }
        print(json.dumps(out), flush=True)
        while not stop.wait(1.0):
            if reg.proc is None or reg.proc.poll() is not None:
                print("registry exited", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
