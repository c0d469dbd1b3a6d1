//! The export file system called directly (the NFS wire and a real guest
//! are covered by tests/tests/volumes.rs). `open_by_handle_at` needs root
//! (CAP_DAC_READ_SEARCH): without it these tests say so and return.

use super::*;
use nfs3_server::nfs3_types::nfs3::{nfsstat3, sattr3, stable_how};
use nfs3_server::vfs::{
    FileHandle, NextResult, NfsFileSystem, NfsReadFileSystem, ReadDirPlusIterator,
};

const A: &str = "vol_0123456789abcdef012345";
const B: &str = "vol_fedcba9876543210fedcba";

fn root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("not root: open_by_handle_at needs CAP_DAC_READ_SEARCH; skipping");
    }
    root
}

struct Fixture {
    _tmp: tempfile::TempDir,
    store: VolumeStore,
    fs: ExportFs,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = VolumeStore::open(tmp.path()).expect("store");
    let fs = store.export();
    Fixture {
        _tmp: tmp,
        store,
        fs,
    }
}

async fn lookup(fs: &ExportFs, dir: &VolHandle, name: &str) -> Result<VolHandle, nfsstat3> {
    fs.lookup(dir, &name.as_bytes().into()).await
}

async fn names(fs: &ExportFs, dir: &VolHandle) -> Vec<String> {
    let mut it = fs.readdirplus(dir, 0).await.expect("readdir");
    let mut out = Vec::new();
    loop {
        match it.next().await {
            NextResult::Ok(e) => out.push(String::from_utf8_lossy(e.name.as_ref()).into_owned()),
            NextResult::Eof => return out,
            NextResult::Err(e) => panic!("readdir: {e:?}"),
        }
    }
}

async fn create(fs: &ExportFs, dir: &VolHandle, name: &str) -> Result<VolHandle, nfsstat3> {
    fs.create(dir, &name.as_bytes().into(), sattr3::default())
        .await
        .map(|(h, _)| h)
}

#[tokio::test]
async fn files_round_trip_and_are_seen_by_every_export() {
    if !root_or_skip() {
        return;
    }
    let f = fixture();
    let vol = f.store.create(A, 1 << 30, false).expect("create");
    f.fs.attach(vol.clone(), false);
    let root = f.fs.root_dir();
    assert_eq!(names(&f.fs, &root).await, vec![A.to_owned()]);
    let v = lookup(&f.fs, &root, A).await.expect("volume root");
    let file = create(&f.fs, &v, "hello.txt").await.expect("create file");
    let (attr, _) =
        f.fs.write(&file, 0, b"hello volume", stable_how::FILE_SYNC)
            .await
            .expect("write");
    assert_eq!(attr.size, 12);
    let (data, eof) = f.fs.read(&file, 6, 100).await.expect("read");
    assert_eq!((data.as_slice(), eof), (&b"volume"[..], true));
    let dir = f.fs.mkdir(&v, &b"sub"[..].into()).await.expect("mkdir").0;
    f.fs.rename(&v, &b"hello.txt"[..].into(), &dir, &b"moved.txt"[..].into())
        .await
        .expect("rename");
    // The handle follows the file through the rename.
    assert_eq!(f.fs.read(&file, 0, 5).await.expect("read").0, b"hello");
    assert_eq!(names(&f.fs, &v).await, vec!["sub".to_owned()]);
    assert_eq!(
        std::fs::read(vol.dir().join("sub/moved.txt")).expect("on the host"),
        b"hello volume"
    );

    // A second VM's export of the same volume sees the same files, and
    // handles (sealed by the same store key) work there too.
    let other = f.store.export();
    other.attach(f.store.get(A).expect("get"), false);
    assert_eq!(other.read(&file, 0, 5).await.expect("shared").0, b"hello");
    // ..of the volume root is the export root, never the host directory above.
    assert_eq!(lookup(&f.fs, &v, "..").await.expect(".."), root);
    assert_eq!(lookup(&f.fs, &dir, "..").await.expect(".."), v);

    f.fs.remove(&dir, &b"moved.txt"[..].into())
        .await
        .expect("remove");
    f.fs.remove(&v, &b"sub"[..].into()).await.expect("rmdir");
    assert_eq!(
        f.fs.getattr(&file).await.err(),
        Some(nfsstat3::NFS3ERR_STALE)
    );
}

