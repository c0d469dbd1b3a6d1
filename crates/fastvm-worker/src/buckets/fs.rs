//! One bucket mount as an NFSv3 file system: the objects under the mount's
//! prefix, seen as files, and the `/`-separated key prefixes between them as
//! directories.
//!
//! ```text
//!  lookup(dir, name)   HEAD <prefix>/<dir>/<name>  -> a file
//!                      else LIST <prefix>/<dir>/<name>/ (one entry) -> a directory
//!  read                a ranged GET per NFS read (or the local staged copy)
//!  write               into a local staged copy (the object is downloaded
//!                      first unless the file was truncated to 0)
//!  commit / stable write   the staged copy is uploaded as the whole object
//!                      (multipart past 10 MiB): a file is in the bucket once the
//!                      guest closes or fsyncs it
//!  create              an empty object at once; mkdir: a local directory until a
//!                      file is written in it (buckets have no empty directories)
//!  remove / rename     DELETE / copy + DELETE (a directory: every object under it)
//! ```
//!
//! Objects are numbered in a table of this mount (numbers are never reused;
//! the handle carries the worker process's epoch, so a handle from before a
//! restart is stale, never another object). Every request to the bucket is
//! made and signed here with the mount's current credentials: the guest only
//! ever talks NFS to the worker, and a credentials rotation applies to the
//! next request.
//!
//! POSIX gaps (docs/ARCHITECTURE.md "Bucket mounts"): no symlinks, hard
//! links, permissions or owners (files 0644, directories 0755, root's);
//! writes reach the bucket at close/fsync, not before; a rename is a copy and
//! a delete, not atomic; empty directories exist only in this mount until a
//! file is written in them; names with characters object stores reserve
//! (`\ { } ^ % \` [ ] " < > ~ # | * ?`, control characters) are refused.

use crate::volumes::fs::DirListing;
use crate::volumes::handle::{bucket_handle, open_bucket_handle, VolHandle, VolumeKey};
use nfs3_server::nfs3_types::nfs3::{
    fattr3, ftype3, nfsstat3, nfstime3, sattr3, specdata3, stable_how, Nfs3Option,
};
use nfs3_server::vfs::DirEntryPlus;
use object_store::path::{Path as ObjectPath, PathPart};
use object_store::{ObjectMeta, ObjectStore, PutPayload};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

/// Number of the mount's root directory.
const ROOT: u64 = 1;
/// Upload chunk: a staged file larger than this goes up in parts.
const CHUNK: usize = 8 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    /// Path under the mount's prefix, `""` for the root.
    rel: String,
    dir: bool,
}

/// A file's local copy, written by the guest and not all uploaded yet.
#[derive(Debug)]
struct Staged {
    file: Arc<File>,
    size: u64,
    /// Changed since the last upload.
    dirty: bool,
}

#[derive(Debug, Default)]
struct State {
    nodes: HashMap<u64, Node>,
    by_rel: HashMap<String, u64>,
    next: u64,
    /// Known size and mtime of files (from HEAD, LIST or our own writes).
    meta: HashMap<u64, (u64, nfstime3)>,
    staged: HashMap<u64, Staged>,
    /// Directories made by mkdir that hold no object yet.
    local_dirs: BTreeSet<String>,
}

#[derive(Debug)]
struct Inner {
    key: VolumeKey,
    epoch: u64,
    store: RwLock<Arc<dyn ObjectStore>>,
    prefix: Option<ObjectPath>,
    read_only: bool,
    staging: PathBuf,
    state: Mutex<State>,
    last_error: Mutex<Option<String>>,
    mounted_at: nfstime3,
}

/// One bucket mount's file system; cheap to clone.
#[derive(Debug, Clone)]
pub struct BucketFs {
    inner: Arc<Inner>,
}

fn now() -> nfstime3 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    nfstime3 {
        seconds: u32::try_from(d.as_secs()).unwrap_or(u32::MAX),
        nseconds: d.subsec_nanos(),
    }
}

fn meta_time(m: &ObjectMeta) -> nfstime3 {
    nfstime3 {
        seconds: u32::try_from(m.last_modified.timestamp()).unwrap_or(0),
        nseconds: m.last_modified.timestamp_subsec_nanos(),
    }
}

