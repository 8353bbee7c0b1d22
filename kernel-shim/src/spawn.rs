//! Spawning a domain: `clone3` into new namespaces, a distinct uid, only the
//! granted fds, resource limits, no privileges — then `execve`.
//!
//! DESIGN ("Sandboxes"): a new pid namespace needs `clone3(CLONE_NEWPID |
//! CLONE_PIDFD)` (`unshare` in the child would move only its children). Between
//! `clone3` and `execve` the child runs on a copy of a possibly multi-threaded
//! parent, so it makes raw system calls only — no allocation, no locks — on data
//! prepared before the clone. What can only be done after `execve` (installing the
//! seccomp filter, which would break the dynamic loader if set before; clearing the
//! dumpable flag, which `execve` resets) the domain does itself in
//! [`crate::sandbox::enter`].
//!
//! In the child, in order: wait until the parent has written the uid/gid maps (when
//! in a new user namespace); `PR_SET_PDEATHSIG(SIGKILL)`; move the granted fds to
//! 3, 4, … and close every other fd; set the resource limits; drop all
//! supplementary groups and set the gid; empty the capability bounding and ambient
//! sets; set the uid; empty the effective, permitted and inheritable sets;
//! `PR_SET_NO_NEW_PRIVS`; `execve`. A failure at any step is written (step, errno)
//! to a close-on-exec pipe and the child exits 127.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::process::{pidfd_send_signal, waitid, Signal, WaitId, WaitIdOptions};

/// Which namespaces a domain gets of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Namespaces {
    /// A user namespace in which only the domain's uid and gid are mapped.
    pub user: bool,
    /// A pid namespace: the domain is pid 1 and sees no other process.
    pub pid: bool,
    /// A mount namespace.
    pub mount: bool,
    /// A network namespace: no interfaces at all (devices arrive as fds).
    pub net: bool,
    /// An IPC namespace (no System V IPC shared with anyone).
    pub ipc: bool,
}

impl Namespaces {
    /// Everything of its own: the default for a domain.
    pub const ALL: Self = Self { user: true, pid: true, mount: true, net: true, ipc: true };
}

/// Resource limits for a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `RLIMIT_AS` in bytes (virtual memory), if any.
    pub address_space: Option<u64>,
    /// `RLIMIT_NOFILE`: the most fds the domain may hold.
    pub open_files: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { address_space: Some(4 << 30), open_files: 256 }
    }
}

/// What to spawn and how to confine it.
#[derive(Debug)]
pub struct SpawnConfig {
    /// The domain binary (its name, as the domain's `argv[0]`).
    pub program: PathBuf,
    /// The binary itself, opened and checked by the caller: when given, the
    /// child starts it through this fd (`execveat(…, AT_EMPTY_PATH)`), so what
    /// runs is the file that was checked, whatever `program` names by then.
    pub image: Option<OwnedFd>,
    /// Arguments after the program name.
    pub args: Vec<String>,
    /// The whole environment the domain gets (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// Namespaces of its own.
    pub namespaces: Namespaces,
    /// Its uid (non-root), also its gid.
    pub uid: u32,
    /// Resource limits.
    pub limits: Limits,
    /// The fds it is granted, in order: they become fds 3, 4, …
    pub fds: Vec<OwnedFd>,
    /// Where its standard output and error go (its log, which the supervisor
    /// keeps); `None`: the supervisor's own.
    pub log: Option<OwnedFd>,
}

/// Spawning failed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The configuration cannot be carried out.
    #[error("bad spawn configuration: {0}")]
    Config(&'static str),
    /// `clone3` failed.
    #[error("clone3 failed: {0} (new namespaces need root or user namespaces enabled)")]
    Clone(std::io::Error),
    /// Writing the uid/gid map failed.
    #[error("cannot write the uid/gid map of the new user namespace: {0}")]
    IdMap(std::io::Error),
    /// A step in the child failed before `execve` completed.
    #[error("domain setup failed at {step}: {errno} ({program})")]
    Child {
        /// Which step.
        step: &'static str,
        /// What the kernel said.
        errno: std::io::Error,
        /// The program being started.
        program: String,
    },
}

/// A spawned domain process, held by its pidfd.
#[derive(Debug)]
pub struct Child {
    pid: i32,
    pidfd: OwnedFd,
}

