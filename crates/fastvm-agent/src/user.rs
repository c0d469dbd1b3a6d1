//! Users of the guest: the image's `User` ([`ExecDefaults::user`]) resolved
//! in the guest's own `/etc/passwd` and `/etc/group`, the way a container
//! runtime (runc) does, so an imported image runs as it would under Docker.
//!
//! ```text
//!  name        passwd entry: uid, gid, home; groups: gid + every group listing name
//!  uid         passwd entry of uid if any (as above), else gid 0, home /, no name
//!  name:group  passwd entry for uid and home; gid = group (name in /etc/group or a
//!  uid:gid     number); groups: that gid only
//! ```
//!
//! The files are parsed tolerantly: comments, blank, NIS (`+`/`-`) and
//! malformed lines are skipped; a missing file is an empty one. `root`
//! resolves without an entry (uid 0, gid 0, home `/root`), as every image
//! expects it to.
//!
//! [`ExecDefaults::user`]: fastvm_agent_proto::ExecDefaults

use std::io;

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PasswdEntry {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) home: String,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GroupEntry {
    pub(crate) name: String,
    pub(crate) gid: u32,
    pub(crate) members: Vec<String>,
}

/// Who an exec runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Supplementary groups (the primary gid first).
    pub(crate) groups: Vec<u32>,
    /// `HOME`.
    pub(crate) home: String,
    /// `USER` and `LOGNAME`: the passwd name, else the uid as text.
    pub(crate) name: String,
}

fn usable(line: &str) -> bool {
    let l = line.trim_start();
    !l.is_empty() && !l.starts_with('#') && !l.starts_with('+') && !l.starts_with('-')
}

/// `name:password:uid:gid:gecos:home:shell`; home may be missing or empty.
pub(crate) fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| usable(l))
        .filter_map(|line| {
            let f: Vec<&str> = line.trim_end_matches('\r').split(':').collect();
            if f.len() < 4 || f[0].is_empty() {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_owned(),
                uid: f[2].trim().parse().ok()?,
                gid: f[3].trim().parse().ok()?,
                home: f.get(5).map(|h| h.trim()).unwrap_or_default().to_owned(),
            })
        })
        .collect()
}

