"""client.vms.bucket_mounts against a live server, real guests and a real
S3-compatible server (moto, with IAM authentication on): the worker serves the
bucket to the guest over NFS and signs every S3 request itself
(docs/ARCHITECTURE.md "Bucket mounts")."""

from __future__ import annotations

import hashlib
import json
import os
import time

import boto3
import httpx
import pytest
from botocore.config import Config

from fastvm import VM, BadRequestError, ConflictError, FastvmClient, NotFoundError

from .conftest import MotoS3

BUCKET = "e2e-data"


def run(client: FastvmClient, vm: VM, cmd: str):
    return client.vms.run(vm.id, command=cmd, timeout_sec=60)


def run_ok(client: FastvmClient, vm: VM, cmd: str) -> str:
    r = run(client, vm, cmd)
    assert r.exit_code == 0, (cmd, r.stdout, r.stderr)
    return r.stdout


def creds(endpoint: str, key_id: str, secret: str) -> dict:
    ini = f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\nendpoint_url = {endpoint}\n"
    return {"type": "aws-credentials", "value": {"data": ini}}


class S3World:
    """Two IAM users' keys, a bucket with objects, and a boto3 client to check
    what the guest's file operations did to it."""

    def __init__(self, moto: MotoS3):
        kw = dict(endpoint_url=moto.endpoint, region_name="us-east-1",
                  config=Config(retries={"max_attempts": 1}))
        # The 3 unauthenticated requests moto allows: user A, its key, its policy.
        iam = boto3.client("iam", aws_access_key_id="x", aws_secret_access_key="x", **kw)
        iam.create_user(UserName="alice")
        key = iam.create_access_key(UserName="alice")["AccessKey"]
        everything = json.dumps({"Version": "2012-10-17",
                                 "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})
        iam.put_user_policy(UserName="alice", PolicyName="all", PolicyDocument=everything)
        self.a = (key["AccessKeyId"], key["SecretAccessKey"])
        iam = boto3.client("iam", aws_access_key_id=self.a[0], aws_secret_access_key=self.a[1], **kw)
        iam.create_user(UserName="bob")
        key = iam.create_access_key(UserName="bob")["AccessKey"]
        iam.put_user_policy(UserName="bob", PolicyName="all", PolicyDocument=everything)
        self.b = (key["AccessKeyId"], key["SecretAccessKey"])
        self.iam = iam
        self.s3 = boto3.client("s3", aws_access_key_id=self.a[0], aws_secret_access_key=self.a[1], **kw)
        self.s3.create_bucket(Bucket=BUCKET)
        self.endpoint = moto.endpoint

    def put(self, key: str, body: bytes) -> None:
        self.s3.put_object(Bucket=BUCKET, Key=key, Body=body)

    def get(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def keys(self, prefix: str = "") -> list[str]:
        out = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        return sorted(o["Key"] for o in out)


@pytest.fixture(scope="module")
def s3(moto_s3: MotoS3) -> S3World:
    return S3World(moto_s3)


def test_bucket_files_credentials_and_snapshot(client: FastvmClient, fresh_vm: VM, s3: S3World) -> None:
    s3.put("train/a.txt", b"hello bucket")
    s3.put("train/sub/b.txt", b"world")
    s3.put("outside.txt", b"not under the prefix")
    alice = creds(s3.endpoint, *s3.a)

    m = client.vms.bucket_mounts.attach(
        fresh_vm.id, bucket_uri=f"s3://{BUCKET}/train", mount_path="/mnt/bkt", credentials=alice
    )
    assert m.id.startswith("bm_") and len(m.id) == 25
    assert (m.mount_status, m.status_message, m.read_only) == ("mounted", None, False), m
    assert [x.id for x in client.vms.bucket_mounts.list(fresh_vm.id)] == [m.id]
    assert [x.id for x in client.vms.retrieve(fresh_vm.id).bucket_mounts] == [m.id]
    assert [x.id for x in {v.id: v for v in client.vms.list()}[fresh_vm.id].bucket_mounts] == [m.id]

    # Objects are files, prefixes directories; ranged reads.
    assert run_ok(client, fresh_vm, "ls /mnt/bkt").split() == ["a.txt", "sub"]
    assert run_ok(client, fresh_vm, "cat /mnt/bkt/a.txt") == "hello bucket"
    assert run_ok(client, fresh_vm, "tail -c 6 /mnt/bkt/a.txt") == "bucket"
    assert run_ok(client, fresh_vm, "cat /mnt/bkt/sub/b.txt") == "world"

    # Writes become objects at close; overwrite, rename (file and directory), delete.
    run_ok(client, fresh_vm, "echo new file > /mnt/bkt/c.txt")
    assert s3.get("train/c.txt") == b"new file\n"
    run_ok(client, fresh_vm, "echo replaced > /mnt/bkt/a.txt")
    assert s3.get("train/a.txt") == b"replaced\n"
    run_ok(client, fresh_vm, "printf 12345 | dd of=/mnt/bkt/a.txt bs=1 seek=2 conv=notrunc 2>/dev/null")
    assert s3.get("train/a.txt") == b"re12345d\n"
    run_ok(client, fresh_vm, "mv /mnt/bkt/c.txt /mnt/bkt/sub/d.txt")
    run_ok(client, fresh_vm, "mkdir /mnt/bkt/newdir && echo z > /mnt/bkt/newdir/z && mv /mnt/bkt/sub /mnt/bkt/moved")
    assert s3.keys("train/") == ["train/a.txt", "train/moved/b.txt", "train/moved/d.txt", "train/newdir/z"]
    run_ok(client, fresh_vm, "rm /mnt/bkt/moved/d.txt")
    assert "train/moved/d.txt" not in s3.keys("train/")
    dd = run_ok(client, fresh_vm, "head -c 3000000 /dev/urandom > /tmp/big && cp /tmp/big /mnt/bkt/big && md5sum < /tmp/big")
    assert hashlib.md5(s3.get("train/big")).hexdigest() == dd.split()[0]
    assert run_ok(client, fresh_vm, "md5sum < /mnt/bkt/big").split()[0] == dd.split()[0]
    # Outside the prefix nothing changed; objects written by others show up.
    assert s3.get("outside.txt") == b"not under the prefix"
    s3.put("train/from-outside.txt", b"hi")
    assert run_ok(client, fresh_vm, "sleep 1.2; cat /mnt/bkt/from-outside.txt") == "hi"

    # The credentials never enter the guest.
    leak = run(client, fresh_vm, f"grep -D skip -rl -e {s3.a[1]} -e {s3.a[0]} /proc/mounts /etc /run /tmp /root 2>/dev/null")
    assert leak.stdout == "", leak.stdout

    # Rotation: keys the bucket refuses are refused and the old ones stay; good
    # ones take effect without a remount, even after the old key is deleted.
    with pytest.raises(BadRequestError) as e:
        client.vms.bucket_mounts.rotate(fresh_vm.id, m.id, credentials=creds(s3.endpoint, "AKIAWRONG", "nope"))
    assert e.value.code == "CREDENTIALS_REFUSED", e.value
    assert run_ok(client, fresh_vm, "cat /mnt/bkt/from-outside.txt") == "hi"
    r = client.vms.bucket_mounts.rotate(fresh_vm.id, m.id, credentials=creds(s3.endpoint, *s3.b))
    assert r.mount_status == "mounted"
    s3.iam.delete_access_key(UserName="alice", AccessKeyId=s3.a[0])
    s3.s3 = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1",
                         aws_access_key_id=s3.b[0], aws_secret_access_key=s3.b[1])
    run_ok(client, fresh_vm, "echo after rotation > /mnt/bkt/rotated.txt")
    assert s3.get("train/rotated.txt") == b"after rotation\n"

    # A snapshot records the mount without credentials; a restore waits for them.
    snap = client.snapshots.create(vm_id=fresh_vm.id, name="with-bucket")
    deadline = time.monotonic() + 120
    while snap.status != "ready":
        assert snap.status != "failed", snap
        assert time.monotonic() < deadline
        time.sleep(0.5)
        snap = client.snapshots.retrieve(snap.id)
    assert [(b.bucket_uri, b.mount_path) for b in snap.bucket_mounts] == [(f"s3://{BUCKET}/train", "/mnt/bkt")]
    raw = httpx.get(f"{os.environ['FASTVM_BASE_URL']}/v1/snapshots/{snap.id}",
                    headers={"Authorization": f"Bearer {os.environ['FASTVM_API_KEY']}"})
    assert raw.status_code == 200 and s3.b[1] not in raw.text and s3.b[0] not in raw.text
    restored = client.vms.launch(snapshot_id=snap.id, poll_interval=0.5)
    try:
        [p] = client.vms.bucket_mounts.list(restored.id)
        assert p.mount_status == "pending" and "credentials" in (p.status_message or ""), p
        # The restored guest does not hang on the source VM's mount.
        assert run_ok(client, restored, "echo alive") == "alive\n"
        p = client.vms.bucket_mounts.rotate(restored.id, p.id, credentials=creds(s3.endpoint, *s3.b))
        assert p.mount_status == "mounted", p
        assert run_ok(client, restored, "cat /mnt/bkt/rotated.txt") == "after rotation\n"
    finally:
        client.vms.delete(restored.id)
        client.snapshots.delete(snap.id)

    # Detach: the guest's directory is empty again, the bucket keeps its objects.
    assert client.vms.bucket_mounts.delete(fresh_vm.id, m.id) is None
    assert client.vms.bucket_mounts.list(fresh_vm.id) == []
    assert run_ok(client, fresh_vm, "ls -A /mnt/bkt 2>/dev/null; true") == ""
    assert "train/a.txt" in s3.keys("train/")
    with pytest.raises(NotFoundError):
        client.vms.bucket_mounts.retrieve(fresh_vm.id, m.id)


def test_bucket_mount_bad_input_and_failures(client: FastvmClient, vm: VM, s3: S3World) -> None:
    bob = creds(s3.endpoint, *s3.b)
    uri = f"s3://{BUCKET}"
    for bad_uri in ["ftp://x/y", "s3://", "s3://UPPER", "gs:/nope"]:
        with pytest.raises(BadRequestError) as e:
            client.vms.bucket_mounts.attach(vm.id, bucket_uri=bad_uri, mount_path="/mnt/b", credentials=bob)
        assert e.value.code == "INVALID_BUCKET_URI", bad_uri
    with pytest.raises(BadRequestError) as e:
        client.vms.bucket_mounts.attach(vm.id, bucket_uri=uri, mount_path="/etc", credentials=bob)
    assert e.value.code == "INVALID_MOUNT_PATH"
    with pytest.raises(BadRequestError) as e:
        client.vms.bucket_mounts.attach(
            vm.id, bucket_uri=uri, mount_path="/mnt/b",
            credentials={"type": "aws-credentials", "value": {"data": "[default]\nregion=x\n"}},
        )
    assert e.value.code == "INVALID_CREDENTIALS"
    # An internal endpoint the operator did not allow.
    with pytest.raises(BadRequestError) as e:
        client.vms.bucket_mounts.attach(
            vm.id, bucket_uri=uri, mount_path="/mnt/b", credentials=creds("http://127.0.0.1:1", *s3.b)
        )
    assert e.value.code == "BUCKET_ENDPOINT_NOT_ALLOWED" and "--allow-bucket-endpoint" in str(e.value)
    with pytest.raises(BadRequestError) as e:
        client.vms.bucket_mounts.attach(
            vm.id, bucket_uri=uri, mount_path="/mnt/b", credentials=creds("http://169.254.169.254", *s3.b)
        )
    assert e.value.code == "BUCKET_ENDPOINT_NOT_ALLOWED"
    with pytest.raises(NotFoundError):
        client.vms.bucket_mounts.retrieve(vm.id, "bm_0123456789abcdef012345")

    # Keys the bucket refuses, a bucket that does not exist, gs:// (not built):
    # `failed` with the reason, nothing mounted, the VM unaffected.
    cases = [
        (uri, creds(s3.endpoint, "AKIANOBODY", "x"), "credentials"),
        ("s3://no-such-bucket-here", bob, "no-such-bucket-here"),
        ("gs://some-bucket", {"type": "gcp-service-account-json", "value": {
            "type": "service_account", "client_email": "sa@p.iam.gserviceaccount.com",
            "private_key": "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n"}}, "private_key"),
    ]
    for bucket_uri, c, says in cases:
        f = client.vms.bucket_mounts.attach(vm.id, bucket_uri=bucket_uri, mount_path="/mnt/f", credentials=c)
        try:
            assert f.mount_status == "failed" and says in (f.status_message or ""), f
        finally:
            client.vms.bucket_mounts.delete(vm.id, f.id)
    assert run_ok(client, vm, "echo alive") == "alive\n"

    # A bucket that disappears under a mount: I/O errors in the guest, the
    # reason in statusMessage, the VM keeps running; the path is taken meanwhile.
    s3.s3.create_bucket(Bucket="short-lived")
    s3.s3.put_object(Bucket="short-lived", Key="f", Body=b"x")
    m = client.vms.bucket_mounts.attach(vm.id, bucket_uri="s3://short-lived", mount_path="/data/gone", read_only=True, credentials=bob)
    try:
        assert m.mount_status == "mounted" and m.read_only
        with pytest.raises(ConflictError) as e:
            client.vms.bucket_mounts.attach(vm.id, bucket_uri=uri, mount_path="/data/gone", credentials=bob)
        assert e.value.code == "MOUNT_PATH_IN_USE"
        ro = run(client, vm, "touch /data/gone/new")
        assert ro.exit_code != 0 and "Read-only" in ro.stderr, ro
        assert run_ok(client, vm, "cat /data/gone/f") == "x"
        s3.s3.delete_object(Bucket="short-lived", Key="f")
        s3.s3.delete_bucket(Bucket="short-lived")
        gone = run(client, vm, "sleep 1.2; ls /data/gone/")
        assert gone.exit_code != 0, gone
        got = client.vms.bucket_mounts.retrieve(vm.id, m.id)
        assert got.mount_status == "mounted" and "NoSuchBucket" in (got.status_message or ""), got
        assert run_ok(client, vm, "echo alive") == "alive\n"
    finally:
        client.vms.bucket_mounts.delete(vm.id, m.id)


def test_gcs_bucket_with_oauth_tokens(client: FastvmClient, fresh_vm: VM, fake_gcs) -> None:
    """gs:// through the stand-in GCS (fake_gcs.py, written for this test: GCS
    cannot be reached from here): the worker gets a token from the key's
    token_uri with an RS256-signed JWT grant, then uses the XML API with it."""
    from .fake_gcs import new_service_account

    sa, public = new_service_account("mounter@test.iam.gserviceaccount.com")
    fake_gcs.accounts[sa["client_email"]] = public
    fake_gcs.buckets["gcs-data"] = {"in/a.txt": (b"from gcs", time.time())}
    key = {"type": "gcp-service-account-json", "value": fake_gcs.key_file(sa)}

    m = client.vms.bucket_mounts.attach(fresh_vm.id, bucket_uri="gs://gcs-data/in", mount_path="/mnt/gcs", credentials=key)
    try:
        assert m.mount_status == "mounted", m
        assert fake_gcs.token_requests >= 1
        assert run_ok(client, fresh_vm, "ls /mnt/gcs") == "a.txt\n"
        assert run_ok(client, fresh_vm, "cat /mnt/gcs/a.txt") == "from gcs"
        run_ok(client, fresh_vm, "echo written > /mnt/gcs/b.txt && mv /mnt/gcs/b.txt /mnt/gcs/c.txt")
        assert fake_gcs.buckets["gcs-data"]["in/c.txt"][0] == b"written\n"
        assert "in/b.txt" not in fake_gcs.buckets["gcs-data"]
        # The private key never enters the guest.
        marker = sa["private_key"].splitlines()[1][:40]
        leak = run(client, fresh_vm, f"grep -D skip -rlF -e '{marker}' /proc/mounts /etc /run /tmp /root 2>/dev/null")
        assert leak.stdout == "", leak.stdout

        # A key the token endpoint does not know: refused, the old one stays.
        stranger, _ = new_service_account("stranger@test.iam.gserviceaccount.com")
        with pytest.raises(BadRequestError) as e:
            client.vms.bucket_mounts.rotate(
                fresh_vm.id, m.id, credentials={"type": "gcp-service-account-json", "value": fake_gcs.key_file(stranger)}
            )
        assert e.value.code == "CREDENTIALS_REFUSED" and "invalid_grant" in str(e.value), e.value
        assert run_ok(client, fresh_vm, "cat /mnt/gcs/c.txt") == "written\n"
        # A key whose endpoints are internal and not allowed.
        with pytest.raises(BadRequestError) as e:
            client.vms.bucket_mounts.rotate(
                fresh_vm.id, m.id,
                credentials={"type": "gcp-service-account-json", "value": {**fake_gcs.key_file(sa), "token_uri": "http://10.9.9.9/token"}},
            )
        assert e.value.code == "BUCKET_ENDPOINT_NOT_ALLOWED"
    finally:
        client.vms.bucket_mounts.delete(fresh_vm.id, m.id)
