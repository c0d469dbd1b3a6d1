//! NFS file handles of volume objects: the host kernel's own file handle
//! (`name_to_handle_at`), which stays valid across worker restarts and
//! follows an object through renames, bound to its volume by a MAC.
//!
//! ```text
//!  byte 0       kind: 0 = the export root (the handle is 1 byte long), 1 = object
//!  1..12        volume id, 11 bytes (the 22 hex digits of vol_<hex>)
//!  12           n, length of the kernel handle (at most KERNEL_MAX)
//!  13..17       kernel handle type (i32, little endian)
//!  17..17+n     kernel handle bytes
//!  then 16      HMAC-SHA256 (truncated) of all the bytes before, under the store's key
//! ```
//!
//! Bucket mounts (crate::buckets) name their objects by number instead
//! (object keys are longer than a handle): `2`, the mount id (11 bytes of
//! `bm_<22 hex>`), the serving process's epoch (8 bytes: numbers of an
//! earlier worker process are stale, never another object), the object's
//! number (8 bytes); unsealed, they only mean something to the one VM's export
//! that numbered them.
//!
//! A guest can send any bytes as a handle. Without a valid MAC a handle is
//! refused (`NFS3ERR_BADHANDLE`), so a guest can only name objects the server
//! handed out for that volume: it cannot forge the kernel handle of a host
//! file outside the volume, nor use one volume's handle on another.

use hmac::{Hmac, Mac};
use nfs3_server::vfs::FileHandle;
use sha2::Sha256;

/// Volume ids as the handle stores them.
pub type VolumeKey = [u8; 11];

/// Longest kernel handle that fits (ext4 and tmpfs give 8 to 12 bytes).
pub const KERNEL_MAX: usize = 20;
const MAC_LEN: usize = 16;
const HEADER: usize = 17;
/// nfs3_server keeps 8 of the 64 bytes of an NFSv3 handle for itself.
const MAX_LEN: usize = 56;

/// A handle as the NFS server stores it.
#[derive(Clone, PartialEq, Eq)]
pub struct VolHandle {
    bytes: Vec<u8>,
}

impl std::fmt::Debug for VolHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VolHandle({})", hex::encode(&self.bytes))
    }
}

impl FileHandle for VolHandle {
    fn len(&self) -> usize {
        self.bytes.len()
    }
    fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        (!bytes.is_empty() && bytes.len() <= MAX_LEN).then(|| VolHandle {
            bytes: bytes.to_vec(),
        })
    }
}

/// What a verified handle names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Named {
    /// The export's root: a directory listing the attached volumes.
    ExportRoot,
    /// An object of a volume, by its kernel handle.
    Object {
        volume: VolumeKey,
        kernel_type: i32,
        kernel: Vec<u8>,
    },
}

/// Makes and checks handles under one key.
#[derive(Clone)]
pub struct Sealer {
    key: [u8; 32],
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<key>)")
    }
}

impl Sealer {
    pub fn new(key: [u8; 32]) -> Sealer {
        Sealer { key }
    }

    fn mac(&self, bytes: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .expect("HMAC takes keys of any length");
        mac.update(bytes);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&full[..MAC_LEN]);
        out
    }

    pub fn export_root() -> VolHandle {
        VolHandle { bytes: vec![0] }
    }

    /// The handle of a volume object; `None` when the kernel handle is too
    /// long to fit (a file system this server cannot export).
    pub fn seal(&self, volume: &VolumeKey, kernel_type: i32, kernel: &[u8]) -> Option<VolHandle> {
        if kernel.len() > KERNEL_MAX {
            return None;
        }
        let mut bytes = Vec::with_capacity(HEADER + kernel.len() + MAC_LEN);
        bytes.push(1);
        bytes.extend_from_slice(volume);
        bytes.push(kernel.len() as u8);
        bytes.extend_from_slice(&kernel_type.to_le_bytes());
        bytes.extend_from_slice(kernel);
        let mac = self.mac(&bytes);
        bytes.extend_from_slice(&mac);
        Some(VolHandle { bytes })
    }

    /// What `h` names, if this server made it.
    pub fn open(&self, h: &VolHandle) -> Option<Named> {
        let b = &h.bytes;
        match b.first()? {
            0 if b.len() == 1 => return Some(Named::ExportRoot),
            1 => {}
            _ => return None,
        }
        let n = usize::from(*b.get(12)?);
        if n > KERNEL_MAX || b.len() != HEADER + n + MAC_LEN {
            return None;
        }
        let (body, mac) = b.split_at(HEADER + n);
        // Constant time: the MAC type's verify does it.
        let mut check = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .expect("HMAC takes keys of any length");
        check.update(body);
        check.verify_truncated_left(mac).ok()?;
        let mut volume = [0u8; 11];
        volume.copy_from_slice(&body[1..12]);
        let kernel_type = i32::from_le_bytes(body[13..17].try_into().ok()?);
        Some(Named::Object {
            volume,
            kernel_type,
            kernel: body[HEADER..].to_vec(),
        })
    }
}

