//! Dockerfile imports of the runtime: a Dockerfile and its build context
//! become a user snapshot. The build runs in a builder VM, never on the host.
//!
//! ```text
//!  builder        boot builder VM builder_vm_id(<import id>) from the builder rootfs (buildah,
//!                 vfs storage, chroot isolation; built once per worker)
//!  fetch_context  the context ZIP streams into the VM (agent channel),
//!                 unzip there; the Dockerfile is read back (<= 1 MiB)
//!  pull           the images its FROM / --from= name are pulled on the host
//!                 (oci::registry: the import's credentials, insecure and
//!                 loopback registries work), sent in as OCI archives and
//!                 loaded with `buildah pull` under their full names
//!  build          buildah bud --pull-never [--build-arg ...] [--target T]
//!                 (RUN steps have the VM's network); output is the log;
//!                 buildah push oci-archive:/build/out.tar
//!  (out)          the archive streams back into <data>/imports/<id>-build,
//!                 its blobs into the blob cache (oci::archive: verified),
//!                 the builder VM is deleted
//!  export, saving, warming: as for an image import (imports.rs)
//! ```
//!
//! The host never unpacks anything of the context, and reads of the build
//! result are digest-checked and capped (the Dockerfile is untrusted, and so
//! is the VM that ran it). Dropping the future (a cancelled import) kills
//! the build (its exec), deletes the builder VM and removes the scratch
//! directory.

use super::imports::{check_import_id, import_err, BuildVm, Progress, Scratch, Target};
use super::{CreateVm, GuestDefaults, RootDisk, Runtime};
use crate::error::{Error, IoContext, Result};
use crate::oci::registry::{PullRequest, Puller};
use crate::oci::{archive, dockerfile};
use fastvm_worker_api::{
    ByteStream, DockerfileImport, ExecEvent, ExecRequest, ImportSink, ImportedImage,
};
use futures::StreamExt as _;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// Budget of the whole `buildah bud`.
const BUILD_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// Budget of one step of moving files in or out and of loading one image.
const STEP_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// Largest Dockerfile read back from the context.
const MAX_DOCKERFILE: usize = 1 << 20;
/// Longest build log line kept (longer ones are cut).
const MAX_LINE: usize = 4096;
/// Name of the build result in the builder's storage.
const RESULT: &str = "localhost/fastvm-build:latest";

impl Runtime {
    /// See [`fastvm_worker_api::Worker::build_dockerfile`].
    pub async fn build_dockerfile(
        self: &Arc<Self>,
        job: &DockerfileImport,
        context: ByteStream,
        sink: ImportSink,
    ) -> Result<ImportedImage> {
        let result = {
            let _cache = self.layer_cache.read().await;
            self.build_dockerfile_now(job, context, sink).await
        };
        self.prune_layer_cache();
        result
    }

    async fn build_dockerfile_now(
        self: &Arc<Self>,
        job: &DockerfileImport,
        context: ByteStream,
        sink: ImportSink,
    ) -> Result<ImportedImage> {
        let progress = Progress { sink };
        check_import_id(&job.import_id)?;
        let dockerfile_path = check_dockerfile_path(&job.dockerfile_path)?;
        let _slot = self.import_slot(&progress).await?;
        self.image().await?;

        // preparing: the builder VM
        progress.event("builder", "started", Some("starting the builder VM".into()));
        let t0 = std::time::Instant::now();
        let rootfs = match self.builder_rootfs().await {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("the builder image could not be built: {e}");
                progress.event("builder", "failed", Some(msg.clone()));
                return Err(import_err(msg));
            }
        };
        let builder_id = fastvm_worker_api::builder_vm_id(&job.import_id)
            .ok_or_else(|| import_err("the import id is not a UUID"))?
            .to_string();
        let builder = BuildVm {
            runtime: self.clone(),
            id: builder_id.clone(),
        };
        let free = crate::disk::free_bytes(&self.cfg.data_dir);
        let disk_gib = match builder_disk_gib(job.disk_gib, free) {
            Ok(g) => g,
            Err(msg) => {
                progress.event("builder", "failed", Some(msg.clone()));
                return Err(import_err(msg));
            }
        };
        let create = CreateVm {
            id: Some(builder_id.clone()),
            machine: job.machine.name.to_owned(),
            disk_gib: Some(disk_gib),
            ..Default::default()
        };
        if let Err(e) = self
            .boot_fresh_with(
                create,
                None,
                RootDisk::Raw(&rootfs),
                &GuestDefaults::default(),
            )
            .await
        {
            let msg = format!("the builder VM did not start: {e}");
            progress.event("builder", "failed", Some(msg.clone()));
            return Err(import_err(msg));
        }
        progress.event(
            "builder",
            "completed",
            Some(format!("builder VM up in {} ms", t0.elapsed().as_millis())),
        );
        let vm = builder_id.as_str();

