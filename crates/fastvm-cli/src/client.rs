//! The HTTP client of the CLI commands: base URL and API key from the same
//! environment as the SDK (`FASTVM_BASE_URL`, `FASTVM_API_KEY`), falling back
//! to the local server's admin key file for a single-host setup.

use anyhow::{anyhow, Context};
use serde_json::Value;
use std::path::Path;

pub struct Client {
    pub base: String,
    key: Option<String>,
    pub http: reqwest::Client,
}

/// Connection flags shared by every client command.
#[derive(clap::Args, Clone)]
pub struct ConnectArgs {
    /// API base URL.
    #[arg(long, env = "FASTVM_BASE_URL", default_value = "http://127.0.0.1:8080")]
    pub base_url: String,
    /// API key (default: FASTVM_API_KEY, else the local server's DATA_DIR/admin-api-key).
    #[arg(long, env = "FASTVM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Client {
    pub fn new(args: &ConnectArgs) -> anyhow::Result<Client> {
        let key = match &args.api_key {
            Some(k) => Some(k.clone()),
            None => read_local_key(&crate::default_data_dir()),
        };
        Ok(Client {
            base: args.base_url.trim_end_matches('/').to_owned(),
            key,
            http: reqwest::Client::builder().build()?,
        })
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        r
    }

    /// Send and decode a JSON answer; API errors become `CODE: message`.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the Fast VM API at {}", self.base))?;
        decode(resp).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send(self.request(reqwest::Method::POST, path).json(body))
            .await
    }

    /// One typed exchange: `body` (if any) as JSON, the answer decoded into
    /// `T` (the API's own types from `fastvm_types`).
    pub async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&(impl serde::Serialize + ?Sized)>,
    ) -> anyhow::Result<T> {
        let mut req = self.request(method, path);
        if let Some(b) = body {
            req = req.json(b);
        }
        let value = self.send(req).await?;
        serde_json::from_value(value).with_context(|| {
            format!("unexpected answer from {path} (is the server the same version as this CLI?)")
        })
    }

    pub async fn get_as<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call(reqwest::Method::GET, path, None::<&Value>).await
    }
}

pub async fn decode(resp: reqwest::Response) -> anyhow::Result<Value> {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        return Ok(body);
    }
    let code = body
        .pointer("/error/code")
        .and_then(Value::as_str)
        .unwrap_or("HTTP_ERROR");
    let msg = body
        .pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or("");
    Err(anyhow!("{code} ({status}): {msg}"))
}

fn read_local_key(data_dir: &Path) -> Option<String> {
    std::fs::read_to_string(data_dir.join("admin-api-key"))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}
