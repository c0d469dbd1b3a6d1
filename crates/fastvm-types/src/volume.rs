//! Managed volumes: org-level disks that attach to VMs at `/mnt/...` or
//! `/data/...`, possibly to several VMs at once.
//!
//! ```text
//!  creating ──▶ ready ──(DELETE)──▶ deleting ──▶ (gone)
//!                 │ PATCH sizeGiB: pendingSizeGiB != 0 until the resize commits
//! ```

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::common::{codes, normalize_name, show, OrgId, ValidationError, VmId};

/// Prefix of volume ids (`vol_<22 lowercase hex>`).
pub const VOLUME_ID_PREFIX: &str = "vol_";

/// A fresh volume id: `vol_` + 22 lowercase hex characters.
pub fn new_volume_id() -> String {
    prefixed_hex_id(VOLUME_ID_PREFIX)
}

/// True when `id` has the shape of a volume id.
pub fn is_volume_id(id: &str) -> bool {
    is_prefixed_hex_id(VOLUME_ID_PREFIX, id)
}

pub(crate) fn prefixed_hex_id(prefix: &str) -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}{}", &hex[..22])
}

pub(crate) fn is_prefixed_hex_id(prefix: &str, id: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|hex| {
        hex.len() == 22
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Access mode of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AccessMode {
    /// Read-write.
    Rw,
    /// Read-only.
    Ro,
}

/// Lifecycle status of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VolumeStatus {
    /// Being provisioned; attach is rejected (`VOL_NOT_READY`).
    Creating,
    /// Attachable.
    Ready,
    /// Cleanup in progress; not attachable.
    Deleting,
}

/// Mount state of a volume attachment or bucket-mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MountStatus {
    /// Mounted in the guest.
    Mounted,
    /// Mounting failed; see `statusMessage`.
    Failed,
    /// Not mounted yet (VM paused, or hot-attach in flight).
    Pending,
}

/// A volume as returned by the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    /// `vol_<22 lowercase hex>`.
    pub id: String,
    /// Name.
    pub name: String,
    /// Owning org.
    pub org_id: OrgId,
    /// `rw` or `ro`.
    pub access_mode: AccessMode,
    /// Size in GiB (the pre-resize value while a resize is in flight).
    #[serde(rename = "sizeGiB")]
    pub size_gib: u64,
    /// Lifecycle status.
    pub status: VolumeStatus,
    /// Target size of an in-flight resize, 0 when none.
    #[serde(rename = "pendingSizeGiB")]
    pub pending_size_gib: u64,
    /// Running VMs with this volume attached (paused VMs not counted).
    pub mounted_count: u64,
    /// Space used, GiB rounded down; omitted (never null) when it cannot be measured.
    #[serde(rename = "usedGiB", default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub used_gib: Option<u64>,
    /// Creation time (RFC 3339).
    pub created_at: String,
}

/// Body of `POST /v1/volumes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateVolumeRequest {
    /// Name (normalized like VM names; must not be empty).
    pub name: String,
    /// Size in GiB, at least 1.
    #[serde(rename = "sizeGiB")]
    pub size_gib: u64,
    /// `rw` or `ro`.
    pub access_mode: AccessMode,
}

/// Body of `PATCH /v1/volumes/{id}`: any of name, size (grow, or shrink when
/// the data fits), access mode.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateVolumeRequest {
    /// New name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// New size in GiB, at least 1.
    #[serde(default, rename = "sizeGiB", skip_serializing_if = "Option::is_none")]
    pub size_gib: Option<u64>,
    /// New access mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<AccessMode>,
}

fn validate_volume_name(raw: &str) -> Result<String, ValidationError> {
    let name = normalize_name(raw);
    if name.is_empty() {
        return Err(ValidationError::new(
            codes::INVALID_NAME,
            "name is empty; give the volume a name",
        ));
    }
    Ok(name)
}

fn validate_size(size_gib: u64) -> Result<(), ValidationError> {
    if size_gib == 0 {
        return Err(ValidationError::new(
            codes::INVALID_SIZE,
            "sizeGiB must be at least 1",
        ));
    }
    Ok(())
}

impl CreateVolumeRequest {
    /// Checks the body; returns the normalized name.
    pub fn validate(&self) -> Result<String, ValidationError> {
        validate_size(self.size_gib)?;
        validate_volume_name(&self.name)
    }
}

impl UpdateVolumeRequest {
    /// Checks the body (something to change, valid size); returns the
    /// normalized new name, if any.
    pub fn validate(&self) -> Result<Option<String>, ValidationError> {
        if self.name.is_none() && self.size_gib.is_none() && self.access_mode.is_none() {
            return Err(ValidationError::new(
                codes::INVALID_REQUEST,
                "nothing to update; give at least one of name, sizeGiB, accessMode",
            ));
        }
        if let Some(size) = self.size_gib {
            validate_size(size)?;
        }
        self.name.as_deref().map(validate_volume_name).transpose()
    }
}