        // fetch_context: the ZIP into the VM, unzipped there
        progress.event("fetch_context", "started", None);
        let fetched = async {
            self.guest_put(vm, "/build/context.zip", context, job.context_bytes)
                .await?;
            let unzip = self
                .guest_sh(
                    vm,
                    "mkdir -p /build/ctx && cd /build/ctx && unzip -q -o /build/context.zip && rm /build/context.zip",
                    &[],
                )
                .await?;
            if unzip.0 != 0 {
                return Err(import_err(format!(
                    "the build context is not a usable ZIP archive: {}",
                    last_line(&unzip.2)
                )));
            }
            let df = self
                .guest_sh(
                    vm,
                    "f=/build/ctx/\"$1\"; test -f \"$f\" || { echo missing; exit 3; }; head -c $2 \"$f\"",
                    &[dockerfile_path, &(MAX_DOCKERFILE + 1).to_string()],
                )
                .await?;
            if df.0 == 3 {
                return Err(import_err(format!(
                    "the build context has no file {dockerfile_path} (dockerfilePath)"
                )));
            }
            if df.0 != 0 {
                return Err(import_err(format!(
                    "reading the Dockerfile failed: {}",
                    last_line(&df.2)
                )));
            }
            if df.1.len() > MAX_DOCKERFILE {
                return Err(import_err(format!(
                    "the Dockerfile is larger than {MAX_DOCKERFILE} bytes"
                )));
            }
            Ok(String::from_utf8_lossy(&df.1).into_owned())
        }
        .await;
        let text = match fetched {
            Ok(t) => t,
            Err(e) => {
                progress.event("fetch_context", "failed", Some(user_msg(&e)));
                return Err(e);
            }
        };
        progress.event(
            "fetch_context",
            "completed",
            Some(format!("{} bytes", job.context_bytes)),
        );