#[tokio::test]
async fn symlinks_and_names_never_leave_the_volume() {
    if !root_or_skip() {
        return;
    }
    let f = fixture();
    let vol = f.store.create(A, 1 << 30, false).expect("create");
    f.fs.attach(vol.clone(), false);
    let v = lookup(&f.fs, &f.fs.root_dir(), A).await.expect("root");
    // A symlink to a host path is stored as text; the server never follows it.
    let (link, attr) =
        f.fs.symlink(
            &v,
            &b"etc"[..].into(),
            &b"/etc"[..].into(),
            &sattr3::default(),
        )
        .await
        .expect("symlink");
    assert_eq!(attr.type_, nfs3_server::nfs3_types::nfs3::ftype3::NF3LNK);
    assert_eq!(
        f.fs.readlink(&link).await.expect("readlink").as_ref(),
        b"/etc"
    );
    assert_eq!(
        lookup(&f.fs, &link, "passwd").await.err(),
        Some(nfsstat3::NFS3ERR_NOTDIR)
    );
    assert!(f.fs.read(&link, 0, 10).await.is_err());
    assert!(f
        .fs
        .write(&link, 0, b"x", stable_how::FILE_SYNC)
        .await
        .is_err());
    // Creating through the symlink's name does not write /etc.
    assert!(create(&f.fs, &v, "etc").await.is_err());
    // Names with a slash, `.`/`..` where a new name is needed, empty names.
    for bad in ["../x", "a/b", "", ".", ".."] {
        assert!(create(&f.fs, &v, bad).await.is_err(), "{bad:?}");
    }
    assert_eq!(
        lookup(&f.fs, &v, "../..").await.err(),
        Some(nfsstat3::NFS3ERR_INVAL)
    );
    // Forged handles: bytes that were never sealed, and the host's own
    // kernel handle of /etc/passwd sealed under another key.
    let forged = VolHandle::from_bytes(&[1; 40]).expect("shape");
    assert_eq!(
        f.fs.getattr(&forged).await.err(),
        Some(nfsstat3::NFS3ERR_BADHANDLE)
    );
    let passwd = sys::open_dir_path(Path::new("/etc")).expect("/etc");
    let (kind, kernel) = sys::kernel_handle(std::os::fd::AsFd::as_fd(&passwd)).expect("handle");
    let key = handle::volume_key(A).expect("key");
    let other_key = Sealer::new([9; 32])
        .seal(&key, kind, &kernel)
        .expect("fits");
    assert_eq!(
        f.fs.getattr(&other_key).await.err(),
        Some(nfsstat3::NFS3ERR_BADHANDLE)
    );
    // Nothing outside the volume directory changed.
    assert!(!vol.dir().parent().expect("parent").join("etc").exists());
}

#[tokio::test]
async fn read_only_detached_and_cross_volume() {
    if !root_or_skip() {
        return;
    }
    let f = fixture();
    let a = f.store.create(A, 1 << 30, false).expect("a");
    let b = f.store.create(B, 1 << 30, false).expect("b");
    f.fs.attach(a.clone(), false);
    f.fs.attach(b.clone(), true);
    let root = f.fs.root_dir();
    let va = lookup(&f.fs, &root, A).await.expect("a");
    let vb = lookup(&f.fs, &root, B).await.expect("b");
    assert_eq!(
        create(&f.fs, &vb, "x").await.err(),
        Some(nfsstat3::NFS3ERR_ROFS)
    );
    let x = create(&f.fs, &va, "x").await.expect("rw");
    assert_eq!(
        f.fs.rename(&va, &b"x"[..].into(), &vb, &b"x"[..].into())
            .await
            .err(),
        Some(nfsstat3::NFS3ERR_XDEV)
    );
    // The volume's own mode: ro for every attachment.
    f.store.update(A, 1 << 30, true).expect("ro");
    assert_eq!(
        f.fs.write(&x, 0, b"no", stable_how::FILE_SYNC).await.err(),
        Some(nfsstat3::NFS3ERR_ROFS)
    );
    f.store.update(A, 1 << 30, false).expect("rw");
    f.fs.write(&x, 0, b"yes", stable_how::FILE_SYNC)
        .await
        .expect("rw again");
    assert!(f.fs.detach(&handle::volume_key(A).expect("key")));
    assert_eq!(f.fs.getattr(&x).await.err(), Some(nfsstat3::NFS3ERR_STALE));
    assert_eq!(
        lookup(&f.fs, &root, A).await.err(),
        Some(nfsstat3::NFS3ERR_NOENT)
    );
    assert_eq!(names(&f.fs, &root).await, vec![B.to_owned()]);
}

