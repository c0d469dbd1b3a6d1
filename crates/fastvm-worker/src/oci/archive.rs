//! OCI image archives (`oci-archive:`, a tar of an OCI image layout): the
//! form images take between the host and a Dockerfile builder VM.
//!
//! ```text
//!  host -> builder   write_archive: a pulled FROM image (manifest and
//!                    config as the registry served them, layers from the
//!                    blob cache), loaded there with `buildah pull`
//!  builder -> host   read_archive: the build's result (`buildah push
//!                    oci-archive:`); its blobs go into the blob cache,
//!                    each checked against its digest
//! ```
//!
//! The archive that comes back was written in a VM that ran an untrusted
//! Dockerfile, so [`read_archive`] trusts nothing in it: only regular files
//! named `oci-layout`, `index.json` and `blobs/sha256/<hex>` are read, each
//! blob must hash to its name, sizes are capped, and the image is read
//! through its digests alone (no path from the archive is ever opened).

use super::layer::Compression;
use super::registry::{
    blob_path, parse_defaults, short, CachedLayer, ConfigFile, PulledImage, RawBlob,
};
use oci_client::manifest::OciImageManifest;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Largest `index.json`, manifest or config read back.
const MAX_JSON_BYTES: u64 = 4 << 20;
/// Most entries of an archive read back.
const MAX_ENTRIES: usize = 4096;

/// Write `image` as an OCI image layout tar to `out`, named `name` in its
/// index (`org.opencontainers.image.ref.name`).
pub fn write_archive(image: &PulledImage, out: impl Write) -> std::io::Result<()> {
    let mut tar = tar::Builder::new(out);
    let mut add = |name: &str, data: &[u8]| -> std::io::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        tar.append_data(&mut h, name, data)
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": image.manifest.media_type,
            "digest": image.manifest.digest,
            "size": image.manifest.bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": image.name},
        }],
    });
    add("index.json", index.to_string().as_bytes())?;
    for blob in [&image.manifest, &image.config] {
        add(&blob_name(&blob.digest)?, &blob.bytes)?;
    }
    for l in &image.layers {
        let mut f = std::fs::File::open(&l.path)?;
        tar.append_file(blob_name(&l.digest)?, &mut f)?;
    }
    tar.into_inner()?.flush()
}

fn blob_name(digest: &str) -> std::io::Result<String> {
    digest
        .strip_prefix("sha256:")
        .map(|hex| format!("blobs/sha256/{hex}"))
        .ok_or_else(|| std::io::Error::other(format!("{digest} is not a sha256 digest")))
}

/// What [`read_archive`] found: the image, and the blobs it stored.
#[derive(Debug)]
pub struct ReadArchive {
    pub image: PulledImage,
    /// Blob files this read added to the cache (the caller may drop those
    /// the image does not use).
    pub added: Vec<PathBuf>,
}

