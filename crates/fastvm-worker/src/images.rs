//! Guest artifacts, built by the project from Debian packages, cached
//! content-addressed in the data dir.
//!
//! ```text
//!  <data>/images/
//!    blobs/<sha256>            immutable artifacts, named by their content hash
//!    refs/<recipe-key>.ref     recipe -> blob hash (kernel, modules, rootfs, initrd)
//!    work/                     scratch space of builds in progress
//! ```
//!
//! * kernel: `apt-get download` of the package `linux-image-cloud-amd64`
//!   depends on; its vmlinuz, plus only the modules we need (virtio
//!   transport, block, console, net, rng and their dependencies, read from
//!   each module's `.modinfo`).
//! * initramfs: the agent as `/init`, the modules and `modules.order`.
//! * rootfs: Debian bookworm by `mmdebstrap` (minbase + [`ROOTFS_PACKAGES`]),
//!   made into ext4 by `mkfs.ext4 -d` (no loop mounts). VMs boot from
//!   copy-on-write qcow2 overlays of it; the agent grows the filesystem to
//!   the VM's disk size at boot.
//! * builder rootfs (Dockerfile imports only, built on their first use):
//!   the same bookworm minbase plus [`BUILDER_PACKAGES`] (buildah, unzip),
//!   with buildah set to the `vfs` storage driver and `chroot` isolation.
//!   It boots with the same kernel and initramfs; nothing of it runs on
//!   the host.
//!
//! A build runs once per recipe; concurrent callers in one process wait for
//! it, other processes are kept out by a lock file.

use crate::error::{Error, IoContext, Result};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Bump when the rootfs recipe changes in a way the package list does not show.
const ROOTFS_RECIPE_VERSION: u32 = 1;
pub const DEBIAN_SUITE: &str = "bookworm";
pub const ROOTFS_PACKAGES: &[&str] = &[
    "bash",
    "coreutils",
    "tar",
    "gzip",
    "curl",
    "ca-certificates",
    "python3",
    "iproute2",
    "procps",
    "e2fsprogs",
    "iputils-ping",
    "netbase",
    // /usr/lib/openssh/sftp-server: the SSH gateway's `sftp` subsystem (and scp).
    "openssh-sftp-server",
];
/// Packages of the builder rootfs (Dockerfile imports), beside minbase.
pub const BUILDER_PACKAGES: &[&str] = &[
    "buildah",
    "unzip",
    "ca-certificates",
    "e2fsprogs",
    "netbase",
];
/// Bump when the builder recipe changes in a way the package list does not show.
const BUILDER_RECIPE_VERSION: u32 = 1;
pub const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
/// Modules the agent loads; their dependencies are added automatically.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "virtio-rng",
    // Volumes: the worker serves them over NFSv3 (crate::volumes); nfsv3
    // brings nfs, sunrpc, lockd, grace, fscache and netfs.
    "nfsv3",
];

/// One progress line of a build ("[rootfs] ...").
pub type Progress = Arc<dyn Fn(&str) + Send + Sync>;

pub fn log_progress() -> Progress {
    Arc::new(|line: &str| tracing::info!(target: "fastvm::images", "{line}"))
}

/// The three files a VM boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
    /// Hash over the three: changes whenever any of them changes.
    pub id: String,
}

pub struct ImageStore {
    root: PathBuf,
    mirror: String,
    agent_binary: PathBuf,
    building: tokio::sync::Mutex<()>,
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).ctx(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).ctx(|| format!("hash {}", path.display()))?;
    Ok(hex::encode(h.finalize()))
}

