import base64
import json

import httpx
import pytest

from fastvm import APIStatusError, ExecEvent, NotFoundError



def ndjson(*events):
    return httpx.Response(200, headers={"Content-Type": "application/x-ndjson"}, content="".join(json.dumps(e) + "\n" for e in events).encode())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_run_wraps_shell_string(client, server):
    server.on("POST", "/v1/vms/vm-1/exec", {"exitCode": 0, "stdout": "x\n", "stderr": "", "timedOut": False, "durationMs": 3})
    res = client.vms.run("vm-1", command="ls -la /root")
    assert res.exit_code == 0 and res.stdout == "x\n" and res.duration_ms == 3
    assert server.json(server.last()) == {"command": ["sh", "-c", "ls -la /root"]}
    assert server.last().headers["Accept"] == "application/json"


@pytest.mark.parametrize("argv", [["python3", "main.py", "--flag"], ("python3", "main.py", "--flag")])
def test_run_passes_argv_through(client, server, argv):
    server.on("POST", "/v1/vms/vm-1/exec", {"exitCode": 0})
    client.vms.run("vm-1", command=argv, timeout_sec=30)
    assert server.json(server.last()) == {"command": ["python3", "main.py", "--flag"], "timeoutSec": 30}


def test_run_rejects_bytes_and_empty(client):
    with pytest.raises(TypeError):
        client.vms.run("vm-1", command=b"ls")
    with pytest.raises(TypeError):
        client.vms.run("vm-1", command=[])


def test_stream_decodes_events(client, server):
    server.on(
        "POST",
        "/v1/vms/vm-1/exec",
        ndjson(
            {"t": "o", "d": b64(b"hello ")},
            {"t": "e", "d": b64(b"\xffwarn")},
            {"t": "o", "d": b64(b"world\n")},
            {"t": "x", "c": 7, "to": False, "ms": 15},
        ),
    )
    events = list(client.vms.stream("vm-1", command="make -j8", timeout_sec=60))
    assert all(isinstance(e, ExecEvent) for e in events)
    assert [e.type for e in events] == ["o", "e", "o", "x"]
    assert b"".join(e.data for e in events if e.type == "o") == b"hello world\n"
    assert events[1].data == b"\xffwarn"
    assert (events[-1].exit_code, events[-1].timed_out, events[-1].duration_ms) == (7, False, 15)
    req = server.last()
    assert req.headers["Accept"] == "application/x-ndjson"
    assert server.json(req) == {"command": ["sh", "-c", "make -j8"], "timeoutSec": 60}


def test_stream_exit_diagnostic_and_blank_lines(client, server):
    server.on("POST", "/v1/vms/vm-1/exec", httpx.Response(200, content=b'\n{"t":"x","c":127,"to":false,"ms":0,"d":"spawn: not found"}\n\n'))
    (event,) = list(client.vms.stream("vm-1", command=["nope"]))
    assert event.exit_code == 127 and event.diagnostic == "spawn: not found"


def test_stream_yields_incrementally(server):
    """Events are yielded as lines arrive, before the response has ended."""
    produced = []

    def body():
        for i in range(3):
            produced.append(i)
            yield (json.dumps({"t": "o", "d": b64(str(i).encode())}) + "\n").encode()
        produced.append("x")
        yield b'{"t":"x","c":0,"to":false,"ms":1}\n'

    from fastvm import FastvmClient

    c = FastvmClient(api_key="k", base_url="http://t", http_client=httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, content=body()))))
    it = c.vms.stream("vm-1", command="x")
    first = next(it)
    assert first.data == b"0"
    assert "x" not in produced
    rest = list(it)
    assert rest[-1].type == "x"


def test_stream_error_status_raises(client, server):
    server.on("POST", "/v1/vms/vm-1/exec", (404, {"error": {"code": "VM_NOT_FOUND", "message": "gone"}}))
    with pytest.raises(NotFoundError) as info:
        list(client.vms.stream("vm-1", command="true"))
    assert info.value.code == "VM_NOT_FOUND"
    assert isinstance(info.value, APIStatusError)
