//! Snapshot imports: build a snapshot from an OCI image or a Dockerfile.
//!
//! ```text
//!  pending ──▶ claimed ──▶ running ──▶ succeeded (snapshotId set)
//!     │           │           ├──────▶ failed    (error set)
//!     └───────────┴───────────┴──────▶ cancelled
//! ```
//! `running` is logged as events: preparing → network → pull | fetch_context,
//! build → export → saving → warming → done.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::common::{codes, show, SnapshotId, SnapshotImportId, ValidationError};

/// Most `buildArgs` entries.
pub const MAX_BUILD_ARGS: usize = 64;
/// Most bytes of all `buildArgs` together, counted as `KEY=VALUE` strings.
pub const MAX_BUILD_ARGS_BYTES: usize = 8 * 1024;

/// Which pipeline builds the snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotImportSourceType {
    /// Pull an OCI image and export its rootfs.
    Image,
    /// Build a Dockerfile against an uploaded context.
    Dockerfile,
}

/// Source descriptor of `POST /v1/snapshot-imports`. `type` selects which other
/// fields apply; fields of the other variant must be omitted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotImportSourceSpec {
    /// `image` or `dockerfile`.
    #[serde(rename = "type")]
    pub source_type: SnapshotImportSourceType,
    /// OCI image reference; required for `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `<os>/<arch>[/<variant>]` (default `linux/amd64`); `image` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Registry username (both variants).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_username: Option<String>,
    /// Registry password or token (both variants); never returned or stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_password: Option<String>,
    /// Registry host the credentials are for; required with credentials on
    /// `dockerfile`, ignored on `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_host: Option<String>,
    /// One-shot token from `/v1/snapshot-imports/context-presign`; required for `dockerfile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_ref: Option<String>,
    /// Dockerfile path relative to the context root (default `Dockerfile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile_path: Option<String>,
    /// `--build-arg` pairs (at most 64, 8 KiB total).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_args: Option<BTreeMap<String, String>>,
    /// Multi-stage `--target` (empty: final stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl fmt::Debug for SnapshotImportSourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotImportSourceSpec")
            .field("source_type", &self.source_type)
            .field("image", &self.image)
            .field("platform", &self.platform)
            .field("registry_username", &self.registry_username)
            .field(
                "registry_password",
                &self.registry_password.as_ref().map(|_| "<redacted>"),
            )
            .field("registry_host", &self.registry_host)
            .field("context_ref", &self.context_ref)
            .field("dockerfile_path", &self.dockerfile_path)
            .field("build_args", &self.build_args)
            .field("target", &self.target)
            .finish()
    }
}

fn src_err(msg: impl Into<String>) -> ValidationError {
    ValidationError::new(codes::INVALID_IMPORT_SOURCE, msg)
}

fn is_blank(v: &Option<String>) -> bool {
    v.as_deref().is_none_or(|s| s.trim().is_empty())
}

impl SnapshotImportSourceSpec {
    /// Checks the variant's required fields, that the other variant's fields are
    /// absent, credentials come in pairs, the Dockerfile path stays inside the
    /// context, the platform's shape and the build-arg limits.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if is_blank(&self.registry_username) != is_blank(&self.registry_password) {
            return Err(src_err(
                "source.registryUsername and source.registryPassword must be given together",
            ));
        }
        let has_creds = !is_blank(&self.registry_username);
        match self.source_type {
            SnapshotImportSourceType::Image => {
                if is_blank(&self.image) {
                    return Err(src_err(
                        "source.image is required when source.type is image",
                    ));
                }
                for (set, name) in [
                    (self.context_ref.is_some(), "contextRef"),
                    (self.dockerfile_path.is_some(), "dockerfilePath"),
                    (self.build_args.is_some(), "buildArgs"),
                    (self.target.is_some(), "target"),
                ] {
                    if set {
                        return Err(src_err(format!(
                            "source.{name} applies to type dockerfile only; remove it for type image"
                        )));
                    }
                }
                if let Some(p) = &self.platform {
                    validate_platform(p)?;
                }
            }
            SnapshotImportSourceType::Dockerfile => {
                if is_blank(&self.context_ref) {
                    return Err(src_err(
                        "source.contextRef is required when source.type is dockerfile; get one from \
                         POST /v1/snapshot-imports/context-presign",
                    ));
                }
                for (set, name) in [
                    (self.image.is_some(), "image"),
                    (self.platform.is_some(), "platform"),
                ] {
                    if set {
                        return Err(src_err(format!(
                            "source.{name} applies to type image only; remove it for type dockerfile"
                        )));
                    }
                }
                if has_creds && is_blank(&self.registry_host) {
                    return Err(src_err(
                        "source.registryHost is required with registry credentials on type dockerfile \
                         (e.g. ghcr.io)",
                    ));
                }
                if let Some(p) = &self.dockerfile_path {
                    validate_dockerfile_path(p)?;
                }
                if let Some(args) = &self.build_args {
                    validate_build_args(args)?;
                }
            }
        }
        Ok(())
    }

    /// The public view (no password, no context token).
    pub fn view(&self, context_size_bytes: Option<u64>) -> SnapshotImportSourceView {
        SnapshotImportSourceView {
            source_type: self.source_type,
            image: self.image.clone(),
            platform: self.platform.clone(),
            registry_username: self.registry_username.clone(),
            registry_host: match self.source_type {
                SnapshotImportSourceType::Dockerfile => self.registry_host.clone(),
                SnapshotImportSourceType::Image => None,
            },
            dockerfile_path: self.dockerfile_path.clone(),
            build_args: self.build_args.clone(),
            target: self.target.clone(),
            context_size_bytes,
        }
    }
}