/// `name:password:gid:member,member`; members may be missing.
pub(crate) fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| usable(l))
        .filter_map(|line| {
            let f: Vec<&str> = line.trim_end_matches('\r').split(':').collect();
            if f.len() < 3 || f[0].is_empty() {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_owned(),
                gid: f[2].trim().parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

fn numeric(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Resolve a user spec (`name`, `uid`, `name:group`, `uid:gid`, and the
/// mixed forms) against parsed passwd and group files.
pub(crate) fn resolve(
    spec: &str,
    passwd: &[PasswdEntry],
    group: &[GroupEntry],
) -> Result<Identity, String> {
    let spec = spec.trim();
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || grp == Some("") {
        return Err(format!(
            "invalid user {spec:?} (want name, uid, name:group or uid:gid)"
        ));
    }
    let (uid, mut gid, home, name) = match numeric(user) {
        Some(uid) => match passwd.iter().find(|e| e.uid == uid) {
            Some(e) => (uid, e.gid, e.home.clone(), Some(e.name.clone())),
            None => (uid, 0, "/".to_owned(), None),
        },
        None => match passwd.iter().find(|e| e.name == user) {
            Some(e) => (e.uid, e.gid, e.home.clone(), Some(e.name.clone())),
            None if user == "root" => (0, 0, "/root".to_owned(), Some("root".to_owned())),
            None => return Err(format!("user {user:?} is not in /etc/passwd of the guest")),
        },
    };
    let groups = match grp {
        Some(g) => {
            gid = match numeric(g) {
                Some(gid) => gid,
                None => match group.iter().find(|e| e.name == g) {
                    Some(e) => e.gid,
                    None => return Err(format!("group {g:?} is not in /etc/group of the guest")),
                },
            };
            vec![gid]
        }
        None => {
            let mut groups = vec![gid];
            if let Some(n) = &name {
                for e in group.iter().filter(|e| e.members.iter().any(|m| m == n)) {
                    if !groups.contains(&e.gid) {
                        groups.push(e.gid);
                    }
                }
            }
            groups
        }
    };
    Ok(Identity {
        uid,
        gid,
        groups,
        home: if home.is_empty() {
            "/".to_owned()
        } else {
            home
        },
        name: name.unwrap_or_else(|| uid.to_string()),
    })
}

/// A file of the guest, empty when it cannot be read (a distroless image
/// may have no `/etc/group`).
fn read_or_empty(path: &str) -> String {
    match std::fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(_) => String::new(),
    }
}

/// Resolve `spec` in this guest's `/etc/passwd` and `/etc/group`.
pub(crate) fn resolve_in_guest(spec: &str) -> Result<Identity, String> {
    let passwd = parse_passwd(&read_or_empty("/etc/passwd"));
    let group = parse_group(&read_or_empty("/etc/group"));
    resolve(spec, &passwd, &group)
}

/// A `pre_exec` step switching the child to `id`: supplementary groups,
/// gid, uid (in that order: each needs the privileges the next drops).
/// With `tty`, stdin (the terminal's slave) is handed to the user first, so
/// the session can reopen and configure its terminal. Raw system calls only:
/// async-signal-safe and without allocation (the group list is built here,
/// before the fork).
pub(crate) fn switch_to(id: &Identity, tty: bool) -> impl FnMut() -> io::Result<()> + Send + Sync {
    let groups: Vec<libc::gid_t> = id.groups.clone();
    let (uid, gid) = (id.uid as libc::c_long, id.gid as libc::c_long);
    move || {
        let check = |ret: libc::c_long| {
            if ret < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: plain system calls; `groups` is a valid array of its length
        // (allocated before the fork, never touched by the parent meanwhile).
        unsafe {
            if tty {
                // -1: the group (tty) stays.
                check(libc::syscall(
                    libc::SYS_fchown,
                    0 as libc::c_long,
                    uid,
                    -1 as libc::c_long,
                ))?;
            }
            check(libc::syscall(
                libc::SYS_setgroups,
                groups.len() as libc::c_long,
                groups.as_ptr(),
            ))?;
            check(libc::syscall(libc::SYS_setresgid, gid, gid, gid))?;
            check(libc::syscall(libc::SYS_setresuid, uid, uid, uid))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/bash
# a comment

daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
app:x:1000:1000::/home/app:/bin/sh
+nisuser::::::
broken:x:notanumber:1:::
short:x:5
nohome:x:1001:1001
dup:x:1000:7::/elsewhere:
crlf:x:1002:1002::/home/crlf:/bin/sh\r
";

    const GROUP: &str = "\
root:x:0:
daemon:x:1:
wheel:x:10:app,other
docker:x:999: app
nogroup:x:65534:
app:x:1000:
bad:x:zz:app
-nis
staff:x:50:other
";

    fn res(spec: &str) -> Result<Identity, String> {
        resolve(spec, &parse_passwd(PASSWD), &parse_group(GROUP))
    }

    #[test]
    fn passwd_is_parsed_tolerantly() {
        let p = parse_passwd(PASSWD);
        let names: Vec<&str> = p.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["root", "daemon", "nobody", "app", "nohome", "dup", "crlf"]
        );
        assert_eq!(p[3].home, "/home/app");
        assert_eq!(p[4].home, "");
        assert_eq!(p[6].home, "/home/crlf");
        assert!(parse_passwd("").is_empty());
        assert!(parse_passwd("\u{0}garbage\n::::\n").is_empty());
    }

    #[test]
    fn group_is_parsed_tolerantly() {
        let g = parse_group(GROUP);
        let names: Vec<&str> = g.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["root", "daemon", "wheel", "docker", "nogroup", "app", "staff"]
        );
        assert_eq!(g[2].members, ["app", "other"]);
        assert_eq!(g[3].members, ["app"]);
        assert!(g[0].members.is_empty());
        assert_eq!(parse_group("x:x:3")[0].members, Vec::<String>::new());
    }

    #[test]
    fn a_name_takes_its_entry_and_memberships() {
        let id = res("app").expect("must succeed");
        assert_eq!(
            id,
            Identity {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 10, 999],
                home: "/home/app".into(),
                name: "app".into(),
            }
        );
        let root = res("root").expect("must succeed");
        assert_eq!((root.uid, root.gid, root.groups), (0, 0, vec![0]));
        assert_eq!(root.home, "/root");
    }

    #[test]
    fn a_uid_with_an_entry_is_that_user() {
        // The first entry of a uid wins (`dup` shares 1000).
        let id = res("1000").expect("must succeed");
        assert_eq!((id.uid, id.gid, id.name.as_str()), (1000, 1000, "app"));
        assert_eq!(id.groups, vec![1000, 10, 999]);
    }

    #[test]
    fn a_uid_without_an_entry_needs_none() {
        let id = res("4242").expect("must succeed");
        assert_eq!(
            id,
            Identity {
                uid: 4242,
                gid: 0,
                groups: vec![0],
                home: "/".into(),
                name: "4242".into(),
            }
        );
        let id = res("4242:4343").expect("must succeed");
        assert_eq!((id.uid, id.gid, id.groups), (4242, 4343, vec![4343]));
    }

    #[test]
    fn an_explicit_group_is_the_only_one() {
        let id = res("app:nogroup").expect("must succeed");
        assert_eq!((id.uid, id.gid, id.groups), (1000, 65534, vec![65534]));
        assert_eq!(id.home, "/home/app");
        let id = res("nobody:50").expect("must succeed");
        assert_eq!((id.uid, id.gid, id.groups), (65534, 50, vec![50]));
        let id = res("1000:wheel").expect("must succeed");
        assert_eq!((id.uid, id.gid, id.name.as_str()), (1000, 10, "app"));
    }

    #[test]
    fn an_entry_without_home_gets_slash() {
        let id = res("nohome").expect("must succeed");
        assert_eq!((id.uid, id.home.as_str()), (1001, "/"));
    }

    #[test]
    fn unknown_names_fail_clearly() {
        assert_eq!(
            res("x").expect_err("must fail"),
            "user \"x\" is not in /etc/passwd of the guest"
        );
        assert_eq!(
            res("app:nosuch").expect_err("must fail"),
            "group \"nosuch\" is not in /etc/group of the guest"
        );
        assert!(res("").expect_err("must fail").starts_with("invalid user"));
        assert!(res(":0")
            .expect_err("must fail")
            .starts_with("invalid user"));
        assert!(res("app:")
            .expect_err("must fail")
            .starts_with("invalid user"));
        // A uid too large for 32 bits is no number: looked up as a name.
        assert!(res("99999999999")
            .expect_err("must fail")
            .contains("not in /etc/passwd"));
    }

    #[test]
    fn root_needs_no_passwd() {
        let id = resolve("root", &[], &[]).expect("must succeed");
        assert_eq!((id.uid, id.gid, id.home.as_str()), (0, 0, "/root"));
        let id = resolve("0", &[], &[]).expect("must succeed");
        assert_eq!((id.uid, id.gid, id.home.as_str()), (0, 0, "/"));
        assert!(resolve("nobody", &[], &[]).is_err());
    }
}
