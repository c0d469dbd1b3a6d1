//! The S3-compatible staging backend (AWS S3, MinIO, moto, ...), on the
//! `object_store` crate, path-style requests.
//!
//! ```text
//!  object  = <bucket>/<prefix>/<org>/<vm>/<uuid>      (prefix optional)
//!  URLs    = <endpoint>/<bucket>/<key>?X-Amz-Algorithm=..&X-Amz-Credential=..
//!            &X-Amz-Date=..&X-Amz-Expires=..&X-Amz-SignedHeaders=host&X-Amz-Signature=..
//!            (real SigV4 presigned URLs: PUT for uploadUrl, GET for downloadUrl)
//! ```
//!
//! Clients talk to the object store directly with those URLs; this server
//! only touches objects for fetch (a streamed GET), export (a streamed
//! multipart upload, capped) and GC (list + delete under the prefix).
//!
//! fetch/export are handed URLs back. [`S3Staging::resolve`] accepts one
//! only if its scheme, host, port, bucket and key shape are ours, and then
//! recomputes the SigV4 signature with this server's credentials for the
//! method asked (so a tampered key, expiry or method is "invalid", like the
//! local backend), and only then checks `X-Amz-Date + X-Amz-Expires`.
//!
//! A plain presigned PUT cannot carry a size limit (that needs a presigned
//! POST policy), so a client may store more than `maxUploadBytes` in the
//! bucket; the cap is enforced where the server moves bytes: export stops
//! its upload at the cap, and fetch refuses an object whose size (from the
//! GET's headers, before any byte is read) is over the cap.

use super::token::{Method, TokenError};
use super::{unix_now, ObjectKey, Presigned, StagingError, StagingStore};
use crate::worker::ByteStream;
use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use hmac::{Hmac, Mac};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{ObjectStore, WriteMultipart};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};
use std::time::Duration;
use url::Url;

