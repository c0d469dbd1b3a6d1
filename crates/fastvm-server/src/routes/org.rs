//! `/v1/org`: the caller's org (quotas).

use crate::auth::Caller;
use crate::error::ApiError;
use crate::openapi::examples;
use crate::AppState;
use axum::extract::State;
use axum::Json;
use fastvm_types::quota::OrgQuotaUsage;
use fastvm_types::ApiError as ErrorBody;

/// Get org quotas and usage
#[utoipa::path(
    get,
    path = "/v1/org/quotas",
    tag = "org",
    operation_id = "getOrgQuotas",
    summary = "Get org quotas and usage",
    description = "Limits (defaults: vcpu 16, memoryMiB 32768, diskGiB 200, snapshotCount 50, volumeCount 20, volumeGiB 500; \
                   operators change them with `fastvm orgs quota set`) and live usage. vcpu, memoryMiB and diskGiB count every VM \
                   that is not deleted, stopped or in error (paused VMs count: they keep their memory and disk); snapshotCount \
                   counts the snapshots not deleted. A launch, resume or snapshot that would exceed a limit answers 429 with \
                   `QUOTA_EXCEEDED_<RESOURCE>` (e.g. `QUOTA_EXCEEDED_VCPU`) and changes nothing.",
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The org's limits and usage", body = OrgQuotaUsage, example = json!(examples::quotas())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
    )
)]
pub async fn quotas(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<OrgQuotaUsage>, ApiError> {
    Ok(Json(state.org_quotas(caller.org_id).await?))
}
