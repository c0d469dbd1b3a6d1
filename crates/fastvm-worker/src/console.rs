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
