//! The default staging backend: files under `<data>/staging/<org>/<vm>/<object>`,
//! URLs `<public base>/v1/staging/<token>` signed with the data dir's secret
//! (`<data>/staging.key`, 32 random bytes, mode 0600, made on first start).
//!
//! Writes go to `<object>.part-<uuid>` and are renamed when complete, so a
//! reader never sees half an object and a failed upload leaves nothing.

use super::token::{self, Claims, Method, TokenError};
use super::{unix_now, ObjectKey, Presigned, StagingError, StagingStore};
use crate::worker::ByteStream;
use async_trait::async_trait;
use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Route prefix of signed URLs.
pub const URL_PREFIX: &str = "/v1/staging/";
const SECRET_FILE: &str = "staging.key";
/// Read size of object downloads.
const READ_CHUNK: usize = 256 << 10;

pub struct LocalStaging {
    root: PathBuf,
    secret: Vec<u8>,
    base_url: String,
}

impl LocalStaging {
    /// Open (creating) the store of a data dir; URLs start with `base_url`
    /// (`http://host:port`, no trailing slash).
    pub fn open(data_dir: &Path, base_url: &str) -> anyhow::Result<LocalStaging> {
        use anyhow::Context as _;
        let root = data_dir.join("staging");
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        // Staged files are tenants' data: only the server (root) reads them, never
        // a VM's QEMU uid (see the worker's jail.rs).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("restricting {}", root.display()))?;
        }
        let key_path = data_dir.join(SECRET_FILE);
        let secret = match std::fs::read_to_string(&key_path) {
            Ok(s) => hex::decode(s.trim()).with_context(|| {
                format!(
                    "{} is not hex; delete it to make a new one (outstanding URLs become invalid)",
                    key_path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret: [u8; 32] = rand::random();
                crate::write_secret(&key_path, &format!("{}\n", hex::encode(secret)))
                    .with_context(|| format!("writing {}", key_path.display()))?;
                secret.to_vec()
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", key_path.display())),
        };
        Ok(LocalStaging {
            root,
            secret,
            base_url: base_url.trim_end_matches('/').to_owned(),
        })
    }

    /// Check a token of `/v1/staging/{token}` for `method`.
    pub fn verify_token(&self, token: &str, method: Method) -> Result<Claims, TokenError> {
        let claims = token::verify(&self.secret, token, method, unix_now())?;
        // Signed by us, so well-formed; checked anyway since they become a path.
        for part in [&claims.org, &claims.vm, &claims.object] {
            if uuid::Uuid::parse_str(part).is_err() {
                return Err(TokenError::Invalid);
            }
        }
        Ok(claims)
    }

    /// The complete objects in the store, with size and modification time
    /// (for [`super::capped::CappedStaging`] at start). Unreadable entries
    /// and partial uploads are skipped.
    pub fn existing(&self) -> Vec<(ObjectKey, u64, std::time::SystemTime)> {
        let mut found = Vec::new();
        let dirs = |p: &Path| -> Vec<(String, PathBuf)> {
            std::fs::read_dir(p)
                .map(|rd| {
                    rd.flatten()
                        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
                        .filter(|(name, _)| uuid::Uuid::parse_str(name).is_ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        for (org, org_dir) in dirs(&self.root) {
            for (vm, vm_dir) in dirs(&org_dir) {
                for (object, path) in dirs(&vm_dir) {
                    let Ok(meta) = std::fs::metadata(&path) else {
                        continue;
                    };
                    if !meta.is_file() {
                        continue;
                    }
                    let modified = meta
                        .modified()
                        .unwrap_or_else(|_| std::time::SystemTime::now());
                    let key = ObjectKey {
                        org: org.clone(),
                        vm: vm.clone(),
                        object,
                    };
                    found.push((key, meta.len(), modified));
                }
            }
        }
        found
    }

    fn path(&self, key: &ObjectKey) -> PathBuf {
        self.root.join(&key.org).join(&key.vm).join(&key.object)
    }

    fn url(&self, key: &ObjectKey, method: Method, cap: u64, expires: u64) -> String {
        let claims = Claims {
            object: key.object.clone(),
            org: key.org.clone(),
            vm: key.vm.clone(),
            method,
            expires,
            cap,
        };
        format!(
            "{}{URL_PREFIX}{}",
            self.base_url,
            token::sign(&self.secret, &claims)
        )
    }
}

/// The key of verified claims.
pub fn key_of(claims: &Claims) -> ObjectKey {
    ObjectKey {
        org: claims.org.clone(),
        vm: claims.vm.clone(),
        object: claims.object.clone(),
    }
}

/// The token of a URL `.../v1/staging/<token>[?...]`.
fn token_of(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once(URL_PREFIX)?;
    let token = rest.split(['?', '#']).next()?;
    (!token.is_empty()).then_some(token)
}

async fn write_capped(
    file: &mut tokio::fs::File,
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
        file.write_all(&chunk)
            .await
            .map_err(|e| StagingError::Backend(format!("writing the object: {e}")))?;
    }
    file.flush()
        .await
        .map_err(|e| StagingError::Backend(format!("writing the object: {e}")))?;
    Ok(size)
}

#[async_trait]
impl StagingStore for LocalStaging {
    async fn presign(
        &self,
        key: &ObjectKey,
        cap: u64,
        ttl: Duration,
    ) -> Result<Presigned, StagingError> {
        let expires = unix_now().saturating_add(ttl.as_secs().max(1));
        Ok(Presigned {
            upload_url: self.url(key, Method::Put, cap, expires),
            download_url: self.url(key, Method::Get, cap, expires),
        })
    }

    fn resolve(&self, url: &str, method: Method) -> Result<ObjectKey, TokenError> {
        let token = token_of(url).ok_or(TokenError::Invalid)?;
        Ok(key_of(&self.verify_token(token, method)?))
    }

    async fn put(&self, key: &ObjectKey, body: ByteStream, cap: u64) -> Result<u64, StagingError> {
        let path = self.path(key);
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.root.clone());
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| StagingError::Backend(format!("creating {}: {e}", dir.display())))?;
        let part = dir.join(format!("{}.part-{}", key.object, uuid::Uuid::new_v4()));
        let mut file = tokio::fs::File::create(&part)
            .await
            .map_err(|e| StagingError::Backend(format!("creating {}: {e}", part.display())))?;
        let written = write_capped(&mut file, body, cap).await;
        drop(file);
        let result = match written {
            Ok(size) => tokio::fs::rename(&part, &path)
                .await
                .map(|()| size)
                .map_err(|e| StagingError::Backend(format!("renaming {}: {e}", part.display()))),
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = tokio::fs::remove_file(&part).await;
        }
        result
    }

    async fn get(&self, key: &ObjectKey) -> Result<(u64, ByteStream), StagingError> {
        let path = self.path(key);
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StagingError::NotFound)
            }
            Err(e) => {
                return Err(StagingError::Backend(format!(
                    "opening {}: {e}",
                    path.display()
                )))
            }
        };
        let size = file
            .metadata()
            .await
            .map_err(|e| StagingError::Backend(e.to_string()))?
            .len();
        let stream = tokio_util::io::ReaderStream::with_capacity(file, READ_CHUNK);
        Ok((size, Box::pin(stream)))
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), StagingError> {
        match tokio::fs::remove_file(self.path(key)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StagingError::Backend(e.to_string())),
        }
    }

    async fn gc(&self, max_age: Duration) -> Result<usize, StagingError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || gc_dir(&root, max_age, 0))
            .await
            .map_err(|e| StagingError::Backend(e.to_string()))?
    }
}

