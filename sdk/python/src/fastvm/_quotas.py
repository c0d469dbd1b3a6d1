"""client.quotas: organisation limits and usage."""

from __future__ import annotations

from ._resource import Resource
from .models import OrgQuotaUsage


class Quotas(Resource):
    def retrieve(self) -> OrgQuotaUsage:
        """GET /v1/org/quotas."""
        return self._client._call("GET", "/v1/org/quotas", cast=OrgQuotaUsage)
