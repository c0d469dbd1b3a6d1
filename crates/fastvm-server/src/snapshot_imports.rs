//! Snapshot imports: an OCI image becomes a snapshot, built by a worker
//! (`Worker::import_image`) in a task of the control plane.
//!
//! ```text
//!  POST ──▶ pending ──▶ claimed ──▶ running ──▶ succeeded (snapshot row `ready`)
//!              │        (worker      (first     ├──────▶ failed    (error: user-safe)
//!              │         chosen)     progress)  │
//!              └────────────┴───────────────────┴──────▶ cancelled (POST .../cancel)
//!
//!  DELETE: terminal only; a succeeded import's snapshot goes with it.
//!  Server restart: imports in flight become `failed` ("the server restarted
//!  ..."); their build VM and partial snapshot are removed from the worker.
//! ```
//!
//! The registry password lives only in the import's task (memory) and in the
//! worker call; the row holds the public view of the source. Progress (phase
//! events, build log) is written to the row as it arrives, at most every
//! [`FLUSH_EVERY`] for log lines.
//!
//! Dockerfile sources (`type: dockerfile`): `context-presign` mints an
//! object of the staging store (`org/<nil uuid>/<object>`, capped at
//! [`MAX_CONTEXT_BYTES`]) and a `contextRef` (`ctx_<object>`); the client
//! PUTs the ZIP to the signed URL; `create` claims the ref (single use),
//! and the task streams the object to the worker's
//! `Worker::build_dockerfile` (the build runs in a builder VM there), then
//! deletes it whatever the outcome.

use crate::auth::Caller;
use crate::error::{codes, ApiError};
use crate::quotas::VmShape;
use crate::staging::ObjectKey;
use crate::store::{now_ms, SnapshotImportRecord, SnapshotRecord};
use crate::worker::MachineType;
use crate::AppState;
use axum::http::StatusCode;
use fastvm_types::snapshot::SnapshotStatus;
use fastvm_types::snapshot_import::{
    CreateSnapshotImportRequest, SnapshotImportEvent, SnapshotImportSourceType,
    SnapshotImportStatus,
};
use fastvm_types::{OrgId, SnapshotId, SnapshotImportId};
use fastvm_worker_api::{
    ByteStream, DockerfileImport, ImageImport, ImportNote, ImportedImage, Worker, WorkerError,
};
use std::sync::Arc;
use std::time::Duration;

/// Machine type of an import that names none.
pub const DEFAULT_MACHINE: &str = "c1m2";
/// Largest disk of an imported snapshot.
pub const MAX_IMPORT_DISK_GIB: u64 = 256;
/// Kept tail of an import's build log.
const MAX_LOG_BYTES: usize = 256 * 1024;
/// Log lines are written to the row at most this often (events at once).
const FLUSH_EVERY: Duration = Duration::from_millis(500);

fn no_such_import(id: SnapshotImportId) -> ApiError {
    ApiError::not_found(format!("no snapshot import with id {id}"))
}

/// Build-context cap of `context-presign` and of its signed URL.
pub const MAX_CONTEXT_BYTES: u64 = 512 << 20;
/// `contextRef` prefix; the rest is the staging object's UUID (simple form).
const CONTEXT_REF_PREFIX: &str = "ctx_";

/// The staging object of an org's build context.
fn context_key(org: OrgId, object: uuid::Uuid) -> ObjectKey {
    ObjectKey {
        org: org.to_string(),
        // Contexts belong to no VM: the nil UUID stands for "none".
        vm: uuid::Uuid::nil().to_string(),
        object: object.to_string(),
    }
}

fn bad_context_ref(msg: impl Into<String>) -> ApiError {
    ApiError::invalid(fastvm_types::codes::INVALID_CONTEXT_REF, msg)
}

/// What the import's task hands its worker.
enum Job {
    Image(ImageImport),
    Dockerfile {
        job: DockerfileImport,
        context: ByteStream,
        key: ObjectKey,
    },
}

fn event(phase: &str, status: &str, message: Option<String>) -> SnapshotImportEvent {
    SnapshotImportEvent {
        phase: phase.into(),
        status: status.into(),
        timestamp_ms: u64::try_from(now_ms()).unwrap_or(0),
        message,
    }
}

