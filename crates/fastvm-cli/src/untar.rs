//! Extraction of tar streams that come from a VM (`fastvm cp VM:DIR LOCAL`):
//! the archive is written by the guest, so it is untrusted input. Members that
//! would land or point outside the destination, device files and FIFOs are
//! refused; setuid/setgid/sticky bits are dropped. The fuzz target
//! `tar_unpack` (crates/fastvm-fuzz) drives [`safe_unpack`] with mutated archives.

use anyhow::{bail, Context};
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// Why a member name is unsafe: absolute, or with a `..` component.
fn unsafe_name(p: &Path) -> Option<&'static str> {
    for c in p.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Some("has a '..' component"),
            Component::RootDir | Component::Prefix(_) => return Some("is absolute"),
        }
    }
    None
}

/// `base` joined with `rel` lexically; `None` when `..` climbs above `base`.
fn join_within(base: &Path, rel: &Path) -> Option<PathBuf> {
    let mut parts: Vec<_> = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => parts.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.iter().fold(base.to_path_buf(), |p, n| p.join(n)))
}

/// Extract a tar stream into `dest`, refusing members that would land or
/// point outside it, and device files / FIFOs. setuid/setgid/sticky bits are
/// dropped.
pub fn safe_unpack<R: Read>(reader: R, dest: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let root = dest
        .canonicalize()
        .with_context(|| format!("resolving {}", dest.display()))?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_mask(0o7000);
    archive.set_overwrite(true);
    for entry in archive.entries().context("reading the archive")? {
        let mut entry = entry.context("reading the archive")?;
        let name = entry
            .path()
            .context("a member name is not valid")?
            .into_owned();
        let shown = name.display().to_string();
        if let Some(why) = unsafe_name(&name) {
            bail!("refusing tar member {shown:?}: it {why}");
        }
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        match kind {
            T::Regular | T::Continuous | T::GNUSparse | T::Directory => {}
            T::Symlink => {
                let target = entry.link_name().context("symlink target")?.unwrap_or_default().into_owned();
                if target.is_absolute() {
                    bail!("refusing symlink {shown:?} -> {}: absolute target", target.display());
                }
                // Resolve the parent as it is on disk (it may be a symlink extracted earlier).
                let parent = name.parent().unwrap_or(Path::new(""));
                let real_parent = join_within(&root, parent).and_then(|p| p.canonicalize().ok());
                let rel_parent = match &real_parent {
                    Some(p) => p.strip_prefix(&root).map(Path::to_path_buf).ok(),
                    None => Some(parent.to_path_buf()),
                };
                if rel_parent.and_then(|p| join_within(&root, &p.join(&target))).is_none() {
                    bail!("refusing symlink {shown:?} -> {}: points outside the destination", target.display());
                }
            }
            T::Link => {
                let target = entry.link_name().context("hard link target")?.unwrap_or_default().into_owned();
                if unsafe_name(&target).is_some() {
                    bail!("refusing hard link {shown:?} -> {}: target outside the destination", target.display());
                }
            }
            other => bail!("refusing tar member {shown:?}: {other:?} entries (devices, FIFOs) are not extracted"),
        }
        // The parent must stay inside the destination even through symlinks extracted earlier.
        if let Some(parent) = name.parent().and_then(|p| join_within(&root, p)) {
            if let Ok(real) = parent.canonicalize() {
                if !real.starts_with(&root) {
                    bail!("refusing tar member {shown:?}: its directory resolves outside the destination");
                }
            }
        }
        if !entry
            .unpack_in(&root)
            .with_context(|| format!("extracting {shown:?}"))?
        {
            bail!("refusing tar member {shown:?}: it would land outside the destination");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(members: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            match kind {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    h.set_size(0);
                    // set_link_name refuses some targets itself; write raw bytes.
                    let raw = &mut h.as_old_mut().linkname;
                    raw[..data.len()].copy_from_slice(data.as_bytes());
                }
                _ => h.set_size(data.len() as u64),
            }
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            let body: &[u8] = if matches!(kind, tar::EntryType::Regular) {
                data.as_bytes()
            } else {
                &[]
            };
            b.append(&h, body).expect("append");
        }
        b.into_inner().expect("tar")
    }

    #[test]
    fn extracts_a_normal_tree() {
        let dir = tempfile::tempdir().expect("tmp");
        let dest = dir.path().join("out");
        let t = tar_of(&[
            ("./a/", tar::EntryType::Directory, ""),
            ("./a/f", tar::EntryType::Regular, "hi"),
            ("./l", tar::EntryType::Symlink, "a/f"),
        ]);
        safe_unpack(&t[..], &dest).expect("unpack");
        assert_eq!(std::fs::read_to_string(dest.join("l")).expect("read"), "hi");
    }

    #[test]
    fn refuses_escapes() {
        use tar::EntryType as T;
        let cases: &[&[(&str, T, &str)]] = &[
            &[("/abs", T::Regular, "x")],
            &[("../evil", T::Regular, "x")],
            &[("a/../../evil", T::Regular, "x")],
            &[("l", T::Symlink, "/etc")],
            &[("l", T::Symlink, "../evil")],
            &[("d/", T::Directory, ""), ("d/l", T::Symlink, "../../evil")],
            &[("h", T::Link, "/etc/passwd")],
            &[("h", T::Link, "../evil")],
            &[("dev", T::Char, "")],
            &[("fifo", T::Fifo, "")],
        ];
        for members in cases {
            let dir = tempfile::tempdir().expect("tmp");
            let dest = dir.path().join("out");
            let r = safe_unpack(&tar_of(members)[..], &dest);
            assert!(r.is_err(), "{members:?} was accepted");
            assert!(!dir.path().join("evil").exists());
            assert!(!dest.join("dev").exists() && !dest.join("fifo").exists());
        }
    }

    #[test]
    fn refuses_writing_through_a_symlink_chain() {
        use tar::EntryType as T;
        let dir = tempfile::tempdir().expect("tmp");
        let dest = dir.path().join("out");
        let r = safe_unpack(
            &tar_of(&[
                ("a", T::Symlink, "."),
                ("a/b", T::Symlink, ".."),
                ("a/b/evil", T::Regular, "x"),
            ])[..],
            &dest,
        );
        assert!(r.is_err());
        assert!(!dir.path().join("evil").exists());
    }
}