fn validate_platform(p: &str) -> Result<(), ValidationError> {
    let parts: Vec<&str> = p.split('/').collect();
    let ok_part =
        |s: &&str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !(2..=3).contains(&parts.len()) || !parts.iter().all(ok_part) {
        return Err(src_err(format!(
            "source.platform {} must look like <os>/<arch>[/<variant>], e.g. linux/amd64",
            show(p)
        )));
    }
    Ok(())
}

fn validate_dockerfile_path(p: &str) -> Result<(), ValidationError> {
    if p.is_empty()
        || p.starts_with('/')
        || p.split(['/', '\\']).any(|c| c == "..")
        || p.contains('\0')
    {
        return Err(src_err(format!(
            "source.dockerfilePath {} must be a relative path inside the context without '..'",
            show(p)
        )));
    }
    Ok(())
}

fn validate_build_args(args: &BTreeMap<String, String>) -> Result<(), ValidationError> {
    if args.len() > MAX_BUILD_ARGS {
        return Err(src_err(format!(
            "source.buildArgs has {} entries; at most {MAX_BUILD_ARGS} are allowed",
            args.len()
        )));
    }
    let bad_key = |k: &String| {
        k.is_empty() || k.contains('=') || k.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    if let Some(k) = args.keys().find(|k| bad_key(k)) {
        return Err(src_err(format!(
            "source.buildArgs key {} is not a valid build-arg name (non-empty, no '=', spaces or control characters)",
            show(k)
        )));
    }
    let total: usize = args.iter().map(|(k, v)| k.len() + 1 + v.len()).sum();
    if total > MAX_BUILD_ARGS_BYTES {
        return Err(src_err(format!(
            "source.buildArgs total {total} bytes (as KEY=VALUE); at most {MAX_BUILD_ARGS_BYTES} are allowed"
        )));
    }
    Ok(())
}

/// Body of `POST /v1/snapshot-imports`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSnapshotImportRequest {
    /// Machine type of the build and the resulting snapshot (server default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_type: Option<String>,
    /// Disk size of the snapshot (machine type's default when absent), at least 1.
    #[serde(default, rename = "diskGiB", skip_serializing_if = "Option::is_none")]
    pub disk_gib: Option<u64>,
    /// Label for the import and its snapshot (the import id when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What to build from.
    pub source: SnapshotImportSourceSpec,
}

impl CreateSnapshotImportRequest {
    /// Checks the disk size and the source.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.disk_gib == Some(0) {
            return Err(ValidationError::new(
                codes::INVALID_SIZE,
                "diskGiB must be at least 1",
            ));
        }
        self.source.validate()
    }
}

/// Body of `POST /v1/snapshot-imports/context-presign`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContextPresignRequest {
    /// Planned upload size in bytes; rejected above the platform cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

impl ContextPresignRequest {
    /// Checks `sizeBytes` against the platform cap `max_bytes`.
    pub fn validate(&self, max_bytes: u64) -> Result<(), ValidationError> {
        match self.size_bytes {
            Some(n) if n > max_bytes => Err(ValidationError::new(
                codes::INVALID_SIZE,
                format!("sizeBytes {n} exceeds the build-context cap of {max_bytes} bytes"),
            )),
            _ => Ok(()),
        }
    }
}

/// One-shot upload handle for a Dockerfile build context.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContextPresignResponse {
    /// Token for `source.contextRef`; single use.
    pub context_ref: String,
    /// Signed PUT URL for the ZIP archive (`Content-Type: application/zip`).
    pub upload_url: String,
    /// Lifetime of `uploadUrl`, seconds.
    pub expires_in_sec: u64,
    /// Upload size cap, bytes.
    pub max_upload_bytes: u64,
}

