//! Types shared by every resource: typed ids, the error body, the validation
//! error, the tri-state [`Patch`] used by PATCH bodies, and name normalization.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::ToSchema;
use uuid::Uuid;

/// Machine-readable error codes carried by [`ValidationError`] and [`ApiError`].
pub mod codes {
    /// The request body is malformed or misses a required combination of fields.
    pub const INVALID_REQUEST: &str = "INVALID_REQUEST";
    /// `metadata` breaks a limit of the Metadata schema.
    pub const INVALID_METADATA: &str = "INVALID_METADATA";
    /// `envVars` (or exec `env`) breaks a rule of the EnvVars schema.
    pub const INVALID_ENV_VARS: &str = "INVALID_ENV_VARS";
    /// A firewall policy is malformed (fqdn value, dns domain, ...).
    pub const INVALID_FIREWALL: &str = "INVALID_FIREWALL";
    /// An fqdn egress rule can never match because the dns block blocks its names.
    pub const DEAD_FQDN_RULE: &str = "DEAD_FQDN_RULE";
    /// A rule's `ports` is not `any`, a port, or an inclusive range.
    pub const INVALID_PORTS: &str = "INVALID_PORTS";
    /// A rule's `value` is not an IPv4 or IPv6 CIDR.
    pub const INVALID_CIDR: &str = "INVALID_CIDR";
    /// A service name breaks the service-name rules.
    pub const INVALID_SERVICE_NAME: &str = "INVALID_SERVICE_NAME";
    /// A service port is outside 1024..=65535.
    pub const INVALID_SERVICE_PORT: &str = "INVALID_SERVICE_PORT";
    /// A TTL is malformed (`seconds` must be at least 1).
    pub const INVALID_TTL: &str = "INVALID_TTL";
    /// `machineType` is missing where it is required.
    pub const INVALID_MACHINE_TYPE: &str = "INVALID_MACHINE_TYPE";
    /// An exec `command` is empty or malformed.
    pub const INVALID_COMMAND: &str = "INVALID_COMMAND";
    /// A timeout is zero.
    pub const INVALID_TIMEOUT: &str = "INVALID_TIMEOUT";
    /// A guest path is not absolute or contains forbidden bytes.
    pub const INVALID_PATH: &str = "INVALID_PATH";
    /// A mount path breaks the mount-path rules.
    pub const INVALID_MOUNT_PATH: &str = "INVALID_MOUNT_PATH";
    /// A bucket URI is not `gs://<bucket>[/prefix]` or `s3://<bucket>[/prefix]`.
    pub const INVALID_BUCKET_URI: &str = "INVALID_BUCKET_URI";
    /// Bucket-mount credentials are malformed or do not fit the bucket's scheme.
    pub const INVALID_CREDENTIALS: &str = "INVALID_CREDENTIALS";
    /// An SSH public key cannot be parsed or has an unsupported type.
    pub const INVALID_SSH_KEY: &str = "INVALID_SSH_KEY";
    /// A size (GiB, bytes) is zero or out of range.
    pub const INVALID_SIZE: &str = "INVALID_SIZE";
    /// A name is empty after normalization where one is required.
    pub const INVALID_NAME: &str = "INVALID_NAME";
    /// A snapshot-import source descriptor breaks its rules.
    pub const INVALID_IMPORT_SOURCE: &str = "INVALID_IMPORT_SOURCE";
    /// A `source.contextRef` names no uploaded build context of the org, or was used.
    pub const INVALID_CONTEXT_REF: &str = "INVALID_CONTEXT_REF";
    /// A fork's `count` is outside 1..=32.
    pub const INVALID_FORK_COUNT: &str = "INVALID_FORK_COUNT";
}

/// A rule of the API contract that a request broke.
///
/// `code` is one of [`codes`]; `message` names the offending field, key or rule
/// index and says what to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ValidationError {
    /// Machine-readable code, one of [`codes`].
    pub code: &'static str,
    /// Human-readable explanation naming the offending input.
    pub message: String,
}

impl ValidationError {
    /// A validation error with `code` and `message`.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Shows user input in an error message: quoted, escaped, and cut after 64 chars
/// so a huge key cannot blow up the response.
pub(crate) fn show(s: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = s.chars().take(MAX).collect();
    if s.chars().nth(MAX).is_some() {
        out.push('…');
    }
    format!("{out:?}")
}

/// Error body of every non-2xx response: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    /// The error.
    pub error: ApiErrorBody,
}

