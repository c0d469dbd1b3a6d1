//! The layer cache's size: `<data>/oci/blobs/sha256/` only speeds up later
//! imports (a finished import's snapshot owns its own disk), so it is kept
//! under a cap by evicting the least recently used blobs.
//!
//! ```text
//!  a pull uses a cached blob  -> its mtime is set to now (touch)
//!  an import ends             -> prune(cap): partial downloads older than an
//!                                hour go, then the oldest blobs until the
//!                                total is under the cap
//! ```
//!
//! The runtime prunes only while no import runs (it holds the cache lock
//! for writing), so a blob an import counted on never disappears under it.

use std::path::Path;
use std::time::{Duration, SystemTime};

/// Default cap of the layer cache.
pub const DEFAULT_CACHE_BYTES: u64 = 10 << 30;
/// Partial downloads older than this are leftovers of a crash.
const PARTIAL_AGE: Duration = Duration::from_secs(3600);

/// What [`prune`] removed and kept.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub removed: usize,
    pub removed_bytes: u64,
    pub kept_bytes: u64,
}

/// Mark a cached blob as used now (its place in the eviction order).
pub fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().write(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Bring the cache under `root` (`<data>/oci`) to at most `cap` bytes.
pub fn prune(root: &Path, cap: u64) -> std::io::Result<Pruned> {
    let dir = root.join("blobs").join("sha256");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Pruned::default()),
        Err(e) => return Err(e),
    };
    let now = SystemTime::now();
    let mut blobs = Vec::new();
    let mut out = Pruned::default();
    for e in entries {
        let e = e?;
        let meta = match e.metadata() {
            Ok(m) if m.is_file() => m,
            _ => continue,
        };
        let mtime = meta.modified().unwrap_or(now);
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(".partial-") {
            if now.duration_since(mtime).unwrap_or_default() > PARTIAL_AGE
                && std::fs::remove_file(e.path()).is_ok()
            {
                out.removed += 1;
                out.removed_bytes += meta.len();
            }
            continue;
        }
        blobs.push((mtime, meta.len(), e.path()));
    }
    let mut total: u64 = blobs.iter().map(|b| b.1).sum();
    blobs.sort_by_key(|b| b.0);
    for (_, len, path) in blobs {
        if total <= cap {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
            out.removed += 1;
            out.removed_bytes += len;
        }
    }
    out.kept_bytes = total;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    type R = Result<(), Box<dyn std::error::Error>>;

    fn blob(dir: &Path, name: &str, len: usize, age_secs: u64) -> R {
        let p = dir.join(name);
        std::fs::write(&p, vec![0u8; len])?;
        let f = std::fs::File::options().write(true).open(&p)?;
        f.set_modified(SystemTime::now() - Duration::from_secs(age_secs))?;
        Ok(())
    }

    #[test]
    fn the_oldest_blobs_go_until_the_cache_fits() -> R {
        let root = tempfile::tempdir()?;
        let dir = root.path().join("blobs/sha256");
        std::fs::create_dir_all(&dir)?;
        blob(&dir, "old", 100, 300)?;
        blob(&dir, "mid", 100, 200)?;
        blob(&dir, "new", 100, 100)?;
        blob(&dir, "x.partial-1", 50, 7200)?; // a crash's leftover
        blob(&dir, "y.partial-2", 50, 1)?; // a download in progress
                                           // A touched blob moves to the back of the line.
        touch(&dir.join("old"));
        let got = prune(root.path(), 200)?;
        assert_eq!(
            got,
            Pruned {
                removed: 2,
                removed_bytes: 150,
                kept_bytes: 200
            }
        );
        assert!(!dir.join("mid").exists() && !dir.join("x.partial-1").exists());
        assert!(dir.join("old").exists() && dir.join("new").exists());
        assert!(dir.join("y.partial-2").exists());
        // Under the cap: nothing goes; no cache at all: nothing to do.
        assert_eq!(prune(root.path(), 1 << 20)?.removed, 0);
        assert_eq!(prune(&root.path().join("none"), 0)?, Pruned::default());
        Ok(())
    }
}
