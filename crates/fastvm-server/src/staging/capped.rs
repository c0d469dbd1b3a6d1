//! The per-org cap on staged bytes, and single-use upload URLs, around any
//! staging backend ([`CappedStaging`]).
//!
//! ```text
//!  put(key): key already stored or being stored -> AlreadyUploaded (409)
//!            org at its cap                      -> QuotaExceeded (429)
//!            each chunk is counted before the backend sees it; the chunk
//!            that would pass the cap ends the upload -> QuotaExceeded,
//!            the backend discards the partial object, its bytes are released
//!  delete(key), gc: the objects' bytes are released
//! ```
//!
//! The ledger lives in memory. What it counts is every byte this server
//! writes to the store: uploads to `/v1/staging/{token}` (local backend) and
//! exports (both backends). Uploads a client makes straight to S3 with a
//! presigned URL never pass through the server and are not counted (the
//! bucket holds them, not the host's disk; they expire like every object).
//! At start the local backend's existing objects are counted again
//! ([`super::local::LocalStaging::existing`]), so a restart neither forgets
//! them nor lets their upload URLs be used again; with S3 the ledger starts
//! empty, and what was staged before the restart expires within
//! [`super::StagingConfig::max_age`].

use super::{ObjectKey, Presigned, StagingError, StagingStore, TokenError};
use crate::staging::Method;
use crate::worker::ByteStream;
use async_trait::async_trait;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// A staging store whose orgs may hold at most `org_cap` bytes each.
pub struct CappedStaging {
    inner: Arc<dyn StagingStore>,
    org_cap: u64,
    ledger: Arc<Mutex<Ledger>>,
}

#[derive(Default)]
struct Ledger {
    /// Bytes per org: stored objects plus uploads in progress.
    used: HashMap<String, u64>,
    objects: HashMap<Key, Entry>,
}

type Key = (String, String, String);

fn key_of(k: &ObjectKey) -> Key {
    (k.org.clone(), k.vm.clone(), k.object.clone())
}

struct Entry {
    size: u64,
    /// When the upload completed (`None`: in progress).
    stored: Option<SystemTime>,
}

impl Ledger {
    fn release(&mut self, key: &Key) {
        if let Some(e) = self.objects.remove(key) {
            if let Some(u) = self.used.get_mut(&key.0) {
                *u = u.saturating_sub(e.size);
                if *u == 0 {
                    self.used.remove(&key.0);
                }
            }
        }
    }
}

impl CappedStaging {
    /// Cap `inner` at `org_cap` bytes per org, counting `existing` objects
    /// (key, size, when stored) as already there.
    pub fn new(
        inner: Arc<dyn StagingStore>,
        org_cap: u64,
        existing: Vec<(ObjectKey, u64, SystemTime)>,
    ) -> CappedStaging {
        let mut ledger = Ledger::default();
        for (key, size, stored) in existing {
            *ledger.used.entry(key.org.clone()).or_default() += size;
            ledger.objects.insert(
                key_of(&key),
                Entry {
                    size,
                    stored: Some(stored),
                },
            );
        }
        CappedStaging {
            inner,
            org_cap,
            ledger: Arc::new(Mutex::new(ledger)),
        }
    }

