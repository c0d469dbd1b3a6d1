//! SSH public keys of users (`/v1/me/ssh-keys`): unique per user by
//! fingerprint; the SSH gateway finds the owners of an offered key by its
//! fingerprint ([`Store::ssh_key_owners`]).

use super::{now_ms, parse_id, Result, Store, StoreError};
use fastvm_types::OrgId;
use sqlx::any::AnyRow;
use sqlx::Row;

/// Most keys one user may register.
pub const MAX_SSH_KEYS_PER_USER: i64 = 100;

/// A stored key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshKeyRecord {
    pub user_id: uuid::Uuid,
    pub org_id: OrgId,
    /// `SHA256:<base64>`.
    pub fingerprint: String,
    pub key_type: String,
    /// `<type> <base64>`.
    pub public_key: String,
    pub name: String,
    pub created_at_ms: i64,
}

/// Why a key could not be added.
#[derive(Debug, thiserror::Error)]
pub enum AddSshKeyError {
    #[error("this SSH key (fingerprint {0}) is already registered for this user")]
    Exists(String),
    #[error("a user may register at most {MAX_SSH_KEYS_PER_USER} SSH keys; delete one first")]
    TooMany,
    #[error(transparent)]
    Store(#[from] StoreError),
}

const COLUMNS: &str = "user_id, org_id, fingerprint, key_type, public_key, name, created_at_ms";

fn from_row(row: &AnyRow) -> Result<SshKeyRecord> {
    Ok(SshKeyRecord {
        user_id: parse_id(row, "user_id", "ssh_keys")?,
        org_id: parse_id(row, "org_id", "ssh_keys")?,
        fingerprint: row.try_get("fingerprint")?,
        key_type: row.try_get("key_type")?,
        public_key: row.try_get("public_key")?,
        name: row.try_get("name")?,
        created_at_ms: row.try_get("created_at_ms")?,
    })
}

impl Store {
    /// Register a key for `user` of `org` (`created_at_ms` is set here).
    pub async fn add_ssh_key(
        &self,
        key: SshKeyRecord,
    ) -> std::result::Result<SshKeyRecord, AddSshKeyError> {
        let count: i64 = sqlx::query("SELECT COUNT(*) AS n FROM ssh_keys WHERE user_id = $1")
            .bind(key.user_id.to_string())
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::from)?
            .try_get("n")
            .map_err(StoreError::from)?;
        if count >= MAX_SSH_KEYS_PER_USER {
            return Err(AddSshKeyError::TooMany);
        }
        let key = SshKeyRecord {
            created_at_ms: now_ms(),
            ..key
        };
        let res = sqlx::query(&format!(
            "INSERT INTO ssh_keys ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(key.user_id.to_string())
        .bind(key.org_id.to_string())
        .bind(&key.fingerprint)
        .bind(&key.key_type)
        .bind(&key.public_key)
        .bind(&key.name)
        .bind(key.created_at_ms)
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => Ok(key),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(AddSshKeyError::Exists(key.fingerprint))
            }
            Err(e) => Err(StoreError::from(e).into()),
        }
    }

    /// Keys of `user`, oldest first.
    pub async fn list_ssh_keys(&self, user: uuid::Uuid) -> Result<Vec<SshKeyRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM ssh_keys WHERE user_id = $1 ORDER BY created_at_ms, fingerprint"
        ))
        .bind(user.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// Remove `user`'s key with this fingerprint; false when there is none.
    pub async fn delete_ssh_key(&self, user: uuid::Uuid, fingerprint: &str) -> Result<bool> {
        Ok(
            sqlx::query("DELETE FROM ssh_keys WHERE user_id = $1 AND fingerprint = $2")
                .bind(user.to_string())
                .bind(fingerprint)
                .execute(&self.pool)
                .await?
                .rows_affected()
                > 0,
        )
    }

    /// Every registration of the key with this fingerprint (one per user
    /// that registered it), for the SSH gateway.
    pub async fn ssh_key_owners(&self, fingerprint: &str) -> Result<Vec<SshKeyRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM ssh_keys WHERE fingerprint = $1 ORDER BY created_at_ms"
        ))
        .bind(fingerprint)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }
}
