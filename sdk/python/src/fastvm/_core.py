"""Request core shared by the sync and async clients.

Everything that does not do I/O lives here once: configuration, request building,
error mapping, the retry policy, response parsing, request-body conversion, and the
VM readiness rule. ``FastvmClient`` / ``AsyncFastvmClient`` only add the loop that
sends (with ``time.sleep`` or ``asyncio.sleep`` between attempts).
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Mapping, Optional, Sequence, Type, TypeVar, Union
from urllib.parse import quote

import httpx

from ._exceptions import APIStatusError, status_error_class
from ._model import Model, camel
from ._version import __version__

__all__ = ["NOT_GIVEN", "NotGiven", "BaseClient", "DEFAULT_BASE_URL", "DEFAULT_TIMEOUT"]

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RETRIES = 2

# Server-side limits of the long operations, in seconds. The HTTP read timeout of
# such a call is its server limit plus TIMEOUT_MARGIN, so the server answers (with
# its own timeout result) before the client gives up; an operation the server does
# not bound gets no read timeout at all (``None``).
#
# files.fetch / files.export without ``timeout_sec``: the server's default
# (``FILE_TRANSFER_DEFAULT_TIMEOUT_SEC`` in crates/fastvm-types/src/files.rs, the
# ``default`` of ``timeoutSec`` in the OpenAPI document).
FILE_TRANSFER_DEFAULT_TIMEOUT_SEC = 600
# Exec without ``timeout_sec`` and snapshot capture: the server sets no time
# limit, it answers when the command exits / the capture is done.
UNBOUNDED = None
TIMEOUT_MARGIN = 30.0
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})

M = TypeVar("M", bound=Model)
TimeoutTypes = Union[float, httpx.Timeout, None]


class NotGiven:
    """Sentinel for "argument not given", distinct from an explicit ``None``."""

    _instance: NotGiven | None = None

    def __new__(cls) -> NotGiven:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN = NotGiven()


def path_segment(value: str) -> str:
    """URL-encode one path segment (``SHA256:a+b/c`` -> ``SHA256%3Aa%2Bb%2Fc``)."""
    return quote(str(value), safe="")


def to_wire(value: Any, model: Type[Model] | None = None) -> Any:
    """Convert a request-body value to its wire form.

    Model instances -> ``to_dict()``; plain dicts given where a model is expected go
    through ``model.from_dict`` so snake_case or camelCase keys both work and
    unknown keys pass through unchanged; lists are converted item by item.
    """
    if isinstance(value, Model):
        return value.to_dict()
    if model is not None and isinstance(value, Mapping):
        return model.from_dict(value).to_dict()
    if isinstance(value, (list, tuple)):
        return [to_wire(v, model) for v in value]
    return value


def body(**fields: Any) -> dict[str, Any]:
    """Build a JSON body: camelCase keys, values not given (``None`` or ``NOT_GIVEN``) dropped."""
    return {camel(k): to_wire(v) for k, v in fields.items() if v is not None and v is not NOT_GIVEN}


def normalize_command(command: str | Sequence[str]) -> list[str]:
    """``"ls -la"`` -> ``["sh", "-c", "ls -la"]``; argv sequences pass through."""
    if isinstance(command, str):
        return ["sh", "-c", command]
    if isinstance(command, (bytes, bytearray)):
        raise TypeError("command must be a str or a sequence of str, not bytes")
    argv = list(command)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise TypeError("command must be a non-empty str or a non-empty sequence of str")
    return argv


def exec_body(command: str | Sequence[str], timeout_sec: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {"command": normalize_command(command)}
    if timeout_sec is not None:
        out["timeoutSec"] = timeout_sec
    return out


# A VM in one of these statuses will never become running on its own.
VM_TERMINAL_FAILURE = frozenset({"error", "stopped", "deleting"})


def vm_readiness(status: str | None) -> str:
    """``"ready"``, ``"failed"`` or ``"pending"`` (unknown statuses count as in transition)."""
    if status == "running":
        return "ready"
    if status in VM_TERMINAL_FAILURE:
        return "failed"
    return "pending"


class Page(list):  # type: ignore[type-arg]
    """A list answered by a paginated GET (extension, not in the spec): the
    items, plus ``next_cursor``, the ``X-Next-Cursor`` response header: pass
    it as ``cursor`` for the next page (``None`` on the last page)."""

    next_cursor: Optional[str] = None


def as_page(items: Any, response: httpx.Response) -> Page:
    """``items`` as a :class:`Page` carrying the response's next cursor."""
    page = Page(items or [])
    page.next_cursor = response.headers.get("X-Next-Cursor")
    return page


