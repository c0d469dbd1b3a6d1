//! Public REST API types of Fast VM.
//!
//! Every request and response body of the API, with the exact camelCase wire
//! names of the contract (`memoryMiB`, `diskGiB`, `sizeGiB`, `expiresAtMs`,
//! `publicIpv6`, ...), OpenAPI schemas (`utoipa::ToSchema`), typed ids, and the
//! validation rules the contract states. Input types (`*Request`) reject unknown
//! fields and expose `validate()`, which returns a [`ValidationError`] with a
//! machine-readable code (see [`codes`]) and a message naming the offending
//! field, key or rule index. Output types are views: every field is always
//! serialized, with `null` for optional values.
//!
//! One module per resource:
//!
//! | module             | endpoints                                               |
//! |--------------------|---------------------------------------------------------|
//! | [`vm`]             | `/v1/vms`, `/v1/vms/{id}` (+ pause, resume, ttl/refresh)|
//! | [`exec`]           | `/v1/vms/{id}/exec` (JSON and NDJSON)                   |
//! | [`firewall`]       | `/v1/vms/{id}/firewall` (PUT, PATCH)                    |
//! | [`service`]        | `/v1/vms/{id}/services`                                 |
//! | [`files`]          | `/v1/vms/{id}/files/presign`, `/files/fetch`, `/files/export` (extension) |
//! | [`volume`]         | `/v1/volumes`, `/v1/vms/{id}/volumes`                   |
//! | [`bucket_mount`]   | `/v1/vms/{id}/bucket-mounts`                            |
//! | [`console`]        | `/v1/vms/{id}/console-token`                            |
//! | [`snapshot`]       | `/v1/snapshots`                                         |
//! | [`snapshot_import`]| `/v1/snapshot-imports`                                  |
//! | [`ssh_key`]        | `/v1/me/ssh-keys`                                       |
//! | [`quota`]          | `/v1/org/quotas`                                        |
//! | [`health`]         | `/healthz`                                              |
//! | [`metadata`]       | the Metadata and EnvVars maps                           |
//! | [`common`]         | ids, errors, `Patch`, name normalization                |

pub mod bucket_mount;
pub mod common;
pub mod console;
pub mod exec;
pub mod files;
pub mod firewall;
pub mod fork;
pub mod health;
pub mod metadata;
pub mod quota;
pub mod service;
pub mod snapshot;
pub mod snapshot_import;
pub mod ssh_key;
pub mod vm;
pub mod volume;

pub use common::{
    codes, normalize_name, ApiError, ApiErrorBody, DeleteResponse, OrgId, Patch, SnapshotId,
    SnapshotImportId, ValidationError, VmId,
};
pub use firewall::{domain_matches, FirewallPolicy, Ports};
pub use metadata::{validate_env_vars, validate_metadata, EnvVars, Metadata};
pub use vm::{LaunchVmRequest, Ttl, TtlAction, UpdateVmRequest, Vm, VmStatus};

/// Every schema of this crate as OpenAPI components, for the server to merge
/// into its document (`ApiDoc::openapi().merge_from(ApiSchemas::openapi())`).
#[derive(utoipa::OpenApi)]
#[openapi(components(schemas(
    common::ApiError,
    common::ApiErrorBody,
    common::DeleteResponse,
    common::VmId,
    common::SnapshotId,
    common::OrgId,
    common::SnapshotImportId,
    metadata::schema::Metadata,
    metadata::schema::EnvVars,
    vm::Vm,
    vm::VmStatus,
    vm::Ttl,
    vm::TtlAction,
    vm::LaunchVmRequest,
    vm::UpdateVmRequest,
    exec::ExecVmRequest,
    exec::ExecVmResponse,
    exec::ExecEvent,
    exec::ExecEventType,
    firewall::FirewallPolicy,
    firewall::IngressPolicy,
    firewall::EgressPolicy,
    firewall::IngressRule,
    firewall::EgressRule,
    firewall::IngressRuleKind,
    firewall::EgressRuleKind,
    firewall::DnsPolicy,
    firewall::DnsMode,
    firewall::PolicyAction,
    firewall::Protocol,
    service::Service,
    service::RegisterServiceRequest,
    service::UpdateServiceRequest,
    files::FilePresignRequest,
    files::FilePresignResponse,
    files::FileFetchRequest,
    files::FileExportRequest,
    files::FileExportResponse,
    files::FileKind,
    console::ConsoleTokenResponse,
    health::HealthResponse,
    quota::OrgQuotaValues,
    quota::OrgQuotaUsage,
    volume::Volume,
    volume::AccessMode,
    volume::VolumeStatus,
    volume::MountStatus,
    volume::CreateVolumeRequest,
    volume::UpdateVolumeRequest,
    volume::AttachVolumeRequest,
    volume::VolumeAttachmentItem,
    volume::VolumeAttachmentItemWithVm,
    volume::DetachVolumeResponse,
    volume::DetachWarning,
    bucket_mount::BucketMount,
    bucket_mount::BucketMountCredentials,
    bucket_mount::GcpServiceAccountKey,
    bucket_mount::AwsCredentialsFile,
    bucket_mount::AttachBucketMountRequest,
    bucket_mount::RotateBucketMountRequest,
    snapshot::Snapshot,
    snapshot::SnapshotStatus,
    snapshot::SnapshotService,
    snapshot::SnapshotVolumeAttachment,
    snapshot::SnapshotBucketMountAttachment,
    snapshot::CreateSnapshotRequest,
    snapshot::UpdateSnapshotRequest,
    snapshot_import::SnapshotImportSourceType,
    snapshot_import::SnapshotImportSourceSpec,
    snapshot_import::SnapshotImportSourceView,
    snapshot_import::SnapshotImportEvent,
    snapshot_import::SnapshotImportStatus,
    snapshot_import::SnapshotImportResponse,
    snapshot_import::CreateSnapshotImportRequest,
    snapshot_import::ContextPresignRequest,
    snapshot_import::ContextPresignResponse,
    ssh_key::SshKey,
    ssh_key::SshKeyListResponse,
    ssh_key::AddSshKeyRequest,
)))]
pub struct ApiSchemas;

