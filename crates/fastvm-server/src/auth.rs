//! API keys and the [`Caller`] extractor.
//!
//! A token is `fvm_` followed by 64 hex digits (32 random bytes). The store
//! keeps only its SHA-256 (hex) and its first 12 characters (to recognise a key
//! in `fastvm keys list`). Clients send `Authorization: Bearer <token>`; the
//! key resolves to its org, and every resource a handler touches is looked up
//! within that org (another org's resource is a 404, never its data).

use crate::error::ApiError;
use crate::AppState;
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use fastvm_types::OrgId;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Prefix of every API token.
pub const TOKEN_PREFIX: &str = "fvm_";

/// A fresh random token.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// Hex SHA-256 of a token: what the store keeps.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The recognisable start of a token (`fvm_` + 8 hex digits).
pub fn token_prefix(token: &str) -> String {
    token.chars().take(TOKEN_PREFIX.len() + 8).collect()
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub org_id: OrgId,
    pub key_id: uuid::Uuid,
    /// The user the key acts for (the admin key's user `admin`); `None` for
    /// org keys made with `fastvm keys create`.
    pub user_id: Option<uuid::Uuid>,
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let value = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthenticated(
            "missing API key: send the header `Authorization: Bearer <api key>`",
        )
    })?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::unauthenticated("the Authorization header is not valid ASCII"))?;
    let (scheme, token) = value.trim().split_once(' ').ok_or_else(|| {
        ApiError::unauthenticated("the Authorization header must be `Bearer <api key>`")
    })?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::unauthenticated(
            "the Authorization header must be `Bearer <api key>`",
        ));
    }
    Ok(token.trim())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts)?;
        // Cheap rejection of obviously foreign tokens, without a query.
        if !token.starts_with(TOKEN_PREFIX) || token.len() > 256 {
            return Err(ApiError::unauthenticated("invalid API key"));
        }
        match state.store().authenticate(token).await? {
            Some(key) => Ok(Caller {
                org_id: key.org_id,
                key_id: key.id,
                user_id: key.user_id,
            }),
            None => Err(ApiError::unauthenticated("invalid or revoked API key")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_prefixed_and_hashed() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with("fvm_") && a.len() == 4 + 64);
        assert_eq!(token_prefix(&a).len(), 12);
        assert_eq!(hash_token(&a), hash_token(&a));
        assert_ne!(hash_token(&a), hash_token(&b));
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
