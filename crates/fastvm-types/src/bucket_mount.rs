//! Bucket-mounts: a customer's GCS or S3 bucket mounted into a VM with the
//! customer's credentials. Credentials are write-only: they are never returned.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::common::{codes, show, ValidationError, VmId};
use crate::volume::{is_prefixed_hex_id, prefixed_hex_id, validate_volume_mount_path, MountStatus};

/// Prefix of bucket-mount ids (`bm_<22 lowercase hex>`).
pub const BUCKET_MOUNT_ID_PREFIX: &str = "bm_";

/// A fresh bucket-mount id: `bm_` + 22 lowercase hex characters.
pub fn new_bucket_mount_id() -> String {
    prefixed_hex_id(BUCKET_MOUNT_ID_PREFIX)
}

/// True when `id` has the shape of a bucket-mount id.
pub fn is_bucket_mount_id(id: &str) -> bool {
    is_prefixed_hex_id(BUCKET_MOUNT_ID_PREFIX, id)
}

/// A bucket-mount as returned by the API (no credentials).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BucketMount {
    /// `bm_<22 lowercase hex>`, unique per VM.
    pub id: String,
    /// The VM.
    pub vm_id: VmId,
    /// `gs://...` or `s3://...`.
    pub bucket_uri: String,
    /// Where it is mounted in the guest.
    pub mount_path: String,
    /// Mounted read-only.
    pub read_only: bool,
    /// `mounted`, `failed` or `pending`.
    pub mount_status: MountStatus,
    /// Detail of a failure; null otherwise.
    pub status_message: Option<String>,
    /// Creation time (RFC 3339).
    pub created_at: String,
}

/// Customer credentials, selected by `type`: `{"type": "...", "value": {...}}`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", content = "value")]
pub enum BucketMountCredentials {
    /// A GCP service-account JSON key (for `gs://`).
    #[serde(rename = "gcp-service-account-json")]
    GcpServiceAccountJson(GcpServiceAccountKey),
    /// An AWS shared-credentials file (for `s3://`).
    #[serde(rename = "aws-credentials")]
    AwsCredentials(AwsCredentialsFile),
}

impl fmt::Debug for BucketMountCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::GcpServiceAccountJson(k) => {
                f.debug_tuple("GcpServiceAccountJson").field(k).finish()
            }
            Self::AwsCredentials(_) => f.write_str("AwsCredentials(<redacted>)"),
        }
    }
}

/// A GCP service-account key file. Its other fields (`project_id`,
/// `private_key_id`, `token_uri`, ...) are kept in `extra` and passed on.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct GcpServiceAccountKey {
    /// Always `service_account`.
    #[serde(rename = "type")]
    pub key_type: String,
    /// The service account's email.
    pub client_email: String,
    /// PEM private key.
    pub private_key: String,
    /// Remaining fields of the key file.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl fmt::Debug for GcpServiceAccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GcpServiceAccountKey")
            .field("client_email", &self.client_email)
            .field("private_key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// An AWS shared-credentials file (INI text).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AwsCredentialsFile {
    /// INI text with a `[default]` section holding `aws_access_key_id` and
    /// `aws_secret_access_key` (and optionally `aws_session_token`).
    pub data: String,
}

/// Keys read from the `[default]` section of an [`AwsCredentialsFile`].
#[derive(Clone, PartialEq, Eq)]
pub struct AwsKeys {
    /// `aws_access_key_id`.
    pub access_key_id: String,
    /// `aws_secret_access_key`.
    pub secret_access_key: String,
    /// `aws_session_token`, if present.
    pub session_token: Option<String>,
}

impl fmt::Debug for AwsKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsKeys")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

fn cred_err(msg: impl Into<String>) -> ValidationError {
    ValidationError::new(codes::INVALID_CREDENTIALS, msg)
}