#[cfg(test)]
mod schema_tests {
    use super::ApiSchemas;
    use serde_json::{json, Value};
    use utoipa::OpenApi;

    fn schemas() -> Result<Value, serde_json::Error> {
        let doc = serde_json::to_value(ApiSchemas::openapi())?;
        Ok(doc["components"]["schemas"].clone())
    }

    fn props(schemas: &Value, name: &str) -> Vec<String> {
        let mut keys: Vec<String> = schemas[name]["properties"]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        keys
    }

    #[test]
    fn document_is_openapi_3_1() -> Result<(), serde_json::Error> {
        let doc = serde_json::to_value(ApiSchemas::openapi())?;
        assert!(doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")));
        Ok(())
    }

    #[test]
    fn schema_wire_names_match_serde() -> Result<(), serde_json::Error> {
        let s = schemas()?;
        let vm = props(&s, "VM");
        for k in [
            "memoryMiB",
            "diskGiB",
            "publicIpv6",
            "expiresAtMs",
            "ttlRemainingMs",
            "orgId",
            "bucketMounts",
            // An extension of the spec: why the VM is `error` or `stopped`.
            "statusMessage",
        ] {
            assert!(vm.contains(&k.to_string()), "Vm lacks {k}: {vm:?}");
        }
        assert_eq!(vm.len(), 23);
        assert!(props(&s, "Volume").contains(&"pendingSizeGiB".to_string()));
        assert!(props(&s, "Volume").contains(&"usedGiB".to_string()));
        assert!(props(&s, "OrgQuotaValues").contains(&"volumeGiB".to_string()));
        assert!(props(&s, "DNSPolicy").contains(&"blockBypass".to_string()));
        assert_eq!(props(&s, "ExecEvent"), ["c", "d", "ms", "t", "to"]);
        // The spec's 8 statuses and `unknown` (extension: the VM's worker is lost).
        assert_eq!(s["VMStatus"]["enum"].as_array().map(Vec::len), Some(9));
        assert_eq!(s["VmId"]["format"], json!("uuid"));
        assert!(props(&s, "UpdateVmRequest").contains(&"ttl".to_string()));
        assert!(props(&s, "CreateSnapshotImportRequest").contains(&"diskGiB".to_string()));
        assert_eq!(
            s["VM"]["properties"]["metadata"]["$ref"],
            json!("#/components/schemas/Metadata")
        );
        assert_eq!(
            s["Metadata"]["additionalProperties"]["type"],
            json!("string")
        );
        Ok(())
    }

    fn collect_refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                for (k, x) in o {
                    match (k.as_str(), x.as_str()) {
                        ("$ref", Some(r)) => out.push(r.to_string()),
                        _ => collect_refs(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
            _ => {}
        }
    }

    #[test]
    fn every_ref_resolves() -> Result<(), serde_json::Error> {
        let s = schemas()?;
        let mut refs = Vec::new();
        collect_refs(&s, &mut refs);
        assert!(!refs.is_empty());
        for r in refs {
            let name = r.trim_start_matches("#/components/schemas/");
            assert!(s.get(name).is_some(), "dangling {r}");
        }
        // Spec names for schemas whose Rust names differ.
        for name in [
            "VM",
            "VMStatus",
            "DNSPolicy",
            "DNSMode",
            "ExecVMResponse",
            "Metadata",
            "EnvVars",
        ] {
            assert!(s.get(name).is_some(), "missing {name}");
        }
        Ok(())
    }
}