/// Size of the parts of export's multipart uploads (S3's minimum is 5 MiB).
const PART_SIZE: usize = 8 << 20;
/// Parts uploading at once; with [`PART_SIZE`] it bounds export's memory.
const PARTS_IN_FLIGHT: usize = 2;
/// S3 refuses presigned URLs valid for longer than 7 days.
const MAX_URL_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Characters kept as-is in SigV4 canonical query strings.
const STRICT_ENCODE_SET: AsciiSet = NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Where the S3-compatible store is and how to sign for it.
#[derive(Clone)]
pub struct S3Config {
    /// `http(s)://host[:port]` of the S3 API; `None`: AWS
    /// (`https://s3.<region>.amazonaws.com`). `http://` is allowed (a
    /// local MinIO or moto).
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Keys start with `<prefix>/` (segments of `A-Za-z0-9._-`); empty: none.
    pub prefix: String,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"******")
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Why an [`S3Config`] cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum S3ConfigError {
    #[error("S3 staging: the endpoint {0:?} is not an http(s)://host[:port] URL")]
    Endpoint(String),
    #[error(
        "S3 staging: the bucket name {0:?} is not valid (3-63 characters of a-z, 0-9, '.', '-')"
    )]
    Bucket(String),
    #[error("S3 staging: the key prefix {0:?} is not valid (segments of A-Z, a-z, 0-9, '.', '_', '-' separated by '/')")]
    Prefix(String),
    #[error("S3 staging: {0} is empty")]
    Missing(&'static str),
    #[error("S3 staging: {0}")]
    Store(#[from] object_store::Error),
}

pub struct S3Staging {
    store: AmazonS3,
    /// `scheme://host[:port]` of the endpoint (no path).
    origin: Url,
    bucket: String,
    /// Without slashes at either end; may be empty.
    prefix: String,
    region: String,
    access_key_id: String,
    secret_access_key: String,
}

impl S3Staging {
    /// A store for `cfg` (no request is made: a wrong endpoint or
    /// credentials show at the first transfer).
    pub fn new(cfg: &S3Config) -> Result<S3Staging, S3ConfigError> {
        for (name, v) in [
            ("region", &cfg.region),
            ("access key id", &cfg.access_key_id),
            ("secret access key", &cfg.secret_access_key),
        ] {
            if v.trim().is_empty() {
                return Err(S3ConfigError::Missing(name));
            }
        }
        let endpoint = cfg
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", cfg.region));
        let origin =
            parse_origin(&endpoint).ok_or_else(|| S3ConfigError::Endpoint(endpoint.clone()))?;
        let bucket_ok = (3..=63).contains(&cfg.bucket.len())
            && cfg
                .bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !bucket_ok {
            return Err(S3ConfigError::Bucket(cfg.bucket.clone()));
        }
        let prefix = cfg.prefix.trim_matches('/').to_owned();
        if !prefix.is_empty() && !prefix.split('/').all(valid_segment) {
            return Err(S3ConfigError::Prefix(cfg.prefix.clone()));
        }
        let store = AmazonS3Builder::new()
            .with_endpoint(origin.as_str().trim_end_matches('/'))
            .with_allow_http(origin.scheme() == "http")
            .with_virtual_hosted_style_request(false)
            .with_region(&cfg.region)
            .with_bucket_name(&cfg.bucket)
            .with_access_key_id(&cfg.access_key_id)
            .with_secret_access_key(&cfg.secret_access_key)
            .build()?;
        Ok(S3Staging {
            store,
            origin,
            bucket: cfg.bucket.clone(),
            prefix,
            region: cfg.region.clone(),
            access_key_id: cfg.access_key_id.clone(),
            secret_access_key: cfg.secret_access_key.clone(),
        })
    }

    /// The object key of `key`: `<prefix>/<org>/<vm>/<uuid>`.
    pub fn object_key(&self, key: &ObjectKey) -> String {
        let tail = format!("{}/{}/{}", key.org, key.vm, key.object);
        if self.prefix.is_empty() {
            tail
        } else {
            format!("{}/{tail}", self.prefix)
        }
    }

    fn path(&self, key: &ObjectKey) -> ObjectPath {
        ObjectPath::from(self.object_key(key))
    }

    /// The object a URL names, if the URL points into our bucket and prefix
    /// and its key has the shape `org/vm/uuid` (all UUIDs).
    fn key_of_url(&self, url: &Url) -> Option<ObjectKey> {
        if url.scheme() != self.origin.scheme()
            || host_port(url) != host_port(&self.origin)
            || url.fragment().is_some()
        {
            return None;
        }
        let rest = url
            .path()
            .strip_prefix('/')?
            .strip_prefix(self.bucket.as_str())?
            .strip_prefix('/')?;
        let rest = if self.prefix.is_empty() {
            rest
        } else {
            rest.strip_prefix(self.prefix.as_str())?.strip_prefix('/')?
        };
        let mut parts = rest.split('/');
        let (org, vm, object) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some()
            || [org, vm, object]
                .iter()
                .any(|p| uuid::Uuid::parse_str(p).is_err())
        {
            return None;
        }
        Some(ObjectKey {
            org: org.to_owned(),
            vm: vm.to_owned(),
            object: object.to_owned(),
        })
    }

    /// Check a presigned URL at time `now` (Unix seconds): ours, signed by
    /// our credentials for `method`, not expired.
    fn check_url(&self, url: &str, method: Method, now: u64) -> Result<ObjectKey, TokenError> {
        let url = Url::parse(url).map_err(|_| TokenError::Invalid)?;
        let key = self.key_of_url(&url).ok_or(TokenError::Invalid)?;
        let q = SignedQuery::parse(&url).ok_or(TokenError::Invalid)?;
        if q.signed_headers != "host"
            || q.credential != format!("{}/{}", self.access_key_id, self.scope(&q.date))
        {
            return Err(TokenError::Invalid);
        }
        let signed_by = |m: Method| {
            constant_time_eq(
                self.signature(&url, m, &q.date).as_bytes(),
                q.signature.as_bytes(),
            )
        };
        if !signed_by(method) {
            let other = if method == Method::Put {
                Method::Get
            } else {
                Method::Put
            };
            return Err(if signed_by(other) {
                TokenError::WrongMethod(other)
            } else {
                TokenError::Invalid
            });
        }
        let expires = amz_date_to_unix(&q.date)
            .ok_or(TokenError::Invalid)?
            .saturating_add(q.expires_in);
        if now >= expires {
            return Err(TokenError::Expired);
        }
        Ok(key)
    }

    fn scope(&self, amz_date: &str) -> String {
        format!(
            "{}/{}/s3/aws4_request",
            amz_date.get(..8).unwrap_or_default(),
            self.region
        )
    }

    /// The SigV4 query signature of `url` (its X-Amz-Signature left out),
    /// as `object_store` computes it: UNSIGNED-PAYLOAD, header `host` only.
    fn signature(&self, url: &Url, method: Method, amz_date: &str) -> String {
        let mut pairs: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, _)| k != "X-Amz-Signature")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        pairs.sort();
        let query = pairs
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    utf8_percent_encode(k, &STRICT_ENCODE_SET),
                    utf8_percent_encode(v, &STRICT_ENCODE_SET)
                )
            })
            .collect::<Vec<_>>()
            .join("&");
        let method = match method {
            Method::Put => "PUT",
            Method::Get => "GET",
        };
        let canonical = format!(
            "{method}\n{}\n{query}\nhost:{}\n\nhost\nUNSIGNED-PAYLOAD",
            url.path(),
            host_port(url)
        );
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{}\n{}",
            self.scope(amz_date),
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        let k_date = hmac_sha256(
            format!("AWS4{}", self.secret_access_key).as_bytes(),
            amz_date.get(..8).unwrap_or_default().as_bytes(),
        );
        let k_region = hmac_sha256(&k_date, self.region.as_bytes());
        let k_service = hmac_sha256(&k_region, b"s3");
        let k_signing = hmac_sha256(&k_service, b"aws4_request");
        hex::encode(hmac_sha256(&k_signing, to_sign.as_bytes()))
    }
}

