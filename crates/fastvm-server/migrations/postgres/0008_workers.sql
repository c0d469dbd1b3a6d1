-- Cluster mode (issue 18): the worker hosts a control plane drives, and what
-- placement needs of snapshots. Single-host servers keep this table empty
-- (their one worker, `local`, is embedded).
--
-- status: ready | unreachable | draining. generation: bumped by every
-- registration; the per-worker token is derived from it, so a request made
-- with an older generation is refused by the worker (fencing).

CREATE TABLE workers (
    id                TEXT PRIMARY KEY,
    address           TEXT NOT NULL,
    status            TEXT NOT NULL,
    generation        BIGINT NOT NULL,
    cpus              BIGINT NOT NULL,
    memory_mib        BIGINT NOT NULL,
    disk_free_gib     BIGINT NOT NULL,
    qemu_build        TEXT NOT NULL,
    accel             TEXT NOT NULL,
    cpu_model         TEXT NOT NULL,
    compat_key        TEXT NOT NULL,
    vm_count          BIGINT NOT NULL,
    last_heartbeat_ms BIGINT NOT NULL,
    registered_at_ms  BIGINT NOT NULL
);
-- Not on last_heartbeat_ms: heartbeats then stay HOT updates.
CREATE INDEX workers_status ON workers(status);

-- Placement sums the live VMs of each candidate worker (VM rows are the
-- reservations); the monitor marks the live VMs of a lost worker.
CREATE INDEX vms_worker_live ON vms(worker_id) WHERE deleted_at_ms IS NULL;

-- compat_key: the capturing worker's compatibility key (QEMU build, accel,
-- CPU model); NULL = restorable only on `worker_id`. stored: 1 when the
-- snapshot is in the shared snapshot store (restorable on any worker with
-- the same compat_key).
ALTER TABLE snapshots ADD COLUMN compat_key TEXT;
ALTER TABLE snapshots ADD COLUMN stored BIGINT NOT NULL DEFAULT 0;
