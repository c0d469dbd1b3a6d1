//! The control plane's side of the worker wire (cluster mode): workers
//! register and heartbeat here. Not part of the public API (not in
//! openapi.json); answers 404 on a single-host server.
//!
//! ```text
//! POST /internal/v1/workers/register          Authorization: Bearer <cluster secret>
//!      WorkerRegistration -> 200 RegisterResponse | 400 | 401
//! POST /internal/v1/workers/{id}/heartbeat    Authorization: Bearer <worker_token(secret, id, generation)>
//!      Heartbeat -> 204 | 401 | 409 STALE_GENERATION (register again)
//! ```
//!
//! Bodies are JSON with the field names below (snake_case); unknown fields
//! are ignored, so a newer worker may send more.
//!
//! The cluster secret is the text of `<data>/worker-token` (whitespace
//! trimmed); the per-worker token is [`crate::fleet::worker_token`]. Both
//! are compared in constant time. Errors use the API's error shape
//! `{"error": {"code", "message"}}`.

use crate::error::{codes, ApiError};
use crate::fleet::{secrets_equal, worker_token, HEARTBEAT_INTERVAL};
use crate::routes::JsonBody;
use crate::store::WorkerRegistrationRow;
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;

/// The bodies of the exchange (shared with `fastvm worker`).
pub use fastvm_worker_api::cluster::{
    Heartbeat, RegisterResponse, SnapshotStoreSettings, WorkerInfo, WorkerRegistration,
};

/// Code of the 409 answer to a heartbeat of an older generation (or of a
/// worker marked unreachable meanwhile): the worker must register again.
pub use crate::error::codes::STALE_GENERATION;

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .ok_or_else(|| ApiError::unauthenticated("send `Authorization: Bearer <token>`"))
}

fn cluster_secret(state: &AppState) -> Result<&str, ApiError> {
    state.fleet().secret().ok_or_else(|| {
        ApiError::not_found("this server runs no cluster: workers cannot register here")
    })
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `POST /internal/v1/workers/register`: upsert the worker (generation + 1,
/// `ready` unless draining), answer its generation, then reconcile its VMs
/// in the background (retried for a few seconds: the worker learns its new
/// token from this answer).
pub async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(reg): JsonBody<WorkerRegistration>,
) -> Result<Json<RegisterResponse>, ApiError> {
    let secret = cluster_secret(&state)?;
    if !secrets_equal(bearer(&headers)?, secret) {
        return Err(ApiError::unauthenticated("invalid cluster token"));
    }
    if !valid_id(&reg.id) {
        return Err(ApiError::invalid(
            codes::INVALID_REQUEST,
            "id must be 1-64 characters of [A-Za-z0-9_-]",
        ));
    }
    if !(reg.address.starts_with("http://") || reg.address.starts_with("https://")) {
        return Err(ApiError::invalid(
            codes::INVALID_REQUEST,
            "address must be http://host:port or https://host:port",
        ));
    }
    let row = state
        .store()
        .register_worker(&WorkerRegistrationRow {
            id: reg.id.clone(),
            address: reg.address.clone(),
            cpus: reg.info.cpus,
            memory_mib: reg.info.memory_mib,
            disk_free_gib: reg.info.disk_free_gib,
            qemu_build: reg.info.qemu_build.clone(),
            accel: reg.info.accel.clone(),
            cpu_model: reg.info.cpu_model.clone(),
            compat_key: reg.info.compat_key.clone(),
        })
        .await?;
    state.workers_changed(&row.id).await;
    tracing::info!(worker = %row.id, address = %row.address, generation = row.generation, status = row.status.as_str(), "worker registered");
    let s = state.clone();
    let id = row.id.clone();
    tokio::spawn(async move {
        for attempt in 0..10u32 {
            tokio::time::sleep(std::time::Duration::from_millis(
                100 * u64::from(attempt + 1),
            ))
            .await;
            match s.reconcile_worker(&id).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::debug!(worker = %id, attempt, error = %e.message, "reconciling a registered worker failed; retrying")
                }
            }
        }
        tracing::warn!(worker = %id, "reconciling a registered worker kept failing");
    });
    Ok(Json(RegisterResponse {
        generation: row.generation,
        heartbeat_interval_ms: u64::try_from(HEARTBEAT_INTERVAL.as_millis()).unwrap_or(2000),
        snapshot_store: state.snapshot_store_settings().cloned(),
    }))
}

/// `POST /internal/v1/workers/{id}/heartbeat`.
pub async fn heartbeat(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(hb): JsonBody<Heartbeat>,
) -> Result<StatusCode, ApiError> {
    let secret = cluster_secret(&state)?;
    let want = worker_token(secret, &id, hb.generation);
    if !secrets_equal(bearer(&headers)?, &want) {
        return Err(ApiError::unauthenticated("invalid worker token"));
    }
    if state
        .store()
        .worker_heartbeat(&id, hb.generation, hb.vm_count)
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            StatusCode::CONFLICT,
            STALE_GENERATION,
            format!(
                "generation {} of worker {id:?} is not current (or the worker was marked unreachable): register again",
                hb.generation
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wire_shapes() -> Result<(), serde_json::Error> {
        let reg: WorkerRegistration = serde_json::from_value(json!({
            "id": "wk_0123456789abcdef",
            "address": "http://10.0.0.2:7070",
            "info": {"cpus": 8, "memory_mib": 16384, "disk_free_gib": 100, "qemu_build": "10.0.2",
                     "accel": "tcg", "cpu_model": "max", "compat_key": "k1"}
        }))?;
        assert_eq!(reg.info.cpus, 8);
        let hb: Heartbeat = serde_json::from_value(json!({"generation": 3, "vm_count": 2}))?;
        assert_eq!(hb.free_memory_mib, None);
        let res = serde_json::to_value(RegisterResponse {
            generation: 3,
            heartbeat_interval_ms: 2000,
            snapshot_store: None,
        })?;
        assert_eq!(
            res,
            json!({"generation": 3, "heartbeat_interval_ms": 2000, "snapshot_store": null})
        );
        assert!(valid_id("wk_0123456789abcdef") && !valid_id("") && !valid_id("a/b"));
        Ok(())
    }
}