fn push_log(logs: &mut String, line: &str) {
    logs.push_str(line.trim_end());
    logs.push('\n');
    if logs.len() > MAX_LOG_BYTES {
        let mut cut = logs.len() - MAX_LOG_BYTES;
        while !logs.is_char_boundary(cut) {
            cut += 1;
        }
        logs.drain(..cut);
    }
}

/// Mirror one progress note of the worker into the record: the first one
/// marks the import `running`; an event goes to the events and the log, a
/// log line to the log. True for an event.
fn apply_note(rec: &mut SnapshotImportRecord, note: ImportNote) -> bool {
    if rec.status == SnapshotImportStatus::Claimed {
        rec.status = SnapshotImportStatus::Running;
        rec.started_at_ms = Some(now_ms());
    }
    match note {
        ImportNote::Event {
            phase,
            status,
            message,
        } => {
            let suffix = message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            push_log(&mut rec.logs, &format!("[{phase}] {status}{suffix}"));
            rec.events.push(event(&phase, &status, message));
            true
        }
        ImportNote::Log { line } => {
            push_log(&mut rec.logs, &line);
            false
        }
    }
}

/// Tasks of the imports this control plane runs, by import.
#[derive(Default)]
pub(crate) struct ImportTasks {
    tasks:
        std::sync::Mutex<std::collections::HashMap<SnapshotImportId, tokio::task::JoinHandle<()>>>,
    /// Build contexts claimed by an import (their staging objects are
    /// deleted when it ends; the set only guards the window before).
    claimed: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Deletes an import's build context from the staging store when dropped.
struct ContextCleanup {
    state: AppState,
    key: ObjectKey,
}

impl Drop for ContextCleanup {
    fn drop(&mut self) {
        let (state, key) = (self.state.clone(), self.key.clone());
        tokio::spawn(async move {
            if let Ok(staging) = state.staging() {
                if let Err(e) = staging.delete(&key).await {
                    tracing::warn!(error = %e, "removing a build context failed");
                }
            }
        });
    }
}

impl ImportTasks {
    /// Mark build context `object` used; false when it was already.
    fn claim(&self, object: &str) -> bool {
        self.claimed
            .lock()
            .map(|mut c| c.insert(object.to_owned()))
            .unwrap_or(false)
    }
    fn unclaim(&self, object: &str) {
        if let Ok(mut c) = self.claimed.lock() {
            c.remove(object);
        }
    }
    fn insert(&self, id: SnapshotImportId, task: tokio::task::JoinHandle<()>) {
        if let Ok(mut t) = self.tasks.lock() {
            t.retain(|_, h| !h.is_finished());
            t.insert(id, task);
        }
    }
    fn take(&self, id: SnapshotImportId) -> Option<tokio::task::JoinHandle<()>> {
        self.tasks.lock().ok().and_then(|mut t| t.remove(&id))
    }
}

impl AppState {
    pub(crate) async fn find_snapshot_import(
        &self,
        org: OrgId,
        id: SnapshotImportId,
    ) -> Result<SnapshotImportRecord, ApiError> {
        self.store()
            .get_snapshot_import(org, id)
            .await?
            .ok_or_else(|| no_such_import(id))
    }

    pub(crate) async fn list_snapshot_imports(
        &self,
        org: OrgId,
    ) -> Result<Vec<SnapshotImportRecord>, ApiError> {
        Ok(self.store().list_snapshot_imports(org).await?)
    }

