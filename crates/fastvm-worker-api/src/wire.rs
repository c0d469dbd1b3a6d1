//! The framing of the internal worker API's streams (exec, terminals) after
//! the HTTP upgrade: `kind: u8 | length: u32 big-endian | payload`.
//!
//! ```text
//!  control plane (client)                 worker (server)
//!   OPEN {json}            ------------>
//!                          <------------  OPENED | ERROR {WorkerError json}
//!   STDIN data | STDIN_EOF | STDIN_ABORT msg | RESIZE {cols,rows} | SIGNAL i32
//!                          <------------  STDOUT | STDERR data, EXIT {ExitStatus json}
//!                                         | PTY_EXIT {PtyExit json} | ERROR (last)
//! ```
//! Closing the connection (either side) ends the stream; the worker then
//! drops the exec, which cancels the process in the guest.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The upgrade protocol name (`Upgrade:` header).
pub const UPGRADE_PROTOCOL: &str = "fastvm-stream";
/// Largest payload of one frame; larger writes are split.
pub const MAX_FRAME: usize = 256 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Open = 1,
    Stdin = 2,
    StdinEof = 3,
    StdinAbort = 4,
    Resize = 5,
    Signal = 6,
    Opened = 16,
    Stdout = 17,
    Stderr = 18,
    Exit = 19,
    PtyExit = 20,
    Error = 21,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Open,
            2 => Stdin,
            3 => StdinEof,
            4 => StdinAbort,
            5 => Resize,
            6 => Signal,
            16 => Opened,
            17 => Stdout,
            18 => Stderr,
            19 => Exit,
            20 => PtyExit,
            21 => Error,
            _ => return None,
        })
    }
}

/// Write one frame (payloads over [`MAX_FRAME`] are the caller's to split).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: Kind,
    payload: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l as usize <= MAX_FRAME)
        .ok_or_else(|| std::io::Error::other("frame payload too large"))?;
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    w.flush().await
}

/// Write `data` as frames of `kind`, at most [`MAX_FRAME`] bytes each.
pub async fn write_data<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: Kind,
    data: &[u8],
) -> std::io::Result<()> {
    for chunk in data.chunks(MAX_FRAME) {
        write_frame(w, kind, chunk).await?;
    }
    Ok(())
}

/// Read one frame; `Ok(None)` at a clean end of the connection. An unknown
/// kind or an oversized length is an error (the peer is not speaking this
/// protocol).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<(Kind, Bytes)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut head[1..]).await?;
    let kind = Kind::from_u8(head[0]).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unknown frame kind {}", head[0]),
        )
    })?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {MAX_FRAME}"),
        ));
    }
    let mut buf = BytesMut::zeroed(len);
    r.read_exact(&mut buf).await?;
    Ok(Some((kind, buf.freeze())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_bad_input_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        write_frame(&mut a, Kind::Open, b"{}").await.expect("write");
        write_data(&mut a, Kind::Stdout, &vec![7u8; MAX_FRAME + 3])
            .await
            .expect("write");
        drop(a);
        assert_eq!(
            read_frame(&mut b).await.expect("read"),
            Some((Kind::Open, Bytes::from_static(b"{}")))
        );
        let (k, d) = read_frame(&mut b).await.expect("read").expect("frame");
        assert_eq!((k, d.len()), (Kind::Stdout, MAX_FRAME));
        let (_, d) = read_frame(&mut b).await.expect("read").expect("frame");
        assert_eq!(d.len(), 3);
        assert_eq!(read_frame(&mut b).await.expect("clean end"), None);

        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[99, 0, 0, 0, 0]).await.expect("write");
        assert!(read_frame(&mut b).await.is_err());
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[2, 0xff, 0xff, 0xff, 0xff])
            .await
            .expect("write");
        assert!(read_frame(&mut b).await.is_err());
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[2, 0, 0, 0, 9, 1]).await.expect("write");
        drop(a);
        assert!(
            read_frame(&mut b).await.is_err(),
            "a truncated frame is an error"
        );
    }
}
