//! `GET /healthz` and `GET /openapi.json` (both without authentication).

use crate::error::{codes, ApiError};
use crate::openapi::examples;
use crate::AppState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fastvm_types::health::HealthResponse;
use fastvm_types::ApiError as ErrorBody;

/// Health check: `{"status": "ok"}` while the server and its database answer.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    operation_id = "health",
    summary = "Health check",
    description = "Answers `{\"status\": \"ok\"}` while the server and its database answer, 503 when the database does not. Needs no API key: use it for load-balancer and liveness checks.",
    responses(
        (status = 200, description = "The server is serving", body = HealthResponse, example = json!(examples::health())),
        (status = 503, description = "The database does not answer", body = ErrorBody),
    )
)]
pub async fn healthz(State(state): State<AppState>) -> Result<Json<HealthResponse>, ApiError> {
    state.store().ping().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::UNAVAILABLE,
            e.to_string(),
        )
    })?;
    Ok(Json(HealthResponse::ok()))
}

/// The OpenAPI document of this server.
pub async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document_json(),
    )
        .into_response()
}
