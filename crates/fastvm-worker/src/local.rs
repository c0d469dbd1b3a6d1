//! [`LocalWorker`]: this host's [`Runtime`] behind the [`Worker`] trait of
//! fastvm-worker-api. The control plane of a single-host server drives it in
//! process; a `fastvm worker` host serves it to remote control planes
//! (`fastvm_worker_api::service`).

use crate::runtime::{CreateVm, Runtime};
use crate::{ExecEvent, ExecRequest, VmState};
use async_trait::async_trait;
use fastvm_types::{FirewallPolicy, SnapshotId, VmId};
use fastvm_worker_api::{
    ByteStream, ExecEvents, GuestStream, PtyEvent, PtyExit, PtyInput, PtySession, PtySpec, VmSpec,
    Worker, WorkerError, PTY_INPUT_QUEUE,
};
use std::sync::Arc;

impl From<crate::Error> for WorkerError {
    fn from(e: crate::Error) -> Self {
        use crate::Error as E;
        let msg = e.to_string();
        match e {
            E::NoSuchVm(_) => WorkerError::NotFound(msg),
            E::NoSuchSnapshot(_) => WorkerError::NoSuchSnapshot(msg),
            E::WrongState { .. } => WorkerError::WrongState(msg),
            E::UnknownMachineType(_) => WorkerError::UnknownMachineType(msg),
            E::InvalidExec(_) => WorkerError::InvalidExec(msg),
            E::AgentUnavailable(_) | E::Protocol(_) => WorkerError::AgentUnavailable(msg),
            E::TooManyStreams(_) => WorkerError::TooManyExecs(msg),
            E::GuestConnect(_) => WorkerError::ConnectRefused(msg),
            E::Unresponsive { .. } => WorkerError::Unresponsive(msg),
            E::Volume(_) => WorkerError::Volume(msg),
            E::Import(_) => WorkerError::Import(msg),
            _ => WorkerError::Failed(msg),
        }
    }
}

/// How long [`LocalWorker::connect`] waits for the guest to accept.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The worker of this process, over [`Runtime`].
pub struct LocalWorker {
    id: String,
    runtime: Arc<Runtime>,
}

impl LocalWorker {
    pub fn new(runtime: Arc<Runtime>) -> Self {
        LocalWorker {
            id: "local".into(),
            runtime,
        }
    }

    /// The worker of a `fastvm worker` host, known to the control planes as `id`.
    pub fn with_id(runtime: Arc<Runtime>, id: impl Into<String>) -> Self {
        LocalWorker {
            id: id.into(),
            runtime,
        }
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }
}

#[async_trait]
impl Worker for LocalWorker {
    fn id(&self) -> &str {
        &self.id
    }

    async fn create(&self, spec: VmSpec) -> Result<(), WorkerError> {
        let req = CreateVm {
            id: Some(spec.id.to_string()),
            machine: spec.machine.name.to_owned(),
            hostname: Some(spec.hostname),
            env: spec.env,
            snapshot: spec.snapshot.map(|s| s.to_string()),
            firewall: spec.firewall,
            ..Default::default()
        };
        self.runtime.create(req).await?;
        Ok(())
    }

    async fn state(&self, id: VmId) -> Result<Option<VmState>, WorkerError> {
        Ok(self.runtime.get(&id.to_string()).ok().map(|i| i.state))
    }

    async fn list(&self) -> Result<Vec<(VmId, VmState)>, WorkerError> {
        // Directories that are not VM ids are not VMs of this control plane.
        Ok(self
            .runtime
            .list()
            .into_iter()
            .filter_map(|i| Some((i.id.parse().ok()?, i.state)))
            .collect())
    }

    async fn pause(&self, id: VmId) -> Result<(), WorkerError> {
        self.runtime.pause(&id.to_string()).await?;
        Ok(())
    }

    async fn resume(&self, id: VmId) -> Result<(), WorkerError> {
        self.runtime.resume(&id.to_string()).await?;
        Ok(())
    }

