//! SSH public keys of the calling user (`/v1/me/ssh-keys`), used by the SSH
//! gateway (`ssh <vm-id>@ssh.<domain>`). The fingerprint is the key's id.

use base64::engine::general_purpose::{STANDARD as BASE64, STANDARD_NO_PAD as BASE64_NO_PAD};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::common::{codes, normalize_name, show, ValidationError};

/// Key types accepted.
pub const SUPPORTED_SSH_KEY_TYPES: [&str; 7] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// Longest public key line accepted, in bytes (a 16384-bit RSA key fits).
pub const MAX_SSH_KEY_BYTES: usize = 16 * 1024;

/// A registered key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SshKey {
    /// Human label (empty when none was given).
    pub name: String,
    /// `<type> <base64-blob>`, comment stripped.
    pub public_key: String,
    /// `SHA256:<base64>`, as `ssh-keygen -lf` prints it.
    pub fingerprint: String,
    /// Registration time (RFC 3339).
    pub created_at: String,
}

/// Answer of `GET /v1/me/ssh-keys`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SshKeyListResponse {
    /// The caller's keys.
    pub keys: Vec<SshKey>,
}

/// Answer of `GET /v1/ssh-gateway` (an extension of this server): how to
/// reach the SSH gateway and the host keys to trust (`fastvm ssh` writes
/// them to a known_hosts file of its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SshGatewayInfo {
    /// Public host keys, `<type> <base64>`.
    pub host_keys: Vec<String>,
    /// TCP port of the gateway (on the API's host).
    pub port: u16,
}

/// Body of `POST /v1/me/ssh-keys`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddSshKeyRequest {
    /// Optional human label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// OpenSSH public key line (`ssh-ed25519 AAAA... comment`).
    pub public_key: String,
}

/// A public key after parsing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedSshKey {
    /// Key type (`ssh-ed25519`, ...).
    pub key_type: String,
    /// Raw key blob.
    pub blob: Vec<u8>,
    /// `<type> <base64-blob>`, comment stripped.
    pub canonical: String,
    /// `SHA256:<unpadded base64 of sha256(blob)>`.
    pub fingerprint: String,
}

/// Parses an OpenSSH public key line: surrounding whitespace is trimmed, the
/// comment is dropped, inner newlines are rejected, the type must be supported
/// and match the type inside the blob.
pub fn parse_ssh_public_key(line: &str) -> Result<ParsedSshKey, ValidationError> {
    let err = |msg: String| ValidationError::new(codes::INVALID_SSH_KEY, msg);
    let line = line.trim();
    if line.len() > MAX_SSH_KEY_BYTES {
        return Err(err(format!(
            "publicKey is longer than {MAX_SSH_KEY_BYTES} bytes"
        )));
    }
    if line.contains(['\n', '\r', '\0']) {
        return Err(err(
            "publicKey must be one line; paste a single key from your .pub file".into(),
        ));
    }
    let mut parts = line.split_whitespace();
    let (Some(key_type), Some(b64)) = (parts.next(), parts.next()) else {
        return Err(err(
            "publicKey must look like \"ssh-ed25519 AAAA... [comment]\"".into(),
        ));
    };
    if !SUPPORTED_SSH_KEY_TYPES.contains(&key_type) {
        return Err(err(format!(
            "key type {} is not supported; use one of {}",
            show(key_type),
            SUPPORTED_SSH_KEY_TYPES.join(", ")
        )));
    }
    let blob = BASE64
        .decode(b64)
        .map_err(|_| err("the key data after the type is not valid base64".into()))?;
    let inner_type = blob
        .get(..4)
        .and_then(|len| <[u8; 4]>::try_from(len).ok())
        .map(|len| u32::from_be_bytes(len) as usize)
        .and_then(|len| blob.get(4..4usize.checked_add(len)?));
    if inner_type != Some(key_type.as_bytes()) {
        return Err(err(format!("the key data is not a {key_type} key")));
    }
    let fingerprint = format!("SHA256:{}", BASE64_NO_PAD.encode(Sha256::digest(&blob)));
    Ok(ParsedSshKey {
        key_type: key_type.to_string(),
        canonical: format!("{key_type} {b64}"),
        blob,
        fingerprint,
    })
}