/// How a domain process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitCause {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
    /// It made a system call its policy forbids (reported by its SIGSYS handler).
    SandboxViolation {
        /// The syscall's name, or its number if unknown.
        syscall: String,
    },
}

impl std::fmt::Display for ExitCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitCause::Exited(c) => write!(f, "exited with code {c}"),
            ExitCause::Signaled(s) => {
                // nix's names (SIGKILL …); rustix's Debug says "Signal::KILL".
                let name = nix::sys::signal::Signal::try_from(*s)
                    .map_or_else(|_| format!("signal {s}"), |sig| sig.as_str().to_owned());
                write!(f, "killed by {name}")
            }
            ExitCause::SandboxViolation { syscall } => write!(f, "sandbox violation: syscall {syscall}"),
        }
    }
}

impl Child {
    /// Its pid, as seen from our pid namespace.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Its pidfd (for polling: readable when it exits).
    pub fn pidfd(&self) -> &OwnedFd {
        &self.pidfd
    }

    /// Sends SIGKILL through the pidfd (never hits a recycled pid).
    pub fn kill(&self) -> std::io::Result<()> {
        pidfd_send_signal(&self.pidfd, Signal::KILL).map_err(std::io::Error::from)
    }

    /// Waits for it to end; `violation` maps the sandbox exit code to the syscall
    /// its SIGSYS handler recorded (see [`crate::sandbox::StatsRegion`]).
    pub fn wait(&self, violation: impl FnOnce() -> Option<i64>) -> std::io::Result<ExitCause> {
        self.wait_with(WaitIdOptions::EXITED, violation).map(|c| c.unwrap_or(ExitCause::Exited(-1)))
    }

    /// Like [`Child::wait`] but returns `None` at once if it is still running.
    pub fn try_wait(&self, violation: impl FnOnce() -> Option<i64>) -> std::io::Result<Option<ExitCause>> {
        self.wait_with(WaitIdOptions::EXITED | WaitIdOptions::NOHANG, violation)
    }

    fn wait_with(
        &self,
        opts: WaitIdOptions,
        violation: impl FnOnce() -> Option<i64>,
    ) -> std::io::Result<Option<ExitCause>> {
        let Some(status) = waitid(WaitId::PidFd(rustix::fd::AsFd::as_fd(&self.pidfd)), opts)? else {
            return Ok(None);
        };
        if let Some(sig) = status.terminating_signal() {
            // A trap while signals were blocked (thread start or exit, fork) is
            // delivered with the default action: still a sandbox violation.
            if sig == libc::SIGSYS {
                let syscall = violation().map_or_else(
                    || "unknown (trapped while signals were blocked)".to_owned(),
                    crate::sandbox::syscall_name,
                );
                return Ok(Some(ExitCause::SandboxViolation { syscall }));
            }
            return Ok(Some(ExitCause::Signaled(sig)));
        }
        let code = status.exit_status().unwrap_or(-1);
        if code == crate::sandbox::SANDBOX_VIOLATION_EXIT {
            if let Some(nr) = violation() {
                return Ok(Some(ExitCause::SandboxViolation { syscall: crate::sandbox::syscall_name(nr) }));
            }
        }
        Ok(Some(ExitCause::Exited(code)))
    }
}

impl Drop for Child {
    /// A dropped child must not outlive its handle: kill and reap it.
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = waitid(WaitId::PidFd(rustix::fd::AsFd::as_fd(&self.pidfd)), WaitIdOptions::EXITED);
    }
}

/// Everything the child needs, prepared before `clone3` so the child allocates
/// nothing.
struct Prepared {
    path: CString,
    /// Owns the strings `argv` points into.
    _argv_store: Vec<CString>,
    /// Owns the strings `envp` points into.
    _envp_store: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    fds: Vec<RawFd>,
    /// The log fd, or -1.
    log: RawFd,
    /// The binary's fd to start it through, or -1 (by `path`).
    image: RawFd,
    last_cap: libc::c_int,
    /// setgroups(2) is denied in this user namespace (and so in the domain's):
    /// an unprivileged supervisor's, which keeps only its user's own groups.
    setgroups_denied: bool,
    open_files: libc::rlim_t,
    address_space: libc::rlim_t,
}

