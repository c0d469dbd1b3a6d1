//! `metadata` (free-form labels) and `envVars` (environment injected at boot):
//! string→string maps with server-enforced limits.
//!
//! | map      | keys                     | key bytes | value rule                   | total JSON |
//! |----------|--------------------------|-----------|------------------------------|------------|
//! | Metadata | at most 256              | 1–256     | at most 4096 bytes           | ≤ 65536    |
//! | EnvVars  | `[A-Za-z_][A-Za-z0-9_]*` | 1–256     | no `\n`, `\r` or NUL         | ≤ 65536    |

use std::collections::BTreeMap;

use crate::common::{codes, show, ValidationError};

/// Free-form string→string labels on VMs and snapshots.
pub type Metadata = BTreeMap<String, String>;

/// Environment variables injected into the VM at boot.
pub type EnvVars = BTreeMap<String, String>;

/// OpenAPI stand-ins that give the [`Metadata`] and [`EnvVars`] aliases their own
/// named schemas. Annotate fields with `#[schema(value_type = schema::Metadata)]`.
pub mod schema {
    use std::collections::BTreeMap;

    /// Free-form string→string map. Server-enforced limits: up to 256 keys, key
    /// length 1–256 bytes, value length ≤4096 bytes, total JSON encoding ≤65536 bytes.
    #[derive(utoipa::ToSchema)]
    pub struct Metadata(pub BTreeMap<String, String>);

    /// Environment variable string→string map injected into the VM at boot. Keys
    /// must be 1–256 bytes and match `[A-Za-z_][A-Za-z0-9_]*`; values may not contain
    /// newline, carriage return, or null bytes. Total JSON encoding ≤65536 bytes.
    #[derive(utoipa::ToSchema)]
    pub struct EnvVars(pub BTreeMap<String, String>);
}

/// Most keys a [`Metadata`] map may hold.
pub const METADATA_MAX_KEYS: usize = 256;
/// Longest key of a [`Metadata`] or [`EnvVars`] map, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Longest value of a [`Metadata`] map, in bytes.
pub const METADATA_MAX_VALUE_BYTES: usize = 4096;
/// Longest JSON encoding of a [`Metadata`] or [`EnvVars`] map, in bytes.
pub const MAX_TOTAL_JSON_BYTES: usize = 65536;

/// Length of the compact JSON encoding of `map`.
fn json_len(map: &BTreeMap<String, String>) -> usize {
    // Serializing a map of strings cannot fail; treat a failure as "too big".
    serde_json::to_vec(map).map_or(usize::MAX, |v| v.len())
}

/// Checks `metadata` against the limits of the Metadata schema.
pub fn validate_metadata(metadata: &Metadata) -> Result<(), ValidationError> {
    let err = |msg: String| ValidationError::new(codes::INVALID_METADATA, msg);
    if metadata.len() > METADATA_MAX_KEYS {
        return Err(err(format!(
            "metadata has {} keys; at most {METADATA_MAX_KEYS} are allowed, remove some",
            metadata.len()
        )));
    }
    for (key, value) in metadata {
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(err(format!(
                "metadata key {} is {} bytes; keys must be 1-{MAX_KEY_BYTES} bytes",
                show(key),
                key.len()
            )));
        }
        if value.len() > METADATA_MAX_VALUE_BYTES {
            return Err(err(format!(
                "metadata value of key {} is {} bytes; values must be at most {METADATA_MAX_VALUE_BYTES} bytes",
                show(key),
                value.len()
            )));
        }
    }
    let total = json_len(metadata);
    if total > MAX_TOTAL_JSON_BYTES {
        return Err(err(format!(
            "metadata encodes to {total} bytes of JSON; the total must be at most {MAX_TOTAL_JSON_BYTES} bytes"
        )));
    }
    Ok(())
}

/// True when `key` is a shell variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_env_var_name(key: &str) -> bool {
    let mut chars = key.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks `env` against the rules of the EnvVars schema. `field` names the map in