impl AwsCredentialsFile {
    /// The `key = value` pairs of the `[default]` section (keys lowercased).
    fn default_section(&self) -> BTreeMap<String, String> {
        let mut section = String::new();
        let mut values = BTreeMap::new();
        for line in self.data.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.trim().to_string();
                continue;
            }
            if section == "default" {
                if let Some((k, v)) = line.split_once('=') {
                    let v = v.trim();
                    if !v.is_empty() {
                        values.insert(k.trim().to_ascii_lowercase(), v.to_string());
                    }
                }
            }
        }
        values
    }

    /// Reads the `[default]` section's keys.
    pub fn default_keys(&self) -> Result<AwsKeys, ValidationError> {
        let mut values = self.default_section();
        match (
            values.remove("aws_access_key_id"),
            values.remove("aws_secret_access_key"),
        ) {
            (Some(access_key_id), Some(secret_access_key)) => Ok(AwsKeys {
                access_key_id,
                secret_access_key,
                session_token: values.remove("aws_session_token"),
            }),
            _ => Err(cred_err(
                "credentials.value.data must be AWS credentials INI text with a [default] section \
                 holding aws_access_key_id and aws_secret_access_key",
            )),
        }
    }

    /// `endpoint_url` of the `[default]` section: an S3-compatible endpoint
    /// instead of AWS.
    pub fn endpoint_url(&self) -> Option<String> {
        self.default_section().remove("endpoint_url")
    }

    /// `region` of the `[default]` section.
    pub fn region(&self) -> Option<String> {
        self.default_section().remove("region")
    }
}

/// Scheme of a bucket URI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BucketScheme {
    /// Google Cloud Storage (`gs://`).
    Gcs,
    /// Amazon S3 or compatible (`s3://`).
    S3,
}

/// A parsed `gs://<bucket>[/prefix]` or `s3://<bucket>[/prefix]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketUri {
    /// Storage service.
    pub scheme: BucketScheme,
    /// Bucket name.
    pub bucket: String,
    /// Object prefix without leading or trailing slash; None for the whole bucket.
    pub prefix: Option<String>,
}

/// Parses a bucket URI. Bucket names are 3-222 characters of lowercase letters,
/// digits, `-`, `_` and `.`, starting and ending with a letter or digit.
pub fn parse_bucket_uri(uri: &str) -> Result<BucketUri, ValidationError> {
    let err = |why: &str| {
        ValidationError::new(
            codes::INVALID_BUCKET_URI,
            format!(
                "bucketUri {} {why}; use gs://<bucket>[/prefix] or s3://<bucket>[/prefix]",
                show(uri)
            ),
        )
    };
    let (scheme, rest) = if let Some(rest) = uri.strip_prefix("gs://") {
        (BucketScheme::Gcs, rest)
    } else if let Some(rest) = uri.strip_prefix("s3://") {
        (BucketScheme::S3, rest)
    } else {
        return Err(err("has an unsupported scheme"));
    };
    let (bucket, prefix) = match rest.split_once('/') {
        Some((b, p)) => (b, p.trim_matches('/')),
        None => (rest, ""),
    };
    let ok_chars = bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    let ok_ends = bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !(3..=222).contains(&bucket.len()) || !ok_chars || !ok_ends {
        return Err(err("has an invalid bucket name"));
    }
    if prefix.contains('\0') || prefix.chars().any(char::is_control) {
        return Err(err("has control characters in its prefix"));
    }
    Ok(BucketUri {
        scheme,
        bucket: bucket.to_string(),
        prefix: (!prefix.is_empty()).then(|| prefix.to_string()),
    })
}