fn cstr(s: &OsStr) -> Result<CString, SpawnError> {
    CString::new(s.as_bytes())
        .map_err(|_| SpawnError::Config("a program path, argument or environment entry contains NUL"))
}

fn prepare(cfg: &SpawnConfig) -> Result<Prepared, SpawnError> {
    if cfg.uid == 0 {
        return Err(SpawnError::Config("a domain may not run as uid 0"));
    }
    if cfg.fds.len() > 64 {
        return Err(SpawnError::Config("at most 64 granted fds"));
    }
    let path = cstr(cfg.program.as_os_str())?;
    let mut argv_store = vec![path.clone()];
    for a in &cfg.args {
        argv_store.push(cstr(OsStr::new(a))?);
    }
    let envp_store =
        cfg.env.iter().map(|(k, v)| cstr(OsStr::new(&format!("{k}={v}")))).collect::<Result<Vec<_>, _>>()?;
    let mut argv: Vec<_> = argv_store.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<_> = envp_store.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());
    let last_cap =
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(63);
    Ok(Prepared {
        path,
        _argv_store: argv_store,
        _envp_store: envp_store,
        argv,
        envp,
        fds: cfg.fds.iter().map(|f| f.as_raw_fd()).collect(),
        log: cfg.log.as_ref().map_or(-1, |f| f.as_raw_fd()),
        image: cfg.image.as_ref().map_or(-1, |f| f.as_raw_fd()),
        last_cap,
        setgroups_denied: std::fs::read_to_string("/proc/self/setgroups").is_ok_and(|s| s.trim() == "deny"),
        open_files: cfg.limits.open_files,
        address_space: cfg.limits.address_space.unwrap_or(libc::RLIM_INFINITY),
    })
}

const STEPS: [&str; 12] = [
    "waiting for the id maps",
    "PR_SET_PDEATHSIG",
    "moving granted fds",
    "closing other fds",
    "setrlimit",
    "setgroups",
    "setresgid",
    "dropping the capability bounding set",
    "clearing ambient capabilities",
    "setresuid",
    "capset / PR_SET_NO_NEW_PRIVS",
    "execve",
];

/// Spawns a sandboxed domain. The granted fds in `cfg.fds` stay open in the parent
/// (the caller decides whether to keep its copies).
pub fn spawn(cfg: &SpawnConfig) -> Result<Child, SpawnError> {
    let p = prepare(cfg)?;
    let (sync_r, sync_w) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| SpawnError::Clone(e.into()))?;
    let (err_r, err_w) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| SpawnError::Clone(e.into()))?;
    let ns = cfg.namespaces;
    let mut flags = libc::CLONE_PIDFD as u64;
    for (on, f) in [
        (ns.user, libc::CLONE_NEWUSER),
        (ns.pid, libc::CLONE_NEWPID),
        (ns.mount, libc::CLONE_NEWNS),
        (ns.net, libc::CLONE_NEWNET),
        (ns.ipc, libc::CLONE_NEWIPC),
    ] {
        if on {
            flags |= f as u64;
        }
    }
    let mut pidfd: libc::c_int = -1;
    // SAFETY: clone_args is plain data; zeroed is a valid "no extras" value.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = flags;
    args.pidfd = (&mut pidfd as *mut libc::c_int) as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    // SAFETY: clone3 with no stack behaves like fork: the child continues on a copy
    // of this stack. The child only runs `child_main`, which makes raw syscalls on
    // data prepared above and never returns.
    let ret = unsafe {
        libc::syscall(libc::SYS_clone3, &mut args as *mut libc::clone_args, std::mem::size_of::<libc::clone_args>())
    };
    if ret < 0 {
        return Err(SpawnError::Clone(std::io::Error::last_os_error()));
    }
    if ret == 0 {
        // SAFETY: we are the freshly cloned child; see child_main's contract.
        unsafe { child_main(&p, sync_r.as_raw_fd(), err_w.as_raw_fd(), cfg.uid, ns.user) }
    }
    let pid = ret as i32;
    // SAFETY: CLONE_PIDFD stored a new pidfd that nothing else owns.
    let child = Child { pid, pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) } };
    drop((sync_r, err_w));
    if ns.user {
        let uid = parent_id(cfg.uid, "uid_map", nix::unistd::geteuid().as_raw());
        let gid = parent_id(cfg.uid, "gid_map", nix::unistd::getegid().as_raw());
        let write = |file: &str, to: u32| {
            std::fs::write(format!("/proc/{pid}/{file}"), format!("{} {to} 1\n", cfg.uid)).map_err(SpawnError::IdMap)
        };
        write("uid_map", uid)?;
        write("gid_map", gid)?;
    }
    rustix::io::write(&sync_w, &[1]).map_err(|e| SpawnError::IdMap(e.into()))?;
    drop(sync_w);
    let mut report = [0u8; 8];
    let n = read_full(&err_r, &mut report);
    drop(p);
    if n == 8 {
        let step = STEPS
            .get(u32::from_le_bytes([report[0], report[1], report[2], report[3]]) as usize)
            .copied()
            .unwrap_or("?");
        let errno = std::io::Error::from_raw_os_error(i32::from_le_bytes([report[4], report[5], report[6], report[7]]));
        return Err(SpawnError::Child { step, errno, program: cfg.program.display().to_string() });
    }
    Ok(child)
}