/// One entry of an import's append-only event log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotImportEvent {
    /// Sub-phase (`preparing`, `network`, `pull`, `fetch_context`, `build`,
    /// `export`, `saving`, `warming`, `done`).
    pub phase: String,
    /// `started`, `completed`, `failed`, `skipped`, `cancelled`.
    pub status: String,
    /// Unix-epoch milliseconds.
    pub timestamp_ms: u64,
    /// User-safe summary; null when none.
    pub message: Option<String>,
}

/// Public view of an import's source (no secrets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotImportSourceView {
    /// `image` or `dockerfile`.
    #[serde(rename = "type")]
    pub source_type: SnapshotImportSourceType,
    /// OCI image reference.
    pub image: Option<String>,
    /// Platform selector.
    pub platform: Option<String>,
    /// Registry username.
    pub registry_username: Option<String>,
    /// Registry host (dockerfile source only).
    pub registry_host: Option<String>,
    /// Dockerfile path.
    pub dockerfile_path: Option<String>,
    /// Build args.
    pub build_args: Option<BTreeMap<String, String>>,
    /// Build target.
    pub target: Option<String>,
    /// Size of the uploaded context, bytes.
    pub context_size_bytes: Option<u64>,
}

/// Status of an import.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotImportStatus {
    /// Queued, no worker yet.
    Pending,
    /// Worker assigned, dispatch in flight.
    Claimed,
    /// Pipeline running.
    Running,
    /// Done; `snapshotId` set.
    Succeeded,
    /// Failed; `error` set.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl SnapshotImportStatus {
    /// `succeeded`, `failed`, `cancelled`.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            SnapshotImportStatus::Succeeded
                | SnapshotImportStatus::Failed
                | SnapshotImportStatus::Cancelled
        )
    }
}