/// Read an OCI image layout tar from `input`: every blob into the cache at
/// `<cache_root>/blobs/sha256/` (verified), then the image its index names.
/// `max_bytes` caps the blobs' total size. Errors are user-safe strings.
pub fn read_archive(
    cache_root: &Path,
    input: impl Read,
    max_bytes: u64,
) -> Result<ReadArchive, String> {
    let dir = cache_root.join("blobs").join("sha256");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create the layer cache: {e}"))?;
    let mut archive = tar::Archive::new(input);
    let mut index: Option<Vec<u8>> = None;
    let mut present: BTreeMap<String, u64> = BTreeMap::new();
    let mut added = Vec::new();
    let mut total = 0u64;
    let entries = archive
        .entries()
        .map_err(|e| format!("the build result is not a tar archive: {e}"))?;
    for (n, entry) in entries.enumerate() {
        if n >= MAX_ENTRIES {
            return Err(format!(
                "the build result has more than {MAX_ENTRIES} entries"
            ));
        }
        let mut entry = entry.map_err(|e| format!("the build result is damaged: {e}"))?;
        let path = entry
            .path()
            .map_err(|e| format!("the build result is damaged: {e}"))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let size = entry.size();
        if path == "index.json" {
            if size > MAX_JSON_BYTES {
                return Err("the build result's index.json is too large".into());
            }
            let mut buf = Vec::new();
            entry
                .read_to_end(&mut buf)
                .map_err(|e| format!("the build result is damaged: {e}"))?;
            index = Some(buf);
            continue;
        }
        let Some(hex) = path.strip_prefix("blobs/sha256/") else {
            continue; // oci-layout and anything else: not needed
        };
        let digest = format!("sha256:{hex}");
        let Some(dest) = blob_path(cache_root, &digest) else {
            return Err(format!("the build result has a blob named {path:?}"));
        };
        total = total.saturating_add(size);
        if total > max_bytes {
            return Err(format!(
                "the built image is larger than the disk ({max_bytes} bytes)"
            ));
        }
        if dest.is_file() {
            super::cache::touch(&dest);
            present.insert(digest, size);
            continue; // already cached (content-addressed: same bytes)
        }
        let tmp = dest.with_extension(format!("partial-{}", uuid::Uuid::new_v4().simple()));
        let stored = (|| -> Result<(), String> {
            let mut f = std::fs::File::create(&tmp)
                .map_err(|e| format!("cannot create a layer file: {e}"))?;
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let k = entry
                    .read(&mut buf)
                    .map_err(|e| format!("the build result is damaged: {e}"))?;
                if k == 0 {
                    break;
                }
                hash.update(&buf[..k]);
                f.write_all(&buf[..k])
                    .map_err(|e| format!("cannot write a layer file: {e}"))?;
            }
            f.sync_all()
                .map_err(|e| format!("cannot write a layer file: {e}"))?;
            let got = format!("sha256:{}", hex::encode(hash.finalize()));
            if got != digest {
                return Err(format!(
                    "blob {} of the build result has digest {}",
                    short(&digest),
                    short(&got)
                ));
            }
            std::fs::rename(&tmp, &dest).map_err(|e| format!("cannot commit a layer file: {e}"))
        })();
        if let Err(e) = stored {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        added.push(dest);
        present.insert(digest, size);
    }
    let index = index.ok_or("the build result has no index.json")?;
    let image = image_of(cache_root, &index, &present)?;
    Ok(ReadArchive { image, added })
}

#[derive(serde::Deserialize)]
struct Index {
    manifests: Vec<oci_client::manifest::OciDescriptor>,
}

