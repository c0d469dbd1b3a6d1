//! Free space of the host's file systems (what imports and the worker's
//! registration check before they write).

use std::path::Path;

/// Bytes an unprivileged writer may still use on the file system of `dir`
/// (`statvfs` `f_bavail * f_frsize`); `None` when it cannot be read.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| (st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    #[test]
    fn free_space_of_a_real_directory() {
        let got = super::free_bytes(std::path::Path::new("/"));
        assert!(got.is_some_and(|b| b > 0), "{got:?}");
        assert_eq!(
            super::free_bytes(std::path::Path::new("/no/such/dir")),
            None
        );
    }
}
