//! Services: named HTTP backends of a VM exposed through the proxy at
//! `<name>--<vmIdHexNoHyphens>.proxy.<domain>` (so a name is at most 29 chars:
//! 29 + 2 + 32 = 63, one DNS label).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::common::{codes, show, ValidationError};

/// Longest service name.
pub const SERVICE_NAME_MAX_CHARS: usize = 29;
/// Lowest port a service may use (privileged ports are rejected).
pub const SERVICE_PORT_MIN: u32 = 1024;
/// Highest port a service may use.
pub const SERVICE_PORT_MAX: u32 = 65535;

/// A service registration as returned by the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// Service name (1-29 chars).
    pub name: String,
    /// TCP port the service listens on inside the VM (1024-65535).
    pub port: u16,
    /// When true the proxy speaks HTTP/2 cleartext to the backend (gRPC);
    /// otherwise HTTP/1.1.
    pub h2c: bool,
    /// Extension of this server: the service's full URL through the proxy,
    /// `http://<name>--<vmIdHex>.proxy.<domain>:<port>/`. Absent when the
    /// server runs no proxy (and never stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// Body of `POST /v1/vms/{id}/services`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegisterServiceRequest {
    /// Service name (see [`validate_service_name`]).
    pub name: String,
    /// TCP port, 1024-65535.
    pub port: u32,
    /// HTTP/2 cleartext to the backend (default false).
    #[serde(default)]
    pub h2c: bool,
}

impl RegisterServiceRequest {
    /// Checks name and port; returns the service to store.
    pub fn validate(&self) -> Result<Service, ValidationError> {
        validate_service_name(&self.name)?;
        Ok(Service {
            name: self.name.clone(),
            port: validate_service_port(self.port)?,
            h2c: self.h2c,
            url: None,
        })
    }
}

/// Body of `PUT /v1/vms/{id}/services/{serviceName}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateServiceRequest {
    /// TCP port, 1024-65535.
    pub port: u32,
    /// HTTP/2 cleartext to the backend (default false).
    #[serde(default)]
    pub h2c: bool,
}

impl UpdateServiceRequest {
    /// Checks the path's name and the body's port; returns the service to store.
    pub fn validate(&self, name: &str) -> Result<Service, ValidationError> {
        validate_service_name(name)?;
        Ok(Service {
            name: name.to_string(),
            port: validate_service_port(self.port)?,
            h2c: self.h2c,
            url: None,
        })
    }
}

/// Checks a service name: 1-29 chars of lowercase letters and digits with
/// optional single internal hyphens (no leading, trailing or consecutive hyphens).
pub fn validate_service_name(name: &str) -> Result<(), ValidationError> {
    let err = |why: &str| {
        ValidationError::new(
            codes::INVALID_SERVICE_NAME,
            format!(
                "service name {} {why}; use 1-{SERVICE_NAME_MAX_CHARS} lowercase letters and digits \
                 with single internal hyphens (e.g. web, api-v2)",
                show(name)
            ),
        )
    };
    if name.is_empty() {
        return Err(err("is empty"));
    }
    if name.len() > SERVICE_NAME_MAX_CHARS {
        return Err(err("is too long"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(err("has characters other than a-z, 0-9 and -"));
    }
    if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return Err(err("has a leading, trailing or doubled hyphen"));
    }
    Ok(())
}

/// Checks a service port is in 1024..=65535 and returns it as `u16`.
pub fn validate_service_port(port: u32) -> Result<u16, ValidationError> {
    match u16::try_from(port) {
        Ok(p) if (SERVICE_PORT_MIN..=SERVICE_PORT_MAX).contains(&port) => Ok(p),
        _ => Err(ValidationError::new(
            codes::INVALID_SERVICE_PORT,
            format!(
                "port {port} is out of range; services must use a TCP port in \
                 {SERVICE_PORT_MIN}-{SERVICE_PORT_MAX} (privileged ports are rejected)"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn service_names() {
        for good in [
            "a",
            "web",
            "api-v2",
            "a1-b2-c3",
            "0",
            "9lives",
            &"a".repeat(29),
        ] {
            assert_eq!(validate_service_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a--b",
            "Web",
            "a_b",
            "a.b",
            "a b",
            "é",
            &"a".repeat(30),
            "-",
        ] {
            assert_eq!(
                validate_service_name(bad).err().map(|e| e.code),
                Some(codes::INVALID_SERVICE_NAME),
                "{bad}"
            );
        }
    }

    #[test]
    fn service_ports() {
        assert_eq!(validate_service_port(1024), Ok(1024));
        assert_eq!(validate_service_port(65535), Ok(65535));
        for bad in [0, 1, 80, 1023, 65536, 100_000] {
            assert_eq!(
                validate_service_port(bad).err().map(|e| e.code),
                Some(codes::INVALID_SERVICE_PORT),
                "{bad}"
            );
        }
    }

    #[test]
    fn wire_forms() -> Result<(), Box<dyn std::error::Error>> {
        let r: RegisterServiceRequest =
            serde_json::from_value(json!({"name": "web", "port": 8080}))?;
        assert_eq!(
            r.validate()?,
            Service {
                name: "web".into(),
                port: 8080,
                h2c: false,
                url: None
            }
        );
        let u: UpdateServiceRequest = serde_json::from_value(json!({"port": 9090, "h2c": true}))?;
        assert_eq!(
            u.validate("grpc")?,
            Service {
                name: "grpc".into(),
                port: 9090,
                h2c: true,
                url: None
            }
        );
        assert!(u.validate("Bad").is_err());
        assert!(serde_json::from_value::<RegisterServiceRequest>(json!({"name": "web"})).is_err());
        assert_eq!(
            serde_json::to_value(Service {
                name: "web".into(),
                port: 8080,
                h2c: false,
                url: None
            })?,
            json!({"name": "web", "port": 8080, "h2c": false})
        );
        Ok(())
    }
}
