"""Every operation of the spec, walked against the Python SDK and the OpenAPI document.

The spec is the SDK reference (``fastvm-sdk-reference.txt``, outside the repo); its
machine-readable extract ``spec_operations.json`` is committed beside this file and
kept equal to the spec by ``test_extract_matches_the_spec`` (see ``spec_extract.py``).

For **every** operation of the spec:

* the SDK method exists on both clients, with the spec's parameter names in the
  spec's order, the same required / optional split and defaults, positional or
  keyword-only as the spec's signature says, and the spec's return type; any
  parameter the SDK adds has a default;
* called through a fake transport, the SDK sends the spec's HTTP method to the
  spec's path and every parameter under its wire name (query for GET, else body).

For every operation the server **serves** (present in ``openapi/fastvm.json``):

* the OpenAPI operation has the spec's summary, path parameters, query / body
  properties with the same required split (and defaults, where both give one),
  and answers the spec's schema;
* every field the spec lists for that schema is in the OpenAPI schema, and every
  property of the OpenAPI schema (nested schemas too) is a field of the SDK model,
  so a server field never lands in ``.extra``.

Operations the server does not serve yet are listed in :data:`NOT_SERVED`, the
one place to edit when a route lands: the test fails while a served operation is
still listed (and while an unserved one is not), and then checks it against
OpenAPI too. Server routes beyond the spec must be in :data:`EXTENSIONS` (with the
SDK method that calls them) or :data:`NOT_OPERATIONS` (routes that are no SDK
operation, such as the console WebSocket).
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, quote

import httpx
import pytest

import fastvm
from fastvm import AsyncFastvmClient, FastvmClient
from fastvm._model import Model, camel

from . import spec_extract

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[2]
EXTRACT: dict[str, Any] = json.loads((HERE / "spec_operations.json").read_text())
OPENAPI: dict[str, Any] = json.loads((REPO_ROOT / "openapi" / "fastvm.json").read_text())
OPERATIONS: dict[str, dict[str, Any]] = EXTRACT["operations"]

# Spec operations the server does not serve yet. Remove an entry when its route
# lands in openapi/fastvm.json (this test says which); from then on the operation
# is checked against the OpenAPI document as well as the SDK.
NOT_SERVED: frozenset[str] = frozenset()

# Server operations beyond the spec: (method, path) -> the SDK method that calls it.
EXTENSIONS: dict[tuple[str, str], str] = {
    ("POST", "/v1/vms/{id}/files/export"): "vms.files.export",
    ("GET", "/v1/ssh-gateway"): "me.ssh_gateway",
    ("POST", "/v1/vms/{id}/fork"): "vms.fork",
}

# Server routes that are not SDK operations, and why.
NOT_OPERATIONS: dict[tuple[str, str], str] = {
    # The spec names it only as ConsoleTokenResponse.websocket_path (a URL the
    # caller opens with a WebSocket client), not as an SDK method.
    ("GET", "/v1/vms/{id}/console"): "the console WebSocket of websocket_path",
    # Cluster operators' routes (admin key), used by `fastvm workers ls|drain`.
    ("GET", "/v1/admin/workers"): "operator route: `fastvm workers ls`",
    ("POST", "/v1/admin/workers/{id}/drain"): "operator route: `fastvm workers drain ID`",
    # An import's build log as text (`fastvm import logs ID`); the spec has no method for it.
    ("GET", "/v1/snapshot-imports/{id}/logs"): "build log text: `fastvm import logs ID`",
}

# Operations whose HTTP line the spec's page lost (no "METHOD/path" line before
# the signature), completed from their siblings' paths. bucket_mounts.rotate has
# no sibling to infer from: PATCH, the verb of an in-place partial change.
SPEC_GAPS: dict[str, tuple[str, str]] = {
    "vms.services.delete": ("DELETE", "/v1/vms/{id}/services/{serviceName}"),
    "vms.bucket_mounts.delete": ("DELETE", "/v1/vms/{id}/bucket-mounts/{bucketMountId}"),
    "vms.bucket_mounts.rotate": ("PATCH", "/v1/vms/{id}/bucket-mounts/{bucketMountId}"),
}

# Where the spec contradicts itself, the reading this SDK follows.
SPEC_QUIRKS: dict[tuple[str, str], str] = {
    # "Default: required", but described as "Optional human-readable label ... If
    # omitted, the import id is used."
    ("snapshot_imports.create", "name"): "optional",
}

# Parameters of the spec's overrides and helpers that shape the client's
# behaviour (polling, HTTP timeout, retries) and are never sent.
CLIENT_SIDE = frozenset({"wait", "poll_interval", "wait_timeout", "timeout", "max_retries"})

EMPTY = inspect.Parameter.empty


# -- helpers -------------------------------------------------------------------------


def http_of(name: str) -> tuple[str, str] | None:
    op = OPERATIONS[name]
    if op["method"]:
        return op["method"], op["path"]
    return SPEC_GAPS.get(name)


def openapi_operation(method: str, path: str) -> dict[str, Any] | None:
    return OPENAPI["paths"].get(path, {}).get(method.lower())


def served(name: str) -> bool:
    http = http_of(name)
    return http is not None and openapi_operation(*http) is not None


def resolve(client: Any, dotted: str) -> Callable[..., Any]:
    obj = client
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def explicit_style(op: dict[str, Any]) -> bool:
    """Overrides and helpers spell out ``*`` and defaults in their signature;
    the generated signatures list every field positionally without defaults."""
    return any(p["keyword_only"] or "default" in p for p in op["signature"])


def path_params(op_name: str) -> list[str]:
    http = http_of(op_name)
    return re.findall(r"\{(\w+)\}", http[1]) if http else []


def expectation(op_name: str, param: dict[str, Any]) -> tuple[str, Any]:
    """("default", value) / ("required", None) / ("optional", None) for a spec
    parameter; ("unspecified", None) for one the page's Parameters block lost
    (in the signature only, e.g. the firewall blocks, snapshot_imports' source)."""
    name = param["name"]
    quirk = SPEC_QUIRKS.get((op_name, name))
    if quirk:
        return quirk, None
    if "default" in param:
        return "default", param["default"]
    listed = OPERATIONS[op_name]["parameters"].get(name, {})
    if "default" in listed:
        return "default", listed["default"]
    if listed.get("required") or camel(name) in path_params(op_name) or explicit_style(OPERATIONS[op_name]):
        return "required", None
    if not listed:
        return "unspecified", None
    return "optional", None


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def wire_params(op_name: str) -> list[dict[str, Any]]:
    op = OPERATIONS[op_name]
    pp = path_params(op_name)
    return [p for p in op["signature"] if p["name"] not in CLIENT_SIDE and camel(p["name"]) not in pp]


def dummy(type_: str, name: str) -> Any:
    """A value of the spec type ``type_`` for a fake call."""
    t = type_.replace(" | None", "").strip()
    if t.startswith('"'):
        return t.split('"')[1]
    return {
        "str": f"{name}-value",
        "int": 7,
        "float": 1.5,
        "bool": True,
        "MachineType": "c1m2",
        "VMStatus": "running",
        "str | Sequence[str]": "true",
        "unknown": None,
    }.get(t, {"k": "v"} if t.startswith("dict") or t in ("Metadata", "EnvVars") else {})


def returns_of(op: dict[str, Any]) -> Any:
    r = op["returns"] or ""
    return [] if r.endswith("[]") else {"id": "id-1", "status": "running"}


class Recorder:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return httpx.Response(200, json=self.answer)


def schema_of(ref_or_schema: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    ref = ref_or_schema.get("$ref")
    if ref:
        name = ref.rsplit("/", 1)[-1]
        return name, OPENAPI["components"]["schemas"][name]
    return None, ref_or_schema


def success_schema(op: dict[str, Any]) -> dict[str, Any] | None:
    for status, response in sorted(op["responses"].items()):
        if status.startswith("2"):
            return response.get("content", {}).get("application/json", {}).get("schema")
    return None


def sdk_model(schema_name: str) -> type[Model] | None:
    """The SDK model of an OpenAPI schema (names differ only in case: VM / Vm, TTL / Ttl)."""
    for attr in dir(fastvm.models):
        value = getattr(fastvm.models, attr)
        if attr.lower() == schema_name.lower() and isinstance(value, type) and issubclass(value, Model):
            return value
    return None


def model_wire_names(model: type[Model]) -> set[str]:
    return {wire for _, wire, _ in model._fields()}


def object_refs(schema: dict[str, Any]) -> list[str]:
    """Schema names referenced by ``schema``'s properties (through arrays, unions)."""
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                out.append(node["$ref"].rsplit("/", 1)[-1])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema.get("properties", {}))
    return out


# -- the extract is the spec -----------------------------------------------------------


def test_extract_matches_the_spec() -> None:
    path = spec_extract.spec_path()
    if not path.is_file():
        msg = f"the spec is not at {path} (set FASTVM_SPEC); cannot check spec_operations.json against it"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " [CI=true: the spec must be present]", pytrace=False)
        pytest.skip(msg)
    fresh = spec_extract.extract(path)
    assert spec_extract.dumps(fresh) == spec_extract.dumps(EXTRACT), (
        "sdk/python/tests/spec_operations.json no longer matches the spec; regenerate it with "
        "`.venv/bin/python sdk/python/tests/spec_extract.py > sdk/python/tests/spec_operations.json`"
    )


