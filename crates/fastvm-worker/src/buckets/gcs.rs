//! GCS access with a service-account key: OAuth2 access tokens from the key's
//! `token_uri` (the JWT-bearer grant, RFC 7523), then the GCS XML API through
//! `object_store`'s client with those tokens.
//!
//! ```text
//!  JWT {iss: client_email, scope: devstorage.read_write, aud: token_uri, iat, exp}
//!    signed RS256 with the key's private_key
//!  POST token_uri  grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<JWT>
//!    -> {"access_token": .., "expires_in": ..}   cached until a minute before it expires
//!  every request: Authorization: Bearer <access_token>
//! ```
//!
//! A key may carry `gcs_base_url` (an XML API other than storage.googleapis.com,
//! e.g. a test server), as `object_store` reads it.

use async_trait::async_trait;
use base64::Engine;
use fastvm_types::bucket_mount::GcpServiceAccountKey;
use object_store::gcp::{GcpCredential, GoogleCloudStorageBuilder};
use object_store::{ClientOptions, CredentialProvider, ObjectStore, RetryConfig};
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where Google issues tokens when the key names no `token_uri`.
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
const SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_write";

/// Tokens from a service account's `token_uri`.
pub struct TokenSource {
    email: String,
    key: RsaKeyPair,
    token_uri: String,
    http: reqwest::Client,
    cached: Mutex<Option<(Arc<GcpCredential>, Instant)>>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("email", &self.email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The DER bytes of a PEM `PRIVATE KEY` (PKCS#8) block.
fn pkcs8_der(pem: &str) -> Result<Vec<u8>, String> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("-----BEGIN PRIVATE KEY-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    if body.is_empty() {
        return Err("private_key holds no PEM \"PRIVATE KEY\" (PKCS#8) block".into());
    }
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|e| format!("private_key is not valid PEM: {e}"))
}

#[derive(serde::Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl TokenSource {
    pub fn new(key: &GcpServiceAccountKey) -> Result<TokenSource, String> {
        let der = pkcs8_der(&key.private_key)?;
        let pair = RsaKeyPair::from_pkcs8(&der)
            .map_err(|e| format!("private_key is not an RSA PKCS#8 key: {e}"))?;
        let token_uri = key
            .extra
            .get("token_uri")
            .and_then(|v| v.as_str())
            .unwrap_or(DEFAULT_TOKEN_URI)
            .to_owned();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .no_proxy()
            .build()
            .map_err(|e| format!("token client: {e}"))?;
        Ok(TokenSource {
            email: key.client_email.clone(),
            key: pair,
            token_uri,
            http,
            cached: Mutex::new(None),
        })
    }

    /// The signed JWT asking for a token.
    fn assertion(&self) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let header = b64(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "iss": self.email, "scope": SCOPE, "aud": self.token_uri,
            "iat": now, "exp": now + 3600,
        });
        let claims = b64(claims.to_string().as_bytes());
        let signed = format!("{header}.{claims}");
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                signed.as_bytes(),
                &mut sig,
            )
            .map_err(|_| "signing the token request failed".to_string())?;
        Ok(format!("{signed}.{}", b64(&sig)))
    }

    async fn fetch(&self) -> Result<(Arc<GcpCredential>, Instant), String> {
        let assertion = self.assertion()?;
        let answer = self
            .http
            .post(&self.token_uri)
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .map_err(|e| format!("token request to {}: {e}", self.token_uri))?;
        let status = answer.status();
        if !status.is_success() {
            let body = answer.text().await.unwrap_or_default();
            let body: String = body.chars().take(300).collect();
            return Err(format!(
                "{} refused a token for {}: {status} {body}",
                self.token_uri, self.email
            ));
        }
        let t: TokenAnswer = answer
            .json()
            .await
            .map_err(|e| format!("token answer of {}: {e}", self.token_uri))?;
        let life = Duration::from_secs(t.expires_in.unwrap_or(3600).clamp(60, 24 * 3600));
        Ok((
            Arc::new(GcpCredential {
                bearer: t.access_token,
            }),
            Instant::now() + life - Duration::from_secs(60),
        ))
    }
}

#[async_trait]
impl CredentialProvider for TokenSource {
    type Credential = GcpCredential;

    async fn get_credential(&self) -> object_store::Result<Arc<GcpCredential>> {
        if let Ok(c) = self.cached.lock() {
            if let Some((cred, until)) = c.as_ref() {
                if Instant::now() < *until {
                    return Ok(cred.clone());
                }
            }
        }
        let (cred, until) = self
            .fetch()
            .await
            .map_err(|e| object_store::Error::Generic {
                store: "GCS",
                source: e.into(),
            })?;
        if let Ok(mut c) = self.cached.lock() {
            *c = Some((cred.clone(), until));
        }
        Ok(cred)
    }
}

/// The client of GCS bucket `bucket` with the tokens of `key`.
pub fn open(
    bucket: &str,
    key: &GcpServiceAccountKey,
    retry: RetryConfig,
    options: ClientOptions,
) -> Result<Arc<dyn ObjectStore>, String> {
    let tokens = TokenSource::new(key)?;
    let json = serde_json::to_string(key).map_err(|e| format!("service-account key: {e}"))?;
    let http = key
        .extra
        .get("gcs_base_url")
        .and_then(|v| v.as_str())
        .is_some_and(|u| u.starts_with("http://"));
    GoogleCloudStorageBuilder::new()
        .with_bucket_name(bucket)
        .with_service_account_key(json)
        .with_credentials(Arc::new(tokens))
        .with_retry(retry)
        .with_client_options(options.with_allow_http(http))
        .build()
        .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        .map_err(|e| format!("the GCS client could not be made from this key: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(private_key: &str) -> GcpServiceAccountKey {
        GcpServiceAccountKey {
            key_type: "service_account".into(),
            client_email: "sa@p.iam.gserviceaccount.com".into(),
            private_key: private_key.into(),
            extra: Default::default(),
        }
    }

    #[test]
    fn bad_private_keys_are_named() {
        // The real signing path (a 2048-bit RSA key, the grant verified by a
        // token endpoint) is covered by sdk/python/tests/e2e (fake_gcs.py).
        let e = TokenSource::new(&key("no pem here")).err();
        assert!(e.is_some_and(|e| e.contains("PKCS#8")));
        let e = TokenSource::new(&key(
            "-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n",
        ))
        .err();
        assert!(e.is_some_and(|e| e.contains("not valid PEM")));
        let e = TokenSource::new(&key(
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ))
        .err();
        assert!(e.is_some_and(|e| e.contains("not an RSA PKCS#8 key")));
    }
}