/// A name the guest may use: UTF-8, one component, and stored unchanged as
/// a key part (no character an object store reserves).
fn valid_name(name: &[u8]) -> Result<&str, nfsstat3> {
    if name.len() > 255 {
        return Err(nfsstat3::NFS3ERR_NAMETOOLONG);
    }
    let s = std::str::from_utf8(name).map_err(|_| nfsstat3::NFS3ERR_INVAL)?;
    if s.is_empty() || s == "." || s == ".." || s.contains('/') {
        return Err(nfsstat3::NFS3ERR_INVAL);
    }
    if PathPart::from(s).as_ref() != s {
        return Err(nfsstat3::NFS3ERR_INVAL);
    }
    Ok(s)
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

fn parent_of(rel: &str) -> &str {
    rel.rsplit_once('/').map(|(p, _)| p).unwrap_or("")
}

impl BucketFs {
    /// The file system of mount `key` over `store` (objects under `prefix`),
    /// staging writes in `staging`.
    pub fn new(
        key: VolumeKey,
        epoch: u64,
        store: Arc<dyn ObjectStore>,
        prefix: Option<&str>,
        read_only: bool,
        staging: PathBuf,
    ) -> BucketFs {
        let mut state = State {
            next: ROOT + 1,
            ..State::default()
        };
        state.nodes.insert(
            ROOT,
            Node {
                rel: String::new(),
                dir: true,
            },
        );
        state.by_rel.insert(String::new(), ROOT);
        BucketFs {
            inner: Arc::new(Inner {
                key,
                epoch,
                store: RwLock::new(store),
                prefix: prefix.map(ObjectPath::from),
                read_only,
                staging,
                state: Mutex::new(state),
                last_error: Mutex::new(None),
                mounted_at: now(),
            }),
        }
    }

    /// New credentials: the next request is signed with them.
    pub fn set_store(&self, store: Arc<dyn ObjectStore>) {
        if let Ok(mut s) = self.inner.store.write() {
            *s = store;
        }
        if let Ok(mut e) = self.inner.last_error.lock() {
            *e = None;
        }
    }

    /// The last error the bucket answered (cleared by a rotation).
    pub fn last_error(&self) -> Option<String> {
        self.inner.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// The mount's root directory.
    pub fn root(&self) -> VolHandle {
        self.handle(ROOT)
    }

    fn store(&self) -> Arc<dyn ObjectStore> {
        match self.inner.store.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        match self.inner.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    fn handle(&self, ino: u64) -> VolHandle {
        bucket_handle(&self.inner.key, self.inner.epoch, ino)
    }

    /// The object key of `rel`.
    fn key(&self, rel: &str) -> ObjectPath {
        let parts = self
            .inner
            .prefix
            .iter()
            .flat_map(|p| p.parts())
            .chain(rel.split('/').filter(|s| !s.is_empty()).map(PathPart::from));
        ObjectPath::from_iter(parts)
    }

    /// The key prefix listing directory `rel` (None: the whole bucket).
    fn dir_prefix(&self, rel: &str) -> Option<ObjectPath> {
        let p = self.key(rel);
        (!p.as_ref().is_empty()).then_some(p)
    }

    /// Records a failure of the bucket for the mount's status and answers
    /// the guest with an I/O error (a missing object: "no such file").
    fn failed(&self, what: &str, rel: &str, e: object_store::Error) -> nfsstat3 {
        if matches!(e, object_store::Error::NotFound { .. }) {
            return nfsstat3::NFS3ERR_NOENT;
        }
        let msg = format!("{what} {rel:?}: {e}");
        tracing::warn!(mount = %hex::encode(self.inner.key), error = %msg, "bucket request failed");
        if let Ok(mut last) = self.inner.last_error.lock() {
            *last = Some(msg);
        }
        nfsstat3::NFS3ERR_IO
    }

    fn writable(&self) -> Result<(), nfsstat3> {
        if self.inner.read_only {
            Err(nfsstat3::NFS3ERR_ROFS)
        } else {
            Ok(())
        }
    }

    /// The object number in `h`, if `h` is one of this mount's handles of
    /// this process.
    pub fn owns(&self, h: &VolHandle) -> bool {
        matches!(open_bucket_handle(h), Some((k, _, _)) if k == self.inner.key)
    }

    fn node(&self, h: &VolHandle) -> Result<(u64, Node), nfsstat3> {
        let (key, epoch, ino) = open_bucket_handle(h).ok_or(nfsstat3::NFS3ERR_BADHANDLE)?;
        if key != self.inner.key || epoch != self.inner.epoch {
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        let node = self
            .state()
            .nodes
            .get(&ino)
            .cloned()
            .ok_or(nfsstat3::NFS3ERR_STALE)?;
        Ok((ino, node))
    }

    fn intern(&self, st: &mut State, rel: &str, dir: bool) -> u64 {
        if let Some(&ino) = st.by_rel.get(rel) {
            if let Some(n) = st.nodes.get_mut(&ino) {
                n.dir = dir;
            }
            return ino;
        }
        let ino = st.next;
        st.next += 1;
        st.nodes.insert(
            ino,
            Node {
                rel: rel.to_owned(),
                dir,
            },
        );
        st.by_rel.insert(rel.to_owned(), ino);
        ino
    }

    fn forget(st: &mut State, rel: &str) {
        if let Some(ino) = st.by_rel.remove(rel) {
            st.nodes.remove(&ino);
            st.meta.remove(&ino);
            st.staged.remove(&ino);
        }
    }

    fn attr(&self, ino: u64, dir: bool, st: &State) -> fattr3 {
        let (size, mtime) = if dir {
            // A bucket's listing can change at any time: a directory's mtime
            // moves every second, so guests re-read listings once their
            // attribute cache (1 s) expires instead of trusting old pages.
            let t = now();
            (
                4096,
                nfstime3 {
                    seconds: t.seconds,
                    nseconds: 0,
                },
            )
        } else if let Some(s) = st.staged.get(&ino) {
            (s.size, st.meta.get(&ino).map(|m| m.1).unwrap_or_else(now))
        } else {
            st.meta
                .get(&ino)
                .copied()
                .unwrap_or((0, self.inner.mounted_at))
        };
        let ro = if self.inner.read_only { 0o222 } else { 0 };
        fattr3 {
            type_: if dir { ftype3::NF3DIR } else { ftype3::NF3REG },
            mode: (if dir { 0o755 } else { 0o644 }) & !ro,
            nlink: if dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            size,
            used: size,
            rdev: specdata3::default(),
            fsid: u64::from_le_bytes([
                self.inner.key[0],
                self.inner.key[1],
                self.inner.key[2],
                self.inner.key[3],
                self.inner.key[4],
                self.inner.key[5],
                self.inner.key[6],
                0xb0,
            ]),
            fileid: ino,
            atime: mtime,
            mtime,
            ctime: mtime,
        }
    }

    /// What `rel` is in the bucket now: a file (its metadata), a directory,
    /// or nothing.
    async fn probe(&self, rel: &str) -> Result<Option<Option<ObjectMeta>>, nfsstat3> {
        let store = self.store();
        match store.head(&self.key(rel)).await {
            Ok(m) => return Ok(Some(Some(m))),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.failed("reading", rel, e)),
        }
        if self.state().local_dirs.contains(rel) {
            return Ok(Some(None));
        }
        let listed = store
            .list_with_delimiter(self.dir_prefix(rel).as_ref())
            .await
            .map_err(|e| self.failed("listing", rel, e))?;
        if listed.objects.is_empty() && listed.common_prefixes.is_empty() {
            Ok(None)
        } else {
            Ok(Some(None))
        }
    }

    pub async fn lookup(&self, dir: &VolHandle, name: &[u8]) -> Result<VolHandle, nfsstat3> {
        let (ino, node) = self.node(dir)?;
        if !node.dir {
            return Err(nfsstat3::NFS3ERR_NOTDIR);
        }
        if name == b"." {
            return Ok(self.handle(ino));
        }
        if name == b".." {
            let parent = parent_of(&node.rel).to_owned();
            let mut st = self.state();
            let p = self.intern(&mut st, &parent, true);
            return Ok(self.handle(p));
        }
        let name = valid_name(name)?;
        let rel = join(&node.rel, name);
        // A file being written here exists whatever the bucket says yet.
        {
            let st = self.state();
            if let Some(&child) = st.by_rel.get(&rel) {
                if st.staged.contains_key(&child) {
                    return Ok(self.handle(child));
                }
            }
        }
        match self.probe(&rel).await? {
            Some(Some(meta)) => {
                let mut st = self.state();
                let child = self.intern(&mut st, &rel, false);
                st.meta.insert(child, (meta.size, meta_time(&meta)));
                Ok(self.handle(child))
            }
            Some(None) => {
                let mut st = self.state();
                Ok(self.handle(self.intern(&mut st, &rel, true)))
            }
            None => Err(nfsstat3::NFS3ERR_NOENT),
        }
    }

    pub async fn getattr(&self, h: &VolHandle) -> Result<fattr3, nfsstat3> {
        let (ino, node) = self.node(h)?;
        if node.dir || self.state().staged.contains_key(&ino) {
            let st = self.state();
            return Ok(self.attr(ino, node.dir, &st));
        }
        match self.store().head(&self.key(&node.rel)).await {
            Ok(meta) => {
                let mut st = self.state();
                st.meta.insert(ino, (meta.size, meta_time(&meta)));
                Ok(self.attr(ino, false, &st))
            }
            // Deleted behind our back (by the bucket's owner or another VM).
            Err(object_store::Error::NotFound { .. }) => Err(nfsstat3::NFS3ERR_STALE),
            Err(e) => Err(self.failed("reading", &node.rel, e)),
        }
    }

    pub async fn read(
        &self,
        h: &VolHandle,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), nfsstat3> {
        let (ino, node) = self.node(h)?;
        if node.dir {
            return Err(nfsstat3::NFS3ERR_ISDIR);
        }
        let staged = self
            .state()
            .staged
            .get(&ino)
            .map(|s| (s.file.clone(), s.size));
        if let Some((file, size)) = staged {
            let end = size.min(offset.saturating_add(u64::from(count)));
            let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
            file.read_exact_at(&mut buf, offset)
                .map_err(|_| nfsstat3::NFS3ERR_IO)?;
            return Ok((buf, end >= size));
        }
        let key = self.key(&node.rel);
        let store = self.store();
        let size = match store.head(&key).await {
            Ok(meta) => {
                self.state().meta.insert(ino, (meta.size, meta_time(&meta)));
                meta.size
            }
            Err(object_store::Error::NotFound { .. }) => return Err(nfsstat3::NFS3ERR_STALE),
            Err(e) => return Err(self.failed("reading", &node.rel, e)),
        };
        let end = size.min(offset.saturating_add(u64::from(count)));
        if offset >= end {
            return Ok((Vec::new(), true));
        }
        let bytes = store
            .get_range(&key, offset..end)
            .await
            .map_err(|e| self.failed("reading", &node.rel, e))?;
        Ok((bytes.to_vec(), end >= size))
    }

    /// The staged copy of file `ino`, made now if needed: empty when
    /// `truncate` (or the object is empty), else the object's bytes.
    async fn staged(&self, ino: u64, rel: &str, truncate: bool) -> Result<Arc<File>, nfsstat3> {
        if let Some(s) = self.state().staged.get(&ino) {
            return Ok(s.file.clone());
        }
        let file = tempfile::tempfile_in(&self.inner.staging).map_err(|e| {
            tracing::warn!(error = %e, "bucket staging file");
            nfsstat3::NFS3ERR_IO
        })?;
        let mut size = 0;
        if !truncate {
            let store = self.store();
            let key = self.key(rel);
            match store.get(&key).await {
                Ok(got) => {
                    use futures::StreamExt;
                    let mut stream = got.into_stream();
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk.map_err(|e| self.failed("reading", rel, e))?;
                        file.write_all_at(&chunk, size)
                            .map_err(|_| nfsstat3::NFS3ERR_IO)?;
                        size += chunk.len() as u64;
                    }
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.failed("reading", rel, e)),
            }
        }
        let mut st = self.state();
        // Another call staged it meanwhile: theirs wins.
        let s = st.staged.entry(ino).or_insert(Staged {
            file: Arc::new(file),
            size,
            dirty: false,
        });
        Ok(s.file.clone())
    }

    /// Uploads file `ino`'s staged copy when it changed since the last upload.
    async fn flush(&self, ino: u64, rel: &str) -> Result<(), nfsstat3> {
        let (file, size) = {
            let mut st = self.state();
            match st.staged.get_mut(&ino) {
                Some(s) if s.dirty => {
                    s.dirty = false;
                    (s.file.clone(), s.size)
                }
                _ => return Ok(()),
            }
        };
        let upload = async {
            let store = self.store();
            let key = self.key(rel);
            if size as usize <= CHUNK {
                let mut buf = vec![0u8; size as usize];
                file.read_exact_at(&mut buf, 0)
                    .map_err(|e| object_store::Error::Generic {
                        store: "staging",
                        source: Box::new(e),
                    })?;
                store.put(&key, PutPayload::from(buf)).await.map(drop)
            } else {
                let mut up = object_store::WriteMultipart::new(store.put_multipart(&key).await?);
                let mut at = 0u64;
                while at < size {
                    let n = (size - at).min(CHUNK as u64) as usize;
                    let mut buf = vec![0u8; n];
                    file.read_exact_at(&mut buf, at)
                        .map_err(|e| object_store::Error::Generic {
                            store: "staging",
                            source: Box::new(e),
                        })?;
                    up.wait_for_capacity(2).await?;
                    up.write(&buf);
                    at += n as u64;
                }
                up.finish().await.map(drop)
            }
        };
        if let Err(e) = upload.await {
            if let Some(s) = self.state().staged.get_mut(&ino) {
                s.dirty = true;
            }
            return Err(self.failed("writing", rel, e));
        }
        self.state().meta.insert(ino, (size, now()));
        Ok(())
    }

    pub async fn write(
        &self,
        h: &VolHandle,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> Result<(fattr3, stable_how), nfsstat3> {
        self.writable()?;
        let (ino, node) = self.node(h)?;
        if node.dir {
            return Err(nfsstat3::NFS3ERR_INVAL);
        }
        let file = self.staged(ino, &node.rel, false).await?;
        file.write_all_at(data, offset)
            .map_err(|_| nfsstat3::NFS3ERR_IO)?;
        {
            let mut st = self.state();
            if let Some(s) = st.staged.get_mut(&ino) {
                s.size = s.size.max(offset + data.len() as u64);
                s.dirty = true;
            }
            st.meta.insert(ino, (0, now()));
        }
        let committed = match stable {
            stable_how::UNSTABLE => stable_how::UNSTABLE,
            other => {
                self.flush(ino, &node.rel).await?;
                other
            }
        };
        let st = self.state();
        Ok((self.attr(ino, false, &st), committed))
    }

    /// Uploads the file's unsaved writes (the guest closed or fsynced it),
    /// then lets go of its local copy.
    pub async fn commit(&self, h: &VolHandle) -> Result<(), nfsstat3> {
        let (ino, node) = self.node(h)?;
        if node.dir {
            return Ok(());
        }
        self.flush(ino, &node.rel).await?;
        let mut st = self.state();
        if st.staged.get(&ino).is_some_and(|s| !s.dirty) {
            st.staged.remove(&ino);
        }
        Ok(())
    }

    pub async fn setattr(&self, h: &VolHandle, set: &sattr3) -> Result<fattr3, nfsstat3> {
        let (ino, node) = self.node(h)?;
        if let Nfs3Option::Some(size) = set.size {
            self.writable()?;
            if node.dir {
                return Err(nfsstat3::NFS3ERR_ISDIR);
            }
            let file = self.staged(ino, &node.rel, size == 0).await?;
            file.set_len(size).map_err(|_| nfsstat3::NFS3ERR_IO)?;
            if let Some(s) = self.state().staged.get_mut(&ino) {
                s.size = size;
                s.dirty = true;
            }
            self.flush(ino, &node.rel).await?;
        }
        // Modes, owners and times are not kept (see the module's gaps).
        self.getattr(h).await
    }

    /// Creates an empty file (an empty object, at once); `exclusive`:
    /// refused when the name exists.
    pub async fn create(
        &self,
        dir: &VolHandle,
        name: &[u8],
        exclusive: bool,
    ) -> Result<(VolHandle, fattr3), nfsstat3> {
        self.writable()?;
        let (_, node) = self.node(dir)?;
        if !node.dir {
            return Err(nfsstat3::NFS3ERR_NOTDIR);
        }
        let rel = join(&node.rel, valid_name(name)?);
        match self.probe(&rel).await? {
            Some(None) => return Err(nfsstat3::NFS3ERR_ISDIR),
            Some(Some(_)) if exclusive => return Err(nfsstat3::NFS3ERR_EXIST),
            _ => {}
        }
        self.store()
            .put(&self.key(&rel), PutPayload::default())
            .await
            .map_err(|e| self.failed("creating", &rel, e))?;
        let file = tempfile::tempfile_in(&self.inner.staging).map_err(|_| nfsstat3::NFS3ERR_IO)?;
        let mut st = self.state();
        let ino = self.intern(&mut st, &rel, false);
        st.staged.insert(
            ino,
            Staged {
                file: Arc::new(file),
                size: 0,
                dirty: false,
            },
        );
        st.meta.insert(ino, (0, now()));
        // Its parents hold an object now.
        let mut p = parent_of(&rel);
        while !p.is_empty() {
            st.local_dirs.remove(p);
            p = parent_of(p);
        }
        Ok((self.handle(ino), self.attr(ino, false, &st)))
    }

    pub async fn mkdir(
        &self,
        dir: &VolHandle,
        name: &[u8],
    ) -> Result<(VolHandle, fattr3), nfsstat3> {
        self.writable()?;
        let (_, node) = self.node(dir)?;
        if !node.dir {
            return Err(nfsstat3::NFS3ERR_NOTDIR);
        }
        let rel = join(&node.rel, valid_name(name)?);
        if self.probe(&rel).await?.is_some() {
            return Err(nfsstat3::NFS3ERR_EXIST);
        }
        let mut st = self.state();
        st.local_dirs.insert(rel.clone());
        let ino = self.intern(&mut st, &rel, true);
        Ok((self.handle(ino), self.attr(ino, true, &st)))
    }

    pub async fn remove(&self, dir: &VolHandle, name: &[u8]) -> Result<(), nfsstat3> {
        self.writable()?;
        let (_, node) = self.node(dir)?;
        let rel = join(&node.rel, valid_name(name)?);
        match self.probe(&rel).await? {
            None => {
                // Created but never seen by the bucket (a failed upload).
                let mut st = self.state();
                if st.by_rel.contains_key(&rel) {
                    Self::forget(&mut st, &rel);
                    return Ok(());
                }
                Err(nfsstat3::NFS3ERR_NOENT)
            }
            Some(Some(_)) => {
                self.store()
                    .delete(&self.key(&rel))
                    .await
                    .map_err(|e| self.failed("deleting", &rel, e))?;
                Self::forget(&mut self.state(), &rel);
                Ok(())
            }
            Some(None) => {
                let listed = self
                    .store()
                    .list_with_delimiter(self.dir_prefix(&rel).as_ref())
                    .await
                    .map_err(|e| self.failed("listing", &rel, e))?;
                let mut st = self.state();
                let has_local = st
                    .local_dirs
                    .iter()
                    .any(|d| d.starts_with(&format!("{rel}/")));
                if !listed.objects.is_empty() || !listed.common_prefixes.is_empty() || has_local {
                    return Err(nfsstat3::NFS3ERR_NOTEMPTY);
                }
                st.local_dirs.remove(&rel);
                Self::forget(&mut st, &rel);
                Ok(())
            }
        }
    }

    pub async fn rename(
        &self,
        from_dir: &VolHandle,
        from_name: &[u8],
        to_dir: &VolHandle,
        to_name: &[u8],
    ) -> Result<(), nfsstat3> {
        self.writable()?;
        let (_, fd) = self.node(from_dir)?;
        let (_, td) = self.node(to_dir)?;
        if !td.dir {
            return Err(nfsstat3::NFS3ERR_NOTDIR);
        }
        let from = join(&fd.rel, valid_name(from_name)?);
        let to = join(&td.rel, valid_name(to_name)?);
        if from == to {
            return Ok(());
        }
        if to.starts_with(&format!("{from}/")) {
            return Err(nfsstat3::NFS3ERR_INVAL);
        }
        let store = self.store();
        match self.probe(&from).await? {
            None => Err(nfsstat3::NFS3ERR_NOENT),
            Some(Some(_)) => {
                if matches!(self.probe(&to).await?, Some(None)) {
                    return Err(nfsstat3::NFS3ERR_EXIST);
                }
                // Unsaved writes go up first, under the old name.
                let ino = self.state().by_rel.get(&from).copied();
                if let Some(ino) = ino {
                    self.flush(ino, &from).await?;
                }
                store
                    .rename(&self.key(&from), &self.key(&to))
                    .await
                    .map_err(|e| self.failed("renaming", &from, e))?;
                let mut st = self.state();
                Self::forget(&mut st, &to);
                Self::move_node(&mut st, &from, &to);
                Ok(())
            }
            Some(None) => {
                if self.probe(&to).await?.is_some() {
                    return Err(nfsstat3::NFS3ERR_EXIST);
                }
                // Every object under the directory, one copy + delete each.
                use futures::TryStreamExt;
                let base = self.key(&from);
                let objects: Vec<ObjectMeta> = store
                    .list(Some(&base))
                    .try_collect()
                    .await
                    .map_err(|e| self.failed("listing", &from, e))?;
                let base_parts = base.parts().count();
                for o in objects {
                    let rest: Vec<PathPart<'_>> = o.location.parts().skip(base_parts).collect();
                    let target = ObjectPath::from_iter(self.key(&to).parts().chain(rest));
                    store
                        .rename(&o.location, &target)
                        .await
                        .map_err(|e| self.failed("renaming", &from, e))?;
                }
                let mut st = self.state();
                let locals: Vec<String> = st
                    .local_dirs
                    .iter()
                    .filter(|d| *d == &from || d.starts_with(&format!("{from}/")))
                    .cloned()
                    .collect();
                for d in locals {
                    st.local_dirs.remove(&d);
                    st.local_dirs.insert(format!("{to}{}", &d[from.len()..]));
                }
                Self::move_node(&mut st, &from, &to);
                Ok(())
            }
        }
    }

    /// Renames `from` (and everything numbered under it) to `to` in the
    /// table, keeping numbers: handles the guest holds follow the rename.
    fn move_node(st: &mut State, from: &str, to: &str) {
        let moved: Vec<(String, u64)> = st
            .by_rel
            .iter()
            .filter(|(r, _)| *r == from || r.starts_with(&format!("{from}/")))
            .map(|(r, i)| (r.clone(), *i))
            .collect();
        for (old, ino) in moved {
            let new = format!("{to}{}", &old[from.len()..]);
            st.by_rel.remove(&old);
            st.by_rel.insert(new.clone(), ino);
            if let Some(n) = st.nodes.get_mut(&ino) {
                n.rel = new;
            }
        }
    }

    pub async fn readdirplus(&self, dir: &VolHandle, cookie: u64) -> Result<DirListing, nfsstat3> {
        let (_, node) = self.node(dir)?;
        if !node.dir {
            return Err(nfsstat3::NFS3ERR_NOTDIR);
        }
        let listed = self
            .store()
            .list_with_delimiter(self.dir_prefix(&node.rel).as_ref())
            .await
            .map_err(|e| self.failed("listing", &node.rel, e))?;
        // name -> Some(meta) for files, None for directories.
        let mut entries: BTreeMap<String, Option<ObjectMeta>> = BTreeMap::new();
        for p in listed.common_prefixes {
            if let Some(name) = p.filename() {
                entries.insert(name.to_owned(), None);
            }
        }
        for o in listed.objects {
            if let Some(name) = o.location.filename() {
                let name = name.to_owned();
                entries.entry(name).or_insert(Some(o));
            }
        }
        let mut st = self.state();
        let inside = |rel: &str| parent_of(rel) == node.rel && !rel.is_empty();
        for d in st.local_dirs.iter().filter(|d| inside(d)) {
            entries
                .entry(d.rsplit('/').next().unwrap_or(d).to_owned())
                .or_insert(None);
        }
        let staged: Vec<String> = st
            .staged
            .keys()
            .filter_map(|i| st.nodes.get(i))
            .filter(|n| inside(&n.rel))
            .map(|n| n.rel.clone())
            .collect();
        let mut out = Vec::new();
        for (name, meta) in entries {
            let rel = join(&node.rel, &name);
            let dir = meta.is_none();
            let ino = self.intern(&mut st, &rel, dir);
            if let Some(m) = &meta {
                if !st.staged.contains_key(&ino) {
                    st.meta.insert(ino, (m.size, meta_time(m)));
                }
            }
            out.push((name, ino, dir));
        }
        for rel in staged {
            let name = rel.rsplit('/').next().unwrap_or(&rel).to_owned();
            if !out.iter().any(|(n, _, _)| *n == name) {
                let ino = self.intern(&mut st, &rel, false);
                out.push((name, ino, false));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        let entries = out
            .into_iter()
            .enumerate()
            .filter(|(i, _)| (*i as u64 + 1) > cookie)
            .map(|(i, (name, ino, dir))| DirEntryPlus {
                fileid: ino,
                name: name.into_bytes().into(),
                cookie: i as u64 + 1,
                name_attributes: Some(self.attr(ino, dir, &st)),
                name_handle: Some(self.handle(ino)),
            })
            .collect();
        Ok(DirListing::new(entries))
    }
}

#[cfg(test)]
mod tests {
    //! The file system over an in-memory object store; the real path (a
    //! guest, moto over HTTP) is covered by tests/tests/buckets.rs.
    use super::*;
    use nfs3_server::vfs::{NextResult, ReadDirPlusIterator};
    use object_store::memory::InMemory;

    fn mount(store: Arc<dyn ObjectStore>, prefix: Option<&str>, ro: bool) -> BucketFs {
        let key =
            crate::volumes::handle::bucket_mount_key("bm_0123456789abcdef012345").expect("key");
        BucketFs::new(key, 9, store, prefix, ro, std::env::temp_dir())
    }

    async fn names(fs: &BucketFs, dir: &VolHandle) -> Vec<String> {
        let mut l = fs.readdirplus(dir, 0).await.expect("readdir");
        let mut out = vec![];
        while let NextResult::Ok(e) = l.next().await {
            out.push(String::from_utf8_lossy(e.name.as_ref()).into_owned());
        }
        out
    }

    async fn cat(fs: &BucketFs, h: &VolHandle) -> Vec<u8> {
        fs.read(h, 0, 1 << 20).await.expect("read").0
    }

    #[tokio::test]
    async fn files_and_directories_over_objects() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        store
            .put(
                &ObjectPath::from("p/a/b.txt"),
                PutPayload::from_static(b"hello"),
            )
            .await
            .expect("put");
        store
            .put(&ObjectPath::from("other/x"), PutPayload::from_static(b"no"))
            .await
            .expect("put");
        let fs = mount(store.clone(), Some("p"), false);
        let root = fs.root();
        assert_eq!(names(&fs, &root).await, ["a"]);
        let a = fs.lookup(&root, b"a").await.expect("dir a");
        assert_eq!(fs.getattr(&a).await.expect("attr").type_, ftype3::NF3DIR);
        let b = fs.lookup(&a, b"b.txt").await.expect("file");
        assert_eq!(fs.getattr(&b).await.expect("attr").size, 5);
        assert_eq!(
            fs.read(&b, 1, 3).await.expect("range"),
            (b"ell".to_vec(), false)
        );
        assert_eq!(fs.lookup(&root, b"x").await, Err(nfsstat3::NFS3ERR_NOENT));
        assert_eq!(fs.lookup(&root, b"a%b").await, Err(nfsstat3::NFS3ERR_INVAL));

        // Create, write (unstable), commit: one object with the bytes.
        let (c, _) = fs.create(&a, b"c.txt", false).await.expect("create");
        fs.write(&c, 0, b"abc", stable_how::UNSTABLE)
            .await
            .expect("write");
        fs.write(&c, 3, b"def", stable_how::UNSTABLE)
            .await
            .expect("write");
        assert_eq!(cat(&fs, &c).await, b"abcdef");
        fs.commit(&c).await.expect("commit");
        let got = store
            .get(&ObjectPath::from("p/a/c.txt"))
            .await
            .expect("get");
        assert_eq!(got.bytes().await.expect("bytes").as_ref(), b"abcdef");
        assert_eq!(cat(&fs, &c).await, b"abcdef");

        // Overwrite in the middle of an existing object.
        fs.write(&b, 1, b"E", stable_how::FILE_SYNC)
            .await
            .expect("write");
        let got = store
            .get(&ObjectPath::from("p/a/b.txt"))
            .await
            .expect("get");
        assert_eq!(got.bytes().await.expect("bytes").as_ref(), b"hEllo");

        // mkdir is local until a file lands in it; rmdir of a non-empty one fails.
        let (d, _) = fs.mkdir(&root, b"d").await.expect("mkdir");
        assert_eq!(names(&fs, &root).await, ["a", "d"]);
        fs.create(&d, b"f", false).await.expect("create in d");
        assert_eq!(
            fs.remove(&root, b"d").await,
            Err(nfsstat3::NFS3ERR_NOTEMPTY)
        );

        // Rename a file and a directory; handles follow.
        fs.rename(&a, b"c.txt", &root, b"c2.txt")
            .await
            .expect("rename file");
        assert_eq!(cat(&fs, &c).await, b"abcdef");
        fs.rename(&root, b"a", &root, b"z")
            .await
            .expect("rename dir");
        assert_eq!(names(&fs, &root).await, ["c2.txt", "d", "z"]);
        let z = fs.lookup(&root, b"z").await.expect("z");
        assert_eq!(names(&fs, &z).await, ["b.txt"]);
        assert!(store.head(&ObjectPath::from("p/z/b.txt")).await.is_ok());
        assert!(store.head(&ObjectPath::from("p/a/b.txt")).await.is_err());

        // Remove; truncate.
        fs.remove(&root, b"c2.txt").await.expect("remove");
        assert!(store.head(&ObjectPath::from("p/c2.txt")).await.is_err());
        let zb = fs.lookup(&z, b"b.txt").await.expect("b");
        let set = sattr3 {
            size: Nfs3Option::Some(2),
            ..sattr3::default()
        };
        assert_eq!(fs.setattr(&zb, &set).await.expect("truncate").size, 2);
        let got = store
            .get(&ObjectPath::from("p/z/b.txt"))
            .await
            .expect("get");
        assert_eq!(got.bytes().await.expect("bytes").as_ref(), b"hE");
        // Nothing outside the prefix was touched.
        assert!(store.head(&ObjectPath::from("other/x")).await.is_ok());
    }

    #[tokio::test]
    async fn read_only_and_foreign_handles() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let fs = mount(store, None, true);
        let root = fs.root();
        assert_eq!(
            fs.create(&root, b"x", false).await.err(),
            Some(nfsstat3::NFS3ERR_ROFS)
        );
        assert_eq!(
            fs.mkdir(&root, b"x").await.err(),
            Some(nfsstat3::NFS3ERR_ROFS)
        );
        // Another process's epoch, an unknown number: stale.
        let key =
            crate::volumes::handle::bucket_mount_key("bm_0123456789abcdef012345").expect("key");
        let old = crate::volumes::handle::bucket_handle(&key, 8, 1);
        assert_eq!(fs.getattr(&old).await.err(), Some(nfsstat3::NFS3ERR_STALE));
        let unknown = crate::volumes::handle::bucket_handle(&key, 9, 999);
        assert_eq!(
            fs.getattr(&unknown).await.err(),
            Some(nfsstat3::NFS3ERR_STALE)
        );
    }
}