async fn run(progress: &Progress, tag: &str, cmd: &mut tokio::process::Command) -> Result<String> {
    let shown = format!("{:?}", cmd.as_std());
    progress(&format!("[{tag}] running {shown}"));
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        // Its own process group: a timeout kills what it spawned too.
        .process_group(0);
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    let budget = crate::timeouts::build_tool_budget(&program);
    let mut child = cmd.spawn().ctx(|| format!("start {shown}"))?;
    let pid = child.id();
    let stderr = child.stderr.take();
    let tag2 = tag.to_owned();
    let p2 = progress.clone();
    let err_task = tokio::spawn(async move {
        let mut tail = Vec::new();
        if let Some(stderr) = stderr {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                p2(&format!("[{tag2}] {line}"));
                tail.push(line);
                if tail.len() > 20 {
                    tail.remove(0);
                }
            }
        }
        tail.join("\n")
    });
    let out = match tokio::time::timeout(budget, child.wait_with_output()).await {
        Ok(out) => out.ctx(|| format!("wait {shown}"))?,
        Err(_) => {
            crate::timeouts::kill_group(pid);
            return Err(Error::Timeout {
                what: format!("{program} (building the guest image)"),
                after: budget,
            });
        }
    };
    let tail = err_task.await.unwrap_or_default();
    if !out.status.success() {
        return Err(Error::ImageBuild(format!(
            "{shown} failed ({}): {tail}",
            out.status
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `depends=` of a kernel module, from its `.modinfo` ELF section.
pub fn module_depends(ko: &[u8]) -> Result<Vec<String>> {
    use object::{Object, ObjectSection};
    let file =
        object::File::parse(ko).map_err(|e| Error::ImageBuild(format!("bad module ELF: {e}")))?;
    let section = file
        .section_by_name(".modinfo")
        .ok_or_else(|| Error::ImageBuild("module without .modinfo".into()))?;
    let data = section
        .data()
        .map_err(|e| Error::ImageBuild(format!("bad .modinfo: {e}")))?;
    for entry in data.split(|b| *b == 0) {
        if let Some(deps) = entry.strip_prefix(b"depends=") {
            let deps = String::from_utf8_lossy(deps);
            return Ok(deps
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_owned)
                .collect());
        }
    }
    Ok(Vec::new())
}

/// Module names use `_` and `-` interchangeably.
fn module_key(name: &str) -> String {
    name.replace('-', "_")
}

/// Order `wanted` and their dependencies so that every module comes after
/// what it depends on. `index` maps module key -> path of its `.ko`.
pub fn resolve_modules(index: &BTreeMap<String, PathBuf>, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    fn visit(
        key: &str,
        index: &BTreeMap<String, PathBuf>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<PathBuf>,
        depth: usize,
    ) -> Result<()> {
        if depth > 32 {
            return Err(Error::ImageBuild(format!(
                "module dependency loop at {key}"
            )));
        }
        if seen.contains(key) {
            return Ok(());
        }
        let path = index
            .get(key)
            .ok_or_else(|| Error::ImageBuild(format!("kernel module {key} not found")))?;
        let data = std::fs::read(path).ctx(|| format!("read {}", path.display()))?;
        for dep in module_depends(&data)? {
            visit(&module_key(&dep), index, seen, out, depth + 1)?;
        }
        seen.insert(key.to_owned());
        out.push(path.clone());
        Ok(())
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for w in wanted {
        visit(&module_key(w), index, &mut seen, &mut out, 0)?;
    }
    Ok(out)
}

/// A minimal `newc` cpio archive writer (the initramfs format).
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Default for Cpio {
    fn default() -> Self {
        Cpio {
            buf: Vec::new(),
            ino: 1,
        }
    }
}

impl Cpio {
    fn header(&mut self, name: &str, mode: u32, size: usize, rdev: (u32, u32)) {
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            size as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
    pub fn dir(&mut self, name: &str) {
        self.header(name, 0o040755, 0, (0, 0));
    }
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.header(name, 0o100000 | mode, data.len(), (0, 0));
        self.buf.extend_from_slice(data);
        self.pad();
    }
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.header(name, 0o020600, 0, (major, minor));
    }
    pub fn finish(mut self) -> Vec<u8> {
        self.header("TRAILER!!!", 0, 0, (0, 0));
        while !self.buf.len().is_multiple_of(512) {
            self.buf.push(0);
        }
        self.buf
    }
}

impl ImageStore {
    /// A store rooted at `root` (usually `<data_dir>/images`).
    pub fn new(root: &Path, mirror: &str, agent_binary: PathBuf) -> Result<ImageStore> {
        let root = root.to_path_buf();
        for d in ["blobs", "refs", "work"] {
            std::fs::create_dir_all(root.join(d))
                .ctx(|| format!("create {}", root.join(d).display()))?;
        }
        Ok(ImageStore {
            root,
            mirror: mirror.to_owned(),
            agent_binary,
            building: tokio::sync::Mutex::new(()),
        })
    }

    fn blob(&self, hash: &str) -> PathBuf {
        self.root.join("blobs").join(hash)
    }

    fn ref_path(&self, key: &str) -> PathBuf {
        self.root.join("refs").join(format!("{key}.ref"))
    }

    fn lookup(&self, key: &str) -> Option<PathBuf> {
        let hash = std::fs::read_to_string(self.ref_path(key)).ok()?;
        let blob = self.blob(hash.trim());
        blob.exists().then_some(blob)
    }

    /// Move a finished file into the blob store and point `key` at it.
    fn commit(&self, key: &str, file: &Path) -> Result<PathBuf> {
        let hash = sha256_file(file)?;
        let blob = self.blob(&hash);
        std::fs::rename(file, &blob).ctx(|| format!("store {}", blob.display()))?;
        let tmp_ref = self.root.join("work").join(format!("{key}.ref.tmp"));
        std::fs::write(&tmp_ref, &hash).ctx(|| "write ref".into())?;
        std::fs::rename(&tmp_ref, self.ref_path(key)).ctx(|| "commit ref".into())?;
        Ok(blob)
    }

    fn work_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self
            .root
            .join("work")
            .join(format!("{name}-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).ctx(|| format!("clean {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
        Ok(dir)
    }

    /// Hold the cross-process build lock for the lifetime of the returned file.
    async fn lock(&self) -> Result<std::fs::File> {
        let path = self.root.join("build.lock");
        tokio::task::spawn_blocking(move || flock(&path))
            .await
            .map_err(|e| Error::ImageBuild(format!("lock task failed: {e}")))?
    }

    /// The default guest image, built on first use.
    pub async fn ensure_default(&self, progress: &Progress) -> Result<GuestImage> {
        let _guard = self.building.lock().await;
        let _file_lock = self.lock().await?;
        let (kernel, modules) = self.ensure_kernel(progress).await?;
        let rootfs = self.ensure_rootfs(progress).await?;
        let initrd = self.ensure_initrd(&modules, progress)?;
        let name = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let id =
            sha256_hex(format!("{}:{}:{}", name(&kernel), name(&initrd), name(&rootfs)).as_bytes())
                [..16]
                .to_owned();
        Ok(GuestImage {
            kernel,
            initrd,
            rootfs,
            id,
        })
    }

    /// (vmlinuz, directory of the selected modules with `modules.order`).
    async fn ensure_kernel(&self, progress: &Progress) -> Result<(PathBuf, PathBuf)> {
        let deps = run(
            progress,
            "kernel",
            tokio::process::Command::new("apt-cache").args(["depends", KERNEL_METAPACKAGE]),
        )
        .await?;
        let package = deps
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("Depends: ")
                    .filter(|p| p.starts_with("linux-image-"))
            })
            .ok_or_else(|| {
                Error::ImageBuild(format!(
                    "cannot resolve {KERNEL_METAPACKAGE}; run `apt-get update`"
                ))
            })?
            .to_owned();
        let key = format!("kernel-{package}-v1");
        // The selection is part of the key: a new module list builds a new set.
        let selection = hex::encode(&Sha256::digest(GUEST_MODULES.join(",").as_bytes())[..6]);
        let mods_key = format!("{key}-modules-{selection}");
        if let (Some(k), Some(m)) = (self.lookup(&key), self.lookup(&mods_key)) {
            let dir = m.with_extension("d");
            if dir.join("modules.order").exists() {
                return Ok((k, dir));
            }
        }
        progress(&format!("[kernel] fetching {package}"));
        let work = self.work_dir("kernel")?;
        run(
            progress,
            "kernel",
            tokio::process::Command::new("apt-get")
                .arg("download")
                .arg(&package)
                .current_dir(&work),
        )
        .await?;
        let deb = std::fs::read_dir(&work)
            .ctx(|| "list kernel download".into())?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| Error::ImageBuild("apt-get download produced no .deb".into()))?;
        let tree = work.join("x");
        run(
            progress,
            "kernel",
            tokio::process::Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(&tree),
        )
        .await?;
        let boot = tree.join("boot");
        let vmlinuz = std::fs::read_dir(&boot)
            .ctx(|| "list /boot of the kernel package".into())?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .ok_or_else(|| Error::ImageBuild("no vmlinuz in the kernel package".into()))?;
        let mut index = BTreeMap::new();
        index_modules(&tree.join("lib/modules"), &mut index)?;
        let selected = resolve_modules(&index, GUEST_MODULES)?;
        // The module set is stored as a tar-free directory next to a marker blob.
        let mut order = String::new();
        let mut digest = Sha256::new();
        let staged = work.join("modules");
        std::fs::create_dir_all(&staged).ctx(|| "stage modules".into())?;
        for m in &selected {
            let name = m
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let data = std::fs::read(m).ctx(|| format!("read {}", m.display()))?;
            digest.update(name.as_bytes());
            digest.update(&data);
            std::fs::write(staged.join(&name), &data).ctx(|| "stage module".into())?;
            order.push_str(&name);
            order.push('\n');
        }
        std::fs::write(staged.join("modules.order"), &order)
            .ctx(|| "write modules.order".into())?;
        let marker = work.join("modules.marker");
        std::fs::write(
            &marker,
            format!("{}\n{order}", hex::encode(digest.finalize())),
        )
        .ctx(|| "write marker".into())?;
        let kernel = self.commit(&key, &vmlinuz)?;
        let marker_blob = self.commit(&mods_key, &marker)?;
        let dir = marker_blob.with_extension("d");
        if !dir.exists() {
            std::fs::rename(&staged, &dir).ctx(|| "store modules".into())?;
        }
        let _ = std::fs::remove_dir_all(&work);
        progress(&format!(
            "[kernel] ready: {} + {} modules",
            kernel.display(),
            selected.len()
        ));
        Ok((kernel, dir))
    }

    fn ensure_initrd(&self, modules: &Path, progress: &Progress) -> Result<PathBuf> {
        let agent = std::fs::read(&self.agent_binary)
            .ctx(|| format!("read agent {}", self.agent_binary.display()))?;
        let order = std::fs::read_to_string(modules.join("modules.order"))
            .ctx(|| "read modules.order".into())?;
        let mut cpio = Cpio::default();
        cpio.dir("dev");
        cpio.char_dev("dev/console", 5, 1);
        cpio.dir("fastvm");
        cpio.file("init", 0o755, &agent);
        cpio.file("fastvm/modules.order", 0o644, order.as_bytes());
        for name in order.lines().filter(|l| !l.is_empty()) {
            let data = std::fs::read(modules.join(name)).ctx(|| format!("read module {name}"))?;
            cpio.file(&format!("fastvm/{name}"), 0o644, &data);
        }
        let bytes = cpio.finish();
        let key = format!("initrd-{}", &sha256_hex(&bytes)[..32]);
        if let Some(p) = self.lookup(&key) {
            return Ok(p);
        }
        let tmp = self.work_dir("initrd")?.join("initrd.cpio");
        std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes))
            .ctx(|| "write initrd".into())?;
        let path = self.commit(&key, &tmp)?;
        progress(&format!(
            "[initrd] ready: {} ({} KiB)",
            path.display(),
            bytes.len() / 1024
        ));
        Ok(path)
    }

    async fn ensure_rootfs(&self, progress: &Progress) -> Result<PathBuf> {
        self.ensure_tree_image(
            "rootfs",
            ROOTFS_RECIPE_VERSION,
            ROOTFS_PACKAGES,
            customize_rootfs,
            progress,
        )
        .await
    }

    /// The builder rootfs of Dockerfile imports (ext4, raw), built on first
    /// use. Callers boot it with the default image's kernel and initramfs.
    pub async fn ensure_builder(&self, progress: &Progress) -> Result<PathBuf> {
        let _guard = self.building.lock().await;
        let _file_lock = self.lock().await?;
        self.ensure_tree_image(
            "builder",
            BUILDER_RECIPE_VERSION,
            BUILDER_PACKAGES,
            customize_builder,
            progress,
        )
        .await
    }

    /// `mmdebstrap` minbase + `packages`, edited by `customize`, as ext4.
    async fn ensure_tree_image(
        &self,
        tag: &str,
        version: u32,
        packages: &[&str],
        customize: fn(&Path) -> Result<()>,
        progress: &Progress,
    ) -> Result<PathBuf> {
        let recipe = format!(
            "{version}:{DEBIAN_SUITE}:{}:{}",
            self.mirror,
            packages.join(",")
        );
        // The default rootfs keeps its historic recipe key (no tag in it).
        let recipe = if tag == "rootfs" {
            recipe
        } else {
            format!("{tag}:{recipe}")
        };
        let key = format!("{tag}-{}", &sha256_hex(recipe.as_bytes())[..32]);
        if let Some(p) = self.lookup(&key) {
            return Ok(p);
        }
        progress(&format!(
            "[{tag}] building Debian {DEBIAN_SUITE} (first use; takes a minute)"
        ));
        let work = self.work_dir(tag)?;
        let tree = work.join("tree");
        run(
            progress,
            tag,
            tokio::process::Command::new("mmdebstrap")
                .arg("--variant=minbase")
                .arg(format!("--include={}", packages.join(",")))
                .arg("--mode=root")
                .arg(DEBIAN_SUITE)
                .arg(&tree)
                .arg(&self.mirror),
        )
        .await?;
        customize(&tree)?;
        let used = run(
            progress,
            tag,
            tokio::process::Command::new("du").args(["-sb"]).arg(&tree),
        )
        .await?;
        let used: u64 = used
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1 << 30);
        let size_mib = ((used * 5 / 4) >> 20) + 256;
        let image = work.join(format!("{tag}.ext4"));
        run(
            progress,
            tag,
            tokio::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "fastvm-root", "-d"])
                .arg(&tree)
                .arg(&image)
                .arg(format!("{size_mib}M")),
        )
        .await?;
        let path = self.commit(&key, &image)?;
        let _ = std::fs::remove_dir_all(&work);
        progress(&format!(
            "[{tag}] ready: {} ({size_mib} MiB)",
            path.display()
        ));
        Ok(path)
    }
}