def test_extract_is_complete() -> None:
    # A parser regression must not silently shrink what is checked.
    assert len(OPERATIONS) >= 51
    assert {"vms.launch", "vms.run", "vms.files.fetch", "snapshots.create", "upload", "download"} <= set(OPERATIONS)
    assert len(EXTRACT["types"]["VM"]["fields"]) >= 20
    for name, op in OPERATIONS.items():
        assert op["kind"] == "helper" or http_of(name) or name in NOT_SERVED, f"{name}: no HTTP method/path (add it to SPEC_GAPS)"


# -- served or not: one list -------------------------------------------------------------


def test_not_served_lists_exactly_the_operations_missing_from_openapi() -> None:
    missing = {name for name, op in OPERATIONS.items() if op["kind"] != "helper" and not served(name)}
    now_served = sorted(NOT_SERVED - missing)
    assert not now_served, f"now served by the server: remove {now_served} from NOT_SERVED"
    unlisted = sorted(missing - NOT_SERVED)
    assert not unlisted, f"spec operations missing from openapi/fastvm.json: {unlisted} (serve them, or list them in NOT_SERVED)"
    assert NOT_SERVED <= set(OPERATIONS), f"not spec operations: {sorted(NOT_SERVED - set(OPERATIONS))}"


def test_every_openapi_operation_is_in_the_spec_or_a_listed_extension() -> None:
    spec_routes = {http_of(name) for name in OPERATIONS if http_of(name)}
    for path, item in OPENAPI["paths"].items():
        for method in item:
            key = (method.upper(), path)
            assert key in spec_routes or key in EXTENSIONS or key in NOT_OPERATIONS, (
                f"{method.upper()} {path} is neither in the spec nor in EXTENSIONS / NOT_OPERATIONS"
            )
    for key in NOT_OPERATIONS:
        assert openapi_operation(*key) is not None, f"{key} is listed in NOT_OPERATIONS but not served"


