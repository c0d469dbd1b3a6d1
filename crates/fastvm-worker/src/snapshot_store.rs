//! The snapshot store: user snapshots in an S3-compatible object store
//! (AWS S3, MinIO, moto, ...), so that any worker with the same compat key
//! ([`crate::runtime::Runtime::compat_key`]) can restore them.
//!
//! ```text
//!  s3://<bucket>/<prefix>/
//!    layers/<sha256>.qcow2        frozen disk layers, content-addressed (shared by snapshots)
//!    images/<sha256>              kernel, initramfs and base rootfs the chain sits on
//!    snapshots/<id>/memory        device state (and RAM when `ram` is absent): QEMU migration stream
//!    snapshots/<id>/ram           the RAM file, packed ([`pack_ram`]: its data extents only)
//!    snapshots/<id>/snapshot.json [`StoredSnapshot`], written LAST: the commit marker
//! ```
//!
//! This module owns the object layout and the byte moving: streamed
//! uploads (multipart, [`PART_SIZE`] parts, at most [`PARTS_IN_FLIGHT`] in
//! flight) and streamed downloads (chunk by chunk into a file), so memory
//! stays bounded whatever the file size. Layers and image files are hashed
//! BEFORE upload (the digest is their key; an existing key is skipped after
//! a HEAD); the memory file is hashed WHILE it uploads (its digest goes into
//! `snapshot.json`). Downloads are hashed while they stream and checked.
//!
//! A reader never sees half a snapshot: `snapshot.json` appears only after
//! every object it names is complete. Deleting a snapshot removes
//! `snapshots/<id>/` (marker first); layers and image files stay, since
//! other snapshots may share them (no store-side collection yet).
//!
//! Placing fetched files into the local layout (backing files, permissions,
//! the local record) is the runtime's part ([`crate::runtime`]).

use crate::error::{Error, IoContext, Result};
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Size of multipart upload parts and of file reads (S3's minimum part is 5 MiB).
pub const PART_SIZE: usize = 8 << 20;
/// Parts uploading at once: with [`PART_SIZE`] this bounds an upload's memory.
pub const PARTS_IN_FLIGHT: usize = 2;
/// Version of [`StoredSnapshot`].
pub const FORMAT: u32 = 1;

/// Where the store is (`s3://bucket/prefix`) and how to sign for it. The
/// same fields as the control plane's `SnapshotStoreSettings` (wire type).
/// Fields left `None` come from the usual `AWS_*` environment variables.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreSettings {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: String,
    /// `http(s)://host[:port]` of the S3 API; `None`: AWS. `http://` is
    /// allowed (a local MinIO or moto).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSettings")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "******"),
            )
            .finish()
    }
}

/// A file of the store named by its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFile {
    pub sha256: String,
    pub size: u64,
}

/// The disk the bottom layer of a chain is an overlay of (the guest
/// image's rootfs), as an object `images/<sha256>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBase {
    pub sha256: String,
    /// Its format as the bottom layer names it (`raw`, `qcow2`).
    pub format: String,
}

/// `snapshots/<id>/snapshot.json`: everything a worker needs to rebuild
/// the snapshot in its own data dir.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredSnapshot {
    pub format: u32,
    /// The capturing worker's compat key: only a worker with the same key
    /// may restore it.
    pub compat_key: String,
    /// The record as captured (its paths are the capturing worker's).
    pub record: crate::runtime::SnapshotRecord,
    /// Disk layers, top first, as digests (`layers/<sha256>.qcow2`).
    pub layers: Vec<String>,
    /// The disk under the bottom layer, when it has one.
    pub base: Option<StoredBase>,
    /// Kernel and initramfs the snapshot's machine was started with (`images/<sha256>`).
    pub kernel: String,
    pub initrd: String,
    pub memory: StoredFile,
    /// The packed RAM file of a snapshot captured with one (see
    /// `crate::migstream`); absent: the RAM is in `memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<StoredFile>,
}

/// First bytes of a packed RAM file.
const PACKED_MAGIC: &[u8; 8] = b"FVMRAM1\n";
/// Largest extent record written or accepted.
const PACKED_EXTENT: u64 = 8 << 20;