        // pull: FROM images on the host, loaded into the builder
        let work = self
            .cfg
            .data_dir
            .join("imports")
            .join(format!("{}-build", job.import_id));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).ctx(|| "create the build's scratch directory".into())?;
        let scratch = Scratch(work.clone(), Arc::new(AtomicBool::new(false)));
        progress.event("pull", "started", None);
        match self.load_bases(vm, job, &text, &work, &progress).await {
            Ok(n) => progress.event(
                "pull",
                "completed",
                Some(format!("{n} base image(s) loaded into the builder")),
            ),
            Err(e) => {
                progress.event("pull", "failed", Some(user_msg(&e)));
                return Err(e);
            }
        }

        // build
        progress.event("build", "started", None);
        let t1 = std::time::Instant::now();
        let mut argv: Vec<String> = [
            "buildah",
            "bud",
            "--isolation",
            "chroot",
            "--pull-never",
            "--layers=false",
            "--format",
            "oci",
            "-f",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.push(format!("/build/ctx/{dockerfile_path}"));
        for (k, v) in &job.build_args {
            argv.push("--build-arg".into());
            argv.push(format!("{k}={v}"));
        }
        if let Some(t) = &job.target {
            argv.push("--target".into());
            argv.push(t.clone());
        }
        argv.extend(["-t".into(), RESULT.into(), "/build/ctx".into()]);
        let built = self
            .guest_logged(vm, argv, BUILD_TIMEOUT, &progress)
            .await
            .and_then(|(code, last)| {
                if code == 0 {
                    Ok(())
                } else {
                    Err(import_err(format!(
                        "the build failed (exit {code}): {last}"
                    )))
                }
            });
        if let Err(e) = built {
            progress.event("build", "failed", Some(user_msg(&e)));
            return Err(e);
        }
        let pushed = self
            .guest_logged(
                vm,
                [
                    "buildah",
                    "push",
                    "--quiet",
                    "--disable-compression",
                    "--format",
                    "oci",
                    RESULT,
                    "oci-archive:/build/out.tar",
                ]
                .map(String::from)
                .to_vec(),
                STEP_TIMEOUT,
                &progress,
            )
            .await
            .and_then(|(code, last)| {
                if code == 0 {
                    Ok(())
                } else {
                    Err(import_err(format!("saving the built image failed: {last}")))
                }
            });
        if let Err(e) = pushed {
            progress.event("build", "failed", Some(user_msg(&e)));
            return Err(e);
        }
        progress.event(
            "build",
            "completed",
            Some(format!("built in {} ms", t1.elapsed().as_millis())),
        );

        // the result: out of the VM, into the blob cache
        let out = work.join("out.tar");
        let cap = u64::from(job.disk_gib) << 30;
        let read = async {
            self.guest_get(vm, "/build/out.tar", &out, cap).await?;
            let cache = self.cfg.data_dir.join("oci");
            let out2 = out.clone();
            tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&out2)
                    .map_err(|e| format!("cannot open the build result: {e}"))?;
                archive::read_archive(&cache, std::io::BufReader::with_capacity(1 << 20, f), cap)
            })
            .await
            .map_err(|e| import_err(format!("reading the build result stopped: {e}")))?
            .map_err(import_err)
        }
        .await;
        let image = match read {
            Ok(r) => r.image,
            Err(e) => {
                progress.event("build", "failed", Some(user_msg(&e)));
                return Err(e);
            }
        };
        progress.log(format!(
            "built image {}: {} layers",
            image.manifest_digest,
            image.layers.len()
        ));
        drop(builder);
        drop(scratch);

        let target = Target {
            import_id: &job.import_id,
            snapshot_id: job.snapshot.to_string(),
            machine: job.machine.name,
            disk_gib: job.disk_gib,
        };
        self.snapshot_of(&target, image, &progress).await
    }

    /// Pull what `dockerfile` names and load it into the builder's storage
    /// under the names the Dockerfile resolves to.
    async fn load_bases(
        &self,
        vm: &str,
        job: &DockerfileImport,
        dockerfile: &str,
        work: &Path,
        progress: &Progress,
    ) -> Result<usize> {
        let images = dockerfile::base_images(dockerfile, &job.build_args).map_err(import_err)?;
        let puller = Puller::new(
            self.cfg.data_dir.join("oci"),
            self.cfg.insecure_registries.clone(),
        );
        for (i, image) in images.iter().enumerate() {
            let creds = credentials_for(image, job);
            let req = PullRequest {
                image,
                platform: None,
                username: creds.map(|c| c.0),
                password: creds.map(|c| c.1),
            };
            let log = |line: String| progress.log(line);
            let pulled = puller
                .pull(&req, &log)
                .await
                .map_err(|e| import_err(e.to_string()))?;
            let tar = work.join(format!("base-{i}.tar"));
            let (pulled2, tar2) = (pulled.clone(), tar.clone());
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let f = std::fs::File::create(&tar2)?;
                archive::write_archive(&pulled2, std::io::BufWriter::with_capacity(1 << 20, f))
            })
            .await
            .map_err(|e| import_err(format!("writing {image} stopped: {e}")))?
            .map_err(|e| import_err(format!("writing {image} for the builder failed: {e}")))?;
            let size = std::fs::metadata(&tar)
                .ctx(|| "stat an image archive".into())?
                .len();
            let file = tokio::fs::File::open(&tar)
                .await
                .ctx(|| "open an image archive".into())?;
            let body: ByteStream =
                Box::pin(tokio_util::io::ReaderStream::with_capacity(file, 256 << 10));
            let dest = format!("/build/base-{i}.tar");
            self.guest_put(vm, &dest, body, size).await?;
            let _ = std::fs::remove_file(&tar);
            // Loaded under the name buildah resolves the Dockerfile's
            // reference to (`busybox` -> docker.io/library/busybox:latest).
            let loaded = self
                .guest_sh(
                    vm,
                    "set -e; id=$(buildah pull --quiet \"oci-archive:$1\"); buildah tag \"$id\" \"$2\"; rm -f \"$1\"",
                    &[&dest, &pulled.name],
                )
                .await?;
            if loaded.0 != 0 {
                return Err(import_err(format!(
                    "loading {image} into the builder failed: {}",
                    last_line(&loaded.2)
                )));
            }
            progress.log(format!(
                "{image}: {} ({} layers) loaded as {}",
                pulled.manifest_digest,
                pulled.layers.len(),
                pulled.name
            ));
        }
        Ok(images.len())
    }

    /// Write `body` (at most `cap` bytes) to `path` in the guest.
    async fn guest_put(&self, vm: &str, path: &str, mut body: ByteStream, cap: u64) -> Result<()> {
        let req = ExecRequest {
            timeout: Some(STEP_TIMEOUT),
            ..ExecRequest::argv(["sh", "-c", "cat > \"$1\"", "sh", path])
        }
        .with_stdin();
        let mut stream = self.exec(vm, &req).await?;
        let mut writer = stream
            .take_stdin()
            .ok_or_else(|| import_err("the builder's exec has no stdin"))?;
        let mut sent = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| import_err(format!("the upload was cut short: {e}")))?;
            sent += chunk.len() as u64;
            if sent > cap {
                return Err(import_err(format!(
                    "the upload is larger than its announced {cap} bytes"
                )));
            }
            writer.write(chunk).await?;
        }
        writer.finish().await?;
        let mut stderr = Vec::new();
        while let Some(ev) = stream.next().await {
            match ev? {
                ExecEvent::Stderr(d) if stderr.len() < 4096 => stderr.extend_from_slice(&d),
                ExecEvent::Exit(st) if st.code == 0 => return Ok(()),
                ExecEvent::Exit(_) => {
                    return Err(import_err(format!(
                        "writing into the builder VM failed: {}",
                        last_line(&stderr)
                    )))
                }
                _ => {}
            }
        }
        Err(import_err("the builder VM's exec ended without an exit"))
    }

    /// Copy `path` of the guest into host file `dest` (at most `cap` bytes).
    async fn guest_get(&self, vm: &str, path: &str, dest: &Path, cap: u64) -> Result<()> {
        use tokio::io::AsyncWriteExt as _;
        let req = ExecRequest {
            timeout: Some(STEP_TIMEOUT),
            ..ExecRequest::argv(["cat", "--", path])
        };
        let mut stream = self.exec(vm, &req).await?;
        let file = tokio::fs::File::create(dest)
            .await
            .ctx(|| "create the build result file".into())?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut got = 0u64;
        let mut stderr = Vec::new();
        while let Some(ev) = stream.next().await {
            match ev? {
                ExecEvent::Stdout(d) => {
                    got += d.len() as u64;
                    if got > cap {
                        return Err(import_err(format!(
                            "the built image is larger than the disk ({cap} bytes)"
                        )));
                    }
                    out.write_all(&d)
                        .await
                        .ctx(|| "write the build result".into())?;
                }
                ExecEvent::Stderr(d) if stderr.len() < 4096 => stderr.extend_from_slice(&d),
                ExecEvent::Stderr(_) => {}
                ExecEvent::Exit(st) if st.code == 0 => {
                    out.flush().await.ctx(|| "write the build result".into())?;
                    return Ok(());
                }
                ExecEvent::Exit(_) => {
                    return Err(import_err(format!(
                        "reading the build result failed: {}",
                        last_line(&stderr)
                    )))
                }
            }
        }
        Err(import_err("the builder VM's exec ended without an exit"))
    }

    /// `sh -c script sh args...`: (exit code, stdout, stderr), each output
    /// capped at 2 MiB.
    async fn guest_sh(
        &self,
        vm: &str,
        script: &str,
        args: &[&str],
    ) -> Result<(i32, Vec<u8>, Vec<u8>)> {
        let mut argv = vec!["sh".to_owned(), "-c".into(), script.into(), "sh".into()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let req = ExecRequest {
            timeout: Some(STEP_TIMEOUT),
            ..ExecRequest::argv(argv)
        };
        let out = self.exec_buffered(vm, &req, 2 << 20).await?;
        Ok((out.exit_code, out.stdout, out.stderr))
    }

    /// Run `argv`, every output line into the build log; (exit code, last
    /// non-empty line).
    async fn guest_logged(
        &self,
        vm: &str,
        argv: Vec<String>,
        timeout: Duration,
        progress: &Progress,
    ) -> Result<(i32, String)> {
        let req = ExecRequest {
            timeout: Some(timeout),
            ..ExecRequest::argv(argv)
        };
        let mut stream = self.exec(vm, &req).await?;
        let mut lines = LineSplitter::default();
        let mut last = String::new();
        let mut emit = |line: String| {
            if !line.trim().is_empty() {
                last = line.clone();
            }
            progress.log(line);
        };
        while let Some(ev) = stream.next().await {
            match ev? {
                ExecEvent::Stdout(d) | ExecEvent::Stderr(d) => lines.push(&d, &mut emit),
                ExecEvent::Exit(st) => {
                    lines.flush(&mut emit);
                    if st.timed_out {
                        return Ok((124, format!("timed out after {} s", timeout.as_secs())));
                    }
                    return Ok((st.code, last));
                }
            }
        }
        Err(import_err("the builder VM's exec ended without an exit"))
    }
}