/// The id of this process's user namespace that a domain's `id` maps to: the
/// same number where the namespace has it (the host's has every id), else this
/// process's own `own` — the one id an unprivileged supervisor's namespace has
/// (`crate::userns`).
fn parent_id(id: u32, map: &str, own: u32) -> u32 {
    let text = std::fs::read_to_string(format!("/proc/self/{map}")).unwrap_or_default();
    let has = text.lines().any(|l| {
        let f: Vec<u64> = l.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        matches!(f[..], [inside, _, count] if u64::from(id) >= inside && u64::from(id) < inside + count)
    });
    if has {
        id
    } else {
        own
    }
}

fn read_full(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match rustix::io::read(fd, &mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => break,
        }
    }
    n
}

/// Writes (step, errno) to `fd` and exits 127. Async-signal-safe.
///
/// # Safety
/// Only for the child between `clone3` and `execve`.
// SAFETY: (the callers') called only from `child_main`, in the child.
unsafe fn die(fd: RawFd, step: usize) -> ! {
    // SAFETY: reading errno and write/_exit are async-signal-safe raw calls.
    unsafe {
        let errno = *libc::__errno_location();
        let mut msg = [0u8; 8];
        msg[..4].copy_from_slice(&(step as u32).to_le_bytes());
        msg[4..].copy_from_slice(&errno.to_le_bytes());
        libc::write(fd, msg.as_ptr().cast(), 8);
        libc::_exit(127)
    }
}

