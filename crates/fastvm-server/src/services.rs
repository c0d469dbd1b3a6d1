//! Services of a VM (`/v1/vms/{id}/services`): named HTTP backends that the
//! proxy ([`crate::proxy`]) exposes at `<name>--<vmIdHex>.proxy.<domain>`.
//!
//! Registrations live in the VM's row (`vms.services`), so one
//! compare-and-set update changes them and, through
//! [`VmRecord::effective_firewall`], the policy the worker enforces: each
//! service adds an ingress rule `::/0` on its port, ahead of the user's rules.
//! After a change the new effective policy is enforced by the worker of a
//! running or paused VM before the API answers; if it cannot be, the change
//! is rolled back (503 `FIREWALL_NOT_ENFORCED`, see
//! [`AppState::change_policy`]).
//!
//! Rules: at most [`MAX_SERVICES_PER_VM`] per VM (409 `TOO_MANY_SERVICES`),
//! names and ports as the spec says (400 `INVALID_SERVICE_NAME` /
//! `INVALID_SERVICE_PORT`), `POST` of a name the VM has is 409
//! `SERVICE_EXISTS`, `PUT` is an upsert and the same values are a no-op
//! (nothing written, nothing pushed). Snapshots carry the registrations; a
//! VM restored from one gets them (see [`crate::lifecycle`]).

use crate::error::{codes, ApiError};
use crate::store::VmRecord;
use crate::AppState;
use axum::http::StatusCode;
use fastvm_types::service::Service;
use fastvm_types::{OrgId, VmId, VmStatus};

/// Most services one VM may register.
pub const MAX_SERVICES_PER_VM: usize = 16;

/// How the proxy is reached, for the `url` of each service.
#[derive(Debug, Clone)]
pub struct ProxyPublic {
    /// `http` or `https` (TLS terminated in front of the proxy).
    pub scheme: String,
    /// The proxy domain: hosts are `<name>--<vmIdHex>.proxy.<domain>`.
    pub domain: String,
    /// The port clients use (omitted from URLs when it is the scheme's default).
    pub port: u16,
}

impl ProxyPublic {
    /// The host name of service `name` of VM `vm`.
    pub fn host(&self, vm: VmId, name: &str) -> String {
        format!("{name}--{}.proxy.{}", vm.as_uuid().as_simple(), self.domain)
    }

    /// `scheme://host[:port]/`.
    pub fn url(&self, vm: VmId, name: &str) -> String {
        let default = matches!(
            (self.scheme.as_str(), self.port),
            ("http", 80) | ("https", 443)
        );
        let port = if default {
            String::new()
        } else {
            format!(":{}", self.port)
        };
        format!("{}://{}{port}/", self.scheme, self.host(vm, name))
    }
}

/// What a register/update did.
pub(crate) enum Registered {
    Created(Service),
    Updated(Service),
    Unchanged(Service),
}

fn same(a: &Service, b: &Service) -> bool {
    a.name == b.name && a.port == b.port && a.h2c == b.h2c
}

impl AppState {
    /// `svc` as the API shows it (with its proxy URL).
    pub(crate) fn service_view(&self, vm: VmId, svc: &Service) -> Service {
        Service {
            url: self.proxy_public().map(|p| p.url(vm, &svc.name)),
            ..svc.clone()
        }
    }

    /// The services of VM `id` of `org`.
    pub(crate) async fn list_services(
        &self,
        org: OrgId,
        id: VmId,
    ) -> Result<Vec<Service>, ApiError> {
        let rec = self.find_vm(org, id).await?;
        Ok(rec
            .services
            .iter()
            .map(|s| self.service_view(id, s))
            .collect())
    }

    /// `POST` (`upsert` false) or `PUT` (`upsert` true) of a validated service.
    pub(crate) async fn register_service(
        &self,
        org: OrgId,
        id: VmId,
        svc: Service,
        upsert: bool,
    ) -> Result<Registered, ApiError> {
        let current = self.find_vm(org, id).await?;
        if let Some(existing) = current.services.iter().find(|s| s.name == svc.name) {
            if !upsert {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    codes::SERVICE_EXISTS,
                    format!("VM {id} already has a service named {:?}; use PUT /v1/vms/{id}/services/{} to change it", svc.name, svc.name),
                ));
            }
            if same(existing, &svc) {
                return Ok(Registered::Unchanged(self.service_view(id, existing)));
            }
        }
        let mut created = false;
        self.change_policy(org, id, |r| {
                refuse_while_deleting(r)?;
                created = false;
                let count = r.services.len();
                match r.services.iter_mut().find(|s| s.name == svc.name) {
                    Some(_) if !upsert => {
                        return Err(ApiError::new(StatusCode::CONFLICT, codes::SERVICE_EXISTS, format!("VM {id} already has a service named {:?}", svc.name)))
                    }
                    Some(existing) => *existing = Service { url: None, ..svc.clone() },
                    None if count >= MAX_SERVICES_PER_VM => {
                        return Err(ApiError::new(
                            StatusCode::CONFLICT,
                            codes::TOO_MANY_SERVICES,
                            format!("VM {id} has {MAX_SERVICES_PER_VM} services, the most one VM may register; delete one first"),
                        ))
                    }
                    None => {
                        created = true;
                        r.services.push(Service { url: None, ..svc.clone() });
                    }
                }
                Ok(())
            })
            .await?;
        let view = self.service_view(id, &svc);
        Ok(if created {
            Registered::Created(view)
        } else {
            Registered::Updated(view)
        })
    }

    /// `DELETE /v1/vms/{id}/services/{name}`.
    pub(crate) async fn delete_service(
        &self,
        org: OrgId,
        id: VmId,
        name: &str,
    ) -> Result<(), ApiError> {
        let current = self.find_vm(org, id).await?;
        if !current.services.iter().any(|s| s.name == name) {
            return Err(no_such_service(id, name));
        }
        self.change_policy(org, id, |r| {
            refuse_while_deleting(r)?;
            let before = r.services.len();
            r.services.retain(|s| s.name != name);
            if r.services.len() == before {
                return Err(no_such_service(id, name));
            }
            Ok(())
        })
        .await?;
        Ok(())
    }
}

fn refuse_while_deleting(r: &VmRecord) -> Result<(), ApiError> {
    if r.status == VmStatus::Deleting {
        return Err(ApiError::invalid_state(format!(
            "VM {} is being deleted",
            r.id
        )));
    }
    Ok(())
}

pub(crate) fn no_such_service(id: VmId, name: &str) -> ApiError {
    let shown: String = name.chars().take(64).collect();
    ApiError::not_found(format!("VM {id} has no service named {shown:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let vm: VmId = "0b9c7a3e-1d2f-4c5b-8a9e-0f1e2d3c4b5a"
            .parse()
            .expect("uuid");
        let p = ProxyPublic {
            scheme: "http".into(),
            domain: "localhost".into(),
            port: 8081,
        };
        assert_eq!(
            p.host(vm, "web"),
            "web--0b9c7a3e1d2f4c5b8a9e0f1e2d3c4b5a.proxy.localhost"
        );
        assert_eq!(
            p.url(vm, "web"),
            "http://web--0b9c7a3e1d2f4c5b8a9e0f1e2d3c4b5a.proxy.localhost:8081/"
        );
        let p = ProxyPublic {
            scheme: "https".into(),
            domain: "example.com".into(),
            port: 443,
        };
        assert_eq!(
            p.url(vm, "api-v2"),
            "https://api-v2--0b9c7a3e1d2f4c5b8a9e0f1e2d3c4b5a.proxy.example.com/"
        );
    }
}
