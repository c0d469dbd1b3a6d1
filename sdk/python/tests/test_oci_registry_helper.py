"""The registry helper of the snapshot-import tests (tests/e2e/oci_registry.py),
checked without fastvm: a real docker-registry, the ready-made images pushed to
it, and skopeo + umoci (independent OCI tooling) reading them back. Skips when
/usr/bin/docker-registry is missing; skopeo/umoci checks skip without them."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from .e2e.oci_registry import (
    BUSYBOX_APPLETS,
    BUSYBOX_CONFIG,
    DOCKER_LAYER,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    GROUP,
    HOSTILE_MARKERS,
    LAYERED_CONFIG,
    LAYERED_EXPECT,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    PASSWD,
    ZSTD_AVAILABLE,
    ImageRef,
    Layer,
    Registry,
    RegistryError,
    get_blob,
    get_manifest,
    list_tags,
    push_all,
    push_busybox_image,
    push_image,
    unavailable_reason,
)

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")

needs_skopeo = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo missing (apt-get install skopeo)")
needs_umoci = pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci missing (apt-get install umoci)")


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with Registry() as reg:
        yield reg


@pytest.fixture(scope="module")
def images(registry: Registry) -> dict[str, ImageRef]:
    return push_all(registry.host)


def skopeo(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["skopeo", "--insecure-policy", *args], capture_output=True, text=True, timeout=300, env=_clean_env())
    if check and r.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} failed: {r.stderr}")
    return r


def _clean_env() -> dict[str, str]:
    # No auth file of the machine's user may leak into the anonymous checks.
    return {k: v for k, v in os.environ.items() if k != "DOCKER_CONFIG"} | {"REGISTRY_AUTH_FILE": "/nonexistent/fastvm-test-auth.json"}


def inspect(ref: str, *extra: str) -> dict:
    return json.loads(skopeo(*extra, "inspect", "--tls-verify=false", f"docker://{ref}").stdout)


def unpack(ref: str, work: Path, *extra: str) -> Path:
    """skopeo copy to an OCI layout (layers recompressed to gzip: umoci 0.4.7 has no
    zstd), then umoci unpack --rootless; the rootfs."""
    layout = work / "layout"
    skopeo(*extra, "copy", "--src-tls-verify=false", "--dest-compress", "--dest-compress-format", "gzip", f"docker://{ref}", f"oci:{layout}:t")
    bundle = work / "bundle"
    r = subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:t", str(bundle)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return bundle / "rootfs"


def layer_tar(host: str, repo: str, desc: dict) -> bytes:
    """A layer blob fetched back and decompressed after its media type."""
    blob = get_blob(host, repo, desc["digest"])
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == desc["digest"]
    mt = desc["mediaType"]
    if mt.endswith("gzip"):
        return gzip.decompress(blob)
    if mt.endswith("zstd"):
        return subprocess.run(["zstd", "-d", "-c", "-q"], input=blob, capture_output=True, check=True).stdout
    return blob


def tar_members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: m for m in tf.getmembers()}


# --- what the registry serves ---------------------------------------------


@needs_skopeo
def test_skopeo_inspects_every_image(images: dict[str, ImageRef]) -> None:
    expected_layers = {"busybox": 1, "layered": 3, "docker": 3, "docker_list": 3, "hostile": 2}
    for name, ref in images.items():
        info = inspect(ref)
        assert (info["Architecture"], info["Os"]) == ("amd64", "linux"), name
        assert len(info["Layers"]) == expected_layers[name], name
        assert info["Digest"] == ref.digest, name  # skopeo names the tag's manifest: the index's, for an index
        assert info["Layers"] == [d["digest"] for d in ref.push.layers], name  # ... but resolves to the amd64 image
        assert info["Env"] == (LAYERED_CONFIG if name in ("layered", "docker", "docker_list") else BUSYBOX_CONFIG)["Env"], name


@needs_skopeo
def test_index_resolves_to_amd64_by_default(images: dict[str, ImageRef]) -> None:
    for name, list_type, manifest_type in (("layered", OCI_INDEX, OCI_MANIFEST), ("docker_list", DOCKER_LIST, DOCKER_MANIFEST)):
        ref = images[name]
        raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{ref}").stdout)
        assert raw["mediaType"] == list_type
        assert [(m["platform"]["os"], m["platform"]["architecture"]) for m in raw["manifests"]] == [("linux", "arm64"), ("linux", "amd64")]
        assert {m["mediaType"] for m in raw["manifests"]} == {manifest_type}
        amd64 = raw["manifests"][1]["digest"]
        assert amd64 == ref.manifest_digest == ref.push.platforms["linux/amd64"]
        assert ref.digest == ref.push.index_digest != amd64
        default = inspect(ref)
        assert default["Architecture"] == "amd64" and default["Layers"] == [d["digest"] for d in ref.push.layers]
        arm = inspect(ref, "--override-arch", "arm64")
        assert arm["Architecture"] == "arm64" and len(arm["Layers"]) == 1
        arm_manifest, _, _ = get_manifest(ref.host, ref.repo, raw["manifests"][0]["digest"])
        assert arm["Layers"] == [arm_manifest["layers"][0]["digest"]]


def test_manifests_and_layers_as_built(registry: Registry, images: dict[str, ImageRef]) -> None:
    host = registry.host
    m, mt, digest = get_manifest(host, "busybox", "1")
    assert mt == OCI_MANIFEST and digest == images["busybox"].digest
    assert [x["mediaType"] for x in m["layers"]] == [OCI_LAYER["gzip"]]

    m, mt, _ = get_manifest(host, "layered", images["layered"].manifest_digest)
    assert mt == OCI_MANIFEST
    assert [x["mediaType"] for x in m["layers"]] == [OCI_LAYER["gzip"], OCI_LAYER["zstd" if ZSTD_AVAILABLE else "gzip"], OCI_LAYER["none"]]
    config = json.loads(get_blob(host, "layered", m["config"]["digest"]))
    assert config["architecture"] == "amd64" and config["os"] == "linux" and config["config"] == LAYERED_CONFIG
    tars = [layer_tar(host, "layered", d) for d in m["layers"]]
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
    l1, l2, l3 = (tar_members(t) for t in tars)
    assert l1["data/secret"].mode == 0o600 and (l1["data/secret"].uid, l1["data/secret"].gid) == (1000, 1000)
    assert l1["data/setuid"].mode == 0o4755
    assert l1["data/xattr"].pax_headers.get("SCHILY.xattr.user.fastvm") == "yes"
    assert l1["data/hardlink"].islnk() and l1["data/hardlink"].linkname == "data/kept"
    assert l1["abs"].issym() and l1["abs"].linkname == "/etc/fastvm-release"
    assert l1["bin/sh"].linkname == "busybox" and l1["home/app"].uid == 1000
    assert {"data/.wh.deleted-file", "data/.wh.deleted-tree", "opq/.wh..wh..opq", "opq/new"} <= set(l2)
    assert set(l3) == {"data", "data/layer3", "data/exec"}

    m, mt, _ = get_manifest(host, "docker-layered", "1")
    assert mt == DOCKER_MANIFEST and [x["mediaType"] for x in m["layers"]] == [DOCKER_LAYER["gzip"]] * 3


def test_hostile_entries_are_written_verbatim(registry: Registry, images: dict[str, ImageRef]) -> None:
    """Read back without extracting anything on this host."""
    m, _, _ = get_manifest(registry.host, "hostile", "1")
    members = tar_members(layer_tar(registry.host, "hostile", m["layers"][1]))
    names = list(members)
    assert names == ["hostile-ok", "../escape-dotdot", "a/../../escape2", "evil", "evil/tmp/fastvm-escape-marker",
                     "up", "up/fastvm-escape-up", "passwd-link", "passwd-link2"]
    assert members["evil"].issym() and members["evil"].linkname == "/"
    assert members["up"].linkname == "../../../../.."
    assert members["passwd-link"].islnk() and members["passwd-link"].linkname == "/etc/passwd"
    assert members["passwd-link2"].islnk() and members["passwd-link2"].linkname == "../../../etc/passwd"
    with tarfile.open(fileobj=io.BytesIO(layer_tar(registry.host, "hostile", m["layers"][1]))) as tf:
        for name, content in HOSTILE_MARKERS.items():
            f = tf.extractfile(name)
            assert f is not None and f.read().decode() == content


def test_pushing_again_gives_the_same_digests(registry: Registry, images: dict[str, ImageRef]) -> None:
    again = push_busybox_image(registry.host)
    assert again == images["busybox"] and again.digest == images["busybox"].digest
    assert sorted(list_tags(registry.host, "docker-layered")) == ["1", "list"]


# --- unpacked with umoci ----------------------------------------------------


@needs_skopeo
@needs_umoci
@pytest.mark.parametrize("name", ["layered", "docker", "docker_list"])
def test_layered_image_unpacks_with_whiteouts_applied(images: dict[str, ImageRef], tmp_path: Path, name: str) -> None:
    rootfs = unpack(images[name], tmp_path)
    for path, (content, mode) in LAYERED_EXPECT["files"].items():
        p = rootfs / path.lstrip("/")
        assert p.read_text() == content, path
        assert p.stat().st_mode & 0o7777 == mode, path
    for path in LAYERED_EXPECT["absent"]:
        assert not os.path.lexists(rootfs / path.lstrip("/")), path
    for path, listing in LAYERED_EXPECT["dir_listings"].items():
        assert sorted(os.listdir(rootfs / path.lstrip("/"))) == listing
    for path, target in LAYERED_EXPECT["symlinks"].items():
        assert os.readlink(rootfs / path.lstrip("/")) == target
    for a, b in LAYERED_EXPECT["hardlinks"]:
        assert (rootfs / a.lstrip("/")).stat().st_ino == (rootfs / b.lstrip("/")).stat().st_ino
    for path, xattrs in LAYERED_EXPECT["xattrs"].items():
        for k, v in xattrs.items():
            assert os.getxattr(rootfs / path.lstrip("/"), k) == v.encode()
    assert not [p for p in rootfs.rglob(".wh.*")]
    assert not (rootfs / "PLATFORM").exists()
    out = subprocess.run([str(rootfs / "bin/busybox"), "sh", str(rootfs / "data/exec")], capture_output=True, text=True, timeout=30)
    assert out.stdout == "layer3-script\n"


@needs_skopeo
@needs_umoci
def test_busybox_image_unpacks(images: dict[str, ImageRef], tmp_path: Path) -> None:
    rootfs = unpack(images["busybox"], tmp_path)
    assert (rootfs / "etc/passwd").read_text() == PASSWD and (rootfs / "etc/group").read_text() == GROUP
    for applet in BUSYBOX_APPLETS:
        assert os.readlink(rootfs / "bin" / applet) == "busybox"
    assert (rootfs / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert (rootfs / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert (rootfs / "home/app").is_dir()
    out = subprocess.run([str(rootfs / "bin/sh"), "-c", "echo $((6 * 7))"], capture_output=True, text=True, timeout=30)
    assert out.stdout == "42\n"


@needs_skopeo
@needs_umoci
def test_arm64_entry_is_the_platform_marker(images: dict[str, ImageRef], tmp_path: Path) -> None:
    rootfs = unpack(images["layered"], tmp_path, "--override-arch", "arm64")
    assert sorted(os.listdir(rootfs)) == ["PLATFORM"]
    assert (rootfs / "PLATFORM").read_text() == "arm64\n"


# --- basic auth -------------------------------------------------------------


def test_basic_auth_refuses_anonymous_and_accepts_credentials(tmp_path: Path) -> None:
    creds = ("fastvm", "s3cret-pass")
    with Registry(auth=creds) as reg:
        assert httpx.get(f"{reg.url}/v2/").status_code == 401
        assert httpx.get(f"{reg.url}/v2/", auth=creds).status_code == 200
        assert httpx.get(f"{reg.url}/v2/", auth=("fastvm", "wrong")).status_code == 401
        layer = Layer().file("hello", "hi\n")
        with pytest.raises(RegistryError) as err:
            push_image(reg.host, "private", "1", [layer])
        assert err.value.status_code == 401
        digest = push_image(reg.host, "private", "1", [layer], {"Cmd": ["/hello"]}, auth=creds)
        with pytest.raises(RegistryError) as err:
            get_manifest(reg.host, "private", "1")
        assert err.value.status_code == 401
        assert get_manifest(reg.host, "private", "1", auth=creds)[2] == digest
        if shutil.which("skopeo"):
            anon = skopeo("inspect", "--tls-verify=false", f"docker://{reg.host}/private:1", check=False)
            assert anon.returncode != 0 and ("unauthorized" in anon.stderr.lower() or "401" in anon.stderr)
            info = json.loads(skopeo("inspect", "--tls-verify=false", "--creds", ":".join(creds), f"docker://{reg.host}/private:1").stdout)
            assert info["Digest"] == digest


def test_stop_kills_the_registry() -> None:
    reg = Registry().start()
    pid, root = reg.pid, reg.root
    assert pid is not None and root is not None and root.is_dir()
    reg.stop()
    assert reg.proc is None and not root.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{reg.url}/v2/", timeout=2)


def test_token_auth_refuses_anonymous_and_issues_bearer_tokens() -> None:
    """docker-registry in token mode against the helper's token service: the
    Bearer flow oci-client follows (challenge -> token with basic credentials
    -> retry), real JWT verification by the registry."""
    from .e2e.oci_registry import BearerAuth, TokenServer

    with TokenServer(users={"tok": "en-pass"}) as ts, Registry(token=ts) as reg:
        anon = httpx.get(f"{reg.url}/v2/")
        assert anon.status_code == 401 and anon.headers["www-authenticate"].lower().startswith("bearer ")
        layer = Layer().file("hello", "hi\n")
        with pytest.raises(RegistryError) as err:
            push_image(reg.host, "tokened", "1", [layer], auth=("tok", "en-pass"))  # basic is not enough
        assert err.value.status_code == 401
        digest = push_image(reg.host, "tokened", "1", [layer], auth=BearerAuth("tok", "en-pass"))
        # The registry names the actions of its challenge in either order.
        pushed = {(user, scope.rpartition(":")[0], frozenset(scope.rpartition(":")[2].split(","))) for user, scope in ts.issued}
        assert ("tok", "repository:tokened", frozenset({"pull", "push"})) in pushed, ts.issued
        assert get_manifest(reg.host, "tokened", "1", auth=BearerAuth("tok", "en-pass"))[2] == digest
        with pytest.raises(RegistryError) as err:
            get_manifest(reg.host, "tokened", "1", auth=BearerAuth("tok", "wrong"))
        assert err.value.status_code == 401
        if shutil.which("skopeo"):
            info = json.loads(skopeo("inspect", "--tls-verify=false", "--creds", "tok:en-pass", f"docker://{reg.host}/tokened:1").stdout)
            assert info["Digest"] == digest
