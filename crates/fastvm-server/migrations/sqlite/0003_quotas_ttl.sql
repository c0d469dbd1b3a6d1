-- Per-org quota limits (GET /v1/org/quotas, `fastvm orgs quota set`). A NULL
-- column means "the built-in default" (see fastvm_server::store::DEFAULT_QUOTA),
-- so changing a default reaches every org that never overrode it.

CREATE TABLE org_quotas (
    org_id         TEXT PRIMARY KEY REFERENCES orgs(id),
    vcpu           BIGINT,
    memory_mib     BIGINT,
    disk_gib       BIGINT,
    snapshot_count BIGINT,
    volume_count   BIGINT,
    volume_gib     BIGINT,
    updated_at_ms  BIGINT NOT NULL
);

-- The TTL reaper looks for the earliest deadline of running VMs.
CREATE INDEX vms_expires_at ON vms(expires_at_ms);