#[tokio::test]
async fn the_size_is_a_limit_that_grows_online() {
    if !root_or_skip() {
        return;
    }
    let f = fixture();
    let vol = f.store.create(A, 1 << 20, false).expect("1 MiB");
    f.fs.attach(vol.clone(), false);
    let v = lookup(&f.fs, &f.fs.root_dir(), A).await.expect("root");
    let file = create(&f.fs, &v, "big").await.expect("create");
    let chunk = vec![7u8; 256 << 10];
    let mut off = 0u64;
    let refused = loop {
        match f.fs.write(&file, off, &chunk, stable_how::UNSTABLE).await {
            Ok(_) => off += chunk.len() as u64,
            Err(e) => break e,
        }
        assert!(off <= 2 << 20, "no limit after {off} bytes");
    };
    assert_eq!(refused, nfsstat3::NFS3ERR_NOSPC);
    assert!((512 << 10..=1 << 20).contains(&off), "wrote {off}");
    // Grow: the same write now succeeds, no remount.
    f.store.update(A, 4 << 20, false).expect("grow");
    f.fs.write(&file, off, &chunk, stable_how::UNSTABLE)
        .await
        .expect("after grow");
    // Removing the file gives the space back.
    f.fs.remove(&v, &b"big"[..].into()).await.expect("remove");
    assert!(vol.used_bytes() < 64 << 10, "used {}", vol.used_bytes());
    // Reopened from disk (a worker restart): same size, same files, handles still valid.
    let again = VolumeStore::open(f._tmp.path()).expect("reopen");
    assert_eq!(again.get(A).expect("get").size_bytes(), 4 << 20);
}

#[tokio::test]
async fn served_over_tcp_an_nfs_client_can_mount_the_export() {
    if !root_or_skip() {
        return;
    }
    // The wire: a MOUNT call for /vol_<hex> answers a root handle. (A
    // real kernel client mounting it is in tests/tests/volumes.rs.)
    let f = fixture();
    let vol = f.store.create(A, 1 << 30, false).expect("create");
    f.fs.attach(vol, false);
    let server = serve(None, "127.0.0.1:0".parse().expect("addr"), f.fs.clone())
        .await
        .expect("serve");
    let mut s = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect");
    // ONC RPC call: MOUNT v3 MNT("/vol_...") with AUTH_NONE, as one record.
    let path = format!("/{A}");
    let mut body = Vec::new();
    for w in [0x1234u32, 0, 2, 100_005, 3, 1, 0, 0, 0, 0] {
        body.extend_from_slice(&w.to_be_bytes());
    }
    body.extend_from_slice(&(path.len() as u32).to_be_bytes());
    body.extend_from_slice(path.as_bytes());
    while body.len() % 4 != 0 {
        body.push(0);
    }
    let mut rec = (0x8000_0000u32 | body.len() as u32).to_be_bytes().to_vec();
    rec.extend_from_slice(&body);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(&rec).await.expect("send");
    let mut hdr = [0u8; 4];
    s.read_exact(&mut hdr).await.expect("reply header");
    let len = (u32::from_be_bytes(hdr) & 0x7fff_ffff) as usize;
    let mut reply = vec![0u8; len];
    s.read_exact(&mut reply).await.expect("reply");
    let word = |i: usize| u32::from_be_bytes(reply[i * 4..i * 4 + 4].try_into().expect("4"));
    // xid, REPLY, MSG_ACCEPTED, verifier (AUTH_NONE, 0), SUCCESS, then MNT3_OK.
    assert_eq!(
        (word(0), word(1), word(2), word(5), word(6)),
        (0x1234, 1, 0, 0, 0)
    );
    let fh_len = word(7) as usize;
    assert!(fh_len > 8 && fh_len <= 64, "file handle of {fh_len} bytes");
}