fn backend(e: object_store::Error) -> StagingError {
    match e {
        object_store::Error::NotFound { .. } => StagingError::NotFound,
        e => StagingError::Backend(e.to_string()),
    }
}

#[async_trait]
impl StagingStore for S3Staging {
    async fn presign(
        &self,
        key: &ObjectKey,
        _cap: u64,
        ttl: Duration,
    ) -> Result<Presigned, StagingError> {
        let ttl = ttl.clamp(Duration::from_secs(1), MAX_URL_TTL);
        let path = self.path(key);
        let up = self
            .store
            .signed_url(axum::http::Method::PUT, &path, ttl)
            .await
            .map_err(backend)?;
        let down = self
            .store
            .signed_url(axum::http::Method::GET, &path, ttl)
            .await
            .map_err(backend)?;
        Ok(Presigned {
            upload_url: up.to_string(),
            download_url: down.to_string(),
        })
    }

    fn resolve(&self, url: &str, method: Method) -> Result<ObjectKey, TokenError> {
        self.check_url(url, method, unix_now())
    }

    async fn put(&self, key: &ObjectKey, body: ByteStream, cap: u64) -> Result<u64, StagingError> {
        let upload = self
            .store
            .put_multipart(&self.path(key))
            .await
            .map_err(backend)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        match write_capped(&mut writer, body, cap).await {
            Ok(size) => {
                writer.finish().await.map_err(backend)?;
                Ok(size)
            }
            Err(e) => {
                // Nothing is left behind: the parts of an aborted upload are dropped.
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    async fn get(&self, key: &ObjectKey) -> Result<(u64, ByteStream), StagingError> {
        let got = self.store.get(&self.path(key)).await.map_err(backend)?;
        let size = got.meta.size;
        let stream = got.into_stream().map_err(std::io::Error::other);
        Ok((size, Box::pin(stream)))
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StagingError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(StagingError::Backend(e.to_string())),
        }
    }

    async fn gc(&self, max_age: Duration) -> Result<usize, StagingError> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        let cutoff = chrono_cutoff(max_age);
        let mut listing = self.store.list(prefix.as_ref());
        let mut removed = 0;
        while let Some(meta) = listing.next().await {
            let meta =
                meta.map_err(|e| StagingError::Backend(format!("listing the bucket: {e}")))?;
            if meta.last_modified.timestamp() <= cutoff {
                match self.store.delete(&meta.location).await {
                    Ok(()) => removed += 1,
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => {
                        return Err(StagingError::Backend(format!(
                            "deleting {}: {e}",
                            meta.location
                        )))
                    }
                }
            }
        }
        Ok(removed)
    }
}

/// Unix second at or before which an object is older than `max_age`.
fn chrono_cutoff(max_age: Duration) -> i64 {
    i64::try_from(unix_now())
        .unwrap_or(i64::MAX)
        .saturating_sub(i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX))
}