impl BucketMountCredentials {
    /// Checks the credentials are well-formed and of the kind `scheme` needs
    /// (`gs://` takes a GCP service-account key, `s3://` AWS credentials).
    pub fn validate_for(&self, scheme: BucketScheme) -> Result<(), ValidationError> {
        match (self, scheme) {
            (Self::GcpServiceAccountJson(k), BucketScheme::Gcs) => {
                if k.key_type != "service_account" {
                    return Err(cred_err(
                        "credentials.value.type must be \"service_account\"",
                    ));
                }
                if k.client_email.trim().is_empty() || !k.client_email.contains('@') {
                    return Err(cred_err(
                        "credentials.value.client_email must be the service account's email",
                    ));
                }
                if !k.private_key.contains("PRIVATE KEY") {
                    return Err(cred_err(
                        "credentials.value.private_key must be the PEM private key of the key file",
                    ));
                }
                Ok(())
            }
            (Self::AwsCredentials(f), BucketScheme::S3) => f.default_keys().map(|_| ()),
            (Self::GcpServiceAccountJson(_), BucketScheme::S3) => Err(cred_err(
                "an s3:// bucket needs credentials of type aws-credentials",
            )),
            (Self::AwsCredentials(_), BucketScheme::Gcs) => Err(cred_err(
                "a gs:// bucket needs credentials of type gcp-service-account-json",
            )),
        }
    }
}

/// Body of `POST /v1/vms/{id}/bucket-mounts`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttachBucketMountRequest {
    /// `gs://<bucket>[/prefix]` or `s3://<bucket>[/prefix]`.
    pub bucket_uri: String,
    /// Absolute, clean path in the guest under `/mnt/` or `/data/`.
    pub mount_path: String,
    /// Mount read-only (default false).
    #[serde(default)]
    pub read_only: bool,
    /// Credentials (never returned).
    pub credentials: BucketMountCredentials,
}

impl AttachBucketMountRequest {
    /// Checks URI, mount path (under `/mnt/` or `/data/`, as volumes) and
    /// credentials; returns the parsed URI.
    pub fn validate(&self) -> Result<BucketUri, ValidationError> {
        let uri = parse_bucket_uri(&self.bucket_uri)?;
        validate_volume_mount_path(&self.mount_path)?;
        self.credentials.validate_for(uri.scheme)?;
        Ok(uri)
    }
}

