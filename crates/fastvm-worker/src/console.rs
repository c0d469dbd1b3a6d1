//! The read-only serial console of a VM: `console.log` (everything the guest
//! wrote to ttyS0: kernel messages, the agent's own log lines), tailed, then
//! followed as the guest writes more.
//!
//! ```text
//!  follow(path, tail)  open, seek to max(0, len - tail)
//!  next()              read <= FOLLOW_CHUNK bytes at the position
//!                      nothing new: the file is gone -> None (VM deleted)
//!                                   replaced or truncated -> start again at 0
//!                                   else wait FOLLOW_POLL and retry
//! ```
//!
//! Memory is one chunk per reader, whatever the file size; bytes are only
//! read when the consumer asks for them. The guest controls the content: it
//! is passed on as raw bytes and never interpreted here.
//!
//! The log is capped ([`CappedLog`]): QEMU writes the console into a ring
//! buffer ([`crate::qemu::CONSOLE_RING`], 1 MiB, oldest bytes overwritten),
//! the worker drains it into `console.log`, and when that file would pass
//! [`LOG_CAP`] (1 MiB) it becomes `console.log.1` (replacing the previous
//! one) and a new `console.log` starts: at most 2 MiB on disk per VM, and
//! a follower sees the rotation as a new file (it reads the old one to its
//! end first). Readers of the tail ([`read_tail`]) read a bounded amount.

use crate::error::{IoContext, Result};
use bytes::Bytes;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Largest chunk returned by one [`ConsoleFollower::next`].
pub const FOLLOW_CHUNK: usize = 64 << 10;
/// How often a follower at the end of the file looks for more.
pub const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Size at which `console.log` is rotated into `console.log.1`.
pub const LOG_CAP: u64 = 1 << 20;

/// The writer of a capped, rotated console log (see the module docs).
pub struct CappedLog {
    path: PathBuf,
    file: Option<std::fs::File>,
    len: u64,
}

impl CappedLog {
    /// Append to `path` (created when missing).
    pub fn open(path: &Path) -> CappedLog {
        CappedLog {
            path: path.to_owned(),
            file: None,
            len: 0,
        }
    }

    fn rotated(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(".1");
        PathBuf::from(p)
    }

    pub fn append(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        while !bytes.is_empty() {
            if self.file.is_none() {
                use std::os::unix::fs::OpenOptionsExt;
                let f = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .open(&self.path)?;
                self.len = f.metadata()?.len();
                self.file = Some(f);
            }
            if self.len >= LOG_CAP {
                self.rotate()?;
                continue;
            }
            let room = (LOG_CAP - self.len) as usize;
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            if let Some(f) = self.file.as_mut() {
                f.write_all(now)?;
            }
            self.len += now.len() as u64;
            bytes = rest;
        }
        Ok(())
    }

    /// `console.log` -> `console.log.1`, then a new empty `console.log`
    /// swapped in atomically (the path never disappears for followers).
    fn rotate(&mut self) -> std::io::Result<()> {
        let rotated = self.rotated();
        let _ = std::fs::remove_file(&rotated);
        std::fs::hard_link(&self.path, &rotated)?;
        let mut fresh = self.path.clone().into_os_string();
        fresh.push(".new");
        let fresh = PathBuf::from(fresh);
        let f = crate::jail::create_private(&fresh)?;
        std::fs::rename(&fresh, &self.path)?;
        self.file = Some(f);
        self.len = 0;
        Ok(())
    }
}