/// Write the sparse file `src` packed into `dest`: [`PACKED_MAGIC`], its
/// length (be64), then its data extents as (offset be64, length be64,
/// bytes) records of at most [`PACKED_EXTENT`] bytes. Holes take no
/// space (a RAM file is mostly holes). Returns the packed size.
pub fn pack_ram(src: &Path, dest: &Path) -> std::io::Result<u64> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(src)?;
    let len = file.metadata()?.len();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, crate::jail::create_private(dest)?);
    out.write_all(PACKED_MAGIC)?;
    out.write_all(&len.to_be_bytes())?;
    let mut written = 16u64;
    let mut buf = vec![0u8; PACKED_EXTENT as usize];
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a valid fd.
        let data = unsafe { libc::lseek(file.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole remains.
        }
        // SAFETY: lseek on a valid fd.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole } as u64;
        let mut off = data as u64;
        while off < end {
            let n = (end - off).min(PACKED_EXTENT) as usize;
            file.read_exact_at(&mut buf[..n], off)?;
            out.write_all(&off.to_be_bytes())?;
            out.write_all(&(n as u64).to_be_bytes())?;
            out.write_all(&buf[..n])?;
            written += 16 + n as u64;
            off += n as u64;
        }
        pos = end as i64;
    }
    out.flush()?;
    Ok(written)
}

/// Rebuild the sparse RAM file `dest` from a packed one ([`pack_ram`]);
/// any record that does not fit the declared length is an error.
pub fn unpack_ram(src: &Path, dest: &Path) -> std::io::Result<()> {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let bad = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("packed RAM file: {what}"),
        )
    };
    let mut r = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(src)?);
    let mut head = [0u8; 16];
    r.read_exact(&mut head)?;
    if &head[..8] != PACKED_MAGIC {
        return Err(bad("not a packed RAM file"));
    }
    let len = u64::from_be_bytes(head[8..].try_into().map_err(|_| bad("header"))?);
    let out = crate::jail::create_private(dest)?;
    out.set_len(len)?;
    let mut buf = vec![0u8; PACKED_EXTENT as usize];
    loop {
        let mut rec = [0u8; 16];
        match r.read_exact(&mut rec[..1]) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            r => r?,
        }
        r.read_exact(&mut rec[1..])?;
        let off = u64::from_be_bytes(rec[..8].try_into().map_err(|_| bad("record"))?);
        let n = u64::from_be_bytes(rec[8..].try_into().map_err(|_| bad("record"))?);
        if n > PACKED_EXTENT || off.checked_add(n).is_none_or(|e| e > len) {
            return Err(bad("an extent outside the file"));
        }
        r.read_exact(&mut buf[..n as usize])?;
        out.write_all_at(&buf[..n as usize], off)?;
    }
}

/// A snapshot store on one bucket and prefix.
pub struct SnapshotStore {
    store: AmazonS3,
    url: String,
    /// Without slashes at either end; may be empty.
    prefix: String,
}

impl std::fmt::Debug for SnapshotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotStore")
            .field("url", &self.url)
            .finish()
    }
}

fn store_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::SnapshotStore(format!("{what}: {e}"))
}

/// True for a lowercase SHA-256 hex digest.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// True for an id usable as an object key segment and a directory name.
pub fn valid_snapshot_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// SHA-256 of a file, read in [`PART_SIZE`] chunks on a blocking thread.
pub async fn sha256_file(path: &Path) -> Result<String> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut f = std::fs::File::open(&owned)?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h)?;
        Ok(hex::encode(h.finalize()))
    })
    .await
    .map_err(|e| store_err("hashing", e))?
    .ctx(|| format!("hash {}", path.display()))
}

