-- Orgs, users, API keys and VMs. Times are Unix milliseconds; ids are
-- hyphenated UUID strings; JSON documents are TEXT.

CREATE TABLE orgs (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    org_id        TEXT NOT NULL REFERENCES orgs(id),
    name          TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY,
    org_id        TEXT NOT NULL REFERENCES orgs(id),
    user_id       TEXT REFERENCES users(id),
    name          TEXT NOT NULL,
    -- First characters of the token (e.g. "fvm_1a2b3c4d"), to recognise it in lists.
    prefix        TEXT NOT NULL,
    -- Hex SHA-256 of the whole token; the token itself is never stored.
    token_hash    TEXT NOT NULL UNIQUE,
    created_at_ms BIGINT NOT NULL,
    revoked_at_ms BIGINT
);
CREATE INDEX api_keys_org ON api_keys(org_id);

CREATE TABLE vms (
    id               TEXT PRIMARY KEY,
    org_id           TEXT NOT NULL REFERENCES orgs(id),
    worker_id        TEXT NOT NULL,
    name             TEXT NOT NULL,
    machine_name     TEXT NOT NULL,
    source_name      TEXT NOT NULL,
    cpu              BIGINT NOT NULL,
    memory_mib       BIGINT NOT NULL,
    disk_gib         BIGINT NOT NULL,
    status           TEXT NOT NULL,
    status_message   TEXT,
    firewall         TEXT NOT NULL,
    metadata         TEXT NOT NULL,
    env_vars         TEXT NOT NULL,
    ttl_seconds      BIGINT,
    ttl_action       TEXT,
    expires_at_ms    BIGINT,
    ttl_remaining_ms BIGINT,
    created_at_ms    BIGINT NOT NULL,
    paused_at_ms     BIGINT,
    deleted_at_ms    BIGINT,
    -- Optimistic concurrency: every update bumps it and checks the old value.
    version          BIGINT NOT NULL
);
CREATE INDEX vms_org_created ON vms(org_id, created_at_ms);
