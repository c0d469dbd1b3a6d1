//! The TTL reaper: fires `ttl.action` of running VMs whose deadline
//! (`expiresAtMs`) has passed.
//!
//! It keeps no timers of its own: each round it asks the store for the due
//! VMs of this server's worker and the next deadline, fires the due ones,
//! then sleeps until the next deadline (at most [`MAX_NAP`]) or until a VM
//! row with a deadline changes ([`AppState::ttl_changed`]). So timers
//! survive restarts by construction: a deadline that passed while the server
//! was down fires in the reaper's first round.
//!
//! Firing goes through the ordinary transitions (`pause`: running -> pausing
//! -> paused; `delete`: the DELETE path), guarded by the row's version and by
//! "still running and still due", so a refresh, a user pause or a delete that
//! lands first wins and the reaper does nothing. A TTL pause ends the cycle:
//! the paused VM gets a full `ttlRemainingMs` for its next resume.

use crate::store::now_ms;
use crate::AppState;
use fastvm_types::TtlAction;
use std::time::Duration;

/// Longest sleep between two rounds (a safety net for deadlines set behind
/// the reaper's back, e.g. by another process on the same store).
const MAX_NAP: Duration = Duration::from_secs(1);

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
        loop {
            let nap = match state.reap_due().await {
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
            tokio::select! {
                _ = &mut stopped => break,
                _ = state.inner.ttl_wake.notified() => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
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

    /// One round: fire every due VM (concurrently), then return the next deadline.
    async fn reap_due(&self) -> Result<Option<i64>, crate::error::ApiError> {
        let worker_id = self.worker().id().to_owned();
        let due = self.store().list_ttl_due(&worker_id, now_ms()).await?;
        let mut fired = tokio::task::JoinSet::new();
        for rec in due {
            let Some(ttl) = rec.ttl else { continue };
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
            });
        }
        while fired.join_next().await.is_some() {}
        Ok(self.store().next_ttl_deadline(&worker_id).await?)
    }
}