/// Body of `POST /v1/vms/{id}/volumes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttachVolumeRequest {
    /// The volume.
    pub volume_id: String,
    /// Absolute path starting with `/mnt/` or `/data/`.
    pub mount_path: String,
    /// Mount read-only (default false).
    #[serde(default)]
    pub read_only: bool,
}

impl AttachVolumeRequest {
    /// Checks the volume id shape and the mount path.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if !is_volume_id(&self.volume_id) {
            return Err(ValidationError::new(
                codes::INVALID_REQUEST,
                format!(
                    "volumeId {} is not a volume id (vol_<22 lowercase hex>)",
                    show(&self.volume_id)
                ),
            ));
        }
        validate_volume_mount_path(&self.mount_path)
    }
}

/// Checks a mount path: absolute, clean (no empty, `.` or `..` components, no
/// trailing slash), at most 4096 bytes, no NUL, not `/`.
pub fn validate_mount_path(path: &str) -> Result<(), ValidationError> {
    let err = |why: &str| {
        ValidationError::new(
            codes::INVALID_MOUNT_PATH,
            format!("mountPath {} {why}", show(path)),
        )
    };
    if !path.starts_with('/') {
        return Err(err("must be an absolute path"));
    }
    if path == "/" {
        return Err(err("cannot be the root directory"));
    }
    if path.len() > 4096 || path.contains('\0') {
        return Err(err("is too long or contains a NUL byte"));
    }
    if path[1..]
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(err(
            "must be a clean path (no '//', '.', '..' or trailing '/')",
        ));
    }
    Ok(())
}

/// Checks a volume mount path: [`validate_mount_path`] and a start of `/mnt/`
/// or `/data/` with something after it.
pub fn validate_volume_mount_path(path: &str) -> Result<(), ValidationError> {
    validate_mount_path(path)?;
    if !(path.starts_with("/mnt/") || path.starts_with("/data/")) {
        return Err(ValidationError::new(
            codes::INVALID_MOUNT_PATH,
            format!(
                "mountPath {} must start with /mnt/ or /data/ (e.g. /mnt/cache)",
                show(path)
            ),
        ));
    }
    Ok(())
}

/// A volume attached to a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeAttachmentItem {
    /// The volume.
    pub volume_id: String,
    /// Where it is mounted in the guest.
    pub mount_path: String,
    /// Mounted read-only.
    pub read_only: bool,
    /// `mounted`, `failed` or `pending`.
    pub mount_status: MountStatus,
    /// Detail of a failure; null otherwise.
    pub status_message: Option<String>,
}

/// A volume attachment with the VM it belongs to (`GET /v1/volumes/{id}/attachments`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeAttachmentItemWithVm {
    /// The VM.
    pub vm_id: VmId,
    /// The volume.
    pub volume_id: String,
    /// Where it is mounted in the guest.
    pub mount_path: String,
    /// Mounted read-only.
    pub read_only: bool,
    /// `mounted`, `failed` or `pending`.
    pub mount_status: MountStatus,
    /// Detail of a failure; null otherwise.
    pub status_message: Option<String>,
}

impl VolumeAttachmentItemWithVm {
    /// `item` on VM `vm_id`.
    pub fn new(vm_id: VmId, item: VolumeAttachmentItem) -> Self {
        Self {
            vm_id,
            volume_id: item.volume_id,
            mount_path: item.mount_path,
            read_only: item.read_only,
            mount_status: item.mount_status,
            status_message: item.status_message,
        }
    }
}

/// Answer of `DELETE /v1/vms/{id}/volumes/{volumeId}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DetachVolumeResponse {
    /// True once detached.
    pub detached: bool,
    /// Issues of a forced teardown (empty on the clean path).
    pub warnings: Vec<DetachWarning>,
}

