//! Zombie reaping for PID 1, and exit statuses for the processes we spawned.
//!
//! Every child of the agent, and every orphan the kernel re-parents to PID 1,
//! is reaped here with `waitpid(-1)`. Processes spawned by [`Reaper::spawn`]
//! are registered under the same lock before the reaper can see them exit, so
//! their status is never lost; all others are reaped and forgotten.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// Raw wait status of a process (as from waitpid).
pub(crate) type WaitStatus = libc::c_int;

#[derive(Clone, Default)]
pub(crate) struct Reaper {
    waiting: Arc<Mutex<HashMap<libc::pid_t, oneshot::Sender<WaitStatus>>>>,
}

impl Reaper {
    pub(crate) fn start() -> Reaper {
        let reaper = Reaper::default();
        let r = reaper.clone();
        tokio::spawn(async move {
            let mut sigchld = match signal(SignalKind::child()) {
                Ok(s) => s,
                Err(e) => {
                    crate::log(&format!("no SIGCHLD handler: {e}"));
                    return;
                }
            };
            loop {
                r.reap();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        reaper
    }

    fn reap(&self) {
        let mut waiting = match self.waiting.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid writes the status into a valid local.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            if let Some(tx) = waiting.remove(&pid) {
                let _ = tx.send(status);
            }
        }
    }

    /// Spawn `cmd` and get a receiver for its wait status.
    pub(crate) fn spawn(
        &self,
        cmd: &mut std::process::Command,
    ) -> std::io::Result<(std::process::Child, oneshot::Receiver<WaitStatus>)> {
        let mut waiting = match self.waiting.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiting.insert(child.id() as libc::pid_t, tx);
        Ok((child, rx))
    }
}