fn flock(path: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::create(path).ctx(|| format!("open {}", path.display()))?;
    // SAFETY: flock on a valid fd we own.
    let ret = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    if ret != 0 {
        return Err(Error::Io {
            context: format!("lock {}", path.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(f)
}

fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)
        .ctx(|| format!("list {}", dir.display()))?
        .flatten()
    {
        let path = entry.path();
        if path.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        {
            index.insert(module_key(stem), path);
        }
    }
    Ok(())
}

/// Small edits of the rootfs before it is frozen into ext4.
fn customize_rootfs(tree: &Path) -> Result<()> {
    let w = |rel: &str, content: &str| {
        std::fs::write(tree.join(rel), content).ctx(|| format!("write /{rel}"))
    };
    w("etc/hostname", "fastvm\n")?;
    w(
        "etc/hosts",
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    )?;
    // Each VM gets its own identity; an empty machine-id is regenerated by tools that need one.
    w("etc/machine-id", "")?;
    std::fs::create_dir_all(tree.join("root")).ctx(|| "create /root".into())?;
    Ok(())
}

/// The builder's buildah configuration: `vfs` storage (no overlay module in
/// the guest kernel, no fuse), short names resolved against docker.io (the
/// worker loads every `FROM` image into local storage under its full name
/// before the build; buildah never pulls).
fn customize_builder(tree: &Path) -> Result<()> {
    customize_rootfs(tree)?;
    let w = |rel: &str, content: &str| {
        if let Some(parent) = tree.join(rel).parent() {
            std::fs::create_dir_all(parent).ctx(|| format!("create the parent of /{rel}"))?;
        }
        std::fs::write(tree.join(rel), content).ctx(|| format!("write /{rel}"))
    };
    w(
        "etc/containers/storage.conf",
        "[storage]\ndriver = \"vfs\"\nrunroot = \"/run/containers/storage\"\ngraphroot = \"/var/lib/containers/storage\"\n",
    )?;
    w(
        "etc/containers/registries.conf",
        "unqualified-search-registries = [\"docker.io\"]\nshort-name-mode = \"permissive\"\n",
    )?;
    std::fs::create_dir_all(tree.join("build")).ctx(|| "create /build".into())?;
    Ok(())
}

/// Where the agent binary is: `FASTVM_AGENT_BIN`, next to the running
/// executable, or in the cargo target dir (musl build) above it.
pub fn find_agent_binary() -> Result<PathBuf> {
    let mut looked = Vec::new();
    if let Some(p) = std::env::var_os("FASTVM_AGENT_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        looked.push(p);
    }
    let exe = std::env::current_exe().ctx(|| "current exe".into())?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        for candidate in [
            d.join("fastvm-agent"),
            d.join("x86_64-unknown-linux-musl/release/fastvm-agent"),
            d.join("target/x86_64-unknown-linux-musl/release/fastvm-agent"),
        ] {
            // A host build of the agent (e.g. `target/debug/fastvm-agent` from
            // `cargo build --workspace`) needs a dynamic loader the initramfs
            // does not have: the kernel then fails /init with ENOENT.
            if candidate.is_file() && is_static_elf(&candidate) {
                return Ok(candidate);
            }
            looked.push(candidate);
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    Err(Error::AgentBinaryMissing { looked })
}

/// Whether `path` is an x86-64 ELF executable without a program interpreter
/// (`PT_INTERP`), i.e. runnable as PID 1 from the initramfs.
fn is_static_elf(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        data.get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    // ELF magic, 64-bit, little endian.
    if data.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = phoff.saturating_add(i.saturating_mul(usize::from(phentsize)));
        u32_at(at).is_some_and(|ty| ty != PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_static_executables_qualify_as_the_agent() {
        // The test binary itself is a dynamically linked host executable.
        let exe = std::env::current_exe().expect("exe");
        assert!(!is_static_elf(&exe));
        assert!(!is_static_elf(Path::new("/etc/hostname")));
        let musl = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/x86_64-unknown-linux-musl/release/fastvm-agent");
        if musl.is_file() {
            assert!(is_static_elf(&musl), "{}", musl.display());
        }
    }

    #[test]
    fn cpio_layout() {
        let mut c = Cpio::default();
        c.dir("fastvm");
        c.file("init", 0o755, b"abc");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 512, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("fastvm\0"));
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!"));
        // init: mode 0100755, size 3
        assert!(text.contains(&format!("{:08x}{:08x}", 0o100755, 0)));
    }

    #[test]
    fn module_keys_normalise() {
        assert_eq!(module_key("virtio-rng"), "virtio_rng");
    }

    #[test]
    fn resolve_reports_missing_module() {
        let err = resolve_modules(&BTreeMap::new(), &["virtio_blk"]).expect_err("missing");
        assert!(err.to_string().contains("virtio_blk"));
    }
}