impl SnapshotStore {
    /// A store for `settings` (no request is made: a wrong endpoint or
    /// credentials show at the first transfer).
    pub fn new(settings: &StoreSettings) -> Result<SnapshotStore> {
        let rest = settings
            .url
            .strip_prefix("s3://")
            .ok_or_else(|| store_err("snapshot store URL", "must start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/').to_owned();
        if bucket.is_empty() {
            return Err(store_err("snapshot store URL", "no bucket"));
        }
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(false);
        if let Some(endpoint) = &settings.endpoint {
            b = b
                .with_endpoint(endpoint.trim_end_matches('/'))
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(region) = &settings.region {
            b = b.with_region(region);
        }
        if let Some(k) = &settings.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(s) = &settings.secret_access_key {
            b = b.with_secret_access_key(s);
        }
        let store = b.build().map_err(|e| store_err("snapshot store", e))?;
        Ok(SnapshotStore {
            store,
            url: settings.url.clone(),
            prefix,
        })
    }

    /// The store's `s3://bucket/prefix`.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, rel: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(rel)
        } else {
            ObjectPath::from(format!("{}/{rel}", self.prefix))
        }
    }

    pub fn layer_key(digest: &str) -> String {
        format!("layers/{digest}.qcow2")
    }

    pub fn image_key(digest: &str) -> String {
        format!("images/{digest}")
    }

    pub fn snapshot_key(id: &str, file: &str) -> String {
        format!("snapshots/{id}/{file}")
    }

    /// Whether object `rel` exists (a HEAD).
    pub async fn exists(&self, rel: &str) -> Result<bool> {
        match self.store.head(&self.path(rel)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(store_err(&format!("HEAD {rel}"), e)),
        }
    }

    /// Stream file `path` to object `rel` (multipart), hashing it on the
    /// way; returns its digest and size. A failed upload is aborted (no
    /// object, no parts left).
    pub async fn upload_file(&self, path: &Path, rel: &str) -> Result<StoredFile> {
        let mut file = tokio::fs::File::open(path)
            .await
            .ctx(|| format!("open {}", path.display()))?;
        let upload = self
            .store
            .put_multipart(&self.path(rel))
            .await
            .map_err(|e| store_err(&format!("upload {rel}"), e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let copied: Result<()> = async {
            loop {
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| store_err(&format!("upload {rel}"), e))?;
                let mut buf = Vec::with_capacity(PART_SIZE);
                let n = (&mut file)
                    .take(PART_SIZE as u64)
                    .read_to_end(&mut buf)
                    .await
                    .ctx(|| format!("read {}", path.display()))?;
                if n == 0 {
                    return Ok(());
                }
                hasher.update(&buf);
                size += n as u64;
                writer.put(buf.into());
            }
        }
        .await;
        match copied {
            Ok(()) => {
                writer
                    .finish()
                    .await
                    .map_err(|e| store_err(&format!("upload {rel}"), e))?;
                Ok(StoredFile {
                    sha256: hex::encode(hasher.finalize()),
                    size,
                })
            }
            Err(e) => {
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// Upload `path` as content-addressed object `rel` unless it exists
    /// already; true when it was uploaded.
    pub async fn upload_if_missing(&self, path: &Path, rel: &str) -> Result<bool> {
        if self.exists(rel).await? {
            return Ok(false);
        }
        self.upload_file(path, rel).await?;
        Ok(true)
    }

    /// Stream object `rel` into a new file `dest` (created 0600), hashing it
    /// on the way; returns its digest and size. A failed download removes `dest`.
    pub async fn download_file(&self, rel: &str, dest: &Path) -> Result<StoredFile> {
        let result = self.download_inner(rel, dest).await;
        if result.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        result
    }

    async fn download_inner(&self, rel: &str, dest: &Path) -> Result<StoredFile> {
        let got = match self.store.get(&self.path(rel)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(store_err(&format!("download {rel}"), "object missing"))
            }
            Err(e) => return Err(store_err(&format!("download {rel}"), e)),
        };
        let file =
            crate::jail::create_private(dest).ctx(|| format!("create {}", dest.display()))?;
        let mut file =
            tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(file));
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| store_err(&format!("download {rel}"), e))?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            file.write_all(&chunk)
                .await
                .ctx(|| format!("write {}", dest.display()))?;
        }
        file.flush()
            .await
            .ctx(|| format!("write {}", dest.display()))?;
        file.get_ref()
            .sync_all()
            .await
            .ctx(|| format!("sync {}", dest.display()))?;
        Ok(StoredFile {
            sha256: hex::encode(hasher.finalize()),
            size,
        })
    }

    /// Download content-addressed object `rel` into `dest` and check that
    /// its digest is `digest`.
    pub async fn download_verified(&self, rel: &str, digest: &str, dest: &Path) -> Result<()> {
        let got = self.download_file(rel, dest).await?;
        if got.sha256 != digest {
            let _ = std::fs::remove_file(dest);
            return Err(store_err(
                &format!("download {rel}"),
                format!("content hash is {}, expected {digest}", got.sha256),
            ));
        }
        Ok(())
    }

    /// Commit a snapshot: write its `snapshot.json` (call it after every
    /// object it names is uploaded).
    pub async fn put_snapshot(&self, doc: &StoredSnapshot) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(doc).map_err(|e| store_err("snapshot.json", e))?;
        let rel = Self::snapshot_key(&doc.record.id, "snapshot.json");
        self.store
            .put(&self.path(&rel), PutPayload::from(bytes))
            .await
            .map_err(|e| store_err(&format!("upload {rel}"), e))?;
        Ok(())
    }

