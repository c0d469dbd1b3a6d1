"""Machine-readable extract of the SDK reference (the spec).

The spec, ``fastvm-sdk-reference.txt``, lives outside the repository: in CI at
``../shared/spec/`` relative to the repository root (``$FASTVM_SPEC`` overrides).
It is the text of the reference's web page, so this parser reads that layout:

* an operation is its signature line, ``client.<name>( <params>, ) -> <Returns>``
  (examples never have a space after the parenthesis), preceded by its heading
  (``client.vms.launch`` + ``override`` / ``helper`` glued on) and its HTTP line
  (``POST/v1/vms``; helpers have none, and a few operations lost theirs);
* then ``Description``, the description, ``Parameters``: per parameter a line
  ``<name><type>``, its description, and ``Default: <value>`` (``required`` for
  a required one; no line when optional without a stated default);
* after the ``Types`` line, each schema: its name, ``object`` / ``enum`` /
  ``primitive``, then its fields as ``<name><type>`` lines with descriptions. The
  page drops the name line of some fields (those whose type was a link), so the
  field list of a schema is a subset of its fields.

The extract is committed as ``spec_operations.json`` beside this file, so the
conformance test (``test_spec_conformance.py``) runs without the spec; that test
also fails when the extract no longer matches the spec. Regenerate it with::

    .venv/bin/python sdk/python/tests/spec_extract.py > sdk/python/tests/spec_operations.json
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[3]
EXTRACT_PATH = Path(__file__).resolve().parent / "spec_operations.json"
SPEC_NAME = "fastvm-sdk-reference.txt"

SIGNATURE = re.compile(r"^client\.(?P<name>[a-z_][\w.]*)\((?P<params>(?:\s.*)?)\)(?:\s*->\s*(?P<returns>.+))?$")
HTTP_LINE = re.compile(r"^(?P<method>GET|POST|PUT|PATCH|DELETE)(?P<path>/\S*)$")
HEADING = re.compile(r"^client\.(?P<name>[a-z_][\w.]*?)(?P<kind>override|helper)?$")
TYPE_KINDS = ("object", "enum", "primitive")
SCALAR_TYPES = ("str", "int", "bool", "float", "unknown", "dict")


def spec_path() -> Path:
    """Where the spec is: ``$FASTVM_SPEC``, else ``../shared/spec/`` beside the repo."""
    explicit = os.environ.get("FASTVM_SPEC")
    if explicit:
        return Path(explicit)
    return REPO_ROOT.parent / "shared" / "spec" / SPEC_NAME


def split_params(text: str) -> list[str]:
    """Split a signature's parameter list on top-level commas."""
    out, depth, current = [], 0, []
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    out.append("".join(current).strip())
    return [p for p in out if p]


def literal(text: str) -> Any:
    """A default as written in the spec (``None``, ``True``, ``2.0``, ``600``,
    ``false``, ``"c1m2"``) as a JSON value."""
    text = text.strip()
    lowered = {"true": True, "false": False, "none": None, "null": None}
    if text.lower() in lowered:
        return lowered[text.lower()]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_signature(params: str) -> list[dict[str, Any]]:
    """``id: str, *, timeout_sec: int | None = None`` -> parameter records."""
    out: list[dict[str, Any]] = []
    keyword_only = False
    for item in split_params(params):
        if item == "*":
            keyword_only = True
            continue
        name, _, rest = item.partition(":")
        type_, eq, default = rest.partition("=")
        record: dict[str, Any] = {"name": name.strip(), "type": type_.strip(), "keyword_only": keyword_only}
        if eq:
            record["default"] = literal(default)
        out.append(record)
    return out


