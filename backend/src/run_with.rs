//! `--run-with user=NAME` (QEMU 9's spelling): the daemon opens its images
//! and sockets as the user that started it, then drops to NAME for the
//! rest of its life, so a compromise is that user's, not root's.

use std::ffi::CString;

use anyhow::{bail, Context as _};

/// Who to become.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// The name given, or `UID:GID`.
    pub user: String,
    uid: libc::uid_t,
    gid: libc::gid_t,
    /// Its groups: the user's in /etc/group for a name, looked up now
    /// because the sandbox will not let /etc be read later; just the gid
    /// for UID:GID.
    groups: Vec<libc::gid_t>,
}

/// Parses `--run-with`'s value: `user=NAME` or `user=UID:GID`, looked up
/// now, so a mistake stops the daemon before it opens anything.
pub fn parse(s: &str) -> Result<RunAs, String> {
    let mut user = None;
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("user", v)) if !v.is_empty() => user = Some(v),
            Some(("chroot" | "async-teardown", _)) => {
                return Err(format!("'{part}' is not supported; only user= is"))
            }
            _ => return Err(format!("'{part}' is not user=NAME or user=UID:GID")),
        }
    }
    let user = user.ok_or("user=NAME or user=UID:GID is required")?;
    if let Some((u, g)) = user.split_once(':') {
        let (Ok(uid), Ok(gid)) = (u.parse(), g.parse()) else {
            return Err(format!("user '{user}': UID:GID must be two numbers"));
        };
        return Ok(RunAs {
            user: user.into(),
            uid,
            gid,
            groups: vec![gid],
        });
    }
    let (uid, gid) = lookup(user)?;
    Ok(RunAs {
        user: user.into(),
        uid,
        gid,
        groups: groups(user, gid)?,
    })
}

fn groups(user: &str, gid: libc::gid_t) -> Result<Vec<libc::gid_t>, String> {
    let c = CString::new(user).map_err(|_| format!("user '{user}' has a NUL byte"))?;
    let mut n: libc::c_int = 64;
    loop {
        let mut list = vec![0 as libc::gid_t; n as usize];
        let want = n;
        // SAFETY: list has room for n entries, and n says so.
        let rc = unsafe { libc::getgrouplist(c.as_ptr(), gid, list.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            list.truncate(n as usize);
            return Ok(list);
        }
        // n now holds the count needed; a list that keeps growing is not a
        // user's.
        if n <= want || n > 65536 {
            return Err(format!("user '{user}': cannot list its groups"));
        }
    }
}

fn lookup(user: &str) -> Result<(libc::uid_t, libc::gid_t), String> {
    let c = CString::new(user).map_err(|_| format!("user '{user}' has a NUL byte"))?;
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: a zeroed passwd is a valid out-parameter.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and buf's length is
    // passed; the result points into pw and buf, which outlive its use.
    let rc =
        unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) };
    if found.is_null() {
        let why = match rc {
            0 => "no such user".to_owned(),
            e => std::io::Error::from_raw_os_error(e).to_string(),
        };
        return Err(format!("user '{user}': {why}"));
    }
    Ok((pw.pw_uid, pw.pw_gid))
}

impl RunAs {
    /// Drops to the user: its group, its supplementary groups (or just
    /// that group, for UID:GID), then its uid; and checks that root cannot
    /// be had back.
    pub fn drop_privileges(&self) -> anyhow::Result<()> {
        let what = || format!("--run-with user={}", self.user);
        // SAFETY: plain system call wrappers; glibc applies them to every
        // thread of the process.
        unsafe {
            if libc::setgid(self.gid) != 0 {
                return Err(std::io::Error::last_os_error()).with_context(what);
            }
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error()).with_context(what);
            }
            if libc::setuid(self.uid) != 0 {
                return Err(std::io::Error::last_os_error()).with_context(what);
            }
            if self.uid != 0 && libc::setuid(0) == 0 {
                bail!("{}: root could be regained after dropping to it", what());
            }
        }
        tracing::info!(
            "running as {} (uid {}, gid {})",
            self.user,
            self.uid,
            self.gid
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_looked_up_and_mistakes_named() {
        let root = parse("user=root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(parse("user=65534:65534").unwrap().uid, 65534);
        assert!(parse("user=no-such-user-here")
            .unwrap_err()
            .contains("no such user"));
        assert!(parse("user=1:x").unwrap_err().contains("two numbers"));
        assert!(parse("chroot=/x").unwrap_err().contains("not supported"));
        assert!(parse("group=x").unwrap_err().contains("user=NAME"));
        assert!(parse("").is_err());
    }
}
