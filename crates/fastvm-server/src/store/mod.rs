//! The control plane's state: orgs, users, API keys, VMs and snapshots, in SQLite (the
//! embedded default, `DATA_DIR/fastvm.db`, WAL) or PostgreSQL.
//!
//! One code path serves both backends through sqlx's `Any` driver: the SQL
//! sticks to what both understand (`$1` placeholders, TEXT and BIGINT
//! columns, times as Unix milliseconds, JSON documents as TEXT). Each backend
//! has its own migration directory (`migrations/sqlite`, `migrations/postgres`)
//! so their schemas may diverge when one needs a dialect feature.
//!
//! Every VM query is scoped by org id: a caller can never read or change a
//! row of another org. VM rows are updated with optimistic concurrency
//! ([`Store::update_vm`] checks and bumps `version`), so concurrent requests
//! on one VM never lose each other's changes. Snapshot rows change little
//! (status once, name, deletion): each change is one guarded `UPDATE`.
//! Quota limits (`org_quotas`) and usage (computed from the rows on every
//! read) are in `quotas.rs`. One-shot console tokens (hashed) are in
//! `console_tokens.rs`. Users' SSH public keys are in `ssh_keys.rs`. Volumes and
//! their attachments to VMs are in `volumes.rs`. Worker
//! hosts of a cluster, and the queries placement runs in its transaction, are
//! in `workers.rs`.

mod bucket_mounts;
mod console_tokens;
mod keys;
mod quotas;
mod snapshot_imports;
mod snapshots;
mod ssh_keys;
mod vms;
mod volumes;
mod workers;

#[cfg(test)]
mod tests;

pub use bucket_mounts::BucketMountRecord;
pub use console_tokens::{ConsoleTokenRecord, Redeemed};
pub use keys::{ApiKeyInfo, NewApiKey, KEY_CACHE_TTL};
pub use quotas::{QuotaPatch, DEFAULT_QUOTA};
pub use snapshot_imports::{import_status_str, SnapshotImportRecord};
pub use snapshots::{status_str as snapshot_status_str, SnapshotRecord};
pub use ssh_keys::{AddSshKeyError, SshKeyRecord, MAX_SSH_KEYS_PER_USER};
pub use vms::{VmListCursor, VmListEntry, VmRecord};
pub use volumes::{status_str as volume_status_str, AttachmentRecord, VolumeRecord};
pub use workers::{PlacementCandidate, WorkerRecord, WorkerRegistrationRow, WorkerStatus};
pub(crate) use {
    quotas::{quota_limits_on, quota_usage_on},
    snapshots::insert_snapshot_on,
    vms::insert_vm_on,
    workers::{
        candidate_usage_on, lock_org_on, lock_ready_worker_on, move_vm_on, placement_candidates_on,
    },
};

use fastvm_types::OrgId;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{AnyPool, ConnectOptions, Connection, Row};
use std::path::Path;
use std::str::FromStr;
use std::sync::Once;
use std::time::Duration;

/// Errors of the store. The message names what failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database answered with an error or could not be reached.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// Running the schema migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value cannot be decoded (a bug or a hand-edited database).
    #[error("corrupt row in {table}: {message}")]
    Corrupt {
        table: &'static str,
        message: String,
    },
    /// A referenced row does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A unique name is taken.
    #[error("{0}")]
    Conflict(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A handle on the database (cheap to clone: a connection pool).
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Recently authenticated API keys, shared by the clones (see keys.rs).
    keys: std::sync::Arc<keys::KeyCache>,
}

/// Current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

static DRIVERS: Once = Once::new();

impl Store {
    /// Open (creating and migrating as needed) the store: PostgreSQL when
    /// `database_url` is given, else SQLite at `DATA_DIR/fastvm.db`.
    pub async fn open(data_dir: &Path, database_url: Option<&str>) -> Result<Store> {
        match database_url {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Store::open_postgres(url).await
            }
            Some(url) if url.starts_with("sqlite:") => {
                let opts = SqliteConnectOptions::from_str(url)?;
                Store::open_sqlite(opts.get_filename()).await
            }
            Some(url) => Err(StoreError::Db(sqlx::Error::Configuration(
                format!("unsupported database URL {url:?}; use postgres://... or sqlite:PATH")
                    .into(),
            ))),
            None => {
                std::fs::create_dir_all(data_dir)
                    .map_err(|e| StoreError::Db(sqlx::Error::Io(e)))?;
                Store::open_sqlite(&data_dir.join("fastvm.db")).await
            }
        }
    }

    /// Open the SQLite database at `path`, creating it in WAL mode.
    pub async fn open_sqlite(path: &Path) -> Result<Store> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        // WAL is a persistent property of the file: set it once with a native
        // connection, then share the file through the Any pool.
        opts.connect().await?.close().await?;
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let url = opts.to_url_lossy();
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            // No ping before each use: an in-process SQLite connection does
            // not go stale, and the ping was a second round trip to the
            // connection's thread on every query (bench-api list).
            .test_before_acquire(false)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA synchronous = NORMAL")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA busy_timeout = 5000")
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("PRAGMA foreign_keys = ON")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
            .connect(url.as_str())
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        Ok(Store {
            pool,
            backend: Backend::Sqlite,
            keys: Default::default(),
        })
    }

    /// Open the PostgreSQL database at `url` and migrate it.
    pub async fn open_postgres(url: &str) -> Result<Store> {
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let pool = AnyPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(Store {
            pool,
            backend: Backend::Postgres,
            keys: Default::default(),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A trivial query: is the database answering?
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Close the pool (waits for connections in use to be returned).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    // --- orgs and users -----------------------------------------------------

    /// Create an org with a unique `name`.
    pub async fn create_org(&self, name: &str) -> Result<OrgId> {
        let id = OrgId::new_v4();
        let res = sqlx::query("INSERT INTO orgs (id, name, created_at_ms) VALUES ($1, $2, $3)")
            .bind(id.to_string())
            .bind(name)
            .bind(now_ms())
            .execute(&self.pool)
            .await;
        match res {
            Ok(_) => Ok(id),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Conflict(
                format!("an org named {name:?} already exists"),
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// The id of the org named `name`.
    pub async fn org_by_name(&self, name: &str) -> Result<Option<OrgId>> {
        let row = sqlx::query("SELECT id FROM orgs WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| parse_id(&r, "id", "orgs")).transpose()
    }

    /// Number of orgs (zero before the first start).
    pub async fn org_count(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM orgs")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

    /// Create a user of `org`.
    pub async fn create_user(&self, org: OrgId, name: &str) -> Result<uuid::Uuid> {
        let id = uuid::Uuid::new_v4();
        sqlx::query("INSERT INTO users (id, org_id, name, created_at_ms) VALUES ($1, $2, $3, $4)")
            .bind(id.to_string())
            .bind(org.to_string())
            .bind(name)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(id)
    }
}

/// Read a UUID column.
fn parse_id<T: FromStr>(row: &AnyRow, col: &str, table: &'static str) -> Result<T> {
    let s: String = row.try_get(col)?;
    s.parse().map_err(|_| StoreError::Corrupt {
        table,
        message: format!("{col} {s:?} is not a UUID"),
    })
}
