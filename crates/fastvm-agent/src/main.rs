//! `fastvm-agent`: the in-guest agent, PID 1 of every Fast VM guest.
//!
//! It is a static musl binary packed as `/init` into the initramfs that the
//! worker builds; it needs nothing from the guest image (no shell, no `ip`:
//! the network is configured over netlink, see `netlink`). Boot sequence:
//!
//! ```text
//!  kernel -> /init (this binary, in the initramfs)
//!     init::early()      mount /dev /proc /sys, load the few virtio modules,
//!                        mount the root disk, move into it (chroot), mount
//!                        /tmp /run /dev/pts /dev/shm (made if missing),
//!                        lo up (netlink), grow the root filesystem if the
//!                        image has resize2fs
//!     reaper::start()    SIGCHLD handler: PID 1 reaps every zombie
//!     port::open()       the virtio-serial port named `fastvm.agent`
//!     session::run()     serve frames forever (see fastvm-agent-proto)
//! ```
//!
//! Run as a normal process (not PID 1, e.g. for a manual test) it skips the
//! init step and serves on the port given as its first argument.

mod config;
mod exec;
mod init;
mod mount;
mod netlink;
mod port;
mod pty;
mod reaper;
mod session;
mod tcp;
mod user;

use std::time::Duration;

fn main() {
    let is_init = std::process::id() == 1;
    if is_init {
        if let Err(e) = init::early() {
            log(&format!("early init failed: {e}"));
            // Without a root filesystem there is nothing to serve: power off so
            // the host sees the VM die instead of a hang.
            init::power_off();
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log(&format!("cannot start runtime: {e}"));
            init::power_off();
        }
    };
    rt.block_on(async move {
        let reaper = reaper::Reaper::start();
        let path = match std::env::args().nth(1) {
            Some(p) if !is_init => std::path::PathBuf::from(p),
            _ => loop {
                match port::find_port(port::PORT_NAME) {
                    Some(p) => break p,
                    None => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            },
        };
        log(&format!("serving on {}", path.display()));
        if let Err(e) = session::serve(&path, reaper).await {
            log(&format!("agent stopped: {e}"));
        }
    });
    if is_init {
        init::power_off();
    }
}

/// Write a line to the kernel console (visible in the VM's console log).
pub(crate) fn log(msg: &str) {
    use std::io::Write;
    // Priority 3 (err): shown on the console even with `quiet`.
    let line = format!("<3>fastvm-agent: {msg}\n");
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = f.write_all(line.as_bytes());
    } else {
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}
