//! API keys: stored as the SHA-256 of the token, never the token itself.
//!
//! [`Store::authenticate`] runs on every request, so its answers are cached
//! ([`KeyCache`]): token hash -> key, for [`KEY_CACHE_TTL`] after the query
//! that found it. Only keys that authenticated are cached (an unknown token
//! costs a query each time and takes no memory). [`Store::revoke_key`] drops
//! the key's entries at once, so a revocation through this process (the
//! server's own store handle, the tests) is effective immediately; one made
//! by another process on the same database (`fastvm keys revoke`, another
//! control plane of a cluster) is effective within [`KEY_CACHE_TTL`].

use super::{now_ms, parse_id, Result, Store, StoreError};
use crate::auth;
use fastvm_types::OrgId;
use sqlx::any::AnyRow;
use sqlx::Row;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a successful authentication is reused without a query: the
/// longest a revocation made by another process can go unnoticed.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(1);

/// Most keys cached at once; past it expired entries are dropped, then all.
const KEY_CACHE_MAX: usize = 10_000;

/// Keys that authenticated recently, by token hash (see the module docs).
#[derive(Default)]
pub(crate) struct KeyCache {
    entries: Mutex<HashMap<String, (ApiKeyInfo, Instant)>>,
    /// Bumped by every revocation: an answer read before a revocation of
    /// this process is not cached after it (it may be that key's).
    revocations: AtomicU64,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.entries.lock().map(|e| e.len()).unwrap_or(0);
        f.debug_struct("KeyCache").field("entries", &n).finish()
    }
}

impl KeyCache {
    /// The key of `hash` if it authenticated less than [`KEY_CACHE_TTL`] ago.
    fn get(&self, hash: &str) -> Option<ApiKeyInfo> {
        let entries = self.entries.lock().ok()?;
        let (info, at) = entries.get(hash)?;
        (at.elapsed() < KEY_CACHE_TTL).then(|| info.clone())
    }

    /// The revocation count, read before a query whose answer may be cached.
    fn generation(&self) -> u64 {
        self.revocations.load(Ordering::SeqCst)
    }

    /// Remember that `hash` authenticated as `info`, as of `at` (the time
    /// the query started, so an entry never outlives TTL after the row was
    /// read), unless a revocation happened since `generation` was read.
    fn put(&self, hash: String, info: ApiKeyInfo, at: Instant, generation: u64) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        // Checked under the lock `forget` takes after bumping the count.
        if self.generation() != generation {
            return;
        }
        if entries.len() >= KEY_CACHE_MAX {
            entries.retain(|_, (_, t)| t.elapsed() < KEY_CACHE_TTL);
            if entries.len() >= KEY_CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(hash, (info, at));
    }

    /// Forget key `id` (it was revoked).
    fn forget(&self, id: uuid::Uuid) {
        self.revocations.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|_, (info, _)| info.id != id);
        }
    }
}

/// What is known about a key (the token itself is only shown once, at creation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyInfo {
    pub id: uuid::Uuid,
    pub org_id: OrgId,
    /// The user the key acts for (`None`: an org key of `fastvm keys create`).
    pub user_id: Option<uuid::Uuid>,
    pub name: String,
    /// The token's first characters (`fvm_1a2b3c4d`), to recognise it.
    pub prefix: String,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

/// A freshly created key: `token` is the secret to hand to the client.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub info: ApiKeyInfo,
    pub token: String,
}

fn key_from_row(row: &AnyRow) -> Result<ApiKeyInfo> {
    Ok(ApiKeyInfo {
        id: parse_id(row, "id", "api_keys")?,
        org_id: parse_id(row, "org_id", "api_keys")?,
        user_id: row
            .try_get::<Option<String>, _>("user_id")?
            .map(|u| {
                u.parse().map_err(|_| StoreError::Corrupt {
                    table: "api_keys",
                    message: format!("user_id {u:?} is not a UUID"),
                })
            })
            .transpose()?,
        name: row.try_get("name")?,
        prefix: row.try_get("prefix")?,
        created_at_ms: row.try_get("created_at_ms")?,
        revoked_at_ms: row.try_get("revoked_at_ms")?,
    })
}

