//! What the supervisor trusts a program to run as a domain: a binary checked
//! (owner, mode, no symlink on the way) and held open, so what runs is what was checked.

use std::os::fd::OwnedFd;

use anyhow::{bail, Result};
use capnet_kernel_shim::userns;

/// Opens a program the supervisor may start as a domain, once, and checks what
/// it opened: an absolute path, walked one component at a time from `/` without
/// following a symlink (`O_NOFOLLOW` at every step), through directories that
/// belong to root or the supervisor's user and that nobody else may write
/// (unless sticky, as `/tmp`: then nobody else may replace what is ours), to an
/// executable regular file that only root or the supervisor's user owns and
/// nobody else may write (it runs with the authority the graph grants). The fd
/// is what the domain is started through, at the swap and at every restart
/// after it: what the path names later does not matter.
pub(crate) fn check_binary(path: &str) -> Result<OwnedFd> {
    use rustix::fs::{fstat, openat, FileType, Mode, OFlags, CWD};
    let p = std::path::Path::new(path);
    if !p.is_absolute() {
        bail!("{path}: give the binary's absolute path");
    }
    let me = nix::unistd::geteuid().as_raw();
    // In its own user namespace an unprivileged supervisor sees root's and every
    // other user's files as the overflow uid: directories can then only be
    // checked for their mode (the file itself must be the user's own).
    let overflow = (!userns::privileged())
        .then(|| std::fs::read_to_string("/proc/sys/kernel/overflowuid").ok()?.trim().parse::<u32>().ok())
        .flatten();
    let owner_ok = |uid: u32| uid == 0 || uid == me || Some(uid) == overflow;
    let mut names = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::RootDir => {}
            std::path::Component::Normal(n) => names.push(n),
            _ => bail!("{path}: give the binary's path without . or .. in it"),
        }
    }
    let Some((file, dirs)) = names.split_last() else { bail!("{path} is not a file") };
    let mut dir = openat(CWD, "/", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    let mut at = std::path::PathBuf::from("/");
    for name in dirs.iter().copied().map(Some).chain([None]) {
        let st = fstat(&dir)?;
        if !owner_ok(st.st_uid) {
            bail!("{path}: {} belongs to uid {}, neither root nor the supervisor's user", at.display(), st.st_uid);
        }
        if st.st_mode & 0o022 != 0 && st.st_mode & 0o1000 == 0 {
            bail!(
                "{path}: {} may be written by others (mode {:o}): refusing to run a domain from it",
                at.display(),
                st.st_mode & 0o7777
            );
        }
        let Some(name) = name else { break };
        at.push(name);
        dir = openat(&dir, name, OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| anyhow::anyhow!("{path}: {} is not a directory of its own (a symlink?): {e}", at.display()))?;
    }
    let fd = openat(&dir, *file, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()).map_err(|e| {
        if e == rustix::io::Errno::LOOP {
            anyhow::anyhow!("{path} is a symlink: give the path of the file itself")
        } else {
            anyhow::anyhow!("{path}: cannot open it: {e}")
        }
    })?;
    let st = fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        bail!("{path} is not a regular file");
    }
    if st.st_mode & 0o111 == 0 {
        bail!("{path} is not executable");
    }
    if st.st_mode & 0o022 != 0 {
        bail!("{path} is writable by others (mode {:o}): refusing to run it as a domain", st.st_mode & 0o777);
    }
    if !userns::privileged() && st.st_uid != me {
        bail!("{path} is not the user's own file (an unprivileged supervisor runs only those): copy it to a file of yours");
    }
    if st.st_uid != 0 && st.st_uid != me {
        bail!("{path} belongs to uid {}, neither root nor the supervisor's user", st.st_uid);
    }
    Ok(fd)
}
