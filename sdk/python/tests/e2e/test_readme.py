"""The Quickstart of sdk/python/README.md, run against the live server.

Every ```python block of the "## Quickstart" section (its subsections included)
is executed as written, in order, with FASTVM_API_KEY / FASTVM_BASE_URL set the
way the Quickstart's shell block tells the user to. Its printed output is checked.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def section_blocks(text: str, heading: str, lang: str) -> list[str]:
    """The ```lang blocks under the level-2 ``heading`` (until the next level-2
    heading), ignoring '#' lines inside code fences."""
    blocks: list[str] = []
    in_section = False
    fence: str | None = None
    current: list[str] = []
    for line in text.splitlines():
        if fence is None:
            if line.startswith("```"):
                fence = line[3:].strip()
                current = []
            elif line.startswith("## "):
                in_section = line[3:].strip() == heading
        elif line.startswith("```"):
            if in_section and fence == lang:
                blocks.append("\n".join(current) + "\n")
            fence = None
        else:
            current.append(line)
    return blocks


def test_readme_has_install_and_quickstart() -> None:
    text = README.read_text()
    install = section_blocks(text, "Install", "shell")
    assert install and "pip install fastvm" in install[0]
    shell = section_blocks(text, "Quickstart", "shell")
    assert shell and "fastvm serve" in shell[0] and "admin-api-key" in shell[0]
    assert len(section_blocks(text, "Quickstart", "python")) >= 2


def test_readme_quickstart_runs(client, fastvm_server, capsysbinary) -> None:
    blocks = section_blocks(README.read_text(), "Quickstart", "python")
    assert len(blocks) >= 2
    before = {v.id for v in client.vms.list()}

    for i, code in enumerate(blocks):
        namespace: dict = {"__name__": f"readme_quickstart_{i}"}
        exec(compile(code, f"{README}:quickstart[{i}]", "exec"), namespace)

    import sys

    sys.stdout.flush()
    captured = capsysbinary.readouterr()
    out = captured.out.decode()
    assert captured.err == b""
    lines = out.splitlines()
    # print(vm.id, vm.status)
    assert re.fullmatch(r"[0-9a-f-]{36} running", lines[0]), out
    # run with a str (hostname expands in the guest) and with an argv list
    assert re.search(r"^0 hello from vm-[0-9a-f]+$", out, re.M), out
    assert "\n42\n" in out
    # stream
    assert "1\n2\n3\n" in out
    assert re.search(r"^exit 0 in \d+ ms$", out, re.M), out
    # delete
    assert "\nTrue\n" in out
    # async block: uname -sn
    assert re.search(r"^Linux vm-[0-9a-f]+$", out, re.M), out

    # The Quickstart cleans up after itself: no VM left behind.
    assert {v.id for v in client.vms.list()} == before
