//! Bucket mounts (`/v1/vms/{id}/bucket-mounts`): a customer's bucket
//! mounted in a VM. The control plane keeps the mount's row (never its
//! credentials); the VM's worker holds the credentials and signs the bucket
//! requests (see fastvm-worker's `buckets`).
//!
//! ```text
//!  attach:  validate (400) -> endpoint allowed? (400) -> VM running? (409)
//!           -> path free? (409) -> row `pending` -> worker mounts it
//!           -> `mounted`, or `failed` with the reason (201 either way)
//!  rotate:  `mounted`: the worker checks and swaps the credentials
//!                      (refused: 400 CREDENTIALS_REFUSED, the old ones stay)
//!           `pending` / `failed`: mount now with them -> `mounted` | `failed`
//!  restore: the snapshot's mounts come back `pending` (no credentials were
//!           kept): a rotate with credentials mounts them
//!  delete:  the worker unmounts (warnings logged), the row goes
//! ```
//!
//! A `mounted` mount whose bucket answered errors since (gone, credentials
//! revoked) says so in `statusMessage` (asked of the worker when read).

use crate::error::{codes, ApiError};
use crate::store::BucketMountRecord;
use crate::AppState;
use axum::http::StatusCode;
use fastvm_types::bucket_mount::{
    new_bucket_mount_id, parse_bucket_uri, AttachBucketMountRequest, BucketMount,
    BucketMountCredentials, RotateBucketMountRequest,
};
use fastvm_types::volume::MountStatus;
use fastvm_types::{OrgId, SnapshotId, VmId, VmStatus};
use fastvm_worker_api::{BucketAttach, WorkerError};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// What a restored mount waits for.
const NEEDS_CREDENTIALS: &str =
    "restored from a snapshot without credentials: rotate this bucket mount with credentials to mount it";

pub(crate) fn view_of(m: BucketMountRecord) -> BucketMount {
    BucketMount {
        id: m.id,
        vm_id: m.vm_id,
        bucket_uri: m.bucket_uri,
        mount_path: m.mount_path,
        read_only: m.read_only,
        mount_status: m.mount_status,
        status_message: m.status_message,
        created_at: crate::routes::vms::rfc3339(m.created_at_ms),
    }
}

/// An address a customer's endpoint may not have unless allowed: this
/// host, its private networks, link-local (cloud metadata) and the like.
fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || (o[0] == 100 && (64..128).contains(&o[1])) // shared (CGNAT)
                || (o[0] == 198 && (18..20).contains(&o[1])) // benchmarking (VM pools)
        }
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let s = a.segments();
            a.is_loopback()
                || a.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
        }
    }
}

/// `scheme://host:port` of a URL, for comparing endpoints.
fn origin(u: &url::Url) -> Option<String> {
    Some(format!(
        "{}://{}:{}",
        u.scheme(),
        u.host_str()?.to_ascii_lowercase(),
        u.port_or_known_default()?
    ))
}

impl AppState {
    /// Refuses credentials that send the worker to an internal address (see
    /// [`is_internal`]) unless the operator allowed it (`--allow-bucket-endpoint`):
    /// S3's `endpoint_url`, a GCS key's `token_uri` and `gcs_base_url`.
    async fn check_bucket_endpoint(&self, creds: &BucketMountCredentials) -> Result<(), ApiError> {
        let urls: Vec<String> = match creds {
            BucketMountCredentials::AwsCredentials(file) => {
                file.endpoint_url().into_iter().collect()
            }
            BucketMountCredentials::GcpServiceAccountJson(key) => ["token_uri", "gcs_base_url"]
                .iter()
                .filter_map(|k| key.extra.get(*k))
                .map(|v| v.as_str().unwrap_or_default().to_owned())
                .collect(),
        };
        for endpoint in urls {
            self.check_one_endpoint(&endpoint).await?;
        }
        Ok(())
    }