    /// `POST /v1/snapshot-imports`: validate, record `pending`, start the
    /// import's task; answers at once.
    pub(crate) async fn create_snapshot_import(
        &self,
        caller: Caller,
        req: CreateSnapshotImportRequest,
    ) -> Result<SnapshotImportRecord, ApiError> {
        req.validate()?;
        let machine_name = req.machine_type.as_deref().unwrap_or(DEFAULT_MACHINE);
        let machine = MachineType::lookup(machine_name).map_err(|e| {
            ApiError::invalid(fastvm_types::codes::INVALID_MACHINE_TYPE, e.to_string())
        })?;
        let disk_gib = req.disk_gib.unwrap_or(u64::from(machine.disk_gib));
        if disk_gib > MAX_IMPORT_DISK_GIB {
            return Err(ApiError::invalid(
                fastvm_types::codes::INVALID_SIZE,
                format!("diskGiB {disk_gib} is over the limit of {MAX_IMPORT_DISK_GIB}"),
            ));
        }
        let image = req.source.image.clone().unwrap_or_default();
        // Check and reserve (the pending row) atomically per org.
        let lock = self.quota_lock(caller.org_id);
        let held = lock.lock().await;
        let shape = VmShape {
            cpu: u64::from(machine.vcpus),
            memory_mib: u64::from(machine.memory_mib),
            disk_gib,
        };
        self.check_import_quota(caller.org_id, shape).await?;
        let worker = self.import_worker().await?;
        // A Dockerfile source: claim its uploaded context (single use).
        let context = match req.source.source_type {
            SnapshotImportSourceType::Image => None,
            SnapshotImportSourceType::Dockerfile => Some(
                self.claim_context(caller.org_id, req.source.context_ref.as_deref())
                    .await?,
            ),
        };
        let id = SnapshotImportId::new_v4();
        let now = now_ms();
        let mut rec = SnapshotImportRecord {
            id,
            org_id: caller.org_id,
            name: req
                .name
                .clone()
                .map(|n| n.trim().to_owned())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| id.to_string()),
            status: SnapshotImportStatus::Pending,
            source: req.source.view(context.as_ref().map(|c| c.1)),
            events: vec![event("preparing", "started", None)],
            logs: String::new(),
            worker_id: None,
            // Chosen now (the worker names its files after it); shown once succeeded.
            snapshot_id: Some(SnapshotId::new_v4()),
            error: None,
            machine_name: machine.name.to_owned(),
            cpu: machine.vcpus,
            memory_mib: u64::from(machine.memory_mib),
            disk_gib,
            created_at_ms: now,
            started_at_ms: None,
            updated_at_ms: now,
            finished_at_ms: None,
        };
        self.store().insert_snapshot_import(&rec).await?;
        drop(held);
        tracing::info!(import = %id, org = %caller.org_id, image = %image, worker = worker.id(), "snapshot import created");
        let snapshot = rec.snapshot_id.unwrap_or_else(SnapshotId::new_v4);
        let disk_gib = u32::try_from(disk_gib).unwrap_or(u32::MAX);
        let job = match context {
            None => Job::Image(ImageImport {
                import_id: id.to_string(),
                snapshot,
                image,
                platform: req.source.platform.clone(),
                registry_username: req.source.registry_username.clone(),
                registry_password: req.source.registry_password.clone(),
                machine,
                disk_gib,
            }),
            Some((key, size, body)) => Job::Dockerfile {
                job: DockerfileImport {
                    import_id: id.to_string(),
                    snapshot,
                    dockerfile_path: req
                        .source
                        .dockerfile_path
                        .clone()
                        .unwrap_or_else(|| "Dockerfile".into()),
                    build_args: req.source.build_args.clone().unwrap_or_default(),
                    target: req.source.target.clone().filter(|t| !t.is_empty()),
                    registry_host: req.source.registry_host.clone(),
                    registry_username: req.source.registry_username.clone(),
                    registry_password: req.source.registry_password.clone(),
                    context_bytes: size,
                    machine,
                    disk_gib,
                },
                context: body,
                key,
            },
        };
        let state = self.clone();
        let task_rec = rec.clone();
        let task = tokio::spawn(async move { state.run_import(task_rec, worker, job).await });
        self.import_tasks().insert(id, task);
        rec.updated_at_ms = now_ms();
        Ok(rec)
    }

