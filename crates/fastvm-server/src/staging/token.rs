//! Signed staging URLs of the local backend.
//!
//! ```text
//!  token   = base64url(payload JSON) "." base64url(HMAC-SHA256(secret, first part))
//!  payload = {"k": object, "o": org, "v": vm, "m": "PUT"|"GET", "e": expiry (unix s), "c": cap}
//! ```
//!
//! The token is the credential (no API key on `/v1/staging/{token}`): whoever
//! holds it may do exactly the one method it names on the one object, until
//! it expires. The signature is checked before anything else in the payload
//! is believed, so a tampered expiry or object is "invalid", never "expired".

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Which side of the object a token opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Method {
    #[serde(rename = "PUT")]
    Put,
    #[serde(rename = "GET")]
    Get,
}

/// What a token grants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Object name (a UUID, unique per presign).
    #[serde(rename = "k")]
    pub object: String,
    #[serde(rename = "o")]
    pub org: String,
    #[serde(rename = "v")]
    pub vm: String,
    #[serde(rename = "m")]
    pub method: Method,
    /// Expiry, seconds since the Unix epoch.
    #[serde(rename = "e")]
    pub expires: u64,
    /// Largest upload accepted (bytes).
    #[serde(rename = "c")]
    pub cap: u64,
}

/// Why a token is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token of ours: malformed, or the signature does not match.
    #[error("the signed URL is not valid (malformed or tampered with); presign a new one")]
    Invalid,
    /// Signed by us, but past its expiry.
    #[error("the signed URL expired; presign a new one")]
    Expired,
    /// Signed by us for the other method (uploadUrl is PUT, downloadUrl is GET).
    #[error("this signed URL is for {0:?} only (uploadUrl: PUT, downloadUrl: GET)")]
    WrongMethod(Method),
}

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; this never fails.
    <HmacSha256 as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"))
}

/// Sign `claims` into a token.
pub fn sign(secret: &[u8], claims: &Claims) -> String {
    // Serializing this plain struct cannot fail.
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
    let mut m = mac(secret);
    m.update(payload.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
    format!("{payload}.{sig}")
}

/// Check a token's signature, then its expiry (against `now`, Unix seconds)
/// and method.
pub fn verify(secret: &[u8], token: &str, method: Method, now: u64) -> Result<Claims, TokenError> {
    let (payload, sig) = token.split_once('.').ok_or(TokenError::Invalid)?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| TokenError::Invalid)?;
    let mut m = mac(secret);
    m.update(payload.as_bytes());
    m.verify_slice(&sig).map_err(|_| TokenError::Invalid)?;
    let json = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Invalid)?;
    let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Invalid)?;
    if now >= claims.expires {
        return Err(TokenError::Expired);
    }
    if claims.method != method {
        return Err(TokenError::WrongMethod(claims.method));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(method: Method) -> Claims {
        Claims {
            object: "o1".into(),
            org: "g".into(),
            vm: "v".into(),
            method,
            expires: 1000,
            cap: 10,
        }
    }

    #[test]
    fn round_trip() {
        let t = sign(b"secret", &claims(Method::Put));
        assert_eq!(
            verify(b"secret", &t, Method::Put, 999),
            Ok(claims(Method::Put))
        );
    }

    #[test]
    fn expired_wrong_method_and_other_key() {
        let t = sign(b"secret", &claims(Method::Get));
        assert_eq!(
            verify(b"secret", &t, Method::Get, 1000),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verify(b"secret", &t, Method::Put, 1),
            Err(TokenError::WrongMethod(Method::Get))
        );
        assert_eq!(
            verify(b"other", &t, Method::Get, 1),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn tampering_is_invalid_not_expired() {
        let t = sign(b"secret", &claims(Method::Get));
        let (_, sig) = t.split_once('.').unwrap_or_default();
        let mut later = claims(Method::Get);
        later.expires = u64::MAX;
        later.cap = u64::MAX;
        let forged = format!(
            "{}.{sig}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&later).unwrap_or_default())
        );
        assert_eq!(
            verify(b"secret", &forged, Method::Get, 2000),
            Err(TokenError::Invalid)
        );
        let mut flipped = t.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            verify(
                b"secret",
                &String::from_utf8_lossy(&flipped),
                Method::Get,
                1
            ),
            Err(TokenError::Invalid)
        );
        for junk in ["", ".", "abc", "a.b", "a.b.c", "\u{0}.\u{0}"] {
            assert_eq!(
                verify(b"secret", junk, Method::Get, 1),
                Err(TokenError::Invalid),
                "{junk:?}"
            );
        }
    }
}
