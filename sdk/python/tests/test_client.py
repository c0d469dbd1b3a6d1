import httpx
import pytest

from fastvm import (
    DEFAULT_BASE_URL,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    FastvmClient,
    FastvmError,
    InternalServerError,
    IngressPolicy,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    TTL,
    UnprocessableEntityError,
)

from .conftest import BASE, vm_json


def test_env_config_and_auth_header(monkeypatch, server):
    monkeypatch.setenv("FASTVM_API_KEY", "env-key")
    monkeypatch.setenv("FASTVM_BASE_URL", "http://env.test:9999/")
    c = FastvmClient(http_client=httpx.Client(transport=httpx.MockTransport(server.handle)))
    assert c.api_key == "env-key" and c.base_url == "http://env.test:9999"
    server.on("GET", "/healthz", {"status": "ok"})
    assert c.health().status == "ok"
    req = server.last()
    assert str(req.url) == "http://env.test:9999/healthz"
    assert req.headers["Authorization"] == "Bearer env-key"


def test_defaults(monkeypatch):
    monkeypatch.delenv("FASTVM_API_KEY", raising=False)
    monkeypatch.delenv("FASTVM_BASE_URL", raising=False)
    c = FastvmClient()
    assert c.base_url == DEFAULT_BASE_URL == "http://127.0.0.1:8080"
    assert c.max_retries == 2 and c.api_key is None
    c.close()


def test_explicit_args_win(monkeypatch):
    monkeypatch.setenv("FASTVM_API_KEY", "env-key")
    c = FastvmClient(api_key="arg-key", base_url="http://x")
    assert c.api_key == "arg-key" and c.base_url == "http://x"
    c.close()


@pytest.mark.parametrize(
    "status,cls",
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (413, PayloadTooLargeError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (500, InternalServerError),
        (503, InternalServerError),
        (418, APIStatusError),
    ],
)
def test_error_mapping(client, server, status, cls):
    payload = {"error": {"code": "SOME_CODE", "message": "it broke"}}
    server.on("GET", "/v1/vms/vm-1", (status, payload))
    with pytest.raises(cls) as info:
        client.vms.retrieve("vm-1")
    err = info.value
    assert type(err) is cls
    assert isinstance(err, APIStatusError) and isinstance(err, FastvmError)
    assert err.status_code == status and err.code == "SOME_CODE" and err.message == "it broke"
    assert err.body == payload
    assert "SOME_CODE" in str(err) and "it broke" in str(err)


def test_error_with_non_json_body(client, server):
    server.on("POST", "/v1/vms/vm-1/pause", httpx.Response(502, text="bad gateway"))
    with pytest.raises(InternalServerError) as info:
        client.vms.pause("vm-1")
    assert info.value.code is None and info.value.message == "bad gateway"


def test_get_retried_on_5xx_then_succeeds(client, server):
    server.on("GET", "/v1/vms/vm-1", (503, {}), (500, {}), vm_json())
    assert client.vms.retrieve("vm-1").status == "running"
    assert len(server.requests) == 3


def test_get_retries_exhausted(client, server):
    server.on("GET", "/v1/snapshots", (500, {"error": {"code": "X", "message": "m"}}))
    with pytest.raises(InternalServerError):
        client.snapshots.list()
    assert len(server.requests) == 3  # 1 + max_retries(2)


def test_get_retried_on_connect_error(client, server):
    server.on("GET", "/v1/volumes", httpx.ConnectError("refused"), [])
    assert client.volumes.list() == []
    assert len(server.requests) == 2


def test_put_and_delete_are_retried(client, server):
    server.on("PUT", "/v1/vms/vm-1/firewall", (503, {}), vm_json())
    client.vms.set_firewall("vm-1")
    server.on("DELETE", "/v1/volumes/vol_1", (500, {}), {"id": "vol_1", "deleted": True})
    assert client.volumes.delete("vol_1").deleted is True
    assert len(server.requests) == 4


def test_4xx_not_retried(client, server):
    server.on("GET", "/v1/vms/vm-1", (404, {"error": {"code": "VM_NOT_FOUND", "message": "no"}}))
    with pytest.raises(NotFoundError):
        client.vms.retrieve("vm-1")
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.vms.pause("vm-1"),
        lambda c: c.vms.update("vm-1", name="x"),
        lambda c: c.vms.run("vm-1", command="true"),
        lambda c: c.vms.launch(machine_type="c1m2"),
    ],
)
def test_post_and_patch_not_retried_by_default(client, server, call):
    for method, path in [("POST", "/v1/vms/vm-1/pause"), ("PATCH", "/v1/vms/vm-1"), ("POST", "/v1/vms/vm-1/exec"), ("POST", "/v1/vms")]:
        server.on(method, path, (503, {"error": {"code": "UNAVAILABLE", "message": "later"}}))
    with pytest.raises(InternalServerError):
        call(client)
    assert len(server.requests) == 1


