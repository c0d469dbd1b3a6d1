-- One-shot console tokens (POST /v1/vms/{id}/console-token). Only the SHA-256
-- of a token is stored. A token is bound to the VM and to the API key that
-- minted it; `used_at_ms` is set by the one upgrade that consumes it (a
-- compare-and-set on `used_at_ms IS NULL`, so two control planes sharing the
-- database can never both accept it). Rows are removed an hour after expiry.

CREATE TABLE console_tokens (
    token_hash    TEXT PRIMARY KEY,
    vm_id         TEXT NOT NULL,
    org_id        TEXT NOT NULL REFERENCES orgs(id),
    key_id        TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    used_at_ms    BIGINT
);

CREATE INDEX console_tokens_expires_at ON console_tokens(expires_at_ms);
