//! Time budgets of everything the worker waits for outside its own process:
//! QMP commands ([`qmp_budget`]) and child processes ([`output_within`]).
//!
//! A QEMU that stops answering (stopped, deadlocked, starved) must fail only
//! its own VM, within seconds, and a hung `qemu-img` or `mkfs` must not hang a
//! launch forever. Every budget is generous against what the operation
//! normally takes (QMP answers in well under a millisecond, `qemu-img
//! create` in ~10 ms), so hitting one means something is broken, not slow.
//!
//! | what                                              | budget  |
//! |---------------------------------------------------|---------|
//! | QMP `query-status`, `stop`, `cont`, `quit`, capability and parameter setting, `query-migrate` (one poll) | [`QMP_SHORT`] 5 s |
//! | QMP `migrate`, `migrate-incoming` (the command, not the transfer) | [`QMP_SHORT`] 5 s |
//! | QMP `blockdev-snapshot-sync` (creates a qcow2 file), `xen-save-devices-state` (writes the device state to a file) | [`QMP_DISK`] 30 s |
//! | QMP anything else                                 | [`QMP_DEFAULT`] 30 s |
//! | a migration to complete (memory capture / restore load) | [`MIGRATION`] 120 s |
//! | `qemu-img create`, `qemu-system-x86_64 --version` | [`QEMU_IMG`] 30 s |
//! | `ip`, `nft` (VM networking, `net::netns`)         | [`NET_TOOL`] 30 s |
//! | `apt-cache`                                       | 2 min   |
//! | `dpkg-deb -x`, `du`                               | 10 min  |
//! | `apt-get download`, `mkfs.ext4`                   | 20 min  |
//! | `mmdebstrap` (a whole Debian root)                | 60 min  |
//!
//! A child process that overruns is killed (SIGKILL to its process group, by
//! pid) and the caller gets [`Error::Timeout`].

use crate::error::{Error, IoContext, Result};
use std::process::Output;
use std::time::Duration;

/// Short QMP commands: answered by QEMU's main loop at once.
pub const QMP_SHORT: Duration = Duration::from_secs(5);
/// QMP commands that create or open disk files.
pub const QMP_DISK: Duration = Duration::from_secs(30);
/// QMP commands not listed in [`qmp_budget`].
pub const QMP_DEFAULT: Duration = Duration::from_secs(30);
/// A migration (memory capture or state load) to complete.
pub const MIGRATION: Duration = Duration::from_secs(120);
/// `qemu-img create` and other quick QEMU tools.
pub const QEMU_IMG: Duration = Duration::from_secs(30);
/// `ip` and `nft` runs of VM networking (`net::netns`); ~2-15 ms normally.
pub const NET_TOOL: Duration = Duration::from_secs(30);

/// How long QEMU may take to answer `command`.
pub fn qmp_budget(command: &str) -> Duration {
    match command {
        "qmp_capabilities"
        | "query-status"
        | "stop"
        | "cont"
        | "quit"
        | "query-migrate"
        | "migrate-set-capabilities"
        | "migrate-set-parameters"
        | "migrate"
        | "migrate-incoming" => QMP_SHORT,
        "blockdev-snapshot-sync" | "xen-save-devices-state" => QMP_DISK,
        _ => QMP_DEFAULT,
    }
}

/// How long an image-build tool (`apt-cache`, `mmdebstrap`, ...) may run.
pub fn build_tool_budget(program: &str) -> Duration {
    let min = |m: u64| Duration::from_secs(m * 60);
    match program {
        "apt-cache" => min(2),
        "dpkg-deb" | "du" => min(10),
        "apt-get" | "mkfs.ext4" => min(20),
        "mmdebstrap" => min(60),
        _ => min(10),
    }
}

/// SIGKILL the process group led by `pid` (a child spawned with
/// `process_group(0)` whose wait was cut short).
pub fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| libc::pid_t::try_from(p).ok()) {
        // SAFETY: kill has no memory preconditions. The group is the one this
        // child leads (process_group(0)); Linux keeps a group's id allocated
        // while any member lives, so if anything of it remains, the id still
        // names this group.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
}

/// Run `cmd` to completion (stdout and stderr captured) within `budget`.
/// On overrun the child's process group is SIGKILLed and
/// [`Error::Timeout`] names `what`.
pub async fn output_within(
    cmd: &mut tokio::process::Command,
    budget: Duration,
    what: &str,
) -> Result<Output> {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        // Its own process group, so that a timeout also kills what it spawned.
        .process_group(0);
    let child = cmd.spawn().ctx(|| format!("start {what}"))?;
    let pid = child.id();
    match tokio::time::timeout(budget, child.wait_with_output()).await {
        Ok(out) => out.ctx(|| format!("run {what}")),
        Err(_) => {
            // Dropping the child (above) SIGKILLs it; the group goes too.
            kill_group(pid);
            tracing::warn!(what, ?budget, ?pid, "child process timed out; killed");
            Err(Error::Timeout {
                what: what.to_owned(),
                after: budget,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_child_that_overruns_is_killed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("pid");
        // The shell records the pid of a grandchild, then waits for it.
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let err = output_within(
            tokio::process::Command::new("sh").args(["-c", &script]),
            Duration::from_millis(300),
            "sleeper",
        )
        .await
        .expect_err("must time out");
        assert!(
            matches!(&err, Error::Timeout { what, .. } if what == "sleeper"),
            "{err}"
        );
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .expect("pidfile")
            .trim()
            .parse()
            .expect("pid");
        // The grandchild went with its process group.
        let mut gone = false;
        for _ in 0..200 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(str::to_owned));
            if state.is_none() || state.as_deref() == Some("Z") {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(gone, "grandchild {pid} survived the timeout");
    }

    #[tokio::test]
    async fn a_child_within_budget_returns_its_output() {
        let out = output_within(
            tokio::process::Command::new("sh").args(["-c", "echo hi; echo err >&2"]),
            Duration::from_secs(10),
            "echo",
        )
        .await
        .expect("runs");
        assert!(out.status.success());
        assert_eq!(out.stdout, b"hi\n");
        assert_eq!(out.stderr, b"err\n");
    }

    #[test]
    fn budgets() {
        assert_eq!(qmp_budget("stop"), QMP_SHORT);
        assert_eq!(qmp_budget("blockdev-snapshot-sync"), QMP_DISK);
        assert_eq!(qmp_budget("human-monitor-command"), QMP_DEFAULT);
    }
}
