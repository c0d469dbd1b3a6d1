-- SSH public keys of users (/v1/me/ssh-keys), used by the SSH gateway.
-- A key is identified by its OpenSSH SHA256 fingerprint, unique per user
-- (the same key may be registered by two users; each authorizes only the
-- VMs of its own user's org). `public_key` is `<type> <base64>` without comment.

CREATE TABLE ssh_keys (
    user_id       TEXT NOT NULL REFERENCES users(id),
    org_id        TEXT NOT NULL REFERENCES orgs(id),
    fingerprint   TEXT NOT NULL,
    key_type      TEXT NOT NULL,
    public_key    TEXT NOT NULL,
    name          TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (user_id, fingerprint)
);

CREATE INDEX ssh_keys_fingerprint ON ssh_keys(fingerprint);
