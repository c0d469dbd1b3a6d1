-- Managed volumes (/v1/volumes) and their attachments to VMs
-- (/v1/vms/{id}/volumes). A volume's files live on one worker (`worker_id`,
-- set when the volume is created there); times are Unix milliseconds.

CREATE TABLE volumes (
    id               TEXT PRIMARY KEY,
    org_id           TEXT NOT NULL REFERENCES orgs(id),
    name             TEXT NOT NULL,
    -- rw | ro
    access_mode      TEXT NOT NULL,
    size_gib         BIGINT NOT NULL,
    -- non-zero while a resize is in flight
    pending_size_gib BIGINT NOT NULL,
    -- creating | ready | deleting
    status           TEXT NOT NULL,
    worker_id        TEXT,
    created_at_ms    BIGINT NOT NULL
);
CREATE INDEX volumes_org_created ON volumes(org_id, created_at_ms);

CREATE TABLE volume_attachments (
    vm_id          TEXT NOT NULL,
    -- no foreign key: a snapshot restore records an attachment of a volume
    -- deleted since (mount_status failed, with the reason)
    volume_id      TEXT NOT NULL,
    org_id         TEXT NOT NULL REFERENCES orgs(id),
    mount_path     TEXT NOT NULL,
    read_only      BIGINT NOT NULL,
    -- mounted | failed | pending
    mount_status   TEXT NOT NULL,
    status_message TEXT,
    created_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (vm_id, volume_id)
);
CREATE UNIQUE INDEX volume_attachments_path ON volume_attachments(vm_id, mount_path);
CREATE INDEX volume_attachments_volume ON volume_attachments(volume_id);