def test_post_connect_error_not_retried(client, server):
    server.on("POST", "/v1/vms/vm-1/pause", httpx.ConnectError("refused"))
    with pytest.raises(APIConnectionError):
        client.vms.pause("vm-1")
    assert len(server.requests) == 1


def test_post_retried_when_caller_asks(client, server):
    server.on("POST", "/v1/vms/vm-1/exec", (503, {}), {"exitCode": 0, "stdout": "ok"})
    assert client.vms.run("vm-1", command="true", max_retries=1).stdout == "ok"
    server.on("POST", "/v1/vms", (500, {}), (500, {}), vm_json())
    assert client.vms.launch(machine_type="c1m2", max_retries=2).id == "vm-1"
    assert len(server.requests) == 5


def test_client_max_retries_zero(server):
    c = FastvmClient(api_key="k", base_url=BASE, max_retries=0, http_client=httpx.Client(transport=httpx.MockTransport(server.handle)))
    server.on("GET", "/v1/vms", (503, {}))
    with pytest.raises(InternalServerError):
        c.vms.list()
    assert len(server.requests) == 1


def test_timeout_maps_to_api_timeout_error(client, server):
    server.on("GET", "/v1/vms", httpx.ReadTimeout("slow"))
    with pytest.raises(APITimeoutError):
        client.vms.list()
    assert len(server.requests) == 1  # read timeouts are not connect errors: no retry


def test_ssh_key_fingerprint_is_url_encoded(client, server):
    fp = "SHA256:ab+c/d=="
    server.on("DELETE", "/v1/me/ssh-keys/SHA256%3Aab%2Bc%2Fd%3D%3D", {"id": fp, "deleted": True})
    assert client.me.ssh_keys.delete(fp).deleted is True
    assert server.last().url.raw_path == b"/v1/me/ssh-keys/SHA256%3Aab%2Bc%2Fd%3D%3D"


def test_ssh_keys_add_and_list(client, server):
    server.on("POST", "/v1/me/ssh-keys", (201, {"name": "laptop", "publicKey": "ssh-ed25519 AAA", "fingerprint": "SHA256:x"}))
    key = client.me.ssh_keys.add(public_key="ssh-ed25519 AAA", name="laptop")
    assert key.public_key == "ssh-ed25519 AAA"
    assert server.json(server.last()) == {"name": "laptop", "publicKey": "ssh-ed25519 AAA"}
    server.on("GET", "/v1/me/ssh-keys", {"keys": [{"fingerprint": "SHA256:x", "createdAt": "t"}]})
    assert client.me.ssh_keys.list().keys[0].created_at == "t"


def test_vm_update_distinguishes_not_given_from_none(client, server):
    server.on("PATCH", "/v1/vms/vm-1", vm_json())
    client.vms.update("vm-1", name="new")
    assert server.json(server.last()) == {"name": "new"}
    client.vms.update("vm-1", ttl=None)
    assert server.json(server.last()) == {"ttl": None}
    client.vms.update("vm-1", ttl=TTL(seconds=60, action="delete"), metadata={"a_b": "c"})
    assert server.json(server.last()) == {"metadata": {"a_b": "c"}, "ttl": {"seconds": 60, "action": "delete"}}
    client.vms.update("vm-1", ttl={"seconds": 5, "action": "pause"})
    assert server.json(server.last()) == {"ttl": {"seconds": 5, "action": "pause"}}


def test_firewall_accepts_models_and_dicts(client, server):
    server.on("PATCH", "/v1/vms/vm-1/firewall", vm_json())
    client.vms.patch_firewall(
        "vm-1",
        ingress=IngressPolicy(default_action="deny", rules=[{"value": "::/0", "protocol": "tcp", "ports": "443", "action": "allow"}]),
        dns={"mode": "allow", "domains": ["a.com"], "block_bypass": True},
    )
    assert server.json(server.last()) == {
        "ingress": {"defaultAction": "deny", "rules": [{"kind": "cidr", "value": "::/0", "protocol": "tcp", "ports": "443", "action": "allow"}]},
        "dns": {"mode": "allow", "domains": ["a.com"], "blockBypass": True},
    }


