-- Bucket mounts (/v1/vms/{id}/bucket-mounts): a customer's bucket mounted in
-- a VM. No credentials here: they live in the worker serving the mount only
-- (a restored mount is `pending` until credentials are given again).
-- Times are Unix milliseconds.

CREATE TABLE bucket_mounts (
    id             TEXT PRIMARY KEY,
    vm_id          TEXT NOT NULL,
    org_id         TEXT NOT NULL REFERENCES orgs(id),
    bucket_uri     TEXT NOT NULL,
    mount_path     TEXT NOT NULL,
    read_only      BIGINT NOT NULL,
    -- mounted | failed | pending
    mount_status   TEXT NOT NULL,
    status_message TEXT,
    created_at_ms  BIGINT NOT NULL
);
CREATE INDEX bucket_mounts_vm ON bucket_mounts(vm_id, created_at_ms);
