-- Snapshots of VMs (POST /v1/snapshots): what the control plane knows of a
-- capture; the memory and disk layers live on the worker (`worker_id`).
-- JSON documents are TEXT; times are Unix milliseconds.

CREATE TABLE snapshots (
    id             TEXT PRIMARY KEY,
    org_id         TEXT NOT NULL REFERENCES orgs(id),
    -- The source VM (it may be deleted since; the snapshot stays restorable).
    vm_id          TEXT NOT NULL,
    worker_id      TEXT NOT NULL,
    name           TEXT NOT NULL,
    -- creating | ready | error
    status         TEXT NOT NULL,
    status_message TEXT,
    machine_name   TEXT NOT NULL,
    cpu            BIGINT NOT NULL,
    memory_mib     BIGINT NOT NULL,
    disk_gib       BIGINT NOT NULL,
    metadata       TEXT NOT NULL,
    env_vars       TEXT NOT NULL,
    firewall       TEXT NOT NULL,
    services       TEXT NOT NULL,
    volumes        TEXT NOT NULL,
    bucket_mounts  TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    deleted_at_ms  BIGINT
);
CREATE INDEX snapshots_org_created ON snapshots(org_id, created_at_ms);
