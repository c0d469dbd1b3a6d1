//! The staging store: where file transfers park their bytes between the
//! client and the guest.
//!
//! ```text
//!  presign  -> a new object (org/vm/uuid) + uploadUrl (PUT) + downloadUrl (GET)
//!  upload:   client PUT uploadUrl -> object;  POST files/fetch {downloadUrl}
//!            -> server reads the object -> exec stdin `cat > PATH` in the guest
//!  download: POST files/export {uploadUrl} -> exec stdout (`cat`/`tar`) -> object;
//!            client GET downloadUrl
//! ```
//!
//! Bytes never cross the guest's network: the server moves them over the
//! agent channel, so transfers work with no network or a deny-all firewall.
//! Every read and write streams (no object is ever held in memory), and
//! writes stop at a cap (the VM's disk size). Objects older than
//! [`StagingConfig::max_age`] are removed by [`spawn_gc`].
//!
//! Every backend is wrapped in [`capped::CappedStaging`]: an org may have
//! at most [`StagingConfig::org_cap_bytes`] staged (`fastvm serve
//! --staging-org-cap-bytes`, 10 GiB by default), and an upload URL stores
//! its object once.
//!
//! Backends: [`local::LocalStaging`] (files under `<data>/staging/`, URLs
//! signed by this server and served at `/v1/staging/{token}`), the default;
//! [`s3::S3Staging`] (an S3-compatible bucket, real S3 presigned URLs) when
//! [`StagingConfig::s3`] is set.

pub mod capped;
pub mod local;
pub mod s3;
pub mod token;

use crate::worker::ByteStream;
use async_trait::async_trait;
use std::time::Duration;
pub use token::{Method, TokenError};

/// Knobs of the staging store.
#[derive(Debug, Clone)]
pub struct StagingConfig {
    /// Lifetime of presigned URLs.
    pub url_ttl: Duration,
    /// Objects older than this are deleted.
    pub max_age: Duration,
    /// Lower cap on uploads than the VM's disk size (tests, small hosts).
    pub max_upload_bytes: Option<u64>,
    /// Stage in this S3-compatible bucket instead of the data dir.
    pub s3: Option<s3::S3Config>,
    /// Most bytes one org may have staged at once (see [`capped`]).
    pub org_cap_bytes: u64,
}

/// Default of [`StagingConfig::org_cap_bytes`]: 10 GiB.
pub const DEFAULT_ORG_CAP_BYTES: u64 = 10 << 30;

impl Default for StagingConfig {
    fn default() -> Self {
        StagingConfig {
            url_ttl: Duration::from_secs(3600),
            max_age: Duration::from_secs(24 * 3600),
            max_upload_bytes: None,
            s3: None,
            org_cap_bytes: DEFAULT_ORG_CAP_BYTES,
        }
    }
}

/// One staging object: `org/vm/object`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectKey {
    pub org: String,
    pub vm: String,
    /// A UUID minted by presign.
    pub object: String,
}

/// A presigned pair for one object.
#[derive(Clone, Debug)]
pub struct Presigned {
    pub upload_url: String,
    pub download_url: String,
}

/// Errors of the staging store.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// Nothing was uploaded to this object (or it was collected).
    #[error("nothing was uploaded to this staging object (PUT the bytes to its uploadUrl first; objects are deleted after about a day)")]
    NotFound,
    /// The upload passed the cap; nothing was kept.
    #[error(
        "the upload exceeds the limit of {cap} bytes (the VM's disk size); nothing was stored"
    )]
    TooLarge { cap: u64 },
    /// The org's staged bytes would pass the server's cap; nothing was kept.
    #[error("this upload would take your org past {cap} staged bytes, the most this server allows (fastvm serve --staging-org-cap-bytes); nothing was stored. Staged objects are deleted about a day after upload: transfer less at once, or wait")]
    QuotaExceeded { cap: u64 },
    /// The upload URL already stored its object (upload URLs are single-use).
    #[error("this uploadUrl was used already (each stores one object once); presign a new one")]
    AlreadyUploaded,
    /// The bytes being stored failed to arrive (client gone, guest command failed).
    #[error("the upload was cut short: {0}")]
    Input(String),
    /// The backend failed (disk, object storage).
    #[error("staging store: {0}")]
    Backend(String),
}

/// A place for staging objects with signed URLs.
#[async_trait]
pub trait StagingStore: Send + Sync + 'static {
    /// URLs for `key`, valid for `ttl`, uploads capped at `cap` bytes.
    async fn presign(
        &self,
        key: &ObjectKey,
        cap: u64,
        ttl: Duration,
    ) -> Result<Presigned, StagingError>;
    /// The object a URL minted by [`StagingStore::presign`] opens with
    /// `method`, after checking signature and expiry.
    fn resolve(&self, url: &str, method: Method) -> Result<ObjectKey, TokenError>;
    /// Bytes `org` may still stage (`None`: unlimited).
    fn room(&self, _org: &str) -> Option<u64> {
        None
    }
    /// Store `body` as `key`, at most `cap` bytes; returns the size. On any
    /// error nothing is left behind.
    async fn put(&self, key: &ObjectKey, body: ByteStream, cap: u64) -> Result<u64, StagingError>;
    /// The object's size and bytes.
    async fn get(&self, key: &ObjectKey) -> Result<(u64, ByteStream), StagingError>;
    /// Remove an object (absent: fine).
    async fn delete(&self, key: &ObjectKey) -> Result<(), StagingError>;
    /// Remove every object older than `max_age`; returns how many.
    async fn gc(&self, max_age: Duration) -> Result<usize, StagingError>;
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The staging GC task: every `max_age / 4` (between 1 s and 10 min) it
/// removes objects older than `max_age`. Dropping the handle stops it.
pub fn spawn_gc(store: std::sync::Arc<dyn StagingStore>, max_age: Duration) -> GcTask {
    let period = (max_age / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
    let task = tokio::spawn(async move {
        loop {
            match store.gc(max_age).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "staging GC removed old objects"),
                Err(e) => tracing::warn!(error = %e, "staging GC failed"),
            }
            tokio::time::sleep(period).await;
        }
    });
    GcTask(task)
}

/// Handle of [`spawn_gc`]'s task; aborts it when dropped.
pub struct GcTask(tokio::task::JoinHandle<()>);

impl Drop for GcTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}
