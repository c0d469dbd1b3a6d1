"""Base of the namespace classes.

Most endpoint methods are written once and shared by both clients: they return
``self._client._call(...)``, which is the parsed result on ``FastvmClient`` and an
awaitable of it on ``AsyncFastvmClient`` (so ``await client.vms.retrieve(id)``).
Only methods with their own control flow (polling, streaming, transfers) have
separate sync and async versions.
"""

from __future__ import annotations

from typing import Any


class Resource:
    def __init__(self, client: Any) -> None:
        self._client = client
