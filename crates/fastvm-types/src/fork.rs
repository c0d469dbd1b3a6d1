//! Fork (an extension beyond the reference API): clone a running VM into
//! several running copies in one call (`POST /v1/vms/{id}/fork`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::common::{codes, ValidationError};

/// Most copies one fork makes.
pub const MAX_FORK_COUNT: u32 = 32;

/// Body of `POST /v1/vms/{id}/fork`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ForkVmRequest {
    /// How many copies (1 to 32).
    #[schema(minimum = 1, maximum = 32, example = 3)]
    pub count: u32,
}

impl ForkVmRequest {
    /// 400 `INVALID_FORK_COUNT` unless `count` is 1..=[`MAX_FORK_COUNT`].
    pub fn validate(&self) -> Result<(), ValidationError> {
        if (1..=MAX_FORK_COUNT).contains(&self.count) {
            Ok(())
        } else {
            Err(ValidationError::new(
                codes::INVALID_FORK_COUNT,
                format!(
                    "count is {}; a fork makes 1 to {MAX_FORK_COUNT} copies",
                    self.count
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_bounds() {
        for ok in [1, 2, MAX_FORK_COUNT] {
            assert!(ForkVmRequest { count: ok }.validate().is_ok());
        }
        for bad in [0, MAX_FORK_COUNT + 1, u32::MAX] {
            let e = ForkVmRequest { count: bad }.validate().expect_err("test");
            assert_eq!(e.code, codes::INVALID_FORK_COUNT);
            assert!(e.message.contains("1 to 32"), "{}", e.message);
        }
        let e = serde_json::from_str::<ForkVmRequest>(r#"{"count": 2, "extra": 1}"#);
        assert!(e.is_err());
    }
}