/// Remove files older than `max_age` under `dir` (org/vm/object: depth 2),
/// then directories left empty.
fn gc_dir(dir: &Path, max_age: Duration, depth: u32) -> Result<usize, StagingError> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => {
            return Err(StagingError::Backend(format!(
                "reading {}: {e}",
                dir.display()
            )))
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() && depth < 2 {
            removed += gc_dir(&path, max_age, depth + 1)?;
            let _ = std::fs::remove_dir(&path); // only succeeds when empty
        } else if meta.is_file() {
            let old = meta
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age >= max_age);
            if old && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn key() -> ObjectKey {
        ObjectKey {
            org: uuid::Uuid::new_v4().to_string(),
            vm: uuid::Uuid::new_v4().to_string(),
            object: uuid::Uuid::new_v4().to_string(),
        }
    }

    fn body(chunks: Vec<&'static [u8]>) -> ByteStream {
        Box::pin(futures::stream::iter(
            chunks.into_iter().map(|c| Ok(Bytes::from_static(c))),
        ))
    }

    #[tokio::test]
    async fn put_get_resolve_and_cap() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = LocalStaging::open(dir.path(), "http://127.0.0.1:1/")?;
        let k = key();
        let urls = s.presign(&k, 5, Duration::from_secs(60)).await?;
        assert!(urls
            .upload_url
            .starts_with("http://127.0.0.1:1/v1/staging/"));
        assert_eq!(s.resolve(&urls.download_url, Method::Get)?, k);
        assert_eq!(s.resolve(&urls.upload_url, Method::Put)?, k);
        assert_eq!(
            s.resolve(&urls.upload_url, Method::Get),
            Err(TokenError::WrongMethod(Method::Put))
        );
        assert_eq!(
            s.resolve("http://elsewhere/x", Method::Get),
            Err(TokenError::Invalid)
        );
        assert!(matches!(s.get(&k).await, Err(StagingError::NotFound)));
        assert_eq!(s.put(&k, body(vec![b"ab", b"cde"]), 5).await?, 5);
        let (size, mut stream) = s.get(&k).await?;
        assert_eq!(size, 5);
        let mut got = Vec::new();
        while let Some(c) = stream.next().await {
            got.extend_from_slice(&c?);
        }
        assert_eq!(got, b"abcde");
        // Crossing the cap: refused, the old object stays, no part file is left.
        assert!(matches!(
            s.put(&k, body(vec![b"abc", b"def"]), 5).await,
            Err(StagingError::TooLarge { cap: 5 })
        ));
        assert_eq!(s.get(&k).await?.0, 5);
        let dir_entries = std::fs::read_dir(s.path(&k).parent().unwrap_or(dir.path()))?.count();
        assert_eq!(dir_entries, 1);
        // The secret persists across opens: old URLs stay valid.
        let again = LocalStaging::open(dir.path(), "http://other:2")?;
        assert_eq!(again.resolve(&urls.download_url, Method::Get)?, k);
        Ok(())
    }

    #[tokio::test]
    async fn gc_removes_old_objects_only() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let s = LocalStaging::open(dir.path(), "http://h")?;
        let k = key();
        s.put(&k, body(vec![b"x"]), 5).await?;
        assert_eq!(s.gc(Duration::from_secs(3600)).await?, 0);
        assert_eq!(s.gc(Duration::ZERO).await?, 1);
        assert!(matches!(s.get(&k).await, Err(StagingError::NotFound)));
        assert_eq!(std::fs::read_dir(dir.path().join("staging"))?.count(), 0);
        Ok(())
    }
}
