"""client.vms.services against a live server and its proxy, with real guests.

The gRPC test runs a real gRPC server (grpcio, the same wheel as the host's
venv: Python 3.11 on both sides) inside the guest and calls it from a real
gRPC client (grpcio on the host) through the proxy, h2c to the backend.
"""

from __future__ import annotations

import base64
import io
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from fastvm import FastvmClient, NotFoundError, VM

from .conftest import LiveServer

WEB = """
import http.server, socketserver, socket, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"hi from the guest at " + self.path.encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
S(("::", int(sys.argv[1])), H).serve_forever()
"""

GRPC_SERVER = """
import sys, grpc
from concurrent import futures
def unary(request, context):
    return b"echo:" + request
def stream(request, context):
    for i in range(int(request or b"3")):
        yield b"item-%d" % i
handler = grpc.method_handlers_generic_handler("test.Echo", {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "Stream": grpc.unary_stream_rpc_method_handler(stream),
})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("[::]:" + sys.argv[1])
server.start()
server.wait_for_termination()
"""


def start_in_guest(client: FastvmClient, vm: VM, script: str, port: int, pythonpath: str = "") -> None:
    b64 = base64.b64encode(script.encode()).decode()
    env = f"PYTHONPATH={pythonpath} " if pythonpath else ""
    cmd = (
        f"echo {b64} | base64 -d > /root/srv{port}.py && ({env}setsid python3 /root/srv{port}.py {port} </dev/null >/tmp/srv{port}.log 2>&1 &) ; "
        f"for i in $(seq 150); do python3 -c 'import socket; socket.create_connection((\"::1\", {port}), 1)' 2>/dev/null && exit 0; sleep 0.1; done; "
        f"cat /tmp/srv{port}.log; exit 1"
    )
    r = client.vms.run(vm.id, command=cmd, timeout_sec=60)
    assert r.exit_code == 0, (r.stdout, r.stderr)


def proxy_get(server: LiveServer, url: str, path: str = "/") -> httpx.Response:
    host = httpx.URL(url).host
    return httpx.get(f"http://127.0.0.1:{server.proxy_port}{path}", headers={"host": host}, timeout=30)


def test_register_list_update_delete_and_reach(client: FastvmClient, fresh_vm: VM, fastvm_server: LiveServer) -> None:
    start_in_guest(client, fresh_vm, WEB, 8080)
    svc = client.vms.services.register(fresh_vm.id, name="web", port=8080)
    assert (svc.name, svc.port, svc.h2c) == ("web", 8080, False)
    assert svc.url == f"http://web--{fresh_vm.id.replace('-', '')}.proxy.localhost:{fastvm_server.proxy_port}/"
    assert [s.name for s in client.vms.services.list(fresh_vm.id)] == ["web"]
    # The auto rule is in the effective firewall, not in the user's policy.
    vm = client.vms.retrieve(fresh_vm.id)
    assert vm.effective_firewall is not None and vm.effective_firewall.ingress is not None
    auto = [r for r in vm.effective_firewall.ingress.rules or [] if r.description == "auto: proxy service web"]
    assert [(r.value, r.protocol, r.ports, r.action) for r in auto] == [("::/0", "tcp", "8080", "allow")]
    # Through the proxy (the default ingress policy denies everything else).
    r = proxy_get(fastvm_server, svc.url, "/x?y=1")
    assert r.status_code == 200 and r.text == "hi from the guest at /x?y=1"
    # PUT: same values are a no-op; a new port moves the service.
    assert client.vms.services.update(fresh_vm.id, "web", port=8080, h2c=False).port == 8080
    start_in_guest(client, fresh_vm, WEB, 8081)
    assert client.vms.services.update(fresh_vm.id, "web", port=8081).port == 8081
    assert proxy_get(fastvm_server, svc.url).status_code == 200
    client.vms.services.delete(fresh_vm.id, "web")
    assert client.vms.services.list(fresh_vm.id) == []
    assert proxy_get(fastvm_server, svc.url).status_code == 404
    with pytest.raises(NotFoundError):
        client.vms.services.delete(fresh_vm.id, "web")


def _grpcio_tree() -> bytes:
    """grpc's package (and its one pure-Python dependency) from this venv, as a
    tar uploaded into the guest."""
    import grpc
    import typing_extensions

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(Path(grpc.__file__).resolve().parent, arcname="grpc")
        tar.add(Path(typing_extensions.__file__).resolve(), arcname="typing_extensions.py")
    return buf.getvalue()


def test_grpc_unary_and_server_streaming_through_the_proxy(client: FastvmClient, fresh_vm: VM, fastvm_server: LiveServer, tmp_path: Path) -> None:
    import grpc  # scripts/test installs grpcio (a missing one fails: never a silent skip)
    archive = tmp_path / "grpc.tar.gz"
    archive.write_bytes(_grpcio_tree())
    client.upload(fresh_vm.id, str(archive), "/root/grpc.tar.gz")
    r = client.vms.run(fresh_vm.id, command="mkdir -p /root/pylib && tar -xzf /root/grpc.tar.gz -C /root/pylib && PYTHONPATH=/root/pylib python3 -c 'import grpc'")
    assert r.exit_code == 0, r.stderr
    start_in_guest(client, fresh_vm, GRPC_SERVER, 50051, pythonpath="/root/pylib")
    svc = client.vms.services.register(fresh_vm.id, name="grpc", port=50051, h2c=True)
    assert svc.h2c is True
    host = httpx.URL(svc.url).host
    # HTTP/2 prior knowledge to the proxy, :authority = the service host.
    with grpc.insecure_channel(f"127.0.0.1:{fastvm_server.proxy_port}", options=[("grpc.default_authority", host)]) as channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        assert unary(b"ping", timeout=30) == b"echo:ping"
        stream = channel.unary_stream("/test.Echo/Stream")
        started = time.monotonic()
        assert list(stream(b"5", timeout=30)) == [b"item-%d" % i for i in range(5)]
        assert time.monotonic() - started < 30
