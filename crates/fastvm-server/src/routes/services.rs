//! `/v1/vms/{id}/services`: register, update, list and remove the HTTP
//! services the proxy exposes (rules in [`crate::services`]).

use crate::auth::Caller;
use crate::error::ApiError;
use crate::openapi::examples;
use crate::routes::{JsonBody, VmPath, VmSubPath};
use crate::services::Registered;
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use fastvm_types::service::{
    validate_service_name, RegisterServiceRequest, Service, UpdateServiceRequest,
};
use fastvm_types::{ApiError as ErrorBody, DeleteResponse};

const DESCRIPTION: &str = "Each service is reachable through the proxy at `<name>--<vmIdHexNoHyphens>.proxy.<domain>` (the `url` field, an \
    extension of this server) and adds an ingress rule `::/0` on its port to the VM's `effectiveFirewall`. At most 16 services per VM.";

/// List service registrations
#[utoipa::path(
    get,
    path = "/v1/vms/{id}/services",
    tag = "services",
    operation_id = "listServices",
    summary = "List service registrations",
    description = DESCRIPTION,
    params(("id" = String, Path, description = "VM ID (UUID).")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The VM's services, in registration order", body = [Service], example = json!(examples::service_list())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
) -> Result<Json<Vec<Service>>, ApiError> {
    Ok(Json(state.list_services(caller.org_id, id).await?))
}

/// Register a service on a VM
#[utoipa::path(
    post,
    path = "/v1/vms/{id}/services",
    tag = "services",
    operation_id = "registerService",
    summary = "Register a service on a VM",
    description = DESCRIPTION,
    params(("id" = String, Path, description = "VM ID (UUID).")),
    request_body(content = RegisterServiceRequest, example = json!(examples::register_service_request())),
    security(("bearerAuth" = [])),
    responses(
        (status = 201, description = "The new service", body = Service, example = json!(examples::service())),
        (status = 400, description = "Malformed body, or a bad name (`INVALID_SERVICE_NAME`) or port (`INVALID_SERVICE_PORT`: privileged or out of range)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org", body = ErrorBody),
        (status = 409, description = "The VM has a service of that name (`SERVICE_EXISTS`), has 16 services (`TOO_MANY_SERVICES`), or is being deleted", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
    )
)]
pub async fn register(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
    JsonBody(req): JsonBody<RegisterServiceRequest>,
) -> Result<(StatusCode, Json<Service>), ApiError> {
    let svc = req.validate()?;
    match state
        .register_service(caller.org_id, id, svc, false)
        .await?
    {
        Registered::Created(s) => Ok((StatusCode::CREATED, Json(s))),
        Registered::Updated(s) | Registered::Unchanged(s) => Ok((StatusCode::OK, Json(s))),
    }
}

/// Register or update a service on a VM
#[utoipa::path(
    put,
    path = "/v1/vms/{id}/services/{serviceName}",
    tag = "services",
    operation_id = "updateService",
    summary = "Register or update a service on a VM",
    description = "Upsert: creates the service (201) or changes its port / transport (200); the same values are a no-op (200). ",
    params(
        ("id" = String, Path, description = "VM ID (UUID)."),
        ("serviceName" = String, Path, description = "Service registration name. 1–29 chars, lowercase letters and digits with optional single internal hyphens."),
    ),
    request_body(content = UpdateServiceRequest, example = json!(examples::update_service_request())),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The updated (or unchanged) service", body = Service, example = json!(examples::service_updated())),
        (status = 201, description = "The new service", body = Service, example = json!(examples::service())),
        (status = 400, description = "Malformed body, or a bad name (`INVALID_SERVICE_NAME`) or port (`INVALID_SERVICE_PORT`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org", body = ErrorBody),
        (status = 409, description = "The VM has 16 services (`TOO_MANY_SERVICES`) or is being deleted", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    VmSubPath(id, name): VmSubPath,
    JsonBody(req): JsonBody<UpdateServiceRequest>,
) -> Result<(StatusCode, Json<Service>), ApiError> {
    let svc = req.validate(&name)?;
    match state.register_service(caller.org_id, id, svc, true).await? {
        Registered::Created(s) => Ok((StatusCode::CREATED, Json(s))),
        Registered::Updated(s) | Registered::Unchanged(s) => Ok((StatusCode::OK, Json(s))),
    }
}

/// Deregister a service from a VM
#[utoipa::path(
    delete,
    path = "/v1/vms/{id}/services/{serviceName}",
    tag = "services",
    operation_id = "deleteService",
    summary = "Deregister a service from a VM",
    description = "Removes the service and its auto ingress rule; the proxy answers 404 for it from then on.",
    params(
        ("id" = String, Path, description = "VM ID (UUID)."),
        ("serviceName" = String, Path, description = "Service registration name."),
    ),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The service is gone (`id` is its name)", body = DeleteResponse, example = json!(examples::service_deleted())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org, or no such service", body = ErrorBody),
        (status = 409, description = "The VM is being deleted", body = ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    VmSubPath(id, name): VmSubPath,
) -> Result<Json<DeleteResponse>, ApiError> {
    if validate_service_name(&name).is_err() {
        return Err(crate::services::no_such_service(id, &name));
    }
    state.delete_service(caller.org_id, id, &name).await?;
    Ok(Json(DeleteResponse::new(name)))
}
