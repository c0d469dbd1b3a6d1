"""Exception hierarchy of the SDK.

    FastvmError
    ├── APIError
    │   ├── APIStatusError            (the server answered with a non-2xx status)
    │   │   ├── BadRequestError           400
    │   │   ├── AuthenticationError       401
    │   │   ├── PermissionDeniedError     403
    │   │   ├── NotFoundError             404
    │   │   ├── ConflictError             409
    │   │   ├── PayloadTooLargeError      413
    │   │   ├── UnprocessableEntityError  422
    │   │   ├── RateLimitError            429
    │   │   └── InternalServerError       5xx
    │   └── APIConnectionError        (no answer: connect failure, broken connection)
    │       └── APITimeoutError
    ├── VMLaunchError                 (the VM reached error / stopped / deleting)
    ├── VMNotReadyError               (polling deadline exceeded)
    ├── FileTransferError             (upload / download failed)
    │   └── UnsafeArchiveError        (a downloaded tar member would escape its destination)
    └── BuildError                    (a snapshot import failed, was cancelled or timed out)

A missing path on ``client.download`` raises the builtin ``FileNotFoundError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

    from .models import VM, SnapshotImportResponse

__all__ = [
    "FastvmError",
    "APIError",
    "APIStatusError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ConflictError",
    "PayloadTooLargeError",
    "UnprocessableEntityError",
    "RateLimitError",
    "InternalServerError",
    "APIConnectionError",
    "APITimeoutError",
    "VMLaunchError",
    "VMNotReadyError",
    "FileTransferError",
    "UnsafeArchiveError",
    "BuildError",
]


class FastvmError(Exception):
    """Base class of every error raised by the SDK."""


class APIError(FastvmError):
    """An HTTP exchange with the API failed."""

    def __init__(self, message: str, *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request


class APIStatusError(APIError):
    """The server answered with a non-success status.

    ``code`` and ``message`` come from the server's error body
    ``{"error": {"code": "SOME_CODE", "message": "..."}}``; ``body`` is the decoded
    JSON body (or the raw text when it was not JSON).
    """

    def __init__(
        self,
        status_code: int,
        code: str | None,
        message: str,
        body: Any = None,
        *,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(message, request=response.request if response is not None else None)
        self.status_code = status_code
        self.code = code
        self.body = body
        self.response = response

    def __str__(self) -> str:
        code = f" {self.code}" if self.code else ""
        return f"HTTP {self.status_code}{code}: {self.message}"


class BadRequestError(APIStatusError):
    """400"""


class AuthenticationError(APIStatusError):
    """401"""


class PermissionDeniedError(APIStatusError):
    """403"""


class NotFoundError(APIStatusError):
    """404"""


class ConflictError(APIStatusError):
    """409"""


class PayloadTooLargeError(APIStatusError):
    """413"""


class UnprocessableEntityError(APIStatusError):
    """422"""


class RateLimitError(APIStatusError):
    """429"""


class InternalServerError(APIStatusError):
    """5xx"""


_STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def status_error_class(status_code: int) -> type[APIStatusError]:
    if status_code >= 500:
        return InternalServerError
    return _STATUS_ERRORS.get(status_code, APIStatusError)


class APIConnectionError(APIError):
    """The request never got an answer (DNS, refused connection, reset, ...)."""

    def __init__(self, message: str = "Connection error.", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class APITimeoutError(APIConnectionError):
    """The request timed out."""

    def __init__(self, message: str = "Request timed out.", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class VMLaunchError(FastvmError):
    """The VM reached a terminal failure status (error, stopped, deleting) while waiting."""

    def __init__(self, vm: VM, message: str | None = None) -> None:
        self.vm = vm
        self.vm_id = vm.id
        self.status = vm.status
        super().__init__(message or f"VM {vm.id} entered terminal status {vm.status!r} before becoming running")


class VMNotReadyError(FastvmError):
    """The VM did not reach ``running`` before the polling deadline."""

    def __init__(self, vm_id: str, last_status: str | None, timeout: float) -> None:
        self.vm_id = vm_id
        self.last_status = last_status
        self.timeout = timeout
        super().__init__(f"VM {vm_id} not running after {timeout:g}s (last status: {last_status!r})")


class FileTransferError(FastvmError):
    """``client.upload`` / ``client.download`` failed.

    ``exit_code`` and ``stderr`` are set when a VM-side step (fetch, tar, curl) failed.
    """

    def __init__(self, message: str, *, exit_code: int | None = None, stderr: str | None = None) -> None:
        self.exit_code = exit_code
        self.stderr = stderr
        if stderr:
            message = f"{message}: {stderr.strip()}"
        super().__init__(message)


class UnsafeArchiveError(FileTransferError):
    """A tar member of a downloaded directory has an absolute path, a ``..`` component,
    or is a link pointing outside the destination; extraction stopped."""


class BuildError(FastvmError):
    """``client.build`` failed: the snapshot import failed, was cancelled, or did not
    finish before the deadline. ``snapshot_import`` is its last known state."""

    def __init__(self, message: str, snapshot_import: SnapshotImportResponse | None = None) -> None:
        self.snapshot_import = snapshot_import
        super().__init__(message)
