-- Snapshot imports (/v1/snapshot-imports): an OCI image (or, later, a
-- Dockerfile) turned into a snapshot. No registry password here: it lives in
-- the server's memory between create and the worker's pull only.
-- Times are Unix milliseconds.

CREATE TABLE snapshot_imports (
    id             TEXT PRIMARY KEY,
    org_id         TEXT NOT NULL REFERENCES orgs(id),
    name           TEXT NOT NULL,
    -- pending | claimed | running | succeeded | failed | cancelled
    status         TEXT NOT NULL,
    -- SnapshotImportSourceView as JSON (no secrets)
    source         TEXT NOT NULL,
    -- SnapshotImportEvent[] as JSON, oldest first
    events         TEXT NOT NULL,
    -- build log (capped)
    logs           TEXT NOT NULL,
    worker_id      TEXT,
    snapshot_id    TEXT,
    error          TEXT,
    machine_name   TEXT NOT NULL,
    cpu            BIGINT NOT NULL,
    memory_mib     BIGINT NOT NULL,
    disk_gib       BIGINT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    started_at_ms  BIGINT,
    updated_at_ms  BIGINT NOT NULL,
    finished_at_ms BIGINT,
    deleted_at_ms  BIGINT
);
CREATE INDEX snapshot_imports_org ON snapshot_imports(org_id, created_at_ms);
