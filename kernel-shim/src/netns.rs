//! Named network namespaces, made and removed the way iproute2 does it, so `ip
//! netns exec NAME …` works on them: a file under `/run/netns` with the namespace
//! bind-mounted on it.

use std::path::{Path, PathBuf};

/// Where named namespaces live.
pub const NETNS_DIR: &str = "/run/netns";

/// Making or removing a namespace failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The name is not usable as a file name.
    #[error("bad namespace name {0:?}: use 1 to 64 of A-Z a-z 0-9 . _ -")]
    Name(String),
    /// It exists already.
    #[error("network namespace {0} exists already: run `capnet down --netns {0}` or choose another with --netns")]
    Exists(String),
    /// A system call failed.
    #[error("cannot {what} network namespace {name} (this needs root, or CAP_SYS_ADMIN)")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The namespace.
        name: String,
        /// What the kernel said.
        source: std::io::Error,
    },
}

fn check(name: &str) -> Result<PathBuf, NetnsError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(Path::new(NETNS_DIR).join(name))
    } else {
        Err(NetnsError::Name(name.to_owned()))
    }
}

/// The file of namespace `name`.
pub fn path(name: &str) -> Result<PathBuf, NetnsError> {
    check(name)
}

/// Whether namespace `name` exists.
pub fn exists(name: &str) -> bool {
    check(name).is_ok_and(|p| p.exists())
}

/// Creates namespace `name` (an empty network namespace with only `lo`, down).
pub fn create(name: &str) -> Result<PathBuf, NetnsError> {
    let path = check(name)?;
    let sys = |what, source: std::io::Error| NetnsError::Sys { what, name: name.to_owned(), source };
    std::fs::create_dir_all(NETNS_DIR).map_err(|e| sys("create the directory of", e))?;
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(NetnsError::Exists(name.to_owned())),
        Err(e) => return Err(sys("create", e)),
    }
    // unshare moves only the calling thread: do it on a thread of its own, bind its
    // namespace onto the file, and let the thread end.
    let target = path.clone();
    let res = std::thread::spawn(move || -> Result<(), std::io::Error> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("namespace thread panicked")));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&path);
        return Err(sys("create", e));
    }
    Ok(path)
}

/// Removes namespace `name`. Its interfaces (a TAP, a veth end) go with it once no
/// process is inside it any more. Removing one that does not exist is not an error.
pub fn delete(name: &str) -> Result<(), NetnsError> {
    let path = check(name)?;
    if !path.exists() {
        return Ok(());
    }
    let sys = |what, source: std::io::Error| NetnsError::Sys { what, name: name.to_owned(), source };
    match nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(sys("unmount", e.into())),
    }
    std::fs::remove_file(&path).map_err(|e| sys("remove", e))
}