/// Inner object of [`ApiError`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiErrorBody {
    /// Machine-readable code (e.g. `INVALID_METADATA`, `NOT_FOUND`).
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// An error body with `code` and `message`.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ApiErrorBody {
                code: code.into(),
                message: message.into(),
            },
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        Self::new(e.code, e.message)
    }
}

/// Body of every DELETE that returns one: `{"id": "...", "deleted": true}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeleteResponse {
    /// Id of the deleted resource.
    pub id: String,
    /// Always true on success.
    pub deleted: bool,
}

impl DeleteResponse {
    /// `{"id": id, "deleted": true}`.
    pub fn new(id: impl fmt::Display) -> Self {
        Self {
            id: id.to_string(),
            deleted: true,
        }
    }
}

macro_rules! typed_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        ///
        /// Serialized as a plain hyphenated UUID string.
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash,
            Serialize, Deserialize, ToSchema,
        )]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh random (v4) id.
            pub fn new_v4() -> Self {
                Self(Uuid::new_v4())
            }

            /// The underlying UUID.
            pub fn as_uuid(&self) -> &Uuid {
                &self.0
            }

            /// The first 8 characters of the hyphenated form (used in default names).
            pub fn short(&self) -> String {
                self.0.hyphenated().to_string().chars().take(8).collect()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }
    };
}

typed_id!(
    /// Id of a VM.
    VmId
);
typed_id!(
    /// Id of a snapshot.
    SnapshotId
);
typed_id!(
    /// Id of an organization (the tenant owning VMs, snapshots, volumes, keys).
    OrgId
);
typed_id!(
    /// Id of a snapshot import.
    SnapshotImportId
);

/// A field of a PATCH body that distinguishes "absent" (keep the current value),
/// `null` (clear it) and a value (set it).
///
/// Use on a field with `#[serde(default, skip_serializing_if = "Patch::is_absent")]`
/// (and `#[schema(value_type = Option<T>)]` for the OpenAPI schema).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Patch<T> {
    /// The field was not in the body: keep the current value.
    #[default]
    Absent,
    /// The field was `null`: clear the value.
    Null,
    /// The field had a value: set it.
    Value(T),
}

impl<T> Patch<T> {
    /// True when the field was not in the body.
    pub fn is_absent(&self) -> bool {
        matches!(self, Patch::Absent)
    }

    /// Applies the patch to `current`: absent keeps it, null clears it, a value replaces it.
    pub fn apply(self, current: Option<T>) -> Option<T> {
        match self {
            Patch::Absent => current,
            Patch::Null => None,
            Patch::Value(v) => Some(v),
        }
    }

    /// The value, if one was given.
    pub fn as_value(&self) -> Option<&T> {
        match self {
            Patch::Value(v) => Some(v),
            _ => None,
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Patch<T> {
    /// Only called when the field is present (absent comes from `#[serde(default)]`).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(d)? {
            None => Patch::Null,
            Some(v) => Patch::Value(v),
        })
    }
}

impl<T: Serialize> Serialize for Patch<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Patch::Value(v) => v.serialize(s),
            Patch::Absent | Patch::Null => s.serialize_none(),
        }
    }
}

/// Maximum length of a VM or snapshot name, in Unicode scalar values.
pub const MAX_NAME_CHARS: usize = 64;

/// Normalizes a user-facing name: trims, collapses every internal whitespace run
/// to one space, and truncates to [`MAX_NAME_CHARS`] Unicode scalar values (then
/// drops a space the cut may have left at the end). May return an empty string.
pub fn normalize_name(raw: &str) -> String {
    let collapsed = raw.split_whitespace().collect::<Vec<_>>().join(" ");
    let truncated: String = collapsed.chars().take(MAX_NAME_CHARS).collect();
    truncated.trim_end().to_string()
}

/// Guest paths (exec `cwd`, file targets): absolute, without NUL bytes.
pub(crate) fn validate_guest_path(field: &str, path: &str) -> Result<(), ValidationError> {
    if !path.starts_with('/') {
        return Err(ValidationError::new(
            codes::INVALID_PATH,
            format!(
                "{field} must be an absolute path starting with '/', got {}",
                show(path)
            ),
        ));
    }
    if path.contains('\0') {
        return Err(ValidationError::new(
            codes::INVALID_PATH,
            format!("{field} must not contain NUL bytes"),
        ));
    }
    Ok(())
}