def parse_parameters(lines: list[str], signature: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The ``Parameters`` block: per parameter its type and ``Default:`` value
    (``"required"`` is reported as ``required: true``)."""
    by_line = {p["name"] + p["type"]: p for p in signature}
    out: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in lines:
        param = by_line.get(line)
        if param is None:
            # Types are sometimes rendered differently from the signature.
            param = next((p for p in signature if line.startswith(p["name"]) and p["name"] not in out and _is_type(line[len(p["name"]):])), None)
        if param is not None:
            current = out.setdefault(param["name"], {"type": line[len(param["name"]):]})
            continue
        if current is not None and line.startswith("Default: "):
            value = line[len("Default: "):].strip()
            if value == "required":
                current["required"] = True
            else:
                current["default"] = literal(value)
    return out


def _is_type(text: str, known: frozenset[str] = frozenset()) -> bool:
    if not text:
        return False
    if text in SCALAR_TYPES or text.startswith("list[") or text.startswith('"'):
        return True
    head = text.split("[", 1)[0].split(" ", 1)[0]
    return bool(re.fullmatch(r"[A-Z]\w*", head)) and (not known or head in known or text[0].isupper())


def parse(text: str) -> dict[str, Any]:
    lines = [line.strip() for line in text.splitlines()]
    types_at = lines.index("Types") if "Types" in lines else len(lines)
    operations: dict[str, dict[str, Any]] = {}
    kinds: dict[str, str] = {}
    http: tuple[str, str] | None = None
    i = 0
    while i < types_at:
        line = lines[i]
        heading = HEADING.match(line)
        if heading and not SIGNATURE.match(line):
            kinds[heading["name"]] = heading["kind"] or "generated"
            http = None
        elif m := HTTP_LINE.match(line):
            http = (m["method"], m["path"])
        elif m := SIGNATURE.match(line):
            name = m["name"]
            signature = parse_signature(m["params"])
            # Its Description, then its Parameters block up to Returns / Example.
            j, description, block = i + 1, [], []
            section = None
            while j < types_at and not SIGNATURE.match(lines[j]) and not HEADING.match(lines[j]):
                cur = lines[j]
                if cur in ("Description", "Parameters", "Returns", "Example"):
                    section = cur
                elif cur:
                    if section == "Description":
                        description.append(cur)
                    elif section == "Parameters":
                        block.append(cur)
                j += 1
            operations[name] = {
                "kind": kinds.get(name, "generated"),
                "method": http[0] if http else None,
                "path": http[1] if http else None,
                "description": " ".join(description),
                "signature": signature,
                "parameters": parse_parameters(block, signature),
                "returns": (m["returns"] or "").strip() or None,
            }
            http = None
            i = j
            continue
        i += 1
    return {"source": SPEC_NAME, "operations": operations, "types": parse_types(lines[types_at + 1 :])}


def parse_types(lines: list[str]) -> dict[str, dict[str, Any]]:
    lines = [line for line in lines if line]
    names = [lines[k] for k in range(len(lines) - 1) if lines[k + 1] in TYPE_KINDS and lines[k]]
    known = frozenset(names)
    out: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    k = 0
    while k < len(lines):
        line = lines[k]
        if k + 1 < len(lines) and lines[k + 1] in TYPE_KINDS and line in known:
            current = out[line] = {"kind": lines[k + 1], "fields": {}}
            k += 2
            continue
        if current is not None and current["kind"] == "object":
            field = re.match(r"^([a-z][a-z0-9_]*?)(\S.*)$", line)
            while field:
                name, type_ = field.group(1), field.group(2)
                if _is_type(type_, known) and (type_ in SCALAR_TYPES or type_.startswith(("list[", '"')) or type_.split("[")[0].split(" ")[0] in known):
                    current["fields"][name] = type_
                    break
                # Non-greedy name: try a longer one.
                field = re.match(rf"^({re.escape(name)}[a-z0-9_]+?)(\S.*)$", line)
        k += 1
    return out


def extract(path: Path | None = None) -> dict[str, Any]:
    return parse((path or spec_path()).read_text(encoding="utf-8"))


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(dumps(extract(Path(sys.argv[1]) if len(sys.argv) > 1 else None)))