/// The one image an index names, read from the cache.
fn image_of(
    cache_root: &Path,
    index: &[u8],
    present: &BTreeMap<String, u64>,
) -> Result<PulledImage, String> {
    let index: Index = serde_json::from_slice(index)
        .map_err(|e| format!("the build result's index.json is not valid: {e}"))?;
    let [desc] = index.manifests.as_slice() else {
        return Err(format!(
            "the build result names {} images (expected one)",
            index.manifests.len()
        ));
    };
    let small = |digest: &str, what: &str| -> Result<Vec<u8>, String> {
        match present.get(digest) {
            Some(size) if *size <= MAX_JSON_BYTES => {}
            Some(_) => return Err(format!("the build result's {what} is too large")),
            None => return Err(format!("the build result lacks its {what}")),
        }
        let path = blob_path(cache_root, digest).ok_or(format!("bad {what} digest"))?;
        std::fs::read(path).map_err(|e| format!("cannot read the {what}: {e}"))
    };
    let manifest_bytes = small(&desc.digest, "manifest")?;
    let manifest: OciImageManifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| format!("the build result's manifest is not valid: {e}"))?;
    let config_bytes = small(&manifest.config.digest, "image config")?;
    let config: ConfigFile = serde_json::from_slice(&config_bytes)
        .map_err(|e| format!("the build result's image config is not valid: {e}"))?;
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for l in &manifest.layers {
        let compression = Compression::from_media_type(&l.media_type)
            .ok_or_else(|| format!("layer media type {:?} is not a tar layer", l.media_type))?;
        let size = *present
            .get(&l.digest)
            .ok_or_else(|| format!("the build result lacks layer {}", short(&l.digest)))?;
        let path = blob_path(cache_root, &l.digest).ok_or("bad layer digest")?;
        layers.push(CachedLayer {
            digest: l.digest.clone(),
            path,
            compression,
            size,
        });
    }
    Ok(PulledImage {
        manifest_digest: desc.digest.clone(),
        layers,
        defaults: parse_defaults(config.config),
        downloaded_bytes: 0,
        cached_layers: 0,
        manifest: RawBlob {
            digest: desc.digest.clone(),
            media_type: desc.media_type.clone(),
            bytes: manifest_bytes,
        },
        config: RawBlob {
            digest: manifest.config.digest.clone(),
            media_type: manifest.config.media_type.clone(),
            bytes: config_bytes,
        },
        name: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    /// A one-layer image in the cache of `root`, as a pull leaves it.
    type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

    fn pulled(root: &Path) -> R<PulledImage> {
        let mut layer = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_cksum();
        layer.append_data(&mut h, "hello", &b"hi\n"[..])?;
        let layer = layer.into_inner()?;
        let ld = sha(&layer);
        let lp = blob_path(root, &ld).ok_or("bad digest")?;
        std::fs::create_dir_all(lp.parent().ok_or("no parent")?)?;
        std::fs::write(&lp, &layer)?;
        let config = serde_json::json!({"architecture": "amd64", "os": "linux",
            "config": {"Env": ["A=1"], "WorkingDir": "/w"},
            "rootfs": {"type": "layers", "diff_ids": [ld]}})
        .to_string()
        .into_bytes();
        let manifest = serde_json::json!({"schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld, "size": layer.len()}]})
        .to_string()
        .into_bytes();
        Ok(PulledImage {
            manifest_digest: sha(&manifest),
            layers: vec![CachedLayer {
                digest: ld,
                path: lp,
                compression: Compression::None,
                size: layer.len() as u64,
            }],
            defaults: Default::default(),
            downloaded_bytes: 0,
            cached_layers: 0,
            manifest: RawBlob {
                digest: sha(&manifest),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                bytes: manifest,
            },
            config: RawBlob {
                digest: sha(&config),
                media_type: "application/vnd.oci.image.config.v1+json".into(),
                bytes: config,
            },
            name: "docker.io/library/x:1".into(),
        })
    }

    #[test]
    fn an_archive_reads_back_into_another_cache() -> R {
        let a = tempfile::tempdir()?;
        let b = tempfile::tempdir()?;
        let img = pulled(a.path())?;
        let mut tar = Vec::new();
        write_archive(&img, &mut tar)?;
        let back = read_archive(b.path(), &tar[..], 1 << 20)?;
        assert_eq!(back.image.manifest_digest, img.manifest_digest);
        assert_eq!(back.image.layers.len(), 1);
        assert_eq!(
            std::fs::read(&back.image.layers[0].path)?,
            std::fs::read(&img.layers[0].path)?
        );
        assert_eq!(
            back.image.defaults.env.get("A").map(String::as_str),
            Some("1")
        );
        assert_eq!(back.image.defaults.working_dir.as_deref(), Some("/w"));
        assert_eq!(back.added.len(), 3);
        // A cap below the blobs' size refuses the archive.
        let c = tempfile::tempdir()?;
        let err = read_archive(c.path(), &tar[..], 10)
            .err()
            .ok_or("expected an error")?;
        assert!(err.contains("larger than the disk"), "{err}");
        Ok(())
    }

    #[test]
    fn a_blob_that_does_not_match_its_name_is_refused() -> R {
        let root = tempfile::tempdir()?;
        let mut tar = tar::Builder::new(Vec::new());
        let name = format!("blobs/sha256/{}", "a".repeat(64));
        let mut h = tar::Header::new_ustar();
        h.set_size(4);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, &name, &b"evil"[..])?;
        let tar = tar.into_inner()?;
        let err = read_archive(root.path(), &tar[..], 1 << 20)
            .err()
            .ok_or("expected an error")?;
        assert!(err.contains("has digest"), "{err}");
        // Nothing is left in the cache.
        let left: Vec<_> = std::fs::read_dir(root.path().join("blobs/sha256"))?.collect();
        assert!(left.is_empty());
        Ok(())
    }

    #[test]
    fn names_outside_the_layout_are_ignored_and_a_missing_index_is_an_error() -> R {
        let root = tempfile::tempdir()?;
        let mut tar = tar::Builder::new(Vec::new());
        for name in ["../../etc/evil", "blobs/sha256/../../x"] {
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_mode(0o644);
            // set_path refuses `..`: write the raw name as a hostile tar would.
            h.as_gnu_mut().ok_or("not gnu")?.name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            tar.append(&h, &b"x"[..])?;
        }
        let tar = tar.into_inner()?;
        let err = read_archive(root.path(), &tar[..], 1 << 20)
            .err()
            .ok_or("expected an error")?;
        assert!(
            err.contains("blob named") || err.contains("no index.json"),
            "{err}"
        );
        assert!(!root.path().join("x").exists());
        Ok(())
    }
}
