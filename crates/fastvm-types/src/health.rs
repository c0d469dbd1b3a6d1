//! `GET /healthz`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Health check answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthResponse {
    /// `ok` when the server is serving.
    pub status: String,
}

impl HealthResponse {
    /// `{"status": "ok"}`.
    pub fn ok() -> Self {
        Self {
            status: "ok".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_shape() -> Result<(), serde_json::Error> {
        assert_eq!(
            serde_json::to_string(&HealthResponse::ok())?,
            r#"{"status":"ok"}"#
        );
        Ok(())
    }
}