def test_list_status_query(client, server):
    server.on("GET", "/v1/vms", [vm_json(), vm_json(status="paused")])
    vms = client.vms.list(status="running")
    assert [v.status for v in vms] == ["running", "paused"]
    assert server.last().url.params["status"] == "running"
    client.vms.list()
    assert "status" not in server.last().url.params


def test_bucket_mounts(client, server):
    bm = {"id": "bm_1", "vmId": "vm-1", "bucketUri": "s3://b", "mountPath": "/data/b", "readOnly": False, "mountStatus": "mounted"}
    server.on("POST", "/v1/vms/vm-1/bucket-mounts", (201, bm))
    creds = {"type": "aws-credentials", "value": {"data": "[default]\naws_access_key_id=x\n"}}
    out = client.vms.bucket_mounts.attach("vm-1", bucket_uri="s3://b", mount_path="/data/b", credentials=creds)
    assert out.mount_status == "mounted"
    assert server.json(server.last()) == {"bucketUri": "s3://b", "mountPath": "/data/b", "readOnly": False, "credentials": creds}
    server.on("PATCH", "/v1/vms/vm-1/bucket-mounts/bm_1", bm)
    client.vms.bucket_mounts.rotate("vm-1", "bm_1", credentials=creds)
    assert server.json(server.last()) == {"credentials": creds}
    server.on("DELETE", "/v1/vms/vm-1/bucket-mounts/bm_1", httpx.Response(204))
    assert client.vms.bucket_mounts.delete("vm-1", "bm_1") is None


ENDPOINTS = [
    ("GET", "/healthz", lambda c: c.health()),
    ("GET", "/v1/vms/v", lambda c: c.vms.retrieve("v")),
    ("DELETE", "/v1/vms/v", lambda c: c.vms.delete("v")),
    ("POST", "/v1/vms/v/pause", lambda c: c.vms.pause("v")),
    ("POST", "/v1/vms/v/resume", lambda c: c.vms.resume("v")),
    ("POST", "/v1/vms/v/ttl/refresh", lambda c: c.vms.refresh_ttl("v")),
    ("PUT", "/v1/vms/v/firewall", lambda c: c.vms.set_firewall("v")),
    ("POST", "/v1/vms/v/console-token", lambda c: c.vms.console_token("v")),
    ("GET", "/v1/vms/v/services", lambda c: c.vms.services.list("v")),
    ("POST", "/v1/vms/v/services", lambda c: c.vms.services.register("v", name="web", port=8080)),
    ("PUT", "/v1/vms/v/services/web", lambda c: c.vms.services.update("v", "web", port=8081, h2c=True)),
    ("DELETE", "/v1/vms/v/services/web", lambda c: c.vms.services.delete("v", "web")),
    ("POST", "/v1/vms/v/files/presign", lambda c: c.vms.files.presign("v", path="/root/f")),
    ("POST", "/v1/vms/v/files/fetch", lambda c: c.vms.files.fetch("v", url="http://u", path="/root/f", timeout_sec=5)),
    ("POST", "/v1/vms/v/volumes", lambda c: c.vms.volumes.attach("v", volume_id="vol_1", mount_path="/mnt/x")),
    ("DELETE", "/v1/vms/v/volumes/vol_1", lambda c: c.vms.volumes.detach("v", "vol_1")),
    ("GET", "/v1/vms/v/bucket-mounts", lambda c: c.vms.bucket_mounts.list("v")),
    ("GET", "/v1/vms/v/bucket-mounts/bm_1", lambda c: c.vms.bucket_mounts.retrieve("v", "bm_1")),
    ("GET", "/v1/snapshots", lambda c: c.snapshots.list()),
    ("POST", "/v1/snapshots", lambda c: c.snapshots.create(vm_id="v", name="s")),
    ("GET", "/v1/snapshots/s", lambda c: c.snapshots.retrieve("s")),
    ("PATCH", "/v1/snapshots/s", lambda c: c.snapshots.update("s", name="n")),
    ("DELETE", "/v1/snapshots/s", lambda c: c.snapshots.delete("s")),
    ("GET", "/v1/snapshot-imports", lambda c: c.snapshot_imports.list()),
    ("POST", "/v1/snapshot-imports", lambda c: c.snapshot_imports.create(source={"type": "image", "image": "alpine"})),
    ("POST", "/v1/snapshot-imports/context-presign", lambda c: c.snapshot_imports.presign_context(size_bytes=10)),
    ("GET", "/v1/snapshot-imports/i", lambda c: c.snapshot_imports.retrieve("i")),
    ("DELETE", "/v1/snapshot-imports/i", lambda c: c.snapshot_imports.delete("i")),
    ("POST", "/v1/snapshot-imports/i/cancel", lambda c: c.snapshot_imports.cancel("i")),
    ("GET", "/v1/org/quotas", lambda c: c.quotas.retrieve()),
    ("GET", "/v1/volumes", lambda c: c.volumes.list()),
    ("POST", "/v1/volumes", lambda c: c.volumes.create(name="v", size_gi_b=5, access_mode="rw")),
    ("GET", "/v1/volumes/vol_1", lambda c: c.volumes.retrieve("vol_1")),
    ("PATCH", "/v1/volumes/vol_1", lambda c: c.volumes.update("vol_1", size_gi_b=6)),
    ("DELETE", "/v1/volumes/vol_1", lambda c: c.volumes.delete("vol_1")),
    ("GET", "/v1/volumes/vol_1/attachments", lambda c: c.volumes.list_attachments("vol_1")),
    ("GET", "/v1/me/ssh-keys", lambda c: c.me.ssh_keys.list()),
]