/// The credentials of `job` when `image` is on its `registry_host`.
/// Smallest builder disk worth booting (its root file system and buildah's
/// storage of a small build).
const MIN_BUILDER_DISK_GIB: u32 = 4;

/// The builder VM's disk: three times the image's (vfs keeps a full copy
/// per layer: room for a few), 10 GiB to 1 TiB, and at most half of the
/// worker's `free` bytes (the disk is a sparse qcow2 layer that grows as the
/// build writes; a build that fills it fails with "no space left" in its
/// log instead of filling the worker's disk). An error says why when the
/// worker has too little room for any builder.
fn builder_disk_gib(disk_gib: u32, free: Option<u64>) -> std::result::Result<u32, String> {
    let want = disk_gib.saturating_mul(3).clamp(10, 1024);
    let Some(free) = free else { return Ok(want) };
    let room = u32::try_from((free / 2) >> 30).unwrap_or(u32::MAX);
    if room < MIN_BUILDER_DISK_GIB {
        return Err(format!(
            "the worker has {} MiB of free disk space: a builder needs at least {} GiB (twice that free); free space on the worker or retry later",
            free >> 20,
            MIN_BUILDER_DISK_GIB
        ));
    }
    Ok(want.min(room))
}

fn credentials_for<'a>(image: &str, job: &'a DockerfileImport) -> Option<(&'a str, &'a str)> {
    let host = job.registry_host.as_deref()?;
    let user = job.registry_username.as_deref()?;
    let reference: oci_client::Reference = image.parse().ok()?;
    let same = |h: &str| h.eq_ignore_ascii_case(host);
    (same(reference.registry()) || same(reference.resolve_registry()))
        .then(|| (user, job.registry_password.as_deref().unwrap_or("")))
}