const KEY_COLUMNS: &str = "id, org_id, user_id, name, prefix, created_at_ms, revoked_at_ms";

impl Store {
    /// Create an API key of `org` (optionally owned by a user) named `name`.
    pub async fn create_key_for(
        &self,
        org: OrgId,
        user: Option<uuid::Uuid>,
        name: &str,
    ) -> Result<NewApiKey> {
        let exists = sqlx::query("SELECT 1 AS one FROM orgs WHERE id = $1")
            .bind(org.to_string())
            .fetch_optional(&self.pool)
            .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound(format!("no org with id {org}")));
        }
        let token = auth::new_token();
        let info = ApiKeyInfo {
            id: uuid::Uuid::new_v4(),
            org_id: org,
            user_id: user,
            name: name.to_owned(),
            prefix: auth::token_prefix(&token),
            created_at_ms: now_ms(),
            revoked_at_ms: None,
        };
        sqlx::query("INSERT INTO api_keys (id, org_id, user_id, name, prefix, token_hash, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(info.id.to_string())
            .bind(org.to_string())
            .bind(user.map(|u| u.to_string()))
            .bind(&info.name)
            .bind(&info.prefix)
            .bind(auth::hash_token(&token))
            .bind(info.created_at_ms)
            .execute(&self.pool)
            .await?;
        Ok(NewApiKey { info, token })
    }

    /// Create an API key of `org` named `name`.
    pub async fn create_key(&self, org: OrgId, name: &str) -> Result<NewApiKey> {
        self.create_key_for(org, None, name).await
    }

    /// Keys of `org` (every org's when `None`), revoked ones included, oldest first.
    pub async fn list_keys(&self, org: Option<OrgId>) -> Result<Vec<ApiKeyInfo>> {
        let rows = match org {
            Some(org) => {
                sqlx::query(&format!(
                "SELECT {KEY_COLUMNS} FROM api_keys WHERE org_id = $1 ORDER BY created_at_ms, id"
            ))
                .bind(org.to_string())
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at_ms, id"
                ))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(key_from_row).collect()
    }

    /// Revoke the key whose id (a UUID) or prefix (`fvm_1a2b3c4d`) is `key`.
    /// Returns the key, or `NotFound`; revoking twice keeps the first time.
    pub async fn revoke_key(&self, key: &str) -> Result<ApiKeyInfo> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1 OR prefix = $1"
        ))
        .bind(key)
        .fetch_all(&self.pool)
        .await?;
        let found = match rows.as_slice() {
            [] => {
                return Err(StoreError::NotFound(format!(
                    "no API key with id or prefix {key:?}"
                )))
            }
            [one] => key_from_row(one)?,
            _ => {
                return Err(StoreError::Conflict(format!(
                    "several keys start with {key:?}; give the key id"
                )))
            }
        };
        sqlx::query(
            "UPDATE api_keys SET revoked_at_ms = $1 WHERE id = $2 AND revoked_at_ms IS NULL",
        )
        .bind(now_ms())
        .bind(found.id.to_string())
        .execute(&self.pool)
        .await?;
        self.keys.forget(found.id);
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
            .bind(found.id.to_string())
            .fetch_one(&self.pool)
            .await?;
        key_from_row(&row)
    }

    /// The key (not revoked) whose token is `token`; a key found less than
    /// [`KEY_CACHE_TTL`] ago is answered from memory (see the module docs).
    pub async fn authenticate(&self, token: &str) -> Result<Option<ApiKeyInfo>> {
        let hash = auth::hash_token(token);
        if let Some(info) = self.keys.get(&hash) {
            return Ok(Some(info));
        }
        let (at, generation) = (Instant::now(), self.keys.generation());
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE token_hash = $1 AND revoked_at_ms IS NULL"
        ))
        .bind(&hash)
        .fetch_optional(&self.pool)
        .await?;
        let info = row.as_ref().map(key_from_row).transpose()?;
        if let Some(info) = &info {
            self.keys.put(hash, info.clone(), at, generation);
        }
        Ok(info)
    }
}