impl AddSshKeyRequest {
    /// Parses the key; returns it with the normalized name (empty when none).
    pub fn validate(&self) -> Result<(ParsedSshKey, String), ValidationError> {
        let key = parse_ssh_public_key(&self.public_key)?;
        Ok((key, normalize_name(self.name.as_deref().unwrap_or(""))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // A real ed25519 public key, and its fingerprint as `ssh-keygen -lf` prints it.
    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEE9x0w6mTVUnXRX0XnY3vyJZcnFa7T3Hh3L6pzWv5Pb user@host";

    fn blob_for(key_type: &str) -> String {
        let mut blob = (key_type.len() as u32).to_be_bytes().to_vec();
        blob.extend_from_slice(key_type.as_bytes());
        blob.extend_from_slice(&[0, 0, 0, 1, 7]);
        BASE64.encode(blob)
    }

    #[test]
    fn parses_and_strips_comment() -> Result<(), ValidationError> {
        let k = parse_ssh_public_key(&format!("  {ED25519}\n"))?;
        assert_eq!(k.key_type, "ssh-ed25519");
        assert_eq!(
            k.canonical,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEE9x0w6mTVUnXRX0XnY3vyJZcnFa7T3Hh3L6pzWv5Pb"
        );
        // As printed by `ssh-keygen -lf` for this key.
        assert_eq!(
            k.fingerprint,
            "SHA256:rpv2jCckvlICyhM11ulUrRdWVefo6GSbZTVshfSMyBE"
        );
        let again = parse_ssh_public_key(&k.canonical)?;
        assert_eq!(again.fingerprint, k.fingerprint);
        Ok(())
    }

    #[test]
    fn all_supported_types_parse() {
        for t in SUPPORTED_SSH_KEY_TYPES {
            assert!(
                parse_ssh_public_key(&format!("{t} {}", blob_for(t))).is_ok(),
                "{t}"
            );
        }
    }

    #[test]
    fn rejects_bad_keys() {
        let two = format!("{ED25519}\n{ED25519}");
        let mismatch = format!("ssh-rsa {}", blob_for("ssh-ed25519"));
        let long = format!("ssh-rsa {}", "A".repeat(MAX_SSH_KEY_BYTES));
        for bad in [
            "",
            "ssh-ed25519",
            "ssh-dss AAAAB3NzaC1kc3M=",
            "ssh-ed25519 not*base64",
            "ssh-ed25519 AAAA",
            two.as_str(),
            mismatch.as_str(),
            long.as_str(),
            "command=\"x\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5",
        ] {
            assert_eq!(
                parse_ssh_public_key(bad).err().map(|e| e.code),
                Some(codes::INVALID_SSH_KEY),
                "{bad}"
            );
        }
    }

    #[test]
    fn wire_forms() -> Result<(), Box<dyn std::error::Error>> {
        let r: AddSshKeyRequest =
            serde_json::from_value(json!({"publicKey": ED25519, "name": " laptop "}))?;
        let (_, name) = r.validate()?;
        assert_eq!(name, "laptop");
        assert!(
            serde_json::from_value::<AddSshKeyRequest>(json!({"public_key": ED25519})).is_err()
        );
        let v = serde_json::to_value(SshKeyListResponse {
            keys: vec![SshKey {
                name: "l".into(),
                public_key: "k".into(),
                fingerprint: "SHA256:x".into(),
                created_at: "t".into(),
            }],
        })?;
        assert_eq!(
            v,
            json!({"keys": [{"name": "l", "publicKey": "k", "fingerprint": "SHA256:x", "createdAt": "t"}]})
        );
        Ok(())
    }
}