/// Body of `PATCH /v1/vms/{id}/bucket-mounts/{bucketMountId}` (rotate credentials).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotateBucketMountRequest {
    /// New credentials; same kind as the mount's bucket needs.
    pub credentials: BucketMountCredentials,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gcp() -> serde_json::Value {
        json!({"type": "gcp-service-account-json", "value": {
            "type": "service_account", "client_email": "sa@p.iam.gserviceaccount.com",
            "private_key": "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n",
            "project_id": "p"
        }})
    }

    fn aws() -> serde_json::Value {
        json!({"type": "aws-credentials", "value": {
            "data": "[default]\naws_access_key_id = AKIA1\naws_secret_access_key=s3cr3t\n"
        }})
    }

    #[test]
    fn bucket_uris() -> Result<(), ValidationError> {
        let u = parse_bucket_uri("gs://my-bucket")?;
        assert_eq!(
            (u.scheme, u.bucket.as_str(), u.prefix),
            (BucketScheme::Gcs, "my-bucket", None)
        );
        let u = parse_bucket_uri("s3://data.example/a/b/")?;
        assert_eq!(u.scheme, BucketScheme::S3);
        assert_eq!(u.prefix.as_deref(), Some("a/b"));
        for bad in [
            "",
            "gs://",
            "gs://ab",
            "http://bucket",
            "gs://Bucket",
            "gs://-abc",
            "s3://abc-",
            "gs:/abc",
            "gs://a b c",
        ] {
            assert_eq!(
                parse_bucket_uri(bad).err().map(|e| e.code),
                Some(codes::INVALID_BUCKET_URI),
                "{bad}"
            );
        }
        Ok(())
    }

    #[test]
    fn credentials_wire_form_and_scheme_match() -> Result<(), serde_json::Error> {
        let g: BucketMountCredentials = serde_json::from_value(gcp())?;
        let a: BucketMountCredentials = serde_json::from_value(aws())?;
        assert_eq!(g.validate_for(BucketScheme::Gcs), Ok(()));
        assert_eq!(a.validate_for(BucketScheme::S3), Ok(()));
        assert_eq!(
            g.validate_for(BucketScheme::S3).err().map(|e| e.code),
            Some(codes::INVALID_CREDENTIALS)
        );
        assert_eq!(
            a.validate_for(BucketScheme::Gcs).err().map(|e| e.code),
            Some(codes::INVALID_CREDENTIALS)
        );
        // Extra key-file fields survive a round trip.
        assert_eq!(serde_json::to_value(&g)?, gcp());
        assert!(!format!("{g:?}").contains("BEGIN"));
        assert!(!format!("{a:?}").contains("s3cr3t"));
        assert!(serde_json::from_value::<BucketMountCredentials>(
            json!({"type": "azure", "value": {}})
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn aws_ini_parsing() -> Result<(), ValidationError> {
        let f = AwsCredentialsFile {
            data: "# c\n[other]\naws_access_key_id=X\n[default]\naws_access_key_id = A\n\
                   aws_secret_access_key = B\naws_session_token=T\n"
                .into(),
        };
        let k = f.default_keys()?;
        assert_eq!(
            (k.access_key_id.as_str(), k.secret_access_key.as_str()),
            ("A", "B")
        );
        assert_eq!(k.session_token.as_deref(), Some("T"));
        assert_eq!(f.endpoint_url(), None);
        let f = AwsCredentialsFile {
            data: "[default]\nAWS_ACCESS_KEY_ID=A\naws_secret_access_key=B\n\
                   endpoint_url = http://127.0.0.1:9000\nregion=eu-west-1\n"
                .into(),
        };
        assert!(f.default_keys().is_ok());
        assert_eq!(f.endpoint_url().as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(f.region().as_deref(), Some("eu-west-1"));
        assert!(!format!("{k:?}").contains('B'));
        for bad in [
            "",
            "[default]\naws_access_key_id=A\n",
            "[other]\naws_access_key_id=A\naws_secret_access_key=B",
        ] {
            let f = AwsCredentialsFile { data: bad.into() };
            assert_eq!(
                f.default_keys().err().map(|e| e.code),
                Some(codes::INVALID_CREDENTIALS),
                "{bad}"
            );
        }
        Ok(())
    }

    #[test]
    fn attach_request() -> Result<(), serde_json::Error> {
        let r: AttachBucketMountRequest = serde_json::from_value(json!({
            "bucketUri": "s3://bucket-one/prefix", "mountPath": "/mnt/b", "credentials": aws()
        }))?;
        assert!(r.validate().is_ok());
        let bad_path = AttachBucketMountRequest {
            mount_path: "rel".into(),
            ..r.clone()
        };
        assert_eq!(
            bad_path.validate().err().map(|e| e.code),
            Some(codes::INVALID_MOUNT_PATH)
        );
        let wrong = AttachBucketMountRequest {
            bucket_uri: "gs://bucket-one".into(),
            ..r
        };
        assert_eq!(
            wrong.validate().err().map(|e| e.code),
            Some(codes::INVALID_CREDENTIALS)
        );
        let rot: RotateBucketMountRequest = serde_json::from_value(json!({"credentials": gcp()}))?;
        assert!(matches!(
            rot.credentials,
            BucketMountCredentials::GcpServiceAccountJson(_)
        ));
        Ok(())
    }

    #[test]
    fn ids_and_view() -> Result<(), Box<dyn std::error::Error>> {
        assert!(is_bucket_mount_id(&new_bucket_mount_id()));
        assert!(!is_bucket_mount_id("vol_0123456789abcdef012345"));
        let v = serde_json::to_value(BucketMount {
            id: "bm_0123456789abcdef012345".into(),
            vm_id: "11111111-2222-4333-8444-555555555555".parse()?,
            bucket_uri: "gs://b-1".into(),
            mount_path: "/mnt/b".into(),
            read_only: false,
            mount_status: MountStatus::Mounted,
            status_message: None,
            created_at: "t".into(),
        })?;
        let mut keys: Vec<String> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        assert_eq!(
            keys,
            [
                "bucketUri",
                "createdAt",
                "id",
                "mountPath",
                "mountStatus",
                "readOnly",
                "statusMessage",
                "vmId"
            ]
        );
        Ok(())
    }
}
