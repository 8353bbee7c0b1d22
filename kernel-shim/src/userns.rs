//! Unprivileged mode: a user namespace of the supervisor's own, owning the
//! network namespace the stack's TAP lives in.
//!
//! An ordinary user cannot make a named namespace under `/run/netns` or a TAP in
//! the host's network namespace. [`enter_own`] makes the calling process root of
//! a new user namespace — its uid and gid, and only those, mapped to 0 — with a
//! new network namespace it owns: there it may create the TAP, configure it, and
//! spawn domains in namespaces of their own. Domains' uids then map onto the one
//! uid the namespace has (see `spawn`): they keep their own namespaces, seccomp
//! and empty capability sets, but share the user's host uid.
//!
//! [`join`] is the way in for the user's other processes (`capnet exec`): the
//! owner of a user namespace may enter it and the network namespace it owns.

use std::os::fd::AsFd;
use std::path::Path;

/// Entering or making a namespace failed.
#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    /// A system call failed.
    #[error("cannot {what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// What the kernel said.
        source: std::io::Error,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UsernsError {
    let what = what.into();
    move |source| UsernsError::Sys { what, source }
}

/// Whether this process runs as root of the host's (initial) user namespace —
/// the privileged mode, with named namespaces and `/run/capnet`.
pub fn privileged() -> bool {
    nix::unistd::geteuid().is_root() && initial_user_namespace()
}

/// Whether this process is in the host's user namespace (its uid map is the
/// identity over every uid).
fn initial_user_namespace() -> bool {
    std::fs::read_to_string("/proc/self/uid_map")
        .is_ok_and(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
}

/// This process's effective uid as the host's user namespace sees it (the
/// same number outside a user namespace; the mapped one inside).
pub fn host_uid() -> u32 {
    let me = nix::unistd::geteuid().as_raw();
    let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    for line in map.lines() {
        let f: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        if let [inside, outside, count] = f[..] {
            if u64::from(me) >= inside && u64::from(me) < inside + count {
                return (outside + u64::from(me) - inside) as u32;
            }
        }
    }
    me
}

/// Makes this process root of a new user namespace (its uid and gid mapped to
/// 0) that owns a new network namespace, and moves it into both. Must be called
/// while the process has one thread (the kernel refuses a new user namespace to
/// a threaded process).
pub fn enter_own() -> Result<(), UsernsError> {
    let (uid, gid) = (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw());
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER | nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
        sys("make a user and a network namespace (are unprivileged user namespaces allowed here?)")(e.into())
    })?;
    // Without CAP_SETGID outside, setgroups must be denied before the gid map.
    std::fs::write("/proc/self/setgroups", "deny").map_err(sys("deny setgroups"))?;
    std::fs::write("/proc/self/uid_map", format!("0 {uid} 1\n")).map_err(sys("write the uid map"))?;
    std::fs::write("/proc/self/gid_map", format!("0 {gid} 1\n")).map_err(sys("write the gid map"))?;
    Ok(())
}

/// Moves this (single-threaded) process into the user namespace of process
/// `pid` when it is not ours already, then into its network namespace.
pub fn join(pid: i32) -> Result<(), UsernsError> {
    let proc = Path::new("/proc").join(pid.to_string()).join("ns");
    let open = |n: &str| std::fs::File::open(proc.join(n)).map_err(sys(format!("open {}", proc.join(n).display())));
    let same = |n: &str| -> bool {
        use std::os::unix::fs::MetadataExt;
        let a = std::fs::metadata(proc.join(n)).map(|m| (m.dev(), m.ino()));
        let b = std::fs::metadata(Path::new("/proc/self/ns").join(n)).map(|m| (m.dev(), m.ino()));
        matches!((a, b), (Ok(x), Ok(y)) if x == y)
    };
    if !same("user") {
        let user = open("user")?;
        nix::sched::setns(user.as_fd(), nix::sched::CloneFlags::CLONE_NEWUSER)
            .map_err(|e| sys(format!("enter the user namespace of process {pid}"))(e.into()))?;
    }
    let net = open("net")?;
    nix::sched::setns(net.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| sys(format!("enter the network namespace of process {pid}"))(e.into()))?;
    Ok(())
}