# -- every operation against the SDK -------------------------------------------------------


@pytest.mark.parametrize("cls", [FastvmClient, AsyncFastvmClient], ids=["sync", "async"])
@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_sdk_signature(name: str, cls: type) -> None:
    op = OPERATIONS[name]
    fn = resolve(cls(api_key="k"), name)
    params = inspect.signature(fn).parameters
    spec_names = [p["name"] for p in op["signature"]]
    missing = [n for n in spec_names if n not in params]
    assert not missing, f"{name}: SDK lacks spec parameters {missing}"
    # Positional parameters in the spec's order (keyword-only ones may come in any order).
    positional = [n for n, p in params.items() if n in spec_names and p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert positional == spec_names[: len(positional)], f"{name}: positional parameters {positional}, spec order {spec_names}"
    pp = path_params(name)
    for p in op["signature"]:
        sdk = params[p["name"]]
        if explicit_style(op):
            kw_only = sdk.kind is inspect.Parameter.KEYWORD_ONLY
            assert kw_only == p["keyword_only"], f"{name}({p['name']}): keyword-only is {kw_only}, spec says {p['keyword_only']}"
        elif camel(p["name"]) in pp:
            assert sdk.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, f"{name}({p['name']}): a path parameter must be positional"
        kind, value = expectation(name, p)
        if kind == "default":
            assert sdk.default is not EMPTY and same_value(sdk.default, value), f"{name}({p['name']}): default {sdk.default!r}, spec {value!r}"
        elif kind == "required":
            assert sdk.default is EMPTY, f"{name}({p['name']}) is required by the spec but has a default {sdk.default!r}"
        elif kind == "optional":
            assert sdk.default is not EMPTY, f"{name}({p['name']}) is optional in the spec but required by the SDK"
    for extra in (n for n in params if n not in spec_names):
        assert params[extra].default is not EMPTY, f"{name}: the SDK's own parameter {extra} must have a default"
        assert params[extra].kind is inspect.Parameter.KEYWORD_ONLY, f"{name}: the SDK's own parameter {extra} must be keyword-only"


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_sdk_return_type(name: str) -> None:
    op = OPERATIONS[name]
    spec = (op["returns"] or "None").replace(" ", "")
    spec = re.sub(r"^(\w+)\[\]$", r"List[\1]", spec)
    for cls, expected in ((FastvmClient, spec), (AsyncFastvmClient, spec.replace("Iterator[", "AsyncIterator["))):
        fn = resolve(cls(api_key="k"), name)
        annotation = str(inspect.signature(fn).return_annotation).replace(" ", "").replace("typing.", "")
        assert annotation == expected, f"{cls.__name__}.{name} returns {annotation}, spec {expected}"


@pytest.mark.parametrize("name", sorted(n for n in OPERATIONS if http_of(n)))
def test_sdk_sends_the_spec_request(name: str) -> None:
    op = OPERATIONS[name]
    method, template = http_of(name)
    recorder = Recorder(returns_of(op))
    client = FastvmClient(api_key="k", base_url="http://fastvm.test", http_client=httpx.Client(transport=httpx.MockTransport(recorder)))
    pp = path_params(name)
    args, kwargs = [], {}
    for p in op["signature"]:
        if p["name"] in CLIENT_SIDE:
            continue
        value = dummy(p["type"], p["name"])
        if camel(p["name"]) in pp:
            args.append(value)
        else:
            kwargs[p["name"]] = value
    resolve(client, name)(*args, **kwargs)
    assert len(recorder.requests) == 1, f"{name}: {len(recorder.requests)} requests"
    request = recorder.requests[0]
    values = {camel(p["name"]): dummy(p["type"], p["name"]) for p in op["signature"]}
    path = re.sub(r"\{(\w+)\}", lambda m: quote(str(values[m.group(1)]), safe=""), template)
    assert (request.method, request.url.raw_path.decode().split("?")[0]) == (method, path)
    sent = parse_qs(request.url.query.decode()) if method == "GET" else (json.loads(request.content) if request.content else {})
    for p in wire_params(name):
        assert camel(p["name"]) in sent, f"{name}: {p['name']} not sent as {camel(p['name'])!r} (sent {sorted(sent)})"


@pytest.mark.parametrize("name", sorted(n for n, t in EXTRACT["types"].items() if t["kind"] == "object"))
def test_sdk_model_has_the_spec_fields(name: str) -> None:
    model = getattr(fastvm, name, None)
    assert isinstance(model, type) and issubclass(model, Model) or name in ("Metadata", "EnvVars"), f"no SDK model {name}"
    if name in ("Metadata", "EnvVars"):
        return
    missing = sorted(camel(f) for f in EXTRACT["types"][name]["fields"] if camel(f) not in model_wire_names(model))
    assert not missing, f"SDK model {name} lacks spec fields {missing}"


# -- served operations against OpenAPI ----------------------------------------------------


SERVED = sorted(n for n in OPERATIONS if served(n))


def test_served_operations_are_many() -> None:
    assert len(SERVED) >= 20


@pytest.mark.parametrize("name", SERVED)
def test_openapi_operation(name: str) -> None:
    op = OPERATIONS[name]
    method, path = http_of(name)
    api = openapi_operation(method, path)
    if op["kind"] == "generated":
        assert api.get("summary") == op["description"], f"{name}: summary {api.get('summary')!r}, spec {op['description']!r}"
    api_params = {(p["name"], p["in"]): p for p in api.get("parameters", [])}
    for placeholder in path_params(name):
        assert (placeholder, "path") in api_params, f"{name}: no path parameter {placeholder}"
    body_schema: dict[str, Any] = {}
    if "requestBody" in api:
        _, body_schema = schema_of(api["requestBody"]["content"]["application/json"]["schema"])
    for p in wire_params(name):
        wire = camel(p["name"])
        kind, value = expectation(name, p)
        if method == "GET":
            qp = api_params.get((wire, "query"))
            assert qp is not None, f"{name}: no query parameter {wire}"
            if kind != "unspecified":
                assert bool(qp.get("required")) == (kind == "required"), f"{name}: query {wire} required={qp.get('required')}, spec {kind}"
            continue
        props = body_schema.get("properties", {})
        assert wire in props, f"{name}: request body has no {wire} (has {sorted(props)})"
        required = wire in body_schema.get("required", [])
        if kind != "unspecified":
            assert required == (kind == "required"), f"{name}: body {wire} required={required}, spec says {kind}"
        if kind == "default" and "default" in props[wire]:
            assert same_value(props[wire]["default"], value), f"{name}: body {wire} default {props[wire]['default']!r}, spec {value!r}"


@pytest.mark.parametrize("name", [n for n in SERVED if OPERATIONS[n]["returns"]])
def test_openapi_answers_the_spec_schema(name: str) -> None:
    op = OPERATIONS[name]
    api = openapi_operation(*http_of(name))
    schema = success_schema(api)
    assert schema is not None, f"{name}: no JSON success response"
    spec_type = op["returns"]
    if spec_type.endswith("[]"):
        assert schema.get("type") == "array", f"{name}: spec answers a list, OpenAPI {schema}"
        schema, spec_type = schema["items"], spec_type[:-2]
    schema_name, resolved = schema_of(schema)
    assert schema_name and schema_name.lower() == spec_type.lower(), f"{name}: answers {schema_name}, spec {spec_type}"
    spec_fields = EXTRACT["types"].get(spec_type, {}).get("fields", {})
    missing = sorted(camel(f) for f in spec_fields if camel(f) not in resolved.get("properties", {}))
    assert not missing, f"{name}: OpenAPI schema {schema_name} lacks spec fields {missing}"


def served_response_schemas() -> list[str]:
    """Every schema a served operation (or an extension) answers, nested ones included."""
    roots: list[str] = []
    ops = [openapi_operation(*http_of(n)) for n in SERVED]
    for op in ops:
        schema = success_schema(op) or {}
        schema = schema.get("items", schema)
        name, _ = schema_of(schema)
        if name:
            roots.append(name)
    seen: list[str] = []
    while roots:
        name = roots.pop()
        if name in seen:
            continue
        seen.append(name)
        roots.extend(object_refs(OPENAPI["components"]["schemas"][name]))
    return sorted(seen)


@pytest.mark.parametrize("schema_name", [s for s in served_response_schemas() if OPENAPI["components"]["schemas"][s].get("properties")])
def test_sdk_model_has_every_field_the_server_sends(schema_name: str) -> None:
    model = sdk_model(schema_name)
    assert model is not None, f"no SDK model for the OpenAPI schema {schema_name}"
    props = set(OPENAPI["components"]["schemas"][schema_name]["properties"])
    missing = sorted(props - model_wire_names(model))
    assert not missing, f"SDK model {model.__name__} lacks {missing} (they would land in .extra)"


# -- extensions -------------------------------------------------------------------------------


@pytest.mark.parametrize("route", sorted(EXTENSIONS))
def test_extension_is_served_and_called_by_the_sdk(route: tuple[str, str]) -> None:
    method, path = route
    api = openapi_operation(method, path)
    assert api is not None, f"extension {method} {path} is not served"
    assert "extension" in (api.get("description", "") + api.get("summary", "")).lower(), f"{method} {path}: document it as an extension"
    fn = resolve(FastvmClient(api_key="k"), EXTENSIONS[route])
    assert "extension" in (fn.__doc__ or "").lower(), f"{EXTENSIONS[route]}: the docstring must say it is an extension"
    declared_body = api.get("requestBody")
    _, body_schema = schema_of(declared_body["content"]["application/json"]["schema"]) if declared_body else (None, {})
    kwargs = {re.sub(r"([A-Z])", r"_\1", p).lower(): "/x" for p in body_schema.get("required", [])}
    recorder = Recorder({})
    client = FastvmClient(api_key="k", base_url="http://fastvm.test", http_client=httpx.Client(transport=httpx.MockTransport(recorder)))
    placeholders = re.findall(r"\{(\w+)\}", path)
    resolve(client, EXTENSIONS[route])(*[f"{p}-1" for p in placeholders], **kwargs)
    request = recorder.requests[0]
    expected = re.sub(r"\{(\w+)\}", lambda m: f"{m.group(1)}-1", path)
    assert (request.method, request.url.raw_path.decode()) == (method, expected)
    assert set(json.loads(request.content or b"{}")) <= set(body_schema.get("properties", {}))