/// messages (`envVars` on launch, `env` on exec).
pub fn validate_env_vars_field(field: &str, env: &EnvVars) -> Result<(), ValidationError> {
    let err = |msg: String| ValidationError::new(codes::INVALID_ENV_VARS, msg);
    for (key, value) in env {
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(err(format!(
                "{field} key {} is {} bytes; keys must be 1-{MAX_KEY_BYTES} bytes",
                show(key),
                key.len()
            )));
        }
        if !is_env_var_name(key) {
            return Err(err(format!(
                "{field} key {} is not a shell variable name; use letters, digits and '_' only, not starting with a digit",
                show(key)
            )));
        }
        for (bad, name) in [
            ('\n', "newline"),
            ('\r', "carriage return"),
            ('\0', "NUL byte"),
        ] {
            if value.contains(bad) {
                return Err(err(format!(
                    "{field} value of key {} contains a {name}; values may not contain newline, carriage return or NUL bytes",
                    show(key)
                )));
            }
        }
    }
    let total = json_len(env);
    if total > MAX_TOTAL_JSON_BYTES {
        return Err(err(format!(
            "{field} encodes to {total} bytes of JSON; the total must be at most {MAX_TOTAL_JSON_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Checks `envVars` against the rules of the EnvVars schema.
pub fn validate_env_vars(env: &EnvVars) -> Result<(), ValidationError> {
    validate_env_vars_field("envVars", env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(r: Result<(), ValidationError>) -> Option<&'static str> {
        r.err().map(|e| e.code)
    }

    /// A map whose compact JSON encoding is exactly `total` bytes, made of
    /// 16 entries `kNN` → `aaa…` (each value at most 4096 bytes).
    fn map_with_json_len(total: usize) -> BTreeMap<String, String> {
        let mut map: BTreeMap<String, String> = (0..16)
            .map(|i| (format!("k{i:02}"), "a".repeat(4096)))
            .collect();
        let over = json_len(&map) - total;
        if let Some(v) = map.get_mut("k15") {
            v.truncate(4096 - over);
        }
        assert_eq!(json_len(&map), total);
        map
    }

    #[test]
    fn metadata_key_count_boundary() {
        let ok: Metadata = (0..256).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(validate_metadata(&ok), Ok(()));
        let bad: Metadata = (0..257).map(|i| (format!("k{i}"), String::new())).collect();
        let e = validate_metadata(&bad).err();
        assert_eq!(e.as_ref().map(|e| e.code), Some(codes::INVALID_METADATA));
        assert!(e
            .map(|e| e.message)
            .unwrap_or_default()
            .contains("257 keys"));
    }

    #[test]
    fn metadata_key_length_boundary() {
        let ok = Metadata::from([("k".repeat(256), "v".into())]);
        assert_eq!(validate_metadata(&ok), Ok(()));
        let long = Metadata::from([("k".repeat(257), "v".into())]);
        assert_eq!(
            code_of(validate_metadata(&long)),
            Some(codes::INVALID_METADATA)
        );
        let empty = Metadata::from([(String::new(), "v".into())]);
        assert_eq!(
            code_of(validate_metadata(&empty)),
            Some(codes::INVALID_METADATA)
        );
        let one = Metadata::from([("k".into(), "v".into())]);
        assert_eq!(validate_metadata(&one), Ok(()));
    }

    #[test]
    fn metadata_key_length_counts_bytes_not_chars() {
        // 129 two-byte characters = 258 bytes.
        let bad = Metadata::from([("é".repeat(129), "v".into())]);
        assert_eq!(
            code_of(validate_metadata(&bad)),
            Some(codes::INVALID_METADATA)
        );
        let ok = Metadata::from([("é".repeat(128), "v".into())]);
        assert_eq!(validate_metadata(&ok), Ok(()));
    }

    #[test]
    fn metadata_value_length_boundary() {
        let ok = Metadata::from([("k".into(), "v".repeat(4096))]);
        assert_eq!(validate_metadata(&ok), Ok(()));
        let bad = Metadata::from([("k".into(), "v".repeat(4097))]);
        let e = validate_metadata(&bad).err();
        assert_eq!(e.as_ref().map(|e| e.code), Some(codes::INVALID_METADATA));
        assert!(e.map(|e| e.message).unwrap_or_default().contains("\"k\""));
        let empty_value = Metadata::from([("k".into(), String::new())]);
        assert_eq!(validate_metadata(&empty_value), Ok(()));
    }

    #[test]
    fn metadata_total_json_boundary() {
        assert_eq!(validate_metadata(&map_with_json_len(65536)), Ok(()));
        assert_eq!(
            code_of(validate_metadata(&map_with_json_len(65537))),
            Some(codes::INVALID_METADATA)
        );
    }

    #[test]
    fn metadata_total_counts_json_escapes() {
        // 16 values of 4096 quote characters escape to 8192 bytes each.
        let map: Metadata = (0..16)
            .map(|i| (format!("k{i}"), "\"".repeat(4000)))
            .collect();
        assert_eq!(
            code_of(validate_metadata(&map)),
            Some(codes::INVALID_METADATA)
        );
    }

    #[test]
    fn empty_maps_are_valid() {
        assert_eq!(validate_metadata(&Metadata::new()), Ok(()));
        assert_eq!(validate_env_vars(&EnvVars::new()), Ok(()));
    }

    #[test]
    fn env_var_name_regex() {
        for good in ["A", "_", "a", "_x", "PATH", "my_var_2", "__", "Z9"] {
            assert!(is_env_var_name(good), "{good}");
        }
        for bad in ["", "1A", "A-B", "A B", "A.B", "A=B", "É", "9", "-x", "x$"] {
            assert!(!is_env_var_name(bad), "{bad}");
        }
    }

    #[test]
    fn env_keys_validated() {
        let ok = EnvVars::from([("FOO_1".into(), "bar".into())]);
        assert_eq!(validate_env_vars(&ok), Ok(()));
        for bad in ["", "1FOO", "FOO-BAR", "FOO BAR"] {
            let env = EnvVars::from([(bad.to_string(), "v".into())]);
            assert_eq!(
                code_of(validate_env_vars(&env)),
                Some(codes::INVALID_ENV_VARS),
                "{bad}"
            );
        }
    }

    #[test]
    fn env_key_length_boundary() {
        let ok = EnvVars::from([("K".repeat(256), "v".into())]);
        assert_eq!(validate_env_vars(&ok), Ok(()));
        let bad = EnvVars::from([("K".repeat(257), "v".into())]);
        assert_eq!(
            code_of(validate_env_vars(&bad)),
            Some(codes::INVALID_ENV_VARS)
        );
    }

    #[test]
    fn env_values_reject_newline_cr_nul() {
        for bad in ["a\nb", "a\rb", "a\0b", "\n", "end\r"] {
            let env = EnvVars::from([("K".into(), bad.to_string())]);
            let e = validate_env_vars(&env).err();
            assert_eq!(
                e.as_ref().map(|e| e.code),
                Some(codes::INVALID_ENV_VARS),
                "{bad:?}"
            );
            assert!(e.map(|e| e.message).unwrap_or_default().contains("\"K\""));
        }
        let ok = EnvVars::from([("K".into(), "tabs\tand spaces = fine".into())]);
        assert_eq!(validate_env_vars(&ok), Ok(()));
    }

    #[test]
    fn env_total_json_boundary() {
        // Keys k00..k15 are valid env names.
        assert_eq!(validate_env_vars(&map_with_json_len(65536)), Ok(()));
        assert_eq!(
            code_of(validate_env_vars(&map_with_json_len(65537))),
            Some(codes::INVALID_ENV_VARS)
        );
    }

    #[test]
    fn env_field_name_in_message() {
        let env = EnvVars::from([("1X".into(), "v".into())]);
        let msg = validate_env_vars_field("env", &env)
            .err()
            .map(|e| e.message);
        assert!(msg.unwrap_or_default().starts_with("env key"));
    }
}