/// Timeouts given in seconds must be at least 1 when present.
/// Longest timeout any request may ask for (30 days).
pub const MAX_TIMEOUT_SEC: u64 = 30 * 24 * 3600;

pub(crate) fn validate_timeout(field: &str, secs: Option<u64>) -> Result<(), ValidationError> {
    if secs.is_some_and(|s| s > MAX_TIMEOUT_SEC) {
        return Err(ValidationError::new(
            codes::INVALID_TIMEOUT,
            format!("{field} must be at most {MAX_TIMEOUT_SEC} seconds (30 days); omit it to use the server default"),
        ));
    }
    if secs == Some(0) {
        return Err(ValidationError::new(
            codes::INVALID_TIMEOUT,
            format!(
                "{field} must be a positive number of seconds; omit it to use the server default"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    struct Body {
        #[serde(default, skip_serializing_if = "Patch::is_absent")]
        ttl: Patch<u32>,
    }

    #[test]
    fn patch_absent_null_value_are_distinct() -> Result<(), serde_json::Error> {
        let absent: Body = serde_json::from_value(json!({}))?;
        let null: Body = serde_json::from_value(json!({"ttl": null}))?;
        let value: Body = serde_json::from_value(json!({"ttl": 5}))?;
        assert_eq!(absent.ttl, Patch::Absent);
        assert_eq!(null.ttl, Patch::Null);
        assert_eq!(value.ttl, Patch::Value(5));
        assert_eq!(serde_json::to_value(&absent)?, json!({}));
        assert_eq!(serde_json::to_value(&null)?, json!({"ttl": null}));
        assert_eq!(serde_json::to_value(&value)?, json!({"ttl": 5}));
        Ok(())
    }

    #[test]
    fn patch_apply() {
        assert_eq!(Patch::Absent.apply(Some(1)), Some(1));
        assert_eq!(Patch::<i32>::Null.apply(Some(1)), None);
        assert_eq!(Patch::Value(2).apply(Some(1)), Some(2));
        assert_eq!(Patch::Value(2).apply(None), Some(2));
    }

    #[test]
    fn typed_ids_are_plain_uuid_strings() -> Result<(), Box<dyn std::error::Error>> {
        let id: VmId = "0b6a7c1e-1111-4222-8333-444455556666".parse()?;
        assert_eq!(
            serde_json::to_value(id)?,
            json!("0b6a7c1e-1111-4222-8333-444455556666")
        );
        assert_eq!(id.short(), "0b6a7c1e");
        assert_eq!(id.to_string(), "0b6a7c1e-1111-4222-8333-444455556666");
        let back: VmId = serde_json::from_value(json!("0b6a7c1e-1111-4222-8333-444455556666"))?;
        assert_eq!(back, id);
        assert!(serde_json::from_value::<VmId>(json!("vm_123")).is_err());
        assert!("nope".parse::<SnapshotId>().is_err());
        Ok(())
    }

    #[test]
    fn api_error_shape() -> Result<(), serde_json::Error> {
        let e: ApiError = ValidationError::new(codes::INVALID_TTL, "bad ttl").into();
        assert_eq!(
            serde_json::to_value(&e)?,
            json!({"error": {"code": "INVALID_TTL", "message": "bad ttl"}})
        );
        Ok(())
    }

    #[test]
    fn validation_error_display() {
        let e = ValidationError::new(codes::INVALID_PORTS, "ports is bad");
        assert_eq!(e.to_string(), "INVALID_PORTS: ports is bad");
    }

    #[test]
    fn delete_response_shape() -> Result<(), serde_json::Error> {
        assert_eq!(
            serde_json::to_value(DeleteResponse::new("vol_1"))?,
            json!({"id": "vol_1", "deleted": true})
        );
        Ok(())
    }

    #[test]
    fn name_normalization() {
        assert_eq!(normalize_name("  my   box \t\n one "), "my box one");
        assert_eq!(normalize_name("   "), "");
        assert_eq!(normalize_name(&"é".repeat(64)), "é".repeat(64));
        assert_eq!(normalize_name(&"é".repeat(65)), "é".repeat(64));
        // A cut that lands right after a space does not leave a trailing space.
        let raw = format!("{} tail", "a".repeat(63));
        assert_eq!(normalize_name(&raw), "a".repeat(63));
    }

    #[test]
    fn show_truncates_long_input() {
        assert_eq!(show("ab"), "\"ab\"");
        let long = "x".repeat(300);
        assert_eq!(show(&long), format!("{:?}", format!("{}…", "x".repeat(64))));
    }
}
