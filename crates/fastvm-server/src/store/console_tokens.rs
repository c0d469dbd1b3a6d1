//! Console tokens: one-shot credentials of the console WebSocket, stored as
//! the SHA-256 of the token (never the token), bound to a VM, an org and the
//! API key that minted them. See `crate::console` for their rules.

use super::{now_ms, parse_id, Result, Store};
use crate::auth;
use fastvm_types::{OrgId, VmId};
use sqlx::Row;

/// How long after its expiry a token row is kept (so a late reuse is still
/// told "already used" or "expired" rather than "unknown").
const KEEP_AFTER_EXPIRY_MS: i64 = 60 * 60 * 1000;

/// A stored token, as found when it is redeemed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleTokenRecord {
    pub vm_id: VmId,
    pub org_id: OrgId,
    pub key_id: uuid::Uuid,
    pub expires_at_ms: i64,
    pub used_at_ms: Option<i64>,
}

/// What redeeming a token found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redeemed {
    /// This call consumed the token (it may still be expired: check).
    Fresh(ConsoleTokenRecord),
    /// The token was consumed before (by another upgrade).
    AlreadyUsed(ConsoleTokenRecord),
    /// No such token (never minted, or forgotten an hour after expiry).
    Unknown,
}

impl Store {
    /// Store a new console token for `vm` of `org`, minted by API key `key`,
    /// valid until `expires_at_ms`. Also forgets tokens expired long ago.
    pub async fn insert_console_token(
        &self,
        token: &str,
        vm: VmId,
        org: OrgId,
        key: uuid::Uuid,
        expires_at_ms: i64,
    ) -> Result<()> {
        let now = now_ms();
        sqlx::query("DELETE FROM console_tokens WHERE expires_at_ms < $1")
            .bind(now.saturating_sub(KEEP_AFTER_EXPIRY_MS))
            .execute(&self.pool)
            .await?;
        sqlx::query("INSERT INTO console_tokens (token_hash, vm_id, org_id, key_id, created_at_ms, expires_at_ms) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(auth::hash_token(token))
            .bind(vm.to_string())
            .bind(org.to_string())
            .bind(key.to_string())
            .bind(now)
            .bind(expires_at_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Consume `token`: exactly one caller ever gets [`Redeemed::Fresh`].
    pub async fn redeem_console_token(&self, token: &str) -> Result<Redeemed> {
        let hash = auth::hash_token(token);
        let claimed = sqlx::query("UPDATE console_tokens SET used_at_ms = $1 WHERE token_hash = $2 AND used_at_ms IS NULL")
            .bind(now_ms())
            .bind(&hash)
            .execute(&self.pool)
            .await?
            .rows_affected()
            == 1;
        let row = sqlx::query("SELECT vm_id, org_id, key_id, expires_at_ms, used_at_ms FROM console_tokens WHERE token_hash = $1")
            .bind(&hash)
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Ok(Redeemed::Unknown);
        };
        let rec = ConsoleTokenRecord {
            vm_id: parse_id(&row, "vm_id", "console_tokens")?,
            org_id: parse_id(&row, "org_id", "console_tokens")?,
            key_id: parse_id(&row, "key_id", "console_tokens")?,
            expires_at_ms: row.try_get("expires_at_ms")?,
            used_at_ms: row.try_get("used_at_ms")?,
        };
        Ok(if claimed {
            Redeemed::Fresh(rec)
        } else {
            Redeemed::AlreadyUsed(rec)
        })
    }

    /// True when the API key `key` exists and is not revoked.
    pub async fn key_is_active(&self, key: uuid::Uuid) -> Result<bool> {
        let row =
            sqlx::query("SELECT 1 AS one FROM api_keys WHERE id = $1 AND revoked_at_ms IS NULL")
                .bind(key.to_string())
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.is_some())
    }
}