/// The handle of object `ino` of bucket mount `mount`, numbered by the
/// process of `epoch`.
pub fn bucket_handle(mount: &VolumeKey, epoch: u64, ino: u64) -> VolHandle {
    let mut bytes = Vec::with_capacity(28);
    bytes.push(2);
    bytes.extend_from_slice(mount);
    bytes.extend_from_slice(&epoch.to_le_bytes());
    bytes.extend_from_slice(&ino.to_le_bytes());
    VolHandle { bytes }
}

/// `(mount, epoch, ino)` of a bucket-mount handle; `None` for other handles.
pub fn open_bucket_handle(h: &VolHandle) -> Option<(VolumeKey, u64, u64)> {
    let b = &h.bytes;
    if b.len() != 28 || b[0] != 2 {
        return None;
    }
    let mut mount = [0u8; 11];
    mount.copy_from_slice(&b[1..12]);
    let epoch = u64::from_le_bytes(b[12..20].try_into().ok()?);
    let ino = u64::from_le_bytes(b[20..28].try_into().ok()?);
    Some((mount, epoch, ino))
}

/// The 11 bytes of `bm_<22 hex>`, or `None` for another shape.
pub fn bucket_mount_key(id: &str) -> Option<VolumeKey> {
    if !fastvm_types::bucket_mount::is_bucket_mount_id(id) {
        return None;
    }
    let mut key = [0u8; 11];
    hex::decode_to_slice(&id[3..], &mut key).ok()?;
    Some(key)
}

/// The 11 bytes of `vol_<22 hex>`, or `None` for another shape.
pub fn volume_key(id: &str) -> Option<VolumeKey> {
    if !fastvm_types::volume::is_volume_id(id) {
        return None;
    }
    let mut key = [0u8; 11];
    hex::decode_to_slice(&id[4..], &mut key).ok()?;
    Some(key)
}

/// `vol_<22 hex>` of a key.
pub fn volume_id(key: &VolumeKey) -> String {
    format!("vol_{}", hex::encode(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_handles_open_and_forged_ones_do_not() {
        let s = Sealer::new([7; 32]);
        let vol = volume_key("vol_0123456789abcdef012345").expect("key");
        let h = s.seal(&vol, 1, &[1, 2, 3, 4, 5, 6, 7, 8]).expect("fits");
        assert!(h.len() <= MAX_LEN);
        assert_eq!(
            s.open(&h),
            Some(Named::Object {
                volume: vol,
                kernel_type: 1,
                kernel: vec![1, 2, 3, 4, 5, 6, 7, 8]
            })
        );
        // Every single-byte change is refused.
        for i in 0..h.len() {
            let mut b = h.as_bytes().to_vec();
            b[i] ^= 1;
            let forged = VolHandle::from_bytes(&b).expect("shape");
            assert_eq!(s.open(&forged), None, "byte {i}");
        }
        // Another key, a truncated handle, an unknown kind.
        assert_eq!(Sealer::new([8; 32]).open(&h), None);
        let short = VolHandle::from_bytes(&h.as_bytes()[..h.len() - 1]).expect("shape");
        assert_eq!(s.open(&short), None);
        assert_eq!(s.open(&VolHandle::from_bytes(&[2]).expect("shape")), None);
        assert_eq!(s.open(&Sealer::export_root()), Some(Named::ExportRoot));
        assert!(s.seal(&vol, 1, &[0; KERNEL_MAX + 1]).is_none());
        assert!(VolHandle::from_bytes(&[]).is_none());
        assert!(VolHandle::from_bytes(&[1; 57]).is_none());
    }

    #[test]
    fn bucket_handles_round_trip() {
        let m = bucket_mount_key("bm_0123456789abcdef012345").expect("key");
        let h = bucket_handle(&m, 7, 42);
        assert!(h.len() <= MAX_LEN);
        assert_eq!(open_bucket_handle(&h), Some((m, 7, 42)));
        // Volume handles and the export root are not bucket handles, and a
        // bucket handle opens no volume object.
        assert_eq!(open_bucket_handle(&Sealer::export_root()), None);
        assert_eq!(Sealer::new([7; 32]).open(&h), None);
        assert_eq!(bucket_mount_key("vol_0123456789abcdef012345"), None);
    }

    #[test]
    fn volume_keys_round_trip() {
        let id = "vol_0123456789abcdef012345";
        assert_eq!(volume_id(&volume_key(id).expect("key")), id);
        assert_eq!(volume_key("vol_XYZ"), None);
        assert_eq!(volume_key("vm_0123456789abcdef012345"), None);
    }
}