def parse(data: Any, cast: Type[M] | None, many: bool = False) -> Any:
    if cast is None or data is None:
        return data
    if many:
        return [cast.from_dict(item) for item in data]
    return cast.from_dict(data)


def decode_json(response: httpx.Response) -> Any:
    if response.status_code == 204 or not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text


def make_status_error(response: httpx.Response) -> APIStatusError:
    """Map an error response to the matching ``APIStatusError`` subclass."""
    try:
        payload: Any = json.loads(response.content) if response.content else None
    except ValueError:
        payload = response.text
    code: str | None = None
    message: str | None = None
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict):
            code = err.get("code")
            message = err.get("message")
        elif isinstance(err, str):
            message = err
        message = message or payload.get("message")
    elif isinstance(payload, str) and payload.strip():
        message = payload.strip()
    if not message:
        message = response.reason_phrase or f"HTTP {response.status_code}"
    cls = status_error_class(response.status_code)
    return cls(response.status_code, code, message, payload, response=response)


class BaseClient:
    """Configuration and the I/O-free parts of a request."""

    # Backoff between retries: base * 2**attempt, capped, with jitter.
    retry_base_delay = 0.5
    retry_max_delay = 8.0

    def __init__(
        self,
        api_key: str | None,
        base_url: str | None,
        timeout: TimeoutTypes,
        max_retries: int,
    ) -> None:
        self.api_key = api_key if api_key is not None else os.environ.get("FASTVM_API_KEY")
        base = base_url or os.environ.get("FASTVM_BASE_URL") or DEFAULT_BASE_URL
        self.base_url = base.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries

    # -- building --------------------------------------------------------------

    def _headers(self, extra: Mapping[str, str] | None = None, *, auth: bool = True) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": f"fastvm-python/{__version__}"}
        if auth and self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if extra:
            headers.update(extra)
        return headers

    def _url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def _external_url(self, url: str) -> str:
        """Signed URLs may be absolute (object storage) or relative to the API host."""
        return self._url(url)

    def _timeout(self, timeout: TimeoutTypes | NotGiven) -> TimeoutTypes:
        return self.timeout if isinstance(timeout, NotGiven) else timeout

    def _operation_timeout(self, server_limit_sec: float | None) -> TimeoutTypes:
        """The HTTP timeout of a call the server bounds at ``server_limit_sec``
        seconds (``None``: not bounded): the client's timeout with the read timeout
        raised to the server's limit plus :data:`TIMEOUT_MARGIN`, so a long
        operation never times out on the client while the server still works on it."""
        return self._extended_timeout(None if server_limit_sec is None else server_limit_sec + TIMEOUT_MARGIN)

    def _extended_timeout(self, read: float | None) -> TimeoutTypes:
        """The client's timeout with the read timeout raised to ``read`` seconds
        (``None``: wait as long as the server keeps the request open). Used for calls
        whose duration is bounded server-side (exec, fetch, streams)."""
        if self.timeout is None:
            return None
        base = self.timeout if isinstance(self.timeout, httpx.Timeout) else httpx.Timeout(self.timeout)
        if read is not None and base.read is not None and base.read >= read:
            return base
        return httpx.Timeout(connect=base.connect, read=read, write=base.write, pool=base.pool)

    def _request_kwargs(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: TimeoutTypes | NotGiven = NOT_GIVEN,
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "method": method,
            "url": self._url(path),
            "headers": self._headers(headers),
            "timeout": self._timeout(timeout),
        }
        if params:
            kwargs["params"] = {k: v for k, v in params.items() if v is not None}
        if json_body is not None:
            kwargs["json"] = json_body
        return kwargs

    # -- retry policy ----------------------------------------------------------

    def _max_retries_for(self, method: str, max_retries: int | None) -> int:
        """Explicit per-call value wins; else idempotent methods get the client default, others 0."""
        if max_retries is not None:
            return max_retries
        return self.max_retries if method.upper() in IDEMPOTENT_METHODS else 0

    @staticmethod
    def _retryable_response(response: httpx.Response) -> bool:
        return response.status_code >= 500

    @staticmethod
    def _retryable_exception(exc: Exception) -> bool:
        return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))

    def _retry_delay(self, attempt: int) -> float:
        delay = min(self.retry_base_delay * (2**attempt), self.retry_max_delay)
        return delay * (0.75 + random.random() * 0.25)