/// A problem met while detaching.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DetachWarning {
    /// `ack_timeout` or `guest_unresponsive`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Detail.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn volume_ids() {
        let id = new_volume_id();
        assert!(is_volume_id(&id), "{id}");
        assert_eq!(id.len(), 4 + 22);
        assert!(!is_volume_id("vol_123"));
        assert!(!is_volume_id("vol_ABCDEF0123456789abcdef"));
        assert!(!is_volume_id("bm_0123456789abcdef012345"));
        assert!(is_volume_id("vol_0123456789abcdef012345"));
    }

    #[test]
    fn volume_wire_names() -> Result<(), Box<dyn std::error::Error>> {
        let v = serde_json::to_value(Volume {
            id: "vol_0123456789abcdef012345".into(),
            name: "cache".into(),
            org_id: "00000000-0000-4000-8000-000000000001".parse()?,
            access_mode: AccessMode::Rw,
            size_gib: 10,
            status: VolumeStatus::Ready,
            pending_size_gib: 0,
            mounted_count: 1,
            used_gib: None,
            created_at: "2025-01-01T00:00:00Z".into(),
        })?;
        let mut keys: Vec<String> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        assert_eq!(
            keys,
            [
                "accessMode",
                "createdAt",
                "id",
                "mountedCount",
                "name",
                "orgId",
                "pendingSizeGiB",
                "sizeGiB",
                "status",
            ]
        );
        assert_eq!(v["accessMode"], json!("rw"));
        assert_eq!(v["status"], json!("ready"));
        // usedGiB: omitted when unknown (above), a number when measured.
        let mut measured: Volume = serde_json::from_value(v)?;
        assert_eq!(measured.used_gib, None);
        measured.used_gib = Some(3);
        assert_eq!(serde_json::to_value(&measured)?["usedGiB"], json!(3));
        Ok(())
    }

    #[test]
    fn used_gib_is_optional_but_never_null_in_the_schema() -> Result<(), serde_json::Error> {
        let schema = serde_json::to_value(<Volume as utoipa::PartialSchema>::schema())?;
        let required: Vec<&str> = schema["required"]
            .as_array()
            .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        assert!(!required.contains(&"usedGiB"), "{schema}");
        assert!(required.contains(&"sizeGiB"), "{schema}");
        assert_eq!(
            schema["properties"]["usedGiB"]["type"],
            json!("integer"),
            "{schema}"
        );
        Ok(())
    }

    #[test]
    fn create_and_update_rules() -> Result<(), serde_json::Error> {
        let c: CreateVolumeRequest =
            serde_json::from_value(json!({"name": " my  vol ", "sizeGiB": 1, "accessMode": "ro"}))?;
        assert_eq!(c.validate(), Ok("my vol".to_string()));
        let zero = CreateVolumeRequest {
            size_gib: 0,
            ..c.clone()
        };
        assert_eq!(
            zero.validate().err().map(|e| e.code),
            Some(codes::INVALID_SIZE)
        );
        let blank = CreateVolumeRequest {
            name: "  ".into(),
            ..c
        };
        assert_eq!(
            blank.validate().err().map(|e| e.code),
            Some(codes::INVALID_NAME)
        );
        assert!(serde_json::from_value::<CreateVolumeRequest>(
            json!({"name": "v", "sizeGiB": 1, "accessMode": "wo"})
        )
        .is_err());
        assert!(serde_json::from_value::<CreateVolumeRequest>(
            json!({"name": "v", "sizeGib": 1, "accessMode": "rw"})
        )
        .is_err());

        let u: UpdateVolumeRequest = serde_json::from_value(json!({"sizeGiB": 20}))?;
        assert_eq!(u.validate(), Ok(None));
        let empty: UpdateVolumeRequest = serde_json::from_value(json!({}))?;
        assert_eq!(
            empty.validate().err().map(|e| e.code),
            Some(codes::INVALID_REQUEST)
        );
        Ok(())
    }

    #[test]
    fn mount_paths() {
        for good in ["/mnt/a", "/data/x/y", "/mnt/a-b_c.d"] {
            assert_eq!(validate_volume_mount_path(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "mnt/a",
            "/mnt",
            "/mnt/",
            "/data",
            "/data/",
            "/etc/x",
            "/mnt/../etc",
            "/mnt/./a",
            "/mnt//a",
            "/mnt/a/",
            "/mnt/a\0",
            "/mntx/a",
            "/",
        ] {
            assert_eq!(
                validate_volume_mount_path(bad).err().map(|e| e.code),
                Some(codes::INVALID_MOUNT_PATH),
                "{bad:?}"
            );
        }
        assert_eq!(validate_mount_path("/srv/bucket"), Ok(()));
    }

    #[test]
    fn attach_request() -> Result<(), serde_json::Error> {
        let a: AttachVolumeRequest = serde_json::from_value(
            json!({"volumeId": "vol_0123456789abcdef012345", "mountPath": "/mnt/v"}),
        )?;
        assert!(!a.read_only);
        assert_eq!(a.validate(), Ok(()));
        let bad = AttachVolumeRequest {
            volume_id: "v1".into(),
            ..a
        };
        assert_eq!(
            bad.validate().err().map(|e| e.code),
            Some(codes::INVALID_REQUEST)
        );
        Ok(())
    }

    #[test]
    fn attachment_and_detach_wire_names() -> Result<(), Box<dyn std::error::Error>> {
        let item = VolumeAttachmentItem {
            volume_id: "vol_0123456789abcdef012345".into(),
            mount_path: "/mnt/v".into(),
            read_only: true,
            mount_status: MountStatus::Pending,
            status_message: None,
        };
        assert_eq!(
            serde_json::to_value(&item)?,
            json!({"volumeId": "vol_0123456789abcdef012345", "mountPath": "/mnt/v", "readOnly": true,
                   "mountStatus": "pending", "statusMessage": null})
        );
        let with_vm =
            VolumeAttachmentItemWithVm::new("11111111-2222-4333-8444-555555555555".parse()?, item);
        assert_eq!(
            serde_json::to_value(&with_vm)?["vmId"],
            json!("11111111-2222-4333-8444-555555555555")
        );
        let d = DetachVolumeResponse {
            detached: true,
            warnings: vec![DetachWarning {
                kind: "ack_timeout".into(),
                message: "m".into(),
            }],
        };
        assert_eq!(
            serde_json::to_value(&d)?,
            json!({"detached": true, "warnings": [{"type": "ack_timeout", "message": "m"}]})
        );
        Ok(())
    }
}