    /// `POST /v1/snapshot-imports/context-presign`: a staging object for
    /// the org's build context and its signed PUT URL.
    pub(crate) async fn presign_context(
        &self,
        org: OrgId,
    ) -> Result<fastvm_types::snapshot_import::ContextPresignResponse, ApiError> {
        let staging = self.staging()?;
        let object = uuid::Uuid::new_v4();
        let ttl = self.staging_config().url_ttl;
        let urls = staging
            .presign(&context_key(org, object), MAX_CONTEXT_BYTES, ttl)
            .await?;
        Ok(fastvm_types::snapshot_import::ContextPresignResponse {
            context_ref: format!("{CONTEXT_REF_PREFIX}{}", object.simple()),
            upload_url: urls.upload_url,
            expires_in_sec: ttl.as_secs(),
            max_upload_bytes: MAX_CONTEXT_BYTES,
        })
    }

    /// Claim `context_ref` of `org`: its staging object, size and bytes.
    /// A ref is claimed once (a second create with it is refused).
    async fn claim_context(
        &self,
        org: OrgId,
        context_ref: Option<&str>,
    ) -> Result<(ObjectKey, u64, ByteStream), ApiError> {
        let r = context_ref.unwrap_or("").trim();
        let object = r
            .strip_prefix(CONTEXT_REF_PREFIX)
            .and_then(|hex| uuid::Uuid::try_parse(hex).ok())
            .ok_or_else(|| {
                bad_context_ref(format!(
                    "source.contextRef {r:?} is not a context ref; get one from POST /v1/snapshot-imports/context-presign"
                ))
            })?;
        let key = context_key(org, object);
        if !self.import_tasks().claim(&key.object) {
            return Err(bad_context_ref(
                "source.contextRef was used already (each build context serves one import); presign and upload it again",
            ));
        }
        let staging = self.staging()?;
        match staging.get(&key).await {
            Ok((size, body)) => Ok((key, size, body)),
            Err(crate::staging::StagingError::NotFound) => {
                self.import_tasks().unclaim(&key.object);
                Err(bad_context_ref(
                    "nothing was uploaded for source.contextRef: PUT the context ZIP to its uploadUrl first (unused contexts are deleted after about a day)",
                ))
            }
            Err(e) => {
                self.import_tasks().unclaim(&key.object);
                Err(e.into())
            }
        }
    }

