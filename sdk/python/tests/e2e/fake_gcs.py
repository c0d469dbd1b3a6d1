"""A small stand-in for Google Cloud Storage, written for the bucket-mount tests
(GCS itself cannot be reached from here): an OAuth2 token endpoint that checks
the RS256-signed JWT-bearer grant of known service accounts, and the subset of
the GCS XML API a mount uses (list-type=2 listings, HEAD/GET with ranges, PUT,
PUT with x-goog-copy-source, DELETE), accepting only tokens it issued.
Multipart uploads are not implemented (the tests write files under 8 MiB)."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.sax.saxutils import escape

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def new_service_account(email: str) -> tuple[dict, rsa.RSAPublicKey]:
    """A service-account key file (without token_uri / gcs_base_url) and its public key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    sa = {"type": "service_account", "project_id": "test", "private_key_id": secrets.token_hex(8),
          "private_key": pem, "client_email": email, "client_id": "1"}
    return sa, key.public_key()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class FakeGcs:
    def __init__(self, port: int):
        self.accounts: dict[str, rsa.RSAPublicKey] = {}
        self.tokens: dict[str, str] = {}  # token -> email
        self.buckets: dict[str, dict[str, tuple[bytes, float]]] = {}
        self.token_requests = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{port}"
        self.token_uri = f"{self.base_url}/token"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def key_file(self, sa: dict) -> dict:
        return {**sa, "token_uri": self.token_uri, "gcs_base_url": self.base_url}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None, ctype="application/xml"):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, code: int, what: str, message: str) -> None:
                body = f"<Error><Code>{what}</Code><Message>{escape(message)}</Message></Error>".encode()
                self._send(code, body)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _token(self) -> None:
                form = urllib.parse.parse_qs(self._body().decode())
                if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
                    return self._send(400, b'{"error":"unsupported_grant_type"}', ctype="application/json")
                try:
                    head, claims, sig = form["assertion"][0].split(".")
                    payload = json.loads(_unb64(claims))
                    public = fake.accounts[payload["iss"]]
                    public.verify(_unb64(sig), f"{head}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())
                    assert json.loads(_unb64(head))["alg"] == "RS256"
                    assert payload["aud"] == fake.token_uri and payload["exp"] > time.time()
                    assert "devstorage" in payload["scope"]
                except Exception as exc:  # any flaw: the grant is refused
                    msg = json.dumps({"error": "invalid_grant", "error_description": repr(exc)})
                    return self._send(400, msg.encode(), ctype="application/json")
                token = secrets.token_urlsafe(24)
                with fake.lock:
                    fake.tokens[token] = payload["iss"]
                    fake.token_requests += 1
                body = json.dumps({"access_token": token, "expires_in": 3600, "token_type": "Bearer"})
                self._send(200, body.encode(), ctype="application/json")

            def _authorized(self) -> bool:
                auth = self.headers.get("Authorization", "")
                with fake.lock:
                    ok = auth.startswith("Bearer ") and auth[7:] in fake.tokens
                if not ok:
                    self._error(401, "AuthenticationRequired", "no valid bearer token")
                return ok

            def _split(self) -> tuple[str, str, dict]:
                url = urllib.parse.urlsplit(self.path)
                parts = url.path.lstrip("/").split("/", 1)
                key = urllib.parse.unquote(parts[1]) if len(parts) > 1 else ""
                return urllib.parse.unquote(parts[0]), key, urllib.parse.parse_qs(url.query)

            def _object(self, bucket: str, key: str):
                with fake.lock:
                    objs = fake.buckets.get(bucket)
                    if objs is None:
                        self._error(404, "NoSuchBucket", f"no bucket {bucket}")
                        return None
                    obj = objs.get(key)
                if obj is None:
                    self._error(404, "NoSuchKey", f"no object {key}")
                return obj

            def _meta(self, data: bytes, mtime: float) -> dict:
                return {"ETag": '"' + hashlib.md5(data).hexdigest() + '"',
                        "Last-Modified": formatdate(mtime, usegmt=True)}

            def do_POST(self) -> None:
                if self.path == "/token":
                    return self._token()
                self._error(501, "NotImplemented", "multipart uploads are not implemented by this fake")

            def do_GET(self) -> None:
                if not self._authorized():
                    return
                bucket, key, q = self._split()
                if not key:
                    return self._list(bucket, q)
                obj = self._object(bucket, key)
                if obj is None:
                    return
                data, mtime = obj
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    a, b = rng[6:].split("-")
                    a, b = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
                    part = data[a:b + 1]
                    headers = {**self._meta(data, mtime), "Content-Range": f"bytes {a}-{b}/{len(data)}"}
                    return self._send(206, part, headers, ctype="application/octet-stream")
                self._send(200, data, self._meta(data, mtime), ctype="application/octet-stream")

            def do_HEAD(self) -> None:
                if not self._authorized():
                    return
                bucket, key, _ = self._split()
                obj = self._object(bucket, key)
                if obj is None:
                    return
                data, mtime = obj
                self.send_response(200)
                for k, v in self._meta(data, mtime).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()

            def _list(self, bucket: str, q: dict) -> None:
                with fake.lock:
                    objs = fake.buckets.get(bucket)
                    items = sorted(objs.items()) if objs is not None else None
                if items is None:
                    return self._error(404, "NoSuchBucket", f"no bucket {bucket}")
                prefix = q.get("prefix", [""])[0]
                delim = q.get("delimiter", [""])[0]
                contents, prefixes = [], set()
                for k, (data, mtime) in items:
                    if not k.startswith(prefix):
                        continue
                    rest = k[len(prefix):]
                    if delim and delim in rest:
                        prefixes.add(prefix + rest.split(delim)[0] + delim)
                        continue
                    contents.append(
                        f"<Contents><Key>{escape(k)}</Key><LastModified>"
                        f"{time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime(mtime))}</LastModified>"
                        f"<ETag>\"{hashlib.md5(data).hexdigest()}\"</ETag><Size>{len(data)}</Size></Contents>"
                    )
                common = "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in sorted(prefixes))
                body = (f"<ListBucketResult><Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>"
                        f"<KeyCount>{len(contents)}</KeyCount>{''.join(contents)}{common}</ListBucketResult>")
                self._send(200, body.encode())

            def do_PUT(self) -> None:
                if not self._authorized():
                    return
                bucket, key, _ = self._split()
                body = self._body()
                source = self.headers.get("x-goog-copy-source")
                with fake.lock:
                    objs = fake.buckets.get(bucket)
                    if objs is not None and source:
                        sb, sk = urllib.parse.unquote(source).split("/", 1)
                        found = fake.buckets.get(sb, {}).get(sk)
                        if found is None:
                            objs = None
                        else:
                            body = found[0]
                    if objs is not None:
                        objs[key] = (body, time.time())
                if objs is None:
                    return self._error(404, "NoSuchKey", f"no bucket {bucket} or copy source {source}")
                self._send(200, b"", self._meta(body, time.time()))

            def do_DELETE(self) -> None:
                if not self._authorized():
                    return
                bucket, key, _ = self._split()
                with fake.lock:
                    objs = fake.buckets.get(bucket)
                    found = objs is not None and objs.pop(key, None) is not None
                if not found:
                    return self._error(404, "NoSuchKey", f"no object {key}")
                self._send(204)

        return Handler