    /// The committed snapshot `id`; `Error::NoSuchSnapshot` when the store
    /// has none.
    pub async fn get_snapshot(&self, id: &str) -> Result<StoredSnapshot> {
        if !valid_snapshot_id(id) {
            return Err(Error::NoSuchSnapshot(id.to_owned()));
        }
        let rel = Self::snapshot_key(id, "snapshot.json");
        let got = match self.store.get(&self.path(&rel)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::NoSuchSnapshot(id.to_owned()))
            }
            Err(e) => return Err(store_err(&format!("download {rel}"), e)),
        };
        let bytes = got
            .bytes()
            .await
            .map_err(|e| store_err(&format!("download {rel}"), e))?;
        let doc: StoredSnapshot =
            serde_json::from_slice(&bytes).map_err(|e| store_err(&format!("parse {rel}"), e))?;
        if doc.format != FORMAT || doc.record.id != id {
            return Err(store_err(
                &format!("parse {rel}"),
                format!("format {} of snapshot {}", doc.format, doc.record.id),
            ));
        }
        Ok(doc)
    }

    /// Remove `snapshots/<id>/` (its `snapshot.json` first, so a reader sees
    /// the snapshot gone rather than half of it). Layers and image files
    /// stay: other snapshots may share them. Deleting an absent snapshot is
    /// not an error.
    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        if !valid_snapshot_id(id) {
            return Ok(());
        }
        for file in ["snapshot.json", "memory", "ram"] {
            let rel = Self::snapshot_key(id, file);
            match self.store.delete(&self.path(&rel)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_err(&format!("delete {rel}"), e)),
            }
        }
        // Anything else under the snapshot's prefix (left by a later format).
        for rel in self.list(&format!("snapshots/{id}/")).await? {
            match self.store.delete(&self.path(&rel)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_err(&format!("delete {rel}"), e)),
            }
        }
        Ok(())
    }

    /// Keys (relative to the prefix) of the objects under `under` (e.g.
    /// `layers/`).
    pub async fn list(&self, under: &str) -> Result<Vec<String>> {
        let base = self.path(under.trim_end_matches('/'));
        let mut listing = self.store.list(Some(&base));
        let mut keys = Vec::new();
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| store_err(&format!("list {under}"), e))?;
            let key = meta.location.to_string();
            keys.push(key.strip_prefix(&strip).unwrap_or(&key).to_owned());
        }
        keys.sort();
        Ok(keys)
    }
}

#[cfg(test)]
mod ram_tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn packed_ram_round_trips_holes_and_data_and_refuses_garbage() {
        let dir = tempfile::tempdir().expect("tmp");
        let (src, packed, back) = (
            dir.path().join("ram"),
            dir.path().join("p"),
            dir.path().join("b"),
        );
        let f = std::fs::File::create(&src).expect("create");
        f.set_len(64 << 20).expect("len");
        f.write_all_at(&[7u8; 4096], 0).expect("w");
        f.write_all_at(&vec![9u8; 10 << 20], 20 << 20).expect("w");
        f.write_all_at(&[1u8; 4096], (64 << 20) - 4096).expect("w");
        let size = pack_ram(&src, &packed).expect("pack");
        assert!(size < 11 << 20, "holes packed away: {size}");
        unpack_ram(&packed, &back).expect("unpack");
        assert_eq!(
            std::fs::read(&src).expect("r"),
            std::fs::read(&back).expect("r")
        );
        let meta = std::fs::metadata(&back).expect("stat");
        assert!(meta.blocks() * 512 < 12 << 20, "unpacked file is sparse");
        // Truncated, or an extent past the end: errors, never a panic.
        let bytes = std::fs::read(&packed).expect("r");
        std::fs::write(&packed, &bytes[..bytes.len() - 100]).expect("w");
        assert!(unpack_ram(&packed, &back).is_err());
        let mut evil = bytes[..16].to_vec();
        evil.extend_from_slice(&(60u64 << 20).to_be_bytes());
        evil.extend_from_slice(&(8u64 << 20).to_be_bytes());
        evil.extend_from_slice(&vec![0u8; 8 << 20]);
        std::fs::write(&packed, &evil).expect("w");
        assert!(unpack_ram(&packed, &back).is_err());
        std::fs::write(&packed, b"garbage garbage garbage").expect("w");
        assert!(unpack_ram(&packed, &back).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_bucket_and_prefix() {
        let s = |url: &str| StoreSettings {
            url: url.into(),
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
        };
        let store = SnapshotStore::new(&s("s3://bucket/a/b/")).expect("store");
        assert_eq!(store.prefix, "a/b");
        assert_eq!(
            store.path(&SnapshotStore::layer_key("ab")).to_string(),
            "a/b/layers/ab.qcow2"
        );
        let store = SnapshotStore::new(&s("s3://bucket")).expect("store");
        assert_eq!(
            store.path("snapshots/x/memory").to_string(),
            "snapshots/x/memory"
        );
        assert!(SnapshotStore::new(&s("http://bucket")).is_err());
        assert!(SnapshotStore::new(&s("s3:///x")).is_err());
    }

    #[test]
    fn secrets_are_not_debug_printed() {
        let s = StoreSettings {
            url: "s3://b".into(),
            secret_access_key: Some("hunter2".into()),
            ..Default::default()
        };
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn ids_and_digests() {
        assert!(valid_snapshot_id("0b5a-x_1.2"));
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(129)] {
            assert!(!valid_snapshot_id(bad), "{bad:?}");
        }
        assert!(is_digest(&"a".repeat(64)));
        assert!(!is_digest(&"A".repeat(64)));
        assert!(!is_digest("4f1d3c7e-uuid"));
    }
}
