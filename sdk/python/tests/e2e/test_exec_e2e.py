"""client.vms.run and client.vms.stream against real guests."""

from __future__ import annotations

import time

import pytest

from fastvm import ExecEvent, ExecVMResponse, FastvmClient


def _collect(events: list[ExecEvent]) -> tuple[bytes, bytes, ExecEvent]:
    assert events, "no events"
    assert all(isinstance(e, ExecEvent) for e in events)
    assert {e.type for e in events} <= {"o", "e", "x"}
    assert [e.type for e in events].count("x") == 1 and events[-1].type == "x", "exactly one x event, last"
    assert all(isinstance(e.data, bytes) for e in events)
    out = b"".join(e.data for e in events if e.type == "o")
    err = b"".join(e.data for e in events if e.type == "e")
    return out, err, events[-1]


# -- run ----------------------------------------------------------------------------


def test_run_str_is_wrapped_in_sh_c(client: FastvmClient, vm) -> None:
    r = client.vms.run(vm.id, command="echo $((6 * 7)); echo oops >&2; exit 3")
    assert isinstance(r, ExecVMResponse)
    assert r.exit_code == 3
    assert r.stdout == "42\n"  # shell arithmetic ran: the string went through sh -c
    assert r.stderr == "oops\n"
    assert r.timed_out is False
    assert r.stdout_truncated is False and r.stderr_truncated is False
    assert isinstance(r.duration_ms, int) and r.duration_ms >= 0


def test_run_list_is_passed_through_as_argv(client, vm) -> None:
    r = client.vms.run(vm.id, command=["printf", "[%s]", "a b", "$HOME", "*"])
    assert r.exit_code == 0
    # No shell: no word splitting, no expansion, no globbing.
    assert r.stdout == "[a b][$HOME][*]"
    r = client.vms.run(vm.id, command=("python3", "-c", "import sys; print(sys.argv[1:])", "x y", "z"))
    assert r.stdout == "['x y', 'z']\n"


@pytest.mark.parametrize(
    "command, code",
    [("true", 0), ("false", 1), ("exit 42", 42), (["sh", "-c", "kill -TERM $$"], 143)],
)
def test_run_exit_codes(client, vm, command, code) -> None:
    assert client.vms.run(vm.id, command=command).exit_code == code


def test_run_missing_program(client, vm) -> None:
    r = client.vms.run(vm.id, command=["no-such-program-xyz"])
    assert r.exit_code == 127
    assert "no-such-program-xyz" in r.stderr
    r = client.vms.run(vm.id, command="no-such-program-xyz")
    assert r.exit_code == 127 and "not found" in r.stderr


def test_run_stderr_and_binary_output(client, vm) -> None:
    r = client.vms.run(vm.id, command="printf 'line1\\nline2\\n' >&2")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "", "line1\nline2\n")
    r = client.vms.run(vm.id, command="printf 'caf\\303\\251 \\377'")
    assert r.stdout == "café \ufffd"  # UTF-8 decoded, invalid bytes replaced


def test_run_timeout_sec(client, vm) -> None:
    start = time.monotonic()
    r = client.vms.run(vm.id, command="echo started; sleep 30; echo never", timeout_sec=1)
    elapsed = time.monotonic() - start
    assert r.timed_out is True
    assert r.exit_code != 0
    assert r.stdout == "started\n"
    assert elapsed < 15
    assert 900 <= r.duration_ms < 15000


def test_run_output_cap(client, vm) -> None:
    r = client.vms.run(vm.id, command="head -c 5000000 /dev/zero | tr '\\0' y")
    assert r.exit_code == 0
    assert r.stdout_truncated is True and r.stderr_truncated is False
    assert len(r.stdout) == 4 * 1024 * 1024 and set(r.stdout) == {"y"}


# -- stream -------------------------------------------------------------------------


def test_stream_yields_typed_events(client, vm) -> None:
    events = list(client.vms.stream(vm.id, command="echo out1; echo err1 >&2; sleep 0.3; echo out2; exit 7"))
    out, err, x = _collect(events)
    assert out == b"out1\nout2\n"
    assert err == b"err1\n"
    assert x.exit_code == 7
    assert x.timed_out is False
    assert isinstance(x.duration_ms, int) and x.duration_ms >= 300
    assert x.data == b"" and x.diagnostic == ""
    for e in events[:-1]:
        assert e.exit_code is None and e.duration_ms is None and e.data


def test_stream_list_command_and_raw_bytes(client, vm) -> None:
    events = list(client.vms.stream(vm.id, command=["python3", "-c", "import sys; sys.stdout.buffer.write(bytes(range(256)))"]))
    out, err, x = _collect(events)
    assert out == bytes(range(256))  # base64-decoded, not UTF-8 mangled
    assert err == b"" and x.exit_code == 0


def test_stream_is_incremental(client, vm) -> None:
    start = time.monotonic()
    first_at = None
    seen = []
    for event in client.vms.stream(vm.id, command="echo first; sleep 2; echo second"):
        if event.type == "o" and first_at is None:
            first_at = time.monotonic() - start
        seen.append(event)
    total = time.monotonic() - start
    out, _, x = _collect(seen)
    assert out == b"first\nsecond\n"
    assert first_at is not None and first_at < total - 1.5, (first_at, total)
    assert x.duration_ms >= 2000


def test_stream_timeout_sec(client, vm) -> None:
    events = list(client.vms.stream(vm.id, command="echo tick; sleep 30", timeout_sec=1))
    out, _, x = _collect(events)
    assert out == b"tick\n"
    assert x.timed_out is True and x.exit_code != 0


def test_stream_has_no_output_cap(client, vm) -> None:
    size = 5_000_000
    total = 0
    last = None
    for event in client.vms.stream(vm.id, command=f"head -c {size} /dev/zero | tr '\\0' y"):
        if event.type == "o":
            total += len(event.data)
        last = event
    assert total == size
    assert last.type == "x" and last.exit_code == 0


def test_stream_missing_program_reports_exit_127(client, vm) -> None:
    out, err, x = _collect(list(client.vms.stream(vm.id, command=["no-such-program-xyz"])))
    assert x.exit_code == 127
    assert b"no-such-program-xyz" in err or "no-such-program-xyz" in x.diagnostic