/// A relative path without `..`, absolute parts or odd characters.
fn check_dockerfile_path(p: &str) -> Result<&str> {
    let ok = !p.is_empty()
        && p.len() <= 1024
        && !p.starts_with('/')
        && p.split('/').all(|c| !c.is_empty() && c != "..")
        && !p.chars().any(|c| c.is_control());
    if ok {
        Ok(p)
    } else {
        Err(import_err(format!(
            "dockerfilePath {p:?} must be a relative path inside the context"
        )))
    }
}

/// The message of an import error without the "import failed:" prefix.
fn user_msg(e: &Error) -> String {
    match e {
        Error::Import(m) => m.clone(),
        other => other.to_string(),
    }
}

fn last_line(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let l = s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    l.chars().take(MAX_LINE).collect()
}

/// Splits output chunks into lines (`\n` or `\r`), cutting very long ones.
#[derive(Default)]
struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    fn push(&mut self, data: &[u8], emit: &mut impl FnMut(String)) {
        for &b in data {
            if b == b'\n' || b == b'\r' {
                self.flush(emit);
            } else if self.buf.len() < MAX_LINE {
                self.buf.push(b);
            }
        }
    }
    fn flush(&mut self, emit: &mut impl FnMut(String)) {
        if !self.buf.is_empty() {
            emit(String::from_utf8_lossy(&self.buf).into_owned());
            self.buf.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_builder_disk_is_bounded_by_free_space() {
        use super::builder_disk_gib as g;
        const GIB: u64 = 1 << 30;
        // Three times the image's disk, 10 GiB at least, when there is room.
        assert_eq!(g(10, Some(500 * GIB)), Ok(30));
        assert_eq!(g(2, Some(500 * GIB)), Ok(10));
        assert_eq!(g(10, None), Ok(30));
        // At most half of the free space.
        assert_eq!(g(10, Some(41 * GIB)), Ok(20));
        assert_eq!(g(10, Some(8 * GIB)), Ok(4));
        // Too little for any builder: a message that says so.
        let e = g(10, Some(7 * GIB)).expect_err("too little room");
        assert!(e.contains("7168 MiB of free disk space"), "{e}");
    }

    use super::*;

    #[test]
    fn dockerfile_paths_stay_in_the_context() {
        for ok in ["Dockerfile", "docker/Dockerfile.prod", "a.b/c"] {
            assert!(check_dockerfile_path(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a\nb"] {
            assert!(check_dockerfile_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lines_split_on_newlines_and_carriage_returns() {
        let mut s = LineSplitter::default();
        let mut got = Vec::new();
        s.push(b"one\ntw", &mut |l| got.push(l));
        s.push(b"o\rthree", &mut |l| got.push(l));
        s.flush(&mut |l| got.push(l));
        assert_eq!(got, ["one", "two", "three"]);
    }
}