    /// The worker that builds imports: this process's, else the first
    /// reachable worker of the cluster.
    async fn import_worker(&self) -> Result<Arc<dyn Worker>, ApiError> {
        if let Some(w) = self.fleet().local() {
            return Ok(w.clone());
        }
        self.fleet()
            .reachable()
            .await
            .into_iter()
            .next()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    codes::NO_CAPACITY,
                    "no worker is available to build the import; try again later",
                )
            })
    }

    /// The import's task: drive the worker, mirror its progress into the
    /// row, settle the outcome.
    async fn run_import(&self, mut rec: SnapshotImportRecord, worker: Arc<dyn Worker>, job: Job) {
        let id = rec.id;
        rec.status = SnapshotImportStatus::Claimed;
        rec.worker_id = Some(worker.id().to_owned());
        rec.events.push(event(
            "preparing",
            "completed",
            Some(format!("worker {}", worker.id())),
        ));
        if !self.save_import(&rec).await {
            return;
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ImportNote>();
        let sink: fastvm_worker_api::ImportSink = Arc::new(move |note| {
            let _ = tx.send(note);
        });
        let started = std::time::Instant::now();
        let (snapshot_id, work, context_key): (
            _,
            futures::future::BoxFuture<'_, Result<ImportedImage, WorkerError>>,
            _,
        ) = match job {
            Job::Image(job) => (job.snapshot, worker.import_image(job, sink), None),
            Job::Dockerfile { job, context, key } => (
                job.snapshot,
                worker.build_dockerfile(job, context, sink),
                Some(key),
            ),
        };
        // The build context goes when the worker is done with it (or the
        // task is aborted: cancel), whatever the outcome.
        let _context = context_key.map(|key| ContextCleanup {
            state: self.clone(),
            key,
        });
        tokio::pin!(work);
        let mut last_flush = std::time::Instant::now();
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                Some(note) = rx.recv() => {
                    // Events are written at once, log lines at most every FLUSH_EVERY.
                    let is_event = apply_note(&mut rec, note);
                    if is_event || last_flush.elapsed() >= FLUSH_EVERY {
                        if !self.save_import(&rec).await {
                            return;
                        }
                        last_flush = std::time::Instant::now();
                    }
                }
            }
        };
        while let Ok(note) = rx.try_recv() {
            apply_note(&mut rec, note);
        }
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(imported) => {
                match self
                    .record_imported_snapshot(&rec, snapshot_id, &worker)
                    .await
                {
                    Ok(()) => {
                        tracing::info!(import = %id, snapshot = %snapshot_id, elapsed_ms, "snapshot import succeeded");
                        rec.status = SnapshotImportStatus::Succeeded;
                        rec.events.push(event(
                            "done",
                            "completed",
                            Some(format!(
                                "snapshot {snapshot_id}, image {}",
                                imported.manifest_digest
                            )),
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(import = %id, error = %e.message, "recording the imported snapshot failed");
                        let _ = worker.delete_snapshot(snapshot_id).await;
                        rec.status = SnapshotImportStatus::Failed;
                        rec.error =
                            Some(format!("the snapshot could not be recorded: {}", e.message));
                        rec.events.push(event("done", "failed", rec.error.clone()));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(import = %id, error = %e, elapsed_ms, "snapshot import failed");
                rec.status = SnapshotImportStatus::Failed;
                rec.error = Some(match e {
                    WorkerError::Import(m) => m,
                    other => format!("the import failed on its worker: {other}"),
                });
                rec.events.push(event("done", "failed", rec.error.clone()));
            }
        }
        rec.finished_at_ms = Some(now_ms());
        if rec.status != SnapshotImportStatus::Succeeded {
            rec.snapshot_id = None;
        }
        if !self.save_import(&rec).await && rec.status == SnapshotImportStatus::Succeeded {
            // Cancelled at the last moment: the snapshot goes again.
            let _ = self
                .store()
                .mark_snapshot_deleted(rec.org_id, snapshot_id, now_ms())
                .await;
            let _ = worker.delete_snapshot(snapshot_id).await;
        }
    }

    /// Save progress; false when the import is no longer in flight (cancelled).
    async fn save_import(&self, rec: &SnapshotImportRecord) -> bool {
        match self.store().save_import_progress(rec).await {
            Ok(saved) => saved,
            Err(e) => {
                tracing::warn!(import = %rec.id, error = %e, "saving an import's progress failed");
                true
            }
        }
    }

    async fn record_imported_snapshot(
        &self,
        rec: &SnapshotImportRecord,
        snapshot_id: SnapshotId,
        worker: &Arc<dyn Worker>,
    ) -> Result<(), ApiError> {
        let worker_id = worker.id().to_owned();
        let (compat_key, stored) = self.fleet().snapshot_traits(&worker_id).await;
        let vm_id: fastvm_types::VmId = rec
            .id
            .to_string()
            .parse()
            .map_err(|_| ApiError::internal("import id is not a UUID"))?;
        // Named by the import's name, else by the image reference (VMs
        // restored from it show it as their sourceName).
        let label = if rec.name == rec.id.to_string() {
            match rec.source.source_type {
                SnapshotImportSourceType::Image => rec.source.image.clone().unwrap_or_default(),
                SnapshotImportSourceType::Dockerfile => format!(
                    "dockerfile:{}",
                    rec.source
                        .dockerfile_path
                        .as_deref()
                        .unwrap_or("Dockerfile")
                ),
            }
        } else {
            rec.name.clone()
        };
        let snap = SnapshotRecord {
            id: snapshot_id,
            org_id: rec.org_id,
            // No VM row: an imported snapshot's source is its import.
            vm_id,
            worker_id,
            name: fastvm_types::snapshot::normalize_snapshot_name(Some(&label), &vm_id),
            status: SnapshotStatus::Ready,
            status_message: None,
            machine_name: rec.machine_name.clone(),
            cpu: rec.cpu,
            memory_mib: rec.memory_mib,
            disk_gib: rec.disk_gib,
            metadata: Default::default(),
            env_vars: Default::default(),
            firewall: Default::default(),
            services: Vec::new(),
            volumes: Vec::new(),
            bucket_mounts: Vec::new(),
            created_at_ms: now_ms(),
            deleted_at_ms: None,
            compat_key,
            stored,
        };
        self.store().insert_snapshot(&snap).await?;
        Ok(())
    }

    /// `POST /v1/snapshot-imports/{id}/cancel`: stop an import in flight and
    /// free what it built so far.
    pub(crate) async fn cancel_snapshot_import(
        &self,
        org: OrgId,
        id: SnapshotImportId,
    ) -> Result<SnapshotImportRecord, ApiError> {
        let rec = self.find_snapshot_import(org, id).await?;
        if rec.status.is_terminal() {
            return Err(ApiError::invalid_state(format!(
                "snapshot import {id} is already {}; only an import in flight can be cancelled",
                crate::store::import_status_str(rec.status)
            )));
        }
        if let Some(task) = self.import_tasks().take(id) {
            task.abort();
            // Its worker call is dropped with it: the worker removes the
            // build VM and scratch files.
            let _ = task.await;
        }
        let mut rec = self.find_snapshot_import(org, id).await?;
        if rec.status.is_terminal() {
            return Ok(rec);
        }
        if let (Some(w), Some(snap)) = (&rec.worker_id, rec.snapshot_id) {
            if let Ok(worker) = self.worker_for(w).await {
                let _ = worker.delete_snapshot(snap).await;
            }
        }
        rec.status = SnapshotImportStatus::Cancelled;
        rec.snapshot_id = None;
        rec.finished_at_ms = Some(now_ms());
        rec.events.push(event(
            "done",
            "cancelled",
            Some("cancelled by the user".into()),
        ));
        self.store().save_import_progress(&rec).await?;
        tracing::info!(import = %id, "snapshot import cancelled");
        self.find_snapshot_import(org, id).await
    }

    /// `DELETE /v1/snapshot-imports/{id}`: a terminal import, with its snapshot.
    pub(crate) async fn delete_snapshot_import(
        &self,
        org: OrgId,
        id: SnapshotImportId,
    ) -> Result<(), ApiError> {
        let rec = self.find_snapshot_import(org, id).await?;
        if !rec.status.is_terminal() {
            return Err(ApiError::invalid_state(format!(
                "snapshot import {id} is {}; cancel it first",
                crate::store::import_status_str(rec.status)
            )));
        }
        if let Some(snap) = rec.snapshot_id {
            match self.delete_snapshot(org, snap).await {
                Ok(()) => {}
                Err(e) if e.status == StatusCode::NOT_FOUND => {}
                Err(e) => return Err(e),
            }
        }
        if !self.store().mark_snapshot_import_deleted(org, id).await? {
            return Err(no_such_import(id));
        }
        tracing::info!(import = %id, org = %org, "snapshot import deleted");
        Ok(())
    }

    /// At startup: imports the last run left in flight cannot resume (their
    /// registry credentials were in memory only): they fail, and what they
    /// left on their worker goes.
    pub(crate) async fn reconcile_imports(&self) -> Result<(), ApiError> {
        if self.fleet().is_cluster() {
            // Another control plane may be running them.
            return Ok(());
        }
        for mut rec in self.store().snapshot_imports_in_flight().await? {
            tracing::info!(import = %rec.id, "an import was interrupted by the last shutdown; marking it failed");
            if let Some(w) = &rec.worker_id {
                if let Ok(worker) = self.worker_for(w).await {
                    if let Ok(vm) = rec.id.to_string().parse() {
                        let _ = worker.delete(vm).await;
                    }
                    // A Dockerfile import's builder VM.
                    if let Some(Ok(vm)) = fastvm_worker_api::builder_vm_id(&rec.id.to_string())
                        .map(|b| b.to_string().parse())
                    {
                        let _ = worker.delete(vm).await;
                    }
                    if let Some(snap) = rec.snapshot_id {
                        let _ = worker.delete_snapshot(snap).await;
                    }
                }
            }
            rec.status = SnapshotImportStatus::Failed;
            rec.snapshot_id = None;
            rec.error =
                Some("the server restarted while this import was running; create it again".into());
            rec.finished_at_ms = Some(now_ms());
            rec.events.push(event("done", "failed", rec.error.clone()));
            self.store().save_import_progress(&rec).await?;
        }
        Ok(())
    }
}
