//! The TTL reaper: fires `ttl.action` of running VMs whose deadline
//! (`expiresAtMs`) has passed.
//!
//! It keeps no timers of its own: each round it asks the store for the due
//! VMs of this server's workers (every reachable one in cluster mode) and the next deadline, fires the due ones,
//! then sleeps until the next deadline (at most [`MAX_NAP`]) or until a VM
//! row with a deadline changes ([`AppState::ttl_changed`]). So timers
//! survive restarts by construction: a deadline that passed while the server
//! was down fires in the reaper's first round.
//!
//! Firing goes through the ordinary transitions (`pause`: running -> pausing
//! -> paused; `delete`: the DELETE path), guarded by the row's version and by
//! "still running and still due", so a refresh, a user pause or a delete that
//! lands first wins and the reaper does nothing.
//!
//! Actions run in tasks of their own and a round does not wait for them: a
//! VM whose QEMU is wedged takes its QMP budget to fail (it ends `error`),
//! and meanwhile the reaper keeps firing other VMs' deadlines. A VM with an
//! action in flight is not fired again until that action is done.

use crate::store::now_ms;
use crate::AppState;
use fastvm_types::{TtlAction, VmId};
use std::collections::HashSet;
use std::time::Duration;

/// Longest sleep between two rounds (a safety net for deadlines set behind
/// the reaper's back, e.g. by another process on the same store).
const MAX_NAP: Duration = Duration::from_secs(1);

/// Shortest sleep between two rounds while actions are in flight (their
/// rows may still look due until the action moved them on).
const MIN_NAP_IN_FLIGHT: Duration = Duration::from_millis(20);

/// A running reaper (see [`spawn_ttl_reaper`]).
pub struct TtlReaper {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl TtlReaper {
    /// Stop it and wait until it has (actions in flight are finished first).
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Start the TTL reaper of `state` (done by [`crate::serve`] and
/// [`crate::start`]; call it yourself for a server assembled by hand).
pub fn spawn_ttl_reaper(state: &AppState) -> TtlReaper {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let state = state.clone();
    let task = tokio::spawn(async move {
        tracing::debug!("TTL reaper started");
        let mut fired: tokio::task::JoinSet<VmId> = tokio::task::JoinSet::new();
        let mut in_flight: HashSet<VmId> = HashSet::new();
        loop {
            let nap = match state.reap_due(&mut fired, &mut in_flight).await {
                Ok(Some(next)) => {
                    Duration::from_millis(u64::try_from(next.saturating_sub(now_ms())).unwrap_or(0))
                        .min(MAX_NAP)
                }
                Ok(None) => MAX_NAP,
                Err(e) => {
                    tracing::warn!(error = %e.message, "TTL reaper round failed; retrying");
                    MAX_NAP
                }
            };
            let nap = if in_flight.is_empty() {
                nap
            } else {
                nap.max(MIN_NAP_IN_FLIGHT)
            };
            tokio::select! {
                _ = &mut stopped => break,
                _ = state.inner.ttl_wake.notified() => {}
                Some(done) = fired.join_next(), if !fired.is_empty() => {
                    if let Ok(id) = done {
                        in_flight.remove(&id);
                    }
                }
                _ = tokio::time::sleep(nap) => {}
            }
            // Collect whatever else finished meanwhile.
            while let Some(done) = fired.try_join_next() {
                if let Ok(id) = done {
                    in_flight.remove(&id);
                }
            }
        }
        while fired.join_next().await.is_some() {}
        tracing::debug!("TTL reaper stopped");
    });
    TtlReaper {
        stop: Some(stop),
        task,
    }
}

impl AppState {
    /// A VM's deadline may have moved: wake the reaper.
    pub(crate) fn ttl_changed(&self) {
        self.inner.ttl_wake.notify_one();
    }

    /// One round: start the action of every due VM not already in flight
    /// (each in its own task, not awaited), then return the next deadline.
    async fn reap_due(
        &self,
        fired: &mut tokio::task::JoinSet<VmId>,
        in_flight: &mut HashSet<VmId>,
    ) -> Result<Option<i64>, crate::error::ApiError> {
        // Embedded: the one worker's VMs; cluster: every worker's, in one
        // query (a VM of an unreachable worker is `unknown`, not running).
        let (due, next) = match self.fleet().local().filter(|_| !self.fleet().is_cluster()) {
            Some(worker) => (
                self.store().list_ttl_due(worker.id(), now_ms()).await?,
                self.store().next_ttl_deadline(worker.id()).await?,
            ),
            None => (
                self.store().list_ttl_due_all(now_ms()).await?,
                self.store().next_ttl_deadline_all().await?,
            ),
        };
        for rec in due {
            let Some(ttl) = rec.ttl else { continue };
            if !in_flight.insert(rec.id) {
                continue;
            }
            let state = self.clone();
            fired.spawn(async move {
                let (org, id) = (rec.org_id, rec.id);
                tracing::info!(vm = %id, action = ?ttl.action, "TTL expired");
                let result = match ttl.action {
                    TtlAction::Pause => state.ttl_pause(org, id).await.map(|_| ()),
                    TtlAction::Delete => state.ttl_delete(org, id).await,
                };
                if let Err(e) = result {
                    tracing::info!(vm = %id, reason = %e.message, "TTL action not taken");
                }
                id
            });
        }
        Ok(next)
    }
}
