//! Bucket mounts on this host: a customer's S3 (or S3-compatible) bucket
//! served to one VM's guest as an NFS directory by the worker, which makes
//! and signs every request to the bucket with the mount's credentials.
//!
//! ```text
//!  guest ──NFSv3──▶ <gateway>:2049 (the VM's export, shared with its volumes)
//!                     /bm_<hex> ──▶ BucketFs ──HTTPS, signed here──▶ bucket endpoint
//! ```
//!
//! Credentials live in this process only: never in the guest, never on disk,
//! never in a snapshot. A rotation swaps the client the mount uses; the next
//! request is signed with the new credentials, without a remount. [`fs`] is
//! the file system (and its POSIX gaps).
//!
//! GCS (`gs://`): a service-account key; the worker gets OAuth2 tokens from
//! its `token_uri` and uses the GCS XML API ([`gcs`]).

pub mod fs;
pub mod gcs;

pub use fs::BucketFs;

use fastvm_types::bucket_mount::{
    parse_bucket_uri, BucketMountCredentials, BucketScheme, BucketUri,
};
use object_store::aws::AmazonS3Builder;
use object_store::{ClientOptions, ObjectStore, RetryConfig};
use std::sync::Arc;
use std::time::Duration;

/// This process's epoch in bucket handles (random, fixed at first use):
/// handles made by an earlier worker process are stale here.
pub fn epoch() -> u64 {
    static EPOCH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(rand::random)
}

/// The client of `uri`'s bucket signing with `credentials`; an error message
/// fit for the mount's `statusMessage` when they cannot make one.
pub fn open_store(
    uri: &BucketUri,
    credentials: &BucketMountCredentials,
) -> Result<Arc<dyn ObjectStore>, String> {
    match (uri.scheme, credentials) {
        (BucketScheme::S3, BucketMountCredentials::AwsCredentials(file)) => {
            let keys = file.default_keys().map_err(|e| e.message)?;
            let mut b = AmazonS3Builder::new()
                .with_bucket_name(&uri.bucket)
                .with_access_key_id(keys.access_key_id)
                .with_secret_access_key(keys.secret_access_key)
                .with_region(file.region().unwrap_or_else(|| "us-east-1".into()))
                .with_retry(retry())
                .with_client_options(client_options());
            if let Some(token) = keys.session_token {
                b = b.with_token(token);
            }
            if let Some(endpoint) = file.endpoint_url() {
                b = b
                    .with_allow_http(endpoint.starts_with("http://"))
                    .with_endpoint(endpoint)
                    .with_virtual_hosted_style_request(false);
            }
            b.build()
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
                .map_err(|e| format!("the S3 client could not be made from these credentials: {e}"))
        }
        (BucketScheme::Gcs, BucketMountCredentials::GcpServiceAccountJson(key)) => {
            gcs::open(&uri.bucket, key, retry(), client_options())
        }
        (BucketScheme::Gcs, _) => {
            Err("a gs:// bucket needs credentials of type gcp-service-account-json".into())
        }
        (BucketScheme::S3, _) => {
            Err("an s3:// bucket needs credentials of type aws-credentials".into())
        }
    }
}

/// A bucket that stops answering fails the guest's call within seconds (an
/// I/O error and a statusMessage), not minutes.
fn retry() -> RetryConfig {
    RetryConfig {
        max_retries: 2,
        retry_timeout: Duration::from_secs(10),
        ..RetryConfig::default()
    }
}

fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(60))
}

/// Parses `uri` and opens its client: see [`open_store`].
pub fn open_uri(
    uri: &str,
    credentials: &BucketMountCredentials,
) -> Result<(BucketUri, Arc<dyn ObjectStore>), String> {
    let parsed = parse_bucket_uri(uri).map_err(|e| e.message)?;
    let store = open_store(&parsed, credentials)?;
    Ok((parsed, store))
}

/// Checks the credentials reach the bucket (one listing under the prefix):
/// the reason when they do not.
pub async fn check_access(store: &dyn ObjectStore, uri: &BucketUri) -> Result<(), String> {
    let prefix = uri.prefix.as_deref().map(object_store::path::Path::from);
    match store.list_with_delimiter(prefix.as_ref()).await {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "the bucket {} did not accept these credentials or could not be reached: {e}",
            uri.bucket
        )),
    }
}
