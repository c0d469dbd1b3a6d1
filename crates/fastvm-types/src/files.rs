//! File transfer through the staging store: presign a pair of URLs, PUT the
//! bytes, then have the VM fetch them (or the reverse for downloads).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::common::{validate_guest_path, validate_timeout, ValidationError};

/// Timeout, in seconds, of `/files/fetch` and `/files/export` when the
/// request gives none. Published as the `default` of their `timeoutSec` in
/// the OpenAPI document; the SDK derives its HTTP read timeout from it.
pub const FILE_TRANSFER_DEFAULT_TIMEOUT_SEC: u64 = 600;

fn default_transfer_timeout() -> u64 {
    FILE_TRANSFER_DEFAULT_TIMEOUT_SEC
}

/// Body of `POST /v1/vms/{id}/files/presign`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilePresignRequest {
    /// Absolute destination path in the guest; only scopes the staging object key.
    pub path: String,
}

/// Signed URLs for one per-VM staging object; usable in either direction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FilePresignResponse {
    /// Presigned PUT URL (`Content-Type: application/octet-stream`).
    pub upload_url: String,
    /// Presigned GET URL of the same object.
    pub download_url: String,
    /// Lifetime of both URLs in seconds.
    pub expires_in_sec: u64,
    /// Upper bound on upload size (the VM's disk size in bytes).
    pub max_upload_bytes: u64,
}

/// Body of `POST /v1/vms/{id}/files/fetch`. Answered with an `ExecVmResponse`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileFetchRequest {
    /// A `downloadUrl` from `/files/presign` (other URLs are rejected).
    pub url: String,
    /// Absolute destination path in the guest.
    pub path: String,
    /// Per-fetch timeout in seconds (positive); omit for the server default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(default = default_transfer_timeout, minimum = 1, maximum = 2592000)]
    pub timeout_sec: Option<u64>,
}

/// Body of `POST /v1/vms/{id}/files/export` (an extension of this server,
/// not in the spec): stream a guest path into the staging object of `url`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileExportRequest {
    /// Absolute path in the guest: a file (copied as is) or a directory
    /// (a tar archive rooted at `./`).
    pub path: String,
    /// An `uploadUrl` from `/files/presign` for this VM.
    pub url: String,
    /// Timeout in seconds for classifying and streaming (positive); omit for the server default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(default = default_transfer_timeout, minimum = 1, maximum = 2592000)]
    pub timeout_sec: Option<u64>,
}

/// What an export found at the guest path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// A file: the object holds its bytes.
    File,
    /// A directory: the object is a tar archive rooted at `./`.
    Directory,
}

/// Answer of `POST /v1/vms/{id}/files/export`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileExportResponse {
    pub kind: FileKind,
    /// Bytes written to the staging object.
    pub size_bytes: u64,
}

impl FileExportRequest {
    /// Checks the path and timeout (the server checks the URL).
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_guest_path("path", &self.path)?;
        validate_timeout("timeoutSec", self.timeout_sec)
    }
}

impl FilePresignRequest {
    /// Checks the path is absolute and NUL-free.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_guest_path("path", &self.path)
    }
}

impl FileFetchRequest {
    /// Checks the path and timeout. Whether `url` is one of ours is the
    /// server's check (it knows its signing key).
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_guest_path("path", &self.path)?;
        validate_timeout("timeoutSec", self.timeout_sec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::codes;
    use serde_json::json;

    #[test]
    fn presign_wire_forms() -> Result<(), serde_json::Error> {
        let r: FilePresignRequest = serde_json::from_value(json!({"path": "/root/a"}))?;
        assert_eq!(r.validate(), Ok(()));
        let rel = FilePresignRequest {
            path: "root/a".into(),
        };
        assert_eq!(
            rel.validate().err().map(|e| e.code),
            Some(codes::INVALID_PATH)
        );
        let v = serde_json::to_value(FilePresignResponse {
            upload_url: "u".into(),
            download_url: "d".into(),
            expires_in_sec: 900,
            max_upload_bytes: 10,
        })?;
        assert_eq!(
            v,
            json!({"uploadUrl": "u", "downloadUrl": "d", "expiresInSec": 900, "maxUploadBytes": 10})
        );
        Ok(())
    }

    #[test]
    fn export_wire_forms() -> Result<(), serde_json::Error> {
        let r: FileExportRequest =
            serde_json::from_value(json!({"path": "/a", "url": "http://x/u", "timeoutSec": 5}))?;
        assert_eq!(r.validate(), Ok(()));
        let v = serde_json::to_value(FileExportResponse {
            kind: FileKind::Directory,
            size_bytes: 3,
        })?;
        assert_eq!(v, json!({"kind": "directory", "sizeBytes": 3}));
        Ok(())
    }

    #[test]
    fn fetch_rules() -> Result<(), serde_json::Error> {
        let r: FileFetchRequest =
            serde_json::from_value(json!({"url": "http://x/d", "path": "/a", "timeoutSec": 3}))?;
        assert_eq!(r.validate(), Ok(()));
        let zero = FileFetchRequest {
            timeout_sec: Some(0),
            ..r.clone()
        };
        assert_eq!(
            zero.validate().err().map(|e| e.code),
            Some(codes::INVALID_TIMEOUT)
        );
        let nul = FileFetchRequest {
            path: "/a\0b".into(),
            ..r
        };
        assert_eq!(
            nul.validate().err().map(|e| e.code),
            Some(codes::INVALID_PATH)
        );
        assert!(serde_json::from_value::<FileFetchRequest>(json!({"url": "x"})).is_err());
        Ok(())
    }
}