    async fn delete(&self, id: VmId) -> Result<(), WorkerError> {
        match self.runtime.delete(&id.to_string()).await {
            Ok(()) | Err(crate::Error::NoSuchVm(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn exec(&self, id: VmId, req: ExecRequest) -> Result<ExecEvents, WorkerError> {
        let stream = self.runtime.exec(&id.to_string(), &req).await?;
        // `unfold` calls `next()` only when polled: no read-ahead.
        let events = futures::stream::unfold(stream, |mut s| async move {
            let item = s.next().await?;
            Some((item.map_err(WorkerError::from), s))
        });
        Ok(Box::pin(events))
    }

    async fn exec_with_input(
        &self,
        id: VmId,
        req: ExecRequest,
        input: ByteStream,
    ) -> Result<ExecEvents, WorkerError> {
        let mut stream = self
            .runtime
            .exec(&id.to_string(), &req.with_stdin())
            .await?;
        let writer = stream
            .take_stdin()
            .ok_or_else(|| WorkerError::Failed("the exec has no stdin".into()))?;
        let (fail_tx, fail_rx) = tokio::sync::mpsc::channel::<String>(1);
        let pump = AbortOnDrop(tokio::spawn(pump_stdin(writer, input, fail_tx)));
        let events = futures::stream::unfold(Some((stream, fail_rx, pump)), |state| async move {
            let (mut s, mut fail_rx, pump) = state?;
            tokio::select! {
                biased;
                Some(msg) = fail_rx.recv() => Some((Err(WorkerError::Failed(msg)), None)),
                item = s.next() => {
                    let item = item?.map_err(WorkerError::from);
                    let last = matches!(item, Ok(ExecEvent::Exit(_)) | Err(_));
                    Some((item, (!last).then_some((s, fail_rx, pump))))
                }
            }
        });
        Ok(Box::pin(events))
    }

    async fn snapshot(&self, vm: VmId, snapshot: SnapshotId) -> Result<(), WorkerError> {
        self.runtime
            .snapshot(&vm.to_string(), Some(snapshot.to_string()))
            .await?;
        Ok(())
    }

    async fn import_image(
        &self,
        job: fastvm_worker_api::ImageImport,
        progress: fastvm_worker_api::ImportSink,
    ) -> Result<fastvm_worker_api::ImportedImage, WorkerError> {
        Ok(self.runtime.import_image(&job, progress).await?)
    }

    async fn build_dockerfile(
        &self,
        job: fastvm_worker_api::DockerfileImport,
        context: ByteStream,
        progress: fastvm_worker_api::ImportSink,
    ) -> Result<fastvm_worker_api::ImportedImage, WorkerError> {
        Ok(self
            .runtime
            .build_dockerfile(&job, context, progress)
            .await?)
    }

    async fn delete_snapshot(&self, snapshot: SnapshotId) -> Result<(), WorkerError> {
        match self.runtime.delete_snapshot(&snapshot.to_string()).await {
            Ok(()) | Err(crate::Error::NoSuchSnapshot(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn set_firewall(&self, id: VmId, policy: &FirewallPolicy) -> Result<(), WorkerError> {
        self.runtime.set_firewall(&id.to_string(), policy).await?;
        Ok(())
    }

    async fn enforced_firewall(&self, id: VmId) -> Result<Option<FirewallPolicy>, WorkerError> {
        Ok(self.runtime.enforced_firewall(&id.to_string())?)
    }

    async fn put_volume(
        &self,
        volume: &str,
        size_bytes: u64,
        read_only: bool,
    ) -> Result<(), WorkerError> {
        Ok(self.runtime.create_volume(volume, size_bytes, read_only)?)
    }

    async fn delete_volume(&self, volume: &str) -> Result<(), WorkerError> {
        Ok(self.runtime.delete_volume(volume).await?)
    }

    async fn volume_used_bytes(&self, volume: &str) -> Result<u64, WorkerError> {
        Ok(self.runtime.volume_used_bytes(volume)?)
    }

    async fn attach_volume(
        &self,
        id: VmId,
        volume: &str,
        mount_path: &str,
        read_only: bool,
    ) -> Result<(), WorkerError> {
        Ok(self
            .runtime
            .attach_volume(&id.to_string(), volume, mount_path, read_only)
            .await?)
    }

    async fn detach_volume(
        &self,
        id: VmId,
        volume: &str,
    ) -> Result<Option<fastvm_worker_api::DetachNote>, WorkerError> {
        Ok(self.runtime.detach_volume(&id.to_string(), volume).await?)
    }

    async fn attach_bucket(
        &self,
        id: VmId,
        b: &fastvm_worker_api::BucketAttach,
    ) -> Result<(), WorkerError> {
        Ok(self
            .runtime
            .attach_bucket(
                &id.to_string(),
                &b.mount,
                &b.bucket_uri,
                &b.mount_path,
                b.read_only,
                &b.credentials,
            )
            .await?)
    }

    async fn rotate_bucket(
        &self,
        id: VmId,
        mount: &str,
        bucket_uri: &str,
        credentials: &fastvm_types::bucket_mount::BucketMountCredentials,
    ) -> Result<(), WorkerError> {
        Ok(self
            .runtime
            .rotate_bucket(&id.to_string(), mount, bucket_uri, credentials)
            .await?)
    }

    async fn detach_bucket(
        &self,
        id: VmId,
        mount: &str,
    ) -> Result<Option<fastvm_worker_api::DetachNote>, WorkerError> {
        Ok(self.runtime.detach_bucket(&id.to_string(), mount).await?)
    }

    async fn bucket_health(
        &self,
        id: VmId,
    ) -> Result<std::collections::BTreeMap<String, Option<String>>, WorkerError> {
        Ok(self.runtime.bucket_health(&id.to_string()).await?)
    }

    async fn public_ipv6(&self, id: VmId) -> Result<Option<String>, WorkerError> {
        Ok(self
            .runtime
            .get(&id.to_string())
            .ok()
            .and_then(|i| i.public_ipv6))
    }

    /// From the host to the guest's IPv6 address: through the host route
    /// into the VM's namespace and its firewall's ingress chain, like any
    /// outside client.
    async fn connect(&self, id: VmId, port: u16) -> Result<GuestStream, WorkerError> {
        let info = self.runtime.get(&id.to_string())?;
        if info.state != VmState::Running {
            return Err(WorkerError::WrongState(format!("VM {id} is not running")));
        }
        let Some(addr) = info
            .public_ipv6
            .as_deref()
            .and_then(|a| a.parse::<std::net::Ipv6Addr>().ok())
        else {
            return Err(WorkerError::ConnectRefused(format!(
                "VM {id} has no network (the worker runs with --no-network)"
            )));
        };
        let target = std::net::SocketAddr::from((addr, port));
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Ok(Box::new(stream))
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(
                WorkerError::ConnectRefused(format!("nothing listens on port {port} in VM {id}")),
            ),
            Ok(Err(e)) => Err(WorkerError::ConnectRefused(format!(
                "connecting to port {port} in VM {id} failed: {e}"
            ))),
            Err(_) => Err(WorkerError::Timeout(format!(
                "port {port} of VM {id} did not accept within {} s (a firewall rule may drop it)",
                CONNECT_TIMEOUT.as_secs()
            ))),
        }
    }

    fn detach(&self) {
        self.runtime.detach_all();
    }

    async fn open_pty(&self, id: VmId, spec: PtySpec) -> Result<PtySession, WorkerError> {
        let req = ExecRequest {
            argv: spec.argv,
            env: spec.env,
            stdin: true,
            pty: Some(crate::agent::PtySpec {
                term: spec.term,
                cols: spec.cols,
                rows: spec.rows,
            }),
            ..Default::default()
        };
        let mut stream = self.runtime.exec(&id.to_string(), &req).await?;
        let writer = stream
            .take_stdin()
            .ok_or_else(|| WorkerError::Failed("the terminal has no input".into()))?;
        let (input, inputs) = tokio::sync::mpsc::channel(PTY_INPUT_QUEUE);
        let pump = AbortOnDrop(tokio::spawn(pump_pty_input(
            writer,
            stream.control(),
            inputs,
        )));
        let events = futures::stream::unfold(Some((stream, pump)), |state| async move {
            let (mut s, pump) = state?;
            match s.next().await? {
                Ok(ExecEvent::Stdout(d) | ExecEvent::Stderr(d)) => {
                    Some((Ok(PtyEvent::Output(d)), Some((s, pump))))
                }
                Ok(ExecEvent::Exit(st)) => Some((
                    Ok(PtyEvent::Exit(PtyExit {
                        code: st.code,
                        signal: st.signal,
                        error: st.error,
                    })),
                    None,
                )),
                Err(e) => Some((Err(WorkerError::from(e)), None)),
            }
        });
        Ok(PtySession {
            input,
            events: Box::pin(events),
        })
    }

    async fn open_serial(&self, id: VmId, tail_bytes: u64) -> Result<ByteStream, WorkerError> {
        let follower = self
            .runtime
            .follow_console(&id.to_string(), tail_bytes)
            .await?;
        let stream = futures::stream::unfold(follower, |mut f| async move {
            let item = f.next().await?;
            Some((item, f))
        });
        Ok(Box::pin(stream))
    }

    async fn open_guest_tcp(
        &self,
        id: VmId,
        host: &str,
        port: u16,
    ) -> Result<GuestStream, WorkerError> {
        let stream = self
            .runtime
            .connect_in_guest(&id.to_string(), host, port)
            .await?;
        Ok(Box::new(stream))
    }
}

/// Aborts its task when dropped (the exec's consumer went away).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Feed `input` to the process, then EOF. A failing input kills the process
/// and is reported through `fail`; a process that stops reading ends the
/// pump quietly (its exit status says why).
async fn pump_stdin(
    mut writer: crate::agent::StdinWriter,
    mut input: ByteStream,
    fail: tokio::sync::mpsc::Sender<String>,
) {
    use futures::StreamExt as _;
    while let Some(chunk) = input.next().await {
        match chunk {
            Ok(data) => {
                if writer.write(data).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = writer.abort().await;
                let _ = fail
                    .send(format!("reading the input for the guest failed: {e}"))
                    .await;
                return;
            }
        }
    }
    let _ = writer.finish().await;
}

/// Move a terminal's input into the guest, in order; ends when the session
/// is dropped or the guest stops taking input (the process exited).
async fn pump_pty_input(
    mut writer: crate::agent::StdinWriter,
    control: crate::agent::StreamControl,
    mut inputs: tokio::sync::mpsc::Receiver<PtyInput>,
) {
    while let Some(input) = inputs.recv().await {
        let sent = match input {
            PtyInput::Data(data) => writer.write(data).await,
            PtyInput::Resize { cols, rows } => control.resize(cols, rows).await,
            PtyInput::Signal(signal) => control.signal(signal).await,
        };
        match sent {
            Ok(()) => {}
            // A size out of range changes nothing; the terminal goes on.
            Err(crate::Error::InvalidExec(e)) => {
                tracing::debug!(error = %e, "terminal request refused")
            }
            Err(e) => {
                tracing::debug!(error = %e, "terminal input stopped");
                return;
            }
        }
    }
}