/// Feed `body` to `writer`, stopping at `cap` bytes; returns the size.
async fn write_capped(
    writer: &mut WriteMultipart,
    mut body: ByteStream,
    cap: u64,
) -> Result<u64, StagingError> {
    let mut size: u64 = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| StagingError::Input(e.to_string()))?;
        size = size.saturating_add(chunk.len() as u64);
        if size > cap {
            return Err(StagingError::TooLarge { cap });
        }
        writer
            .wait_for_capacity(PARTS_IN_FLIGHT)
            .await
            .map_err(backend)?;
        writer.put(chunk);
    }
    Ok(size)
}

/// The X-Amz-* parameters of a presigned URL.
struct SignedQuery {
    credential: String,
    /// `YYYYMMDDTHHMMSSZ`.
    date: String,
    expires_in: u64,
    signed_headers: String,
    signature: String,
}

impl SignedQuery {
    fn parse(url: &Url) -> Option<SignedQuery> {
        let get = |name: &str| -> Option<String> {
            let mut values = url.query_pairs().filter(|(k, _)| k == name);
            let v = values.next()?.1.into_owned();
            values.next().is_none().then_some(v)
        };
        if get("X-Amz-Algorithm")? != "AWS4-HMAC-SHA256" {
            return None;
        }
        Some(SignedQuery {
            credential: get("X-Amz-Credential")?,
            date: get("X-Amz-Date")?,
            expires_in: get("X-Amz-Expires")?.parse().ok()?,
            signed_headers: get("X-Amz-SignedHeaders")?,
            signature: get("X-Amz-Signature")?,
        })
    }
}

/// `YYYYMMDDTHHMMSSZ` (UTC) as Unix seconds.
fn amz_date_to_unix(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 16
        || b[8] != b'T'
        || b[15] != b'Z'
        || !b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit)
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r).and_then(|d| d.parse::<u64>().ok());
    let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hh, mm, ss) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1970..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&d)
        || hh > 23
        || mm > 59
        || ss > 60
    {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm), for years >= 1970.
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// `scheme://host[:port]/` of an endpoint, refusing paths, queries, users.
fn parse_origin(endpoint: &str) -> Option<Url> {
    let url = Url::parse(endpoint.trim_end_matches('/')).ok()?;
    let ok = matches!(url.scheme(), "http" | "https")
        && url.host().is_some()
        && url.path() == "/"
        && url.query().is_none()
        && url.username().is_empty();
    ok.then_some(url)
}

