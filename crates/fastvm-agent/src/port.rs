//! The virtio-serial port: discovery and raw byte I/O.
//!
//! A guest read returns 0 while no host is connected to the port's chardev,
//! so the reader polls gently then; bytes written while nobody listens are
//! dropped by QEMU. Session (re)starts are found by the SYNC markers of the
//! protocol, not by this layer.

use bytes::Bytes;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// The name QEMU gives the agent's port (`virtserialport,name=...`).
pub(crate) const PORT_NAME: &str = "fastvm.agent";

/// Find `/dev/vportNpM` whose sysfs name is `name`.
pub(crate) fn find_port(name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for entry in entries.flatten() {
        let found = std::fs::read_to_string(entry.path().join("name")).ok()?;
        if found.trim() == name {
            let dev = Path::new("/dev").join(entry.file_name());
            if dev.exists() {
                return Some(dev);
            }
        }
    }
    None
}

/// Byte pipes to and from the port, each served by one OS thread.
pub(crate) struct Port {
    pub(crate) rx: mpsc::Receiver<Bytes>,
    pub(crate) tx: mpsc::Sender<Bytes>,
}

pub(crate) fn open(path: &Path) -> std::io::Result<Port> {
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut writer = reader.try_clone()?;
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(64);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => std::thread::sleep(Duration::from_millis(5)),
                Ok(n) => {
                    if in_tx
                        .blocking_send(Bytes::copy_from_slice(&buf[..n]))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    crate::log(&format!("port read: {e}"));
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    });
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(64);
    std::thread::spawn(move || {
        while let Some(chunk) = out_rx.blocking_recv() {
            // A failed write means the host went away; the session will be
            // restarted with a SYNC, so the bytes are simply lost.
            let _ = writer.write_all(&chunk);
        }
    });
    Ok(Port {
        rx: in_rx,
        tx: out_tx,
    })
}