/// The child between `clone3` and `execve`.
///
/// # Safety
/// Must be called only in the child of `clone3`/`fork`, with `p` prepared by the
/// parent. It makes raw system calls only (no allocation, no locks) and never
/// returns.
// SAFETY: (the caller's) `spawn` calls it only in the clone3 child.
unsafe fn child_main(p: &Prepared, sync_r: RawFd, err_w: RawFd, uid: u32, user_ns: bool) -> ! {
    // SAFETY: the whole block makes raw syscalls on integers, on stack arrays, and on
    // pointers into `p`, which stays alive in this copy of the parent's memory
    // until execve replaces it.
    unsafe {
        if user_ns {
            let mut b = 0u8;
            if libc::read(sync_r, (&mut b as *mut u8).cast(), 1) != 1 {
                die(err_w, 0);
            }
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
            die(err_w, 1);
        }
        // Granted fds go to 3, 4, …; the error pipe right after them. First copy
        // every source above all targets so no dup3 can clobber a source.
        let n = p.fds.len();
        let err_fd = (3 + n) as libc::c_int;
        let floor = (4 + n + 64) as libc::c_int;
        let mut tmp = [0 as libc::c_int; 64];
        for (slot, fd) in tmp.iter_mut().zip(p.fds.iter()) {
            *slot = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, floor);
            if *slot < 0 {
                die(err_w, 2);
            }
        }
        let log_tmp = if p.log >= 0 { libc::fcntl(p.log, libc::F_DUPFD_CLOEXEC, floor) } else { -1 };
        if p.log >= 0 && log_tmp < 0 {
            die(err_w, 2);
        }
        let image_tmp = if p.image >= 0 { libc::fcntl(p.image, libc::F_DUPFD_CLOEXEC, floor) } else { -1 };
        if p.image >= 0 && image_tmp < 0 {
            die(err_w, 2);
        }
        let err_tmp = libc::fcntl(err_w, libc::F_DUPFD_CLOEXEC, floor);
        if err_tmp < 0 || libc::dup3(err_tmp, err_fd, libc::O_CLOEXEC) < 0 {
            die(err_w, 2);
        }
        for (i, t) in tmp.iter().take(n).enumerate() {
            if libc::dup3(*t, 3 + i as libc::c_int, 0) < 0 {
                die(err_fd, 2);
            }
        }
        // stdout and stderr go to the log, if there is one; stdin stays.
        if log_tmp >= 0 && (libc::dup3(log_tmp, 1, 0) < 0 || libc::dup3(log_tmp, 2, 0) < 0) {
            die(err_fd, 2);
        }
        // The binary's fd, if any, right after the error pipe (close-on-exec:
        // the domain never holds it).
        let image_fd = err_fd + 1;
        if image_tmp >= 0 && libc::dup3(image_tmp, image_fd, libc::O_CLOEXEC) < 0 {
            die(err_fd, 2);
        }
        let keep = if p.image >= 0 { image_fd } else { err_fd };
        if libc::close_range((keep + 1) as libc::c_uint, libc::c_uint::MAX, 0) != 0 {
            die(err_fd, 3);
        }
        let nofile = libc::rlimit { rlim_cur: p.open_files, rlim_max: p.open_files };
        let core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &nofile) != 0 || libc::setrlimit(libc::RLIMIT_CORE, &core) != 0 {
            die(err_fd, 4);
        }
        if p.address_space != libc::RLIM_INFINITY {
            let mem = libc::rlimit { rlim_cur: p.address_space, rlim_max: p.address_space };
            if libc::setrlimit(libc::RLIMIT_AS, &mem) != 0 {
                die(err_fd, 4);
            }
        }
        // The id changes are raw system calls, not glibc's wrappers: those ask
        // every thread the parent had to change ids too and wait on a futex for
        // them — threads this copy does not have, so it would wait forever.
        if !p.setgroups_denied && libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0 {
            die(err_fd, 5);
        }
        if libc::syscall(libc::SYS_setresgid, uid, uid, uid) != 0 {
            die(err_fd, 6);
        }
        for cap in 0..=p.last_cap {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0 {
                die(err_fd, 7);
            }
        }
        if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0) != 0 {
            die(err_fd, 8);
        }
        if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
            die(err_fd, 9);
        }
        // capset(v3, all zero): empty effective, permitted and inheritable sets.
        let mut hdr = CapHeader { version: 0x2008_0522, pid: 0 };
        let data = [CapData { effective: 0, permitted: 0, inheritable: 0 }; 2];
        if libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) != 0 {
            die(err_fd, 10);
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            die(err_fd, 10);
        }
        if p.image >= 0 {
            let empty = c"".as_ptr();
            libc::syscall(libc::SYS_execveat, image_fd, empty, p.argv.as_ptr(), p.envp.as_ptr(), libc::AT_EMPTY_PATH);
        } else {
            libc::execve(p.path.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr());
        }
        die(err_fd, 11)
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The path of a binary built next to the running one (tests and the supervisor
/// find domain binaries this way).
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(name), dir.parent()?.join(name)].into_iter().find(|p| Path::new(p).exists())
}

/// Which granted fds this process has taken (bit n: fd 3 + n).
static TAKEN: std::sync::Mutex<u64> = std::sync::Mutex::new(0);

/// In a spawned domain: takes ownership of granted fd number `3 + index` (granted
/// fds arrive as 3, 4, … in the order of [`SpawnConfig::fds`]). Each can be taken
/// once; `None` if already taken or not open.
pub fn take_granted_fd(index: usize) -> Option<OwnedFd> {
    if index >= 64 {
        return None;
    }
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    if *taken & (1 << index) != 0 {
        return None;
    }
    let raw = 3 + index as RawFd;
    // SAFETY: F_GETFD on any integer is harmless; it tells whether the fd is open.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return None;
    }
    *taken |= 1 << index;
    // SAFETY: by the spawn contract fds 3.. were granted to this process and nothing
    // else in it owns them; the TAKEN bitmap makes sure each is owned at most once.
    Some(unsafe { OwnedFd::from_raw_fd(raw) })
}