/// `host[:port]` as it appears in the URL (the SigV4 `host` header).
fn host_port(url: &Url) -> &str {
    &url[url::Position::BeforeHost..url::Position::AfterPort]
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(prefix: &str) -> S3Config {
        S3Config {
            endpoint: Some("http://127.0.0.1:9/".into()),
            region: "us-east-1".into(),
            bucket: "staging".into(),
            access_key_id: "AKID".into(),
            secret_access_key: "secret".into(),
            prefix: prefix.into(),
        }
    }

    fn key() -> ObjectKey {
        ObjectKey {
            org: uuid::Uuid::new_v4().to_string(),
            vm: uuid::Uuid::new_v4().to_string(),
            object: uuid::Uuid::new_v4().to_string(),
        }
    }

    /// Replace (or add) query parameter `name` of `url`.
    fn with_param(url: &str, name: &str, value: &str) -> String {
        let mut u = Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .filter(|(k, _)| k != name)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        u.query_pairs_mut()
            .clear()
            .extend_pairs(pairs)
            .append_pair(name, value);
        u.to_string()
    }

    #[test]
    fn amz_dates() {
        assert_eq!(amz_date_to_unix("19700101T000000Z"), Some(0));
        assert_eq!(amz_date_to_unix("20130524T000000Z"), Some(1_369_353_600));
        assert_eq!(amz_date_to_unix("20240229T235959Z"), Some(1_709_251_199));
        for bad in [
            "",
            "20130524T000000",
            "20130524X000000Z",
            "20131324T000000Z",
            "20130524T250000Z",
            "2013-05-24T00:00Z",
        ] {
            assert_eq!(amz_date_to_unix(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn presigned_urls_resolve_to_their_key_and_method() -> anyhow::Result<()> {
        for prefix in ["", "fastvm/staging"] {
            let s = S3Staging::new(&cfg(prefix))?;
            let k = key();
            let p = s.presign(&k, 10, Duration::from_secs(60)).await?;
            let want_path = format!("/staging/{}", s.object_key(&k));
            assert!(
                p.upload_url
                    .starts_with(&format!("http://127.0.0.1:9{want_path}?")),
                "{}",
                p.upload_url
            );
            assert!(
                p.upload_url.contains("X-Amz-Expires=60"),
                "{}",
                p.upload_url
            );
            assert_eq!(s.resolve(&p.upload_url, Method::Put)?, k);
            assert_eq!(s.resolve(&p.download_url, Method::Get)?, k);
            assert_eq!(
                s.resolve(&p.upload_url, Method::Get),
                Err(TokenError::WrongMethod(Method::Put))
            );
            assert_eq!(
                s.resolve(&p.download_url, Method::Put),
                Err(TokenError::WrongMethod(Method::Get))
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn foreign_and_tampered_urls_are_invalid() -> anyhow::Result<()> {
        let s = S3Staging::new(&cfg("pre"))?;
        let k = key();
        let url = s
            .presign(&k, 10, Duration::from_secs(60))
            .await?
            .download_url;
        let other_key = key();
        let tampered = [
            url.replace(&k.object, &other_key.object), // another object
            url.replace(&k.vm, &other_key.vm),         // another VM
            url.replace("127.0.0.1:9", "127.0.0.1:10"), // another endpoint
            url.replace("/staging/", "/other-bucket/"), // another bucket
            url.replace("/pre/", "/"),                 // outside the prefix
            url.replace("http://", "https://"),        // another scheme
            with_param(&url, "X-Amz-Expires", "604800"), // longer life
            with_param(&url, "X-Amz-Date", "20990101T000000Z"), // later start
            with_param(&url, "extra", "1"),            // added parameter
            with_param(&url, "X-Amz-Signature", &"0".repeat(64)), // forged signature
            format!("{url}#frag"),
            url.split('?').next().unwrap_or_default().to_owned(), // unsigned
            "http://127.0.0.1:9/staging/pre/a/b/c?X-Amz-Algorithm=AWS4-HMAC-SHA256".to_owned(),
            "not a url".to_owned(),
            String::new(),
        ];
        for t in &tampered {
            assert_eq!(s.resolve(t, Method::Get), Err(TokenError::Invalid), "{t}");
        }
        // Same bucket and endpoint, other credentials: not ours.
        let mut other = cfg("pre");
        other.secret_access_key = "other".into();
        let foreign = S3Staging::new(&other)?
            .presign(&k, 10, Duration::from_secs(60))
            .await?
            .download_url;
        assert_eq!(s.resolve(&foreign, Method::Get), Err(TokenError::Invalid));
        Ok(())
    }

    #[tokio::test]
    async fn expiry_comes_from_date_plus_expires() -> anyhow::Result<()> {
        let s = S3Staging::new(&cfg(""))?;
        let url = s
            .presign(&key(), 10, Duration::from_secs(60))
            .await?
            .upload_url;
        let now = unix_now();
        assert!(s.check_url(&url, Method::Put, now).is_ok());
        assert!(s.check_url(&url, Method::Put, now + 55).is_ok());
        assert_eq!(
            s.check_url(&url, Method::Put, now + 62),
            Err(TokenError::Expired)
        );
        Ok(())
    }

    #[test]
    fn config_is_checked() {
        let bad = |f: fn(&mut S3Config)| {
            let mut c = cfg("");
            f(&mut c);
            S3Staging::new(&c).is_err()
        };
        assert!(bad(|c| c.endpoint = Some("ftp://x".into())));
        assert!(bad(|c| c.endpoint = Some("http://x/path".into())));
        assert!(bad(|c| c.bucket = "No_Such".into()));
        assert!(bad(|c| c.prefix = "a/../b".into()));
        assert!(bad(|c| c.secret_access_key = String::new()));
        assert!(!bad(|c| c.prefix = "/a/b/".into()));
        assert!(!bad(|c| c.endpoint = None));
        assert!(!format!("{:?}", cfg("")).contains("secret\""));
    }
}
