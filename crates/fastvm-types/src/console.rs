//! Serial console access: `POST /v1/vms/{id}/console-token` mints a short-lived
//! token; the client opens `wss://<host><websocketPath>?session=<token>`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A console session handle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsoleTokenResponse {
    /// One-shot session token.
    pub token: String,
    /// Token lifetime in seconds.
    pub expires_in_sec: u64,
    /// Relative WebSocket path.
    pub websocket_path: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wire_names() -> Result<(), serde_json::Error> {
        let v = serde_json::to_value(ConsoleTokenResponse {
            token: "t".into(),
            expires_in_sec: 60,
            websocket_path: "/v1/console".into(),
        })?;
        assert_eq!(
            v,
            json!({"token": "t", "expiresInSec": 60, "websocketPath": "/v1/console"})
        );
        Ok(())
    }
}