/// Current state of an import.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotImportResponse {
    /// Import id (UUID).
    pub id: SnapshotImportId,
    /// Label.
    pub name: String,
    /// Current state.
    pub status: SnapshotImportStatus,
    /// Source (no secrets).
    pub source: SnapshotImportSourceView,
    /// Event log, oldest first.
    pub events: Vec<SnapshotImportEvent>,
    /// The produced snapshot once `succeeded`; null otherwise.
    pub snapshot_id: Option<SnapshotId>,
    /// User-safe diagnostic once `failed`; null otherwise.
    pub error: Option<String>,
    /// Machine type.
    pub machine_name: String,
    /// vCPUs.
    pub cpu: u32,
    /// Memory, MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// Disk, GiB.
    #[serde(rename = "diskGiB")]
    pub disk_gib: u64,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// When a worker started it; null before.
    pub started_at: Option<String>,
    /// Last change.
    pub updated_at: String,
    /// When it reached a terminal state; null before.
    pub finished_at: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> Result<SnapshotImportSourceSpec, serde_json::Error> {
        serde_json::from_value(v)
    }

    fn code(s: &SnapshotImportSourceSpec) -> Option<&'static str> {
        s.validate().err().map(|e| e.code)
    }

    #[test]
    fn image_source() -> Result<(), serde_json::Error> {
        assert_eq!(
            spec(json!({"type": "image", "image": "python:3.13-slim"}))?.validate(),
            Ok(())
        );
        assert_eq!(
            spec(json!({"type": "image", "image": "ghcr.io/a/b:v1", "platform": "linux/arm64/v8",
                        "registryUsername": "u", "registryPassword": "p", "registryHost": "ignored"}))?
            .validate(),
            Ok(())
        );
        let bad = [
            json!({"type": "image"}),
            json!({"type": "image", "image": " "}),
            json!({"type": "image", "image": "a", "contextRef": "c"}),
            json!({"type": "image", "image": "a", "buildArgs": {}}),
            json!({"type": "image", "image": "a", "platform": "linux"}),
            json!({"type": "image", "image": "a", "platform": "linux/"}),
            json!({"type": "image", "image": "a", "registryUsername": "u"}),
        ];
        for b in bad {
            assert_eq!(
                code(&spec(b.clone())?),
                Some(codes::INVALID_IMPORT_SOURCE),
                "{b}"
            );
        }
        assert!(spec(json!({"type": "zip", "image": "a"})).is_err());
        assert!(spec(json!({"type": "image", "image": "a", "extra": 1})).is_err());
        Ok(())
    }

    #[test]
    fn dockerfile_source() -> Result<(), serde_json::Error> {
        assert_eq!(
            spec(json!({"type": "dockerfile", "contextRef": "ctx", "dockerfilePath": "docker/Dockerfile",
                        "buildArgs": {"V": "1"}, "target": "prod"}))?
            .validate(),
            Ok(())
        );
        let bad = [
            json!({"type": "dockerfile"}),
            json!({"type": "dockerfile", "contextRef": "c", "image": "a"}),
            json!({"type": "dockerfile", "contextRef": "c", "platform": "linux/amd64"}),
            json!({"type": "dockerfile", "contextRef": "c", "dockerfilePath": "/Dockerfile"}),
            json!({"type": "dockerfile", "contextRef": "c", "dockerfilePath": "../Dockerfile"}),
            json!({"type": "dockerfile", "contextRef": "c", "dockerfilePath": "a/../../b"}),
            json!({"type": "dockerfile", "contextRef": "c", "registryUsername": "u", "registryPassword": "p"}),
            json!({"type": "dockerfile", "contextRef": "c", "buildArgs": {"A=B": "x"}}),
        ];
        for b in bad {
            assert_eq!(
                code(&spec(b.clone())?),
                Some(codes::INVALID_IMPORT_SOURCE),
                "{b}"
            );
        }
        Ok(())
    }

    #[test]
    fn build_arg_limits() {
        let n = |count: usize| -> BTreeMap<String, String> {
            (0..count)
                .map(|i| (format!("A{i}"), String::new()))
                .collect()
        };
        assert_eq!(validate_build_args(&n(64)), Ok(()));
        assert!(validate_build_args(&n(65)).is_err());
        // One entry "K=<v>" of exactly 8192 bytes, then 8193.
        let one = |len: usize| BTreeMap::from([("K".to_string(), "v".repeat(len - 2))]);
        assert_eq!(validate_build_args(&one(8192)), Ok(()));
        assert!(validate_build_args(&one(8193)).is_err());
    }

    #[test]
    fn view_strips_secrets_and_debug_redacts() -> Result<(), serde_json::Error> {
        let s = spec(
            json!({"type": "image", "image": "a", "registryUsername": "u",
                            "registryPassword": "hunter2", "registryHost": "h"}),
        )?;
        let v = serde_json::to_value(s.view(None))?;
        assert!(!v.to_string().contains("hunter2"));
        assert_eq!(v["type"], json!("image"));
        assert_eq!(v["registryHost"], json!(null));
        assert!(!format!("{s:?}").contains("hunter2"));
        Ok(())
    }

    #[test]
    fn create_request_and_presign() -> Result<(), serde_json::Error> {
        let r: CreateSnapshotImportRequest = serde_json::from_value(json!({
            "machineType": "c1m2", "diskGiB": 10, "name": "py", "source": {"type": "image", "image": "python"}
        }))?;
        assert_eq!(r.validate(), Ok(()));
        let zero = CreateSnapshotImportRequest {
            disk_gib: Some(0),
            ..r
        };
        assert_eq!(
            zero.validate().err().map(|e| e.code),
            Some(codes::INVALID_SIZE)
        );
        let p: ContextPresignRequest = serde_json::from_value(json!({"sizeBytes": 100}))?;
        assert_eq!(p.validate(100), Ok(()));
        assert_eq!(
            p.validate(99).err().map(|e| e.code),
            Some(codes::INVALID_SIZE)
        );
        let empty: ContextPresignRequest = serde_json::from_value(json!({}))?;
        assert_eq!(empty.validate(1), Ok(()));
        Ok(())
    }

    #[test]
    fn response_wire_names() -> Result<(), Box<dyn std::error::Error>> {
        let r = SnapshotImportResponse {
            id: SnapshotImportId::new_v4(),
            name: "n".into(),
            status: SnapshotImportStatus::Pending,
            source: spec(json!({"type": "image", "image": "a"}))?.view(None),
            events: vec![SnapshotImportEvent {
                phase: "preparing".into(),
                status: "started".into(),
                timestamp_ms: 1,
                message: None,
            }],
            snapshot_id: None,
            error: None,
            machine_name: "c1m2".into(),
            cpu: 1,
            memory_mib: 2048,
            disk_gib: 10,
            created_at: "t".into(),
            started_at: None,
            updated_at: "t".into(),
            finished_at: None,
        };
        let v = serde_json::to_value(&r)?;
        let mut keys: Vec<String> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        assert_eq!(
            keys,
            [
                "cpu",
                "createdAt",
                "diskGiB",
                "error",
                "events",
                "finishedAt",
                "id",
                "machineName",
                "memoryMiB",
                "name",
                "snapshotId",
                "source",
                "startedAt",
                "status",
                "updatedAt"
            ]
        );
        assert_eq!(v["events"][0]["timestampMs"], json!(1));
        assert!(
            SnapshotImportStatus::Cancelled.is_terminal()
                && !SnapshotImportStatus::Running.is_terminal()
        );
        let c = serde_json::to_value(ContextPresignResponse {
            context_ref: "c".into(),
            upload_url: "u".into(),
            expires_in_sec: 1,
            max_upload_bytes: 2,
        })?;
        assert_eq!(
            c,
            json!({"contextRef": "c", "uploadUrl": "u", "expiresInSec": 1, "maxUploadBytes": 2})
        );
        Ok(())
    }
}