    /// Bytes staged by `org` now (stored and being uploaded).
    pub fn used(&self, org: &str) -> u64 {
        self.ledger
            .lock()
            .map(|l| l.used.get(org).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Ledger>, StagingError> {
        self.ledger
            .lock()
            .map_err(|_| StagingError::Backend("staging ledger poisoned".into()))
    }
}

#[async_trait]
impl StagingStore for CappedStaging {
    async fn presign(
        &self,
        key: &ObjectKey,
        cap: u64,
        ttl: Duration,
    ) -> Result<Presigned, StagingError> {
        self.inner.presign(key, cap, ttl).await
    }

    fn resolve(&self, url: &str, method: Method) -> Result<ObjectKey, TokenError> {
        self.inner.resolve(url, method)
    }

    fn room(&self, org: &str) -> Option<u64> {
        Some(self.org_cap.saturating_sub(self.used(org)))
    }

    async fn put(&self, key: &ObjectKey, body: ByteStream, cap: u64) -> Result<u64, StagingError> {
        let k = key_of(key);
        {
            let mut l = self.lock()?;
            if l.objects.contains_key(&k) {
                return Err(StagingError::AlreadyUploaded);
            }
            if l.used.get(&key.org).copied().unwrap_or(0) >= self.org_cap {
                return Err(StagingError::QuotaExceeded { cap: self.org_cap });
            }
            l.objects.insert(
                k.clone(),
                Entry {
                    size: 0,
                    stored: None,
                },
            );
        }
        let over = Arc::new(AtomicBool::new(false));
        let counted = {
            let (ledger, over, k, org_cap) =
                (self.ledger.clone(), over.clone(), k.clone(), self.org_cap);
            body.map(move |chunk| {
                let chunk = chunk?;
                let n = chunk.len() as u64;
                let mut l = ledger
                    .lock()
                    .map_err(|_| std::io::Error::other("staging ledger poisoned"))?;
                let used = l.used.get(&k.0).copied().unwrap_or(0);
                if used.saturating_add(n) > org_cap {
                    over.store(true, Ordering::SeqCst);
                    return Err(std::io::Error::other("the org's staging quota is used up"));
                }
                *l.used.entry(k.0.clone()).or_default() += n;
                if let Some(e) = l.objects.get_mut(&k) {
                    e.size += n;
                }
                Ok(chunk)
            })
        };
        let result = self.inner.put(key, Box::pin(counted), cap).await;
        let mut l = self.lock()?;
        match result {
            Ok(size) => {
                if let Some(e) = l.objects.get_mut(&k) {
                    e.stored = Some(SystemTime::now());
                }
                Ok(size)
            }
            Err(e) => {
                l.release(&k);
                if over.load(Ordering::SeqCst) {
                    Err(StagingError::QuotaExceeded { cap: self.org_cap })
                } else {
                    Err(e)
                }
            }
        }
    }

    async fn get(&self, key: &ObjectKey) -> Result<(u64, ByteStream), StagingError> {
        self.inner.get(key).await
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StagingError> {
        self.inner.delete(key).await?;
        self.lock()?.release(&key_of(key));
        Ok(())
    }

    async fn gc(&self, max_age: Duration) -> Result<usize, StagingError> {
        // Taken before the backend's pass: an object old enough here is
        // older still for the backend (its clock starts before `stored`).
        let now = SystemTime::now();
        let removed = self.inner.gc(max_age).await?;
        let mut l = self.lock()?;
        let expired: Vec<Key> = l
            .objects
            .iter()
            .filter(|(_, e)| {
                e.stored
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age >= max_age)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in &expired {
            l.release(k);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::local::LocalStaging;
    use bytes::Bytes;

    fn key(org: &str) -> ObjectKey {
        ObjectKey {
            org: org.to_owned(),
            vm: uuid::Uuid::new_v4().to_string(),
            object: uuid::Uuid::new_v4().to_string(),
        }
    }

    fn body(n: usize, chunk: usize) -> ByteStream {
        let chunks: Vec<Result<Bytes, std::io::Error>> = (0..n.div_ceil(chunk))
            .map(|i| Ok(Bytes::from(vec![b'x'; chunk.min(n - i * chunk)])))
            .collect();
        Box::pin(futures::stream::iter(chunks))
    }

    fn files(dir: &std::path::Path) -> usize {
        walk(&dir.join("staging"))
    }

    fn walk(p: &std::path::Path) -> usize {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| {
                        if e.path().is_dir() {
                            walk(&e.path())
                        } else {
                            1
                        }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }

    async fn store(dir: &std::path::Path, cap: u64) -> CappedStaging {
        let local = LocalStaging::open(dir, "http://127.0.0.1:1").expect("open");
        let existing = local.existing();
        CappedStaging::new(Arc::new(local), cap, existing)
    }

    #[tokio::test]
    async fn uploads_past_the_org_cap_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path(), 1000).await;
        let org = uuid::Uuid::new_v4().to_string();
        let other = uuid::Uuid::new_v4().to_string();
        let a = key(&org);
        assert_eq!(
            s.put(&a, body(600, 100), u64::MAX).await.expect("fits"),
            600
        );
        assert_eq!(s.used(&org), 600);
        // 600 + 500 > 1000: cut at the chunk that crosses, nothing kept.
        let b = key(&org);
        let e = s.put(&b, body(500, 100), u64::MAX).await;
        assert!(
            matches!(e, Err(StagingError::QuotaExceeded { cap: 1000 })),
            "{e:?}"
        );
        assert_eq!(s.used(&org), 600);
        assert_eq!(files(dir.path()), 1);
        assert!(matches!(s.get(&b).await, Err(StagingError::NotFound)));
        // Another org has its own cap.
        assert!(s.put(&key(&other), body(1000, 100), u64::MAX).await.is_ok());
        // Exactly up to the cap fits; then even one byte is refused up front.
        assert!(s.put(&key(&org), body(400, 100), u64::MAX).await.is_ok());
        assert_eq!(s.room(&org), Some(0));
        assert!(matches!(
            s.put(&key(&org), body(1, 1), u64::MAX).await,
            Err(StagingError::QuotaExceeded { .. })
        ));
        // Deleting releases the bytes.
        s.delete(&a).await.expect("delete");
        assert_eq!(s.used(&org), 400);
        assert!(s.put(&key(&org), body(600, 100), u64::MAX).await.is_ok());
    }

    #[tokio::test]
    async fn an_upload_url_stores_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path(), 1 << 20).await;
        let org = uuid::Uuid::new_v4().to_string();
        let k = key(&org);
        assert!(s.put(&k, body(10, 10), u64::MAX).await.is_ok());
        assert!(matches!(
            s.put(&k, body(10, 10), u64::MAX).await,
            Err(StagingError::AlreadyUploaded)
        ));
        // A failed upload (over the object's cap) leaves the URL usable.
        let k2 = key(&org);
        assert!(matches!(
            s.put(&k2, body(100, 10), 50).await,
            Err(StagingError::TooLarge { cap: 50 })
        ));
        assert!(s.put(&k2, body(10, 10), 50).await.is_ok());
        assert_eq!(s.used(&org), 20);
    }

    #[tokio::test]
    async fn gc_and_restart_keep_the_count_right() {
        let dir = tempfile::tempdir().expect("tempdir");
        let org = uuid::Uuid::new_v4().to_string();
        let k = key(&org);
        {
            let s = store(dir.path(), 100).await;
            assert!(s.put(&k, body(80, 40), u64::MAX).await.is_ok());
        }
        // A new server counts what is on disk, and the URL stays used.
        let s = store(dir.path(), 100).await;
        assert_eq!(s.used(&org), 80);
        assert!(matches!(
            s.put(&k, body(1, 1), u64::MAX).await,
            Err(StagingError::AlreadyUploaded)
        ));
        assert!(matches!(
            s.put(&key(&org), body(40, 40), u64::MAX).await,
            Err(StagingError::QuotaExceeded { .. })
        ));
        // Young objects survive a GC, and stay counted.
        assert_eq!(s.gc(Duration::from_secs(3600)).await.expect("gc"), 0);
        assert_eq!(s.used(&org), 80);
        // Expired ones are removed and released.
        assert_eq!(s.gc(Duration::ZERO).await.expect("gc"), 1);
        assert_eq!(s.used(&org), 0);
        assert!(s.put(&key(&org), body(100, 50), u64::MAX).await.is_ok());
    }
}