    async fn check_one_endpoint(&self, endpoint: &str) -> Result<(), ApiError> {
        let endpoint = endpoint.to_owned();
        let bad = |why: String| ApiError::invalid(fastvm_types::codes::INVALID_CREDENTIALS, why);
        let url = url::Url::parse(&endpoint)
            .map_err(|e| bad(format!("bucket endpoint {endpoint:?} is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad(format!(
                "bucket endpoint {endpoint:?} must be an http:// or https:// URL"
            )));
        }
        let Some(own) = origin(&url) else {
            return Err(bad(format!("bucket endpoint {endpoint:?} has no host")));
        };
        let allowed = self
            .allowed_bucket_endpoints()
            .iter()
            .filter_map(|a| url::Url::parse(a).ok())
            .any(|a| origin(&a).as_deref() == Some(own.as_str()));
        if allowed {
            return Ok(());
        }
        let addrs: Vec<IpAddr> = match url.host() {
            Some(url::Host::Ipv4(a)) => vec![a.into()],
            Some(url::Host::Ipv6(a)) => vec![a.into()],
            Some(url::Host::Domain(d)) => {
                let port = url.port_or_known_default().unwrap_or(443);
                tokio::net::lookup_host((d, port))
                    .await
                    .map_err(|e| bad(format!("bucket endpoint host {d:?} does not resolve: {e}")))?
                    .map(|s| s.ip())
                    .collect()
            }
            None => Vec::new(),
        };
        if let Some(ip) = addrs.into_iter().find(|ip| is_internal(*ip)) {
            return Err(ApiError::invalid(
                codes::BUCKET_ENDPOINT_NOT_ALLOWED,
                format!(
                    "bucket endpoint {endpoint} is on an internal address ({ip}); bucket endpoints must be \
                     public unless the operator allows this one (fastvm serve --allow-bucket-endpoint {own})"
                ),
            ));
        }
        Ok(())
    }

    async fn bucket_mount_record(
        &self,
        org: OrgId,
        vm: VmId,
        id: &str,
    ) -> Result<BucketMountRecord, ApiError> {
        self.store()
            .get_bucket_mount(org, vm, id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("VM {vm} has no bucket mount {id}")))
    }

    /// The views of `rows` (one VM's), `mounted` ones with the last error
    /// their bucket answered, if any.
    async fn live_views(&self, vm: VmId, rows: Vec<BucketMountRecord>) -> Vec<BucketMount> {
        let mut health = BTreeMap::new();
        if rows.iter().any(|m| m.mount_status == MountStatus::Mounted) {
            if let Ok(w) = self.worker_of(vm).await {
                health = w.bucket_health(vm).await.unwrap_or_default();
            }
        }
        rows.into_iter()
            .map(|m| {
                let err = health.get(&m.id).cloned().flatten();
                let mut v = view_of(m);
                if let (MountStatus::Mounted, Some(e)) = (v.mount_status, err) {
                    v.status_message = Some(format!("the bucket answered an error: {e}"));
                }
                v
            })
            .collect()
    }

    /// `GET /v1/vms/{id}/bucket-mounts`.
    pub(crate) async fn list_bucket_mounts(
        &self,
        org: OrgId,
        vm: VmId,
    ) -> Result<Vec<BucketMount>, ApiError> {
        self.find_vm(org, vm).await?;
        let rows = self.store().bucket_mounts_of_vm(vm).await?;
        Ok(self.live_views(vm, rows).await)
    }

    /// `GET /v1/vms/{id}/bucket-mounts/{bucketMountId}`.
    pub(crate) async fn get_bucket_mount(
        &self,
        org: OrgId,
        vm: VmId,
        id: &str,
    ) -> Result<BucketMount, ApiError> {
        let row = self.bucket_mount_record(org, vm, id).await?;
        let mut views = self.live_views(vm, vec![row]).await;
        views
            .pop()
            .ok_or_else(|| ApiError::internal("bucket mount view missing"))
    }

    /// The `bucketMounts` of a VM's JSON.
    pub(crate) async fn vm_bucket_mount_items(
        &self,
        vm: VmId,
    ) -> Result<Vec<BucketMount>, ApiError> {
        Ok(self
            .store()
            .bucket_mounts_of_vm(vm)
            .await?
            .into_iter()
            .map(view_of)
            .collect())
    }

    /// `POST /v1/vms/{id}/bucket-mounts`.
    pub(crate) async fn attach_bucket_mount(
        &self,
        org: OrgId,
        vm_id: VmId,
        req: AttachBucketMountRequest,
    ) -> Result<BucketMount, ApiError> {
        req.validate()?;
        self.check_bucket_endpoint(&req.credentials).await?;
        let vm = self.find_vm(org, vm_id).await?;
        if vm.status != VmStatus::Running {
            return Err(ApiError::invalid_state(format!(
                "VM {vm_id} is {}; buckets mount in running VMs (resume it first)",
                vm.status.as_str()
            )));
        }
        self.check_mount_path_free(vm_id, &req.mount_path).await?;
        let row = self
            .store()
            .insert_bucket_mount(&BucketMountRecord {
                id: new_bucket_mount_id(),
                vm_id,
                org_id: org,
                bucket_uri: req.bucket_uri.clone(),
                mount_path: req.mount_path.clone(),
                read_only: req.read_only,
                mount_status: MountStatus::Pending,
                status_message: None,
                created_at_ms: 0,
            })
            .await?;
        let row = self.mount_bucket(row, req.credentials).await?;
        tracing::info!(org = %org, vm = %vm_id, mount = %row.id, status = ?row.mount_status, "bucket mount attached");
        Ok(view_of(row))
    }

    /// 409 when the VM has a volume or a bucket mounted at `path`.
    async fn check_mount_path_free(&self, vm: VmId, path: &str) -> Result<(), ApiError> {
        let taken_by_volume = self
            .store()
            .attachments_of_vm(vm)
            .await?
            .into_iter()
            .find(|a| a.mount_path == path)
            .map(|a| a.volume_id);
        let taken_by_bucket = self
            .store()
            .bucket_mounts_of_vm(vm)
            .await?
            .into_iter()
            .find(|m| m.mount_path == path)
            .map(|m| m.id);
        match taken_by_volume.or(taken_by_bucket) {
            Some(other) => Err(ApiError::new(
                StatusCode::CONFLICT,
                codes::MOUNT_PATH_IN_USE,
                format!("{path} already holds {other} in VM {vm}; choose another mount path"),
            )),
            None => Ok(()),
        }
    }

    /// Ask the VM's worker to mount a recorded bucket mount with
    /// `credentials`; the row takes the outcome.
    async fn mount_bucket(
        &self,
        m: BucketMountRecord,
        credentials: BucketMountCredentials,
    ) -> Result<BucketMountRecord, ApiError> {
        let worker = self.worker_of(m.vm_id).await?;
        let attach = BucketAttach {
            mount: m.id.clone(),
            bucket_uri: m.bucket_uri.clone(),
            mount_path: m.mount_path.clone(),
            read_only: m.read_only,
            credentials,
        };
        let (status, message) = match worker.attach_bucket(m.vm_id, &attach).await {
            Ok(()) => (MountStatus::Mounted, None),
            Err(WorkerError::Volume(why)) => (MountStatus::Failed, Some(why)),
            Err(e @ WorkerError::AgentUnavailable(_)) => (MountStatus::Failed, Some(e.to_string())),
            Err(e) => {
                let _ = self.store().delete_bucket_mount(m.vm_id, &m.id).await;
                return Err(e.into());
            }
        };
        self.store()
            .set_bucket_mount_status(m.vm_id, &m.id, status, message.as_deref())
            .await?;
        Ok(BucketMountRecord {
            mount_status: status,
            status_message: message,
            ..m
        })
    }

    /// `PATCH /v1/vms/{id}/bucket-mounts/{bucketMountId}`.
    pub(crate) async fn rotate_bucket_mount(
        &self,
        org: OrgId,
        vm_id: VmId,
        id: &str,
        req: RotateBucketMountRequest,
    ) -> Result<BucketMount, ApiError> {
        let row = self.bucket_mount_record(org, vm_id, id).await?;
        let uri = parse_bucket_uri(&row.bucket_uri)?;
        req.credentials.validate_for(uri.scheme)?;
        self.check_bucket_endpoint(&req.credentials).await?;
        if row.mount_status != MountStatus::Mounted {
            let vm = self.find_vm(org, vm_id).await?;
            if vm.status != VmStatus::Running {
                return Err(ApiError::invalid_state(format!(
                    "VM {vm_id} is {}; the bucket mounts when the VM runs (resume it, then rotate)",
                    vm.status.as_str()
                )));
            }
            let row = self.mount_bucket(row, req.credentials).await?;
            return Ok(view_of(row));
        }
        let worker = self.worker_of(vm_id).await?;
        match worker
            .rotate_bucket(vm_id, id, &row.bucket_uri, &req.credentials)
            .await
        {
            Ok(()) => {}
            Err(WorkerError::Volume(why)) => {
                return Err(ApiError::invalid(
                    codes::CREDENTIALS_REFUSED,
                    format!("the new credentials were not used (the old ones stay): {why}"),
                ))
            }
            Err(e) => return Err(e.into()),
        }
        self.store()
            .set_bucket_mount_status(vm_id, id, MountStatus::Mounted, None)
            .await?;
        tracing::info!(org = %org, vm = %vm_id, mount = %id, "bucket mount credentials rotated");
        self.get_bucket_mount(org, vm_id, id).await
    }

    /// `DELETE /v1/vms/{id}/bucket-mounts/{bucketMountId}`.
    pub(crate) async fn delete_bucket_mount(
        &self,
        org: OrgId,
        vm_id: VmId,
        id: &str,
    ) -> Result<(), ApiError> {
        let row = self.bucket_mount_record(org, vm_id, id).await?;
        if row.mount_status == MountStatus::Mounted {
            match self.worker_of(vm_id).await {
                Ok(w) => match w.detach_bucket(vm_id, id).await {
                    Ok(None) => {}
                    Ok(Some(note)) => {
                        tracing::warn!(vm = %vm_id, mount = %id, note = ?note, "bucket unmounted with a warning")
                    }
                    Err(e) => {
                        tracing::warn!(vm = %vm_id, mount = %id, error = %e, "unmounting the bucket failed; its row goes anyway")
                    }
                },
                Err(e) => {
                    tracing::warn!(vm = %vm_id, mount = %id, error = %e, "the VM's worker is not reachable; the bucket mount's row goes anyway")
                }
            }
        }
        self.store().delete_bucket_mount(vm_id, id).await?;
        tracing::info!(org = %org, vm = %vm_id, mount = %id, "bucket mount deleted");
        Ok(())
    }

    /// After a restore from snapshot `sid`: its bucket mounts, `pending`
    /// until credentials are given again (they were never in the snapshot).
    pub(crate) async fn restore_snapshot_bucket_mounts(
        &self,
        org: OrgId,
        vm: VmId,
        sid: SnapshotId,
    ) {
        let wanted = match self.store().get_snapshot(org, sid).await {
            Ok(Some(s)) => s.bucket_mounts,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(vm = %vm, snapshot = %sid, error = %e, "reading the snapshot's bucket mounts failed");
                return;
            }
        };
        for b in wanted {
            let row = BucketMountRecord {
                id: new_bucket_mount_id(),
                vm_id: vm,
                org_id: org,
                bucket_uri: b.bucket_uri,
                mount_path: b.mount_path,
                read_only: b.read_only,
                mount_status: MountStatus::Pending,
                status_message: Some(NEEDS_CREDENTIALS.to_owned()),
                created_at_ms: 0,
            };
            if let Err(e) = self.store().insert_bucket_mount(&row).await {
                tracing::warn!(vm = %vm, error = %e, "recording a restored bucket mount failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "198.19.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_internal(a.parse().expect("ip")), "{a}");
        }
        for a in ["8.8.8.8", "52.216.1.1", "2600:1f18::1"] {
            assert!(!is_internal(a.parse().expect("ip")), "{a}");
        }
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        let o = |s: &str| origin(&url::Url::parse(s).expect("url"));
        assert_eq!(o("http://127.0.0.1:9000/"), o("http://127.0.0.1:9000"));
        assert_eq!(
            o("https://S3.Example.com"),
            o("https://s3.example.com:443/x")
        );
        assert_ne!(o("http://127.0.0.1:9000"), o("http://127.0.0.1:9001"));
        assert_ne!(o("http://127.0.0.1:9000"), o("https://127.0.0.1:9000"));
    }
}