/// The last `max` bytes of `path` (empty when it cannot be read).
pub fn read_tail(path: &Path, max: u64) -> Vec<u8> {
    use std::io::{Read, Seek};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(std::io::SeekFrom::Start(len.saturating_sub(max)))
        .is_err()
    {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    buf
}

/// A reader of a growing console log.
pub struct ConsoleFollower {
    path: PathBuf,
    file: tokio::fs::File,
    inode: u64,
    pos: u64,
    buf: Vec<u8>,
}

impl ConsoleFollower {
    /// Follow `path`, starting `tail` bytes before its current end.
    pub async fn open(path: &Path, tail: u64) -> Result<ConsoleFollower> {
        let mut file = tokio::fs::File::open(path)
            .await
            .ctx(|| format!("open the console log {}", path.display()))?;
        let meta = file
            .metadata()
            .await
            .ctx(|| format!("stat {}", path.display()))?;
        let pos = meta.len().saturating_sub(tail);
        file.seek(std::io::SeekFrom::Start(pos))
            .await
            .ctx(|| format!("seek in {}", path.display()))?;
        Ok(ConsoleFollower {
            path: path.to_owned(),
            file,
            inode: meta.ino(),
            pos,
            buf: vec![0; FOLLOW_CHUNK],
        })
    }

    /// The next bytes the guest wrote, waiting for them; `None` once the log
    /// is gone (the VM was deleted).
    pub async fn next(&mut self) -> Option<std::io::Result<Bytes>> {
        loop {
            match self.file.read(&mut self.buf).await {
                Ok(0) => {}
                Ok(n) => {
                    self.pos += n as u64;
                    return Some(Ok(Bytes::copy_from_slice(&self.buf[..n])));
                }
                Err(e) => return Some(Err(e)),
            }
            match tokio::fs::metadata(&self.path).await {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
                Err(e) => return Some(Err(e)),
                Ok(meta) if meta.ino() != self.inode || meta.len() < self.pos => {
                    // A new QEMU process (re)created or truncated it: read it from its start.
                    match tokio::fs::File::open(&self.path).await {
                        Ok(f) => {
                            self.file = f;
                            self.inode = meta.ino();
                            self.pos = 0;
                            continue;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
                        Err(e) => return Some(Err(e)),
                    }
                }
                Ok(_) => tokio::time::sleep(FOLLOW_POLL).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn tails_follows_and_ends_with_the_file(
    ) -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"old line\nnew line\n")?;
        let mut f = ConsoleFollower::open(&path, 9).await?;
        assert_eq!(
            f.next().await.transpose()?.as_deref(),
            Some(&b"new line\n"[..])
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)?
            .write_all(b"more")?;
        assert_eq!(f.next().await.transpose()?.as_deref(), Some(&b"more"[..]));
        // Truncated (a new QEMU process): from the start again.
        std::fs::write(&path, b"re")?;
        assert_eq!(f.next().await.transpose()?.as_deref(), Some(&b"re"[..]));
        std::fs::remove_file(&path)?;
        assert!(f.next().await.is_none());
        Ok(())
    }

    #[test]
    fn capped_log_rotates_and_stays_under_its_cap() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("console.log");
        let mut log = CappedLog::open(&path);
        let chunk = vec![b'y'; 100_000];
        for _ in 0..50 {
            log.append(&chunk)?;
        }
        let cur = std::fs::metadata(&path)?.len();
        let old = std::fs::metadata(dir.path().join("console.log.1"))?.len();
        assert!(cur <= LOG_CAP && old == LOG_CAP, "{cur} {old}");
        assert_eq!((50 * 100_000) % LOG_CAP, cur);
        // A new writer (a restarted worker) appends where the file ends.
        CappedLog::open(&path).append(b"z")?;
        assert_eq!(std::fs::metadata(&path)?.len(), cur + 1);
        assert_eq!(read_tail(&path, 1), b"z");
        assert_eq!(read_tail(&path, 10 * LOG_CAP).len() as u64, cur + 1);
        assert!(read_tail(&dir.path().join("none"), 10).is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn chunks_are_bounded() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("console.log");
        std::fs::write(&path, vec![b'x'; 3 * FOLLOW_CHUNK])?;
        let mut f = ConsoleFollower::open(&path, u64::MAX).await?;
        let mut total = 0;
        while total < 3 * FOLLOW_CHUNK {
            let chunk = f.next().await.transpose()?.unwrap_or_default();
            assert!(!chunk.is_empty() && chunk.len() <= FOLLOW_CHUNK);
            total += chunk.len();
        }
        Ok(())
    }
}