@pytest.mark.parametrize("method,path,call", ENDPOINTS, ids=[f"{m} {p}" for m, p, _ in ENDPOINTS])
def test_endpoint_method_and_path(client, server, method, path, call):
    server.on(method, path, {})
    call(client)
    assert server.calls() == [(method, path)]
    assert server.last().headers["Authorization"] == "Bearer sk-test"


def test_request_bodies_use_wire_names(client, server):
    server.on("POST", "/v1/volumes", {"id": "vol_1", "sizeGiB": 5})
    assert client.volumes.create(name="v", size_gi_b=5, access_mode="rw").size_gi_b == 5
    assert server.json(server.last()) == {"name": "v", "sizeGiB": 5, "accessMode": "rw"}
    server.on("POST", "/v1/vms/v/volumes", {"volumeId": "vol_1"})
    client.vms.volumes.attach("v", volume_id="vol_1", mount_path="/mnt/x", read_only=True)
    assert server.json(server.last()) == {"volumeId": "vol_1", "mountPath": "/mnt/x", "readOnly": True}
    server.on("POST", "/v1/vms/v/files/fetch", {"exitCode": 0})
    client.vms.files.fetch("v", url="http://u", path="/p", timeout_sec=7)
    assert server.json(server.last()) == {"url": "http://u", "path": "/p", "timeoutSec": 7}
    server.on("POST", "/v1/snapshots", {})
    client.snapshots.create(vm_id="vm-1")
    assert server.json(server.last()) == {"vmId": "vm-1"}
    server.on("POST", "/v1/snapshot-imports/context-presign", {})
    client.snapshot_imports.presign_context(size_bytes=99)
    assert server.json(server.last()) == {"sizeBytes": 99}
    server.on("POST", "/v1/vms/v/services", {"name": "web", "port": 8080, "h2c": False})
    client.vms.services.register("v", name="web", port=8080)
    assert server.json(server.last()) == {"name": "web", "port": 8080, "h2c": False}


def test_context_manager_closes_owned_client():
    with FastvmClient(api_key="k") as c:
        assert not c._http.is_closed
    assert c._http.is_closed


def test_list_pages_extension(client, server):
    page1 = httpx.Response(200, json=[vm_json(id="vm-1")], headers={"X-Next-Cursor": "c" * 48})
    page2 = httpx.Response(200, json=[vm_json(id="vm-2")])
    server.on("GET", "/v1/vms", page1, page2)
    first = client.vms.list(limit=1)
    assert [v.id for v in first] == ["vm-1"] and first.next_cursor == "c" * 48
    assert dict(server.last().url.params) == {"limit": "1"}
    last = client.vms.list(status="running", limit=1, cursor=first.next_cursor)
    assert [v.id for v in last] == ["vm-2"] and last.next_cursor is None
    assert dict(server.last().url.params) == {"status": "running", "limit": "1", "cursor": "c" * 48}


async def test_list_pages_extension_async(aclient, server):
    server.on("GET", "/v1/vms", httpx.Response(200, json=[vm_json()], headers={"X-Next-Cursor": "n"}))
    page = await aclient.vms.list(limit=5)
    assert len(page) == 1 and page.next_cursor == "n"
    assert server.last().url.params["limit"] == "5"
