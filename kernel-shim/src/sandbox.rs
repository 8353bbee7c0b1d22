//! The sandbox a domain enters after it has received its fds.
//!
//! DESIGN ("Sandboxes"): the domain installs its own seccomp filter, on all threads,
//! after receiving its fds (a filter set before `execve` breaks the dynamic loader).
//! A forbidden syscall traps (`SECCOMP_RET_TRAP`) into a SIGSYS handler, installed
//! before the filter, which records the syscall number in the domain's stats region
//! and exits with [`SANDBOX_VIOLATION_EXIT`]; the supervisor reads the number from its
//! read-only mapping of that region and names the syscall.
//!
//! Policies are reviewed data: `policy/<role>.toml`, one entry per syscall, each with
//! a reason, compiled into the binary.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use capnet_ipc::region::{Region, RegionError, RegionRo};
use capnet_ipc::shm::{ShmRead, ShmWrite};
use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};
use serde::Deserialize;

/// The exit code of a domain killed by its own SIGSYS handler (128 + SIGSYS).
pub const SANDBOX_VIOLATION_EXIT: i32 = 159;

const POLICIES: &[(&str, &str)] = &[
    ("base", include_str!("../policy/base.toml")),
    ("driver", include_str!("../policy/driver.toml")),
    ("ip", include_str!("../policy/ip.toml")),
    ("tcp", include_str!("../policy/tcp.toml")),
    ("udp", include_str!("../policy/udp.toml")),
    ("sockets", include_str!("../policy/sockets.toml")),
    ("probe", include_str!("../policy/probe.toml")),
];

/// Errors loading a policy or entering the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// No policy for that role.
    #[error("no seccomp policy for role {0:?} (policies: base, driver, ip, tcp, udp, sockets, probe)")]
    UnknownRole(String),
    /// A policy file does not parse.
    #[error("policy {role}: {msg}")]
    Policy {
        /// The role.
        role: String,
        /// What is wrong.
        msg: String,
    },
    /// Building or installing the filter failed.
    #[error("cannot install the seccomp filter: {0}")]
    Seccomp(String),
    /// A privilege step failed.
    #[error("cannot drop privileges: {0}")]
    Privileges(String),
    /// The stats region could not be made or attached.
    #[error(transparent)]
    Region(#[from] RegionError),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    role: String,
    #[serde(default)]
    include: Vec<String>,
    #[serde(default)]
    allow: Vec<Allow>,
    #[serde(default)]
    refuse: Vec<Refuse>,
}

/// A syscall that fails with an errno instead of trapping: for calls the C
/// library makes on its own and copes with failing.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Refuse {
    /// The syscall's name (x86_64 table).
    pub syscall: String,
    /// The errno it returns.
    pub errno: u32,
    /// Who makes the call and why failing is harmless.
    pub reason: String,
    /// Optionally: refused only when argument `index` is one of `values` (and
    /// trapped otherwise, as any syscall not listed).
    pub arg: Option<ArgRule>,
}

/// One allowed syscall, as the policy file states it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Allow {
    /// The syscall's name (x86_64 table).
    pub syscall: String,
    /// Why the domain needs it.
    pub reason: String,
    /// Optionally: allowed only when argument `index` is one of `values`.
    pub arg: Option<ArgRule>,
}

/// An argument restriction.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ArgRule {
    /// Argument index (0–5).
    pub index: u8,
    /// Allowed values.
    pub values: Vec<u64>,
}

/// A role's resolved allow-list (its own entries plus those it includes).
#[derive(Debug, Clone)]
pub struct Policy {
    /// The role.
    pub role: String,
    /// Every allowed syscall with its reason.
    pub allow: Vec<Allow>,
    /// Every refused syscall (an errno, not a trap).
    pub refuse: Vec<Refuse>,
}

impl Policy {
    /// The policy compiled into this binary for `role`.
    pub fn for_role(role: &str) -> Result<Self, SandboxError> {
        Self::for_roles(&[role])
    }

    /// The union of several roles' policies (a group running several domains);
    /// a policy included by more than one is read once.
    pub fn for_roles(roles: &[&str]) -> Result<Self, SandboxError> {
        let (mut allow, mut refuse, mut seen) = (Vec::new(), Vec::new(), Vec::new());
        for role in roles {
            collect(role, &mut allow, &mut refuse, 0, &mut seen)?;
        }
        Ok(Self { role: roles.join("+"), allow, refuse })
    }

    /// Every role with a policy.
    pub fn roles() -> impl Iterator<Item = &'static str> {
        POLICIES.iter().map(|(r, _)| *r)
    }

    fn number(&self, name: &str) -> Result<i64, SandboxError> {
        syscall_number(name)
            .ok_or_else(|| SandboxError::Policy { role: self.role.clone(), msg: format!("unknown syscall {name:?}") })
    }

    /// The BPF programs, in the order they are installed: one per errno that
    /// refuses its syscalls (allowing the rest), then the allow-list that traps
    /// on everything not listed (the refused calls pass it, so the errno is
    /// what the caller sees).
    pub fn compile(&self) -> Result<Vec<seccompiler::BpfProgram>, SandboxError> {
        let seccomp = |e: &dyn std::fmt::Display| SandboxError::Seccomp(e.to_string());
        let mut programs = Vec::new();
        let mut by_errno: BTreeMap<u32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
        for r in &self.refuse {
            by_errno.entry(r.errno).or_default().insert(self.number(&r.syscall)?, arg_rules(r.arg.as_ref())?);
        }
        for (errno, rules) in by_errno {
            let filter =
                SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno), TargetArch::x86_64)
                    .map_err(|e| seccomp(&e))?;
            programs.push(filter.try_into().map_err(|e: seccompiler::BackendError| seccomp(&e))?);
        }
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for r in &self.refuse {
            rules.insert(self.number(&r.syscall)?, arg_rules(r.arg.as_ref())?);
        }
        for a in &self.allow {
            rules.entry(self.number(&a.syscall)?).or_default().extend(arg_rules(a.arg.as_ref())?);
        }
        let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
            .map_err(|e| seccomp(&e))?;
        programs.push(filter.try_into().map_err(|e: seccompiler::BackendError| seccomp(&e))?);
        Ok(programs)
    }
}

/// The rules matching a syscall whose argument `arg.index` is one of
/// `arg.values` (none: any call matches).
fn arg_rules(arg: Option<&ArgRule>) -> Result<Vec<SeccompRule>, SandboxError> {
    let seccomp = |e: &dyn std::fmt::Display| SandboxError::Seccomp(e.to_string());
    let Some(arg) = arg else { return Ok(Vec::new()) };
    arg.values
        .iter()
        .map(|v| {
            let cond = SeccompCondition::new(arg.index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *v)
                .map_err(|e| seccomp(&e))?;
            SeccompRule::new(vec![cond]).map_err(|e| seccomp(&e))
        })
        .collect()
}

fn collect(
    role: &str,
    out: &mut Vec<Allow>,
    refuse: &mut Vec<Refuse>,
    depth: u8,
    seen: &mut Vec<String>,
) -> Result<(), SandboxError> {
    if seen.iter().any(|r| r == role) {
        return Ok(());
    }
    seen.push(role.to_owned());
    if depth > 4 {
        return Err(SandboxError::Policy { role: role.into(), msg: "includes nest too deep".into() });
    }
    let text = POLICIES
        .iter()
        .find(|(r, _)| *r == role)
        .map(|(_, t)| *t)
        .ok_or_else(|| SandboxError::UnknownRole(role.into()))?;
    let file: PolicyFile =
        toml::from_str(text).map_err(|e| SandboxError::Policy { role: role.into(), msg: e.to_string() })?;
    if file.role != role {
        return Err(SandboxError::Policy { role: role.into(), msg: format!("file says role {:?}", file.role) });
    }
    for inc in &file.include {
        collect(inc, out, refuse, depth + 1, seen)?;
    }
    for r in file.refuse {
        if r.reason.trim().len() < 10 || out.iter().any(|o| o.syscall == r.syscall) {
            return Err(SandboxError::Policy {
                role: role.into(),
                msg: format!("refused {} needs a reason and no allow", r.syscall),
            });
        }
        refuse.push(r);
    }
    for a in file.allow {
        if a.reason.trim().len() < 10 {
            return Err(SandboxError::Policy { role: role.into(), msg: format!("{} has no real reason", a.syscall) });
        }
        match out.iter_mut().find(|o| o.syscall == a.syscall) {
            // A role may widen an included entry's argument values (say, one more
            // fcntl command), never lift its argument rule.
            Some(Allow { arg: Some(have), .. }) if a.arg.as_ref().is_some_and(|n| n.index == have.index) => {
                have.values.extend(a.arg.iter().flat_map(|n| n.values.iter().copied()));
            }
            Some(_) => {
                return Err(SandboxError::Policy { role: role.into(), msg: format!("{} listed twice", a.syscall) });
            }
            None => out.push(a),
        }
    }
    Ok(())
}

/// The x86_64 number of a syscall name.
pub fn syscall_number(name: &str) -> Option<i64> {
    name.parse::<syscalls::Sysno>().ok().map(|s| i64::from(s.id()))
}

/// The name of a syscall number ("syscall 999" if unknown).
pub fn syscall_name(nr: i64) -> String {
    u32::try_from(nr)
        .ok()
        .and_then(|n| syscalls::Sysno::new(n as usize))
        .map_or_else(|| format!("syscall {nr}"), |s| s.name().to_owned())
}

/// The per-domain statistics region: written by the domain, mapped read-only by the
/// supervisor. For now it carries the sandbox-violation word; counters come with the
/// domains.
#[derive(Debug)]
pub struct StatsRegion;

const STATS_MAGIC: u64 = u64::from_le_bytes(*b"CAPNETST");
const STATS_LEN: usize = 4096;
const OFF_MAGIC: usize = 0;
/// 0: no violation; otherwise the trapped syscall number + 1.
const OFF_VIOLATION: usize = 8;
/// Counters: 64-bit words from here, in an order the domain and reader agree on.
const OFF_COUNTERS: usize = 64;
/// How many counters a stats region holds.
pub const STATS_COUNTERS: usize = 256;

impl StatsRegion {
    /// Creates the region (the domain does this before entering its sandbox).
    pub fn create() -> Result<Region, RegionError> {
        let r = Region::create("capnet-stats", STATS_LEN)?;
        r.store64(OFF_MAGIC, STATS_MAGIC, Ordering::Relaxed);
        Ok(r)
    }

    /// Maps a domain's stats region read-only (the supervisor side).
    pub fn attach(fd: std::os::fd::OwnedFd) -> Result<RegionRo, RegionError> {
        RegionRo::attach(fd, STATS_LEN)
    }

    /// Publishes counter `index` (the domain side).
    pub fn set(stats: &Region, index: usize, value: u64) {
        if index < STATS_COUNTERS {
            stats.store64(OFF_COUNTERS + index * 8, value, Ordering::Relaxed);
        }
    }

    /// Reads counter `index` (the supervisor side); 0 if out of range.
    pub fn get(stats: &impl ShmRead, index: usize) -> u64 {
        if index < STATS_COUNTERS {
            stats.load64(OFF_COUNTERS + index * 8, Ordering::Relaxed)
        } else {
            0
        }
    }

    /// The syscall the domain's SIGSYS handler recorded, if any.
    pub fn violation(stats: &impl ShmRead) -> Option<i64> {
        if stats.load64(OFF_MAGIC, Ordering::Relaxed) != STATS_MAGIC {
            return None;
        }
        match stats.load32(OFF_VIOLATION, Ordering::Acquire) {
            0 => None,
            v => Some(i64::from(v) - 1),
        }
    }
}

/// Where the SIGSYS handler records the syscall number (a word in the stats region).
static VIOLATION_WORD: AtomicPtr<AtomicU32> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // siginfo_t for SIGSYS on x86_64: signo, errno, code (3 × i32), padding, then
    // _call_addr (8 bytes) at offset 16 and _syscall (i32) at offset 24.
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; we read
    // one i32 inside it.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let word = VIOLATION_WORD.load(Ordering::Acquire);
    if !word.is_null() {
        // SAFETY: the pointer was set by `enter` to a word of the stats region, which
        // `enter`'s caller keeps mapped for the life of the process.
        unsafe { &*word }.store((nr as u32).wrapping_add(1), Ordering::Release);
    }
    // SAFETY: _exit is async-signal-safe (exit_group, allowed by every policy).
    unsafe { libc::_exit(SANDBOX_VIOLATION_EXIT) }
}

/// Enters the sandbox for `role` (several roles joined by `+`: the union of their
/// policies, for a group running several domains): not dumpable, SIGSYS handler pointing at `stats`,
/// capability sets emptied (checked), then the seccomp filter on every thread.
///
/// `stats` must stay mapped for the rest of the process's life (leak it or keep it
/// in `main`). Start every thread the domain will ever have, and let each finish
/// starting, before calling this: thread start and exit run with signals blocked, so
/// a syscall the policy forbids there kills the domain by SIGSYS before the handler
/// can record which one it was.
pub fn enter(role: &str, stats: &'static Region) -> Result<(), SandboxError> {
    let roles: Vec<&str> = role.split('+').collect();
    let programs = Policy::for_roles(&roles)?.compile()?;
    // execve reset the dumpable flag the supervisor could not set for us.
    nix::sys::prctl::set_dumpable(false).map_err(|e| SandboxError::Privileges(format!("PR_SET_DUMPABLE: {e}")))?;
    VIOLATION_WORD.store((stats.word32(OFF_VIOLATION) as *const AtomicU32).cast_mut(), Ordering::Release);
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::SigAction(on_sigsys),
        nix::sys::signal::SaFlags::SA_SIGINFO,
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler only reads siginfo, stores one atomic word and calls _exit.
    unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGSYS, &action) }
        .map_err(|e| SandboxError::Privileges(format!("SIGSYS handler: {e}")))?;
    for set in [caps::CapSet::Effective, caps::CapSet::Permitted, caps::CapSet::Inheritable, caps::CapSet::Ambient] {
        caps::clear(None, set).map_err(|e| SandboxError::Privileges(format!("clearing {set:?}: {e}")))?;
    }
    let bounding = caps::read(None, caps::CapSet::Bounding).map_err(|e| SandboxError::Privileges(e.to_string()))?;
    if !bounding.is_empty() {
        return Err(SandboxError::Privileges(format!("bounding set still holds {} capabilities", bounding.len())));
    }
    for bpf in &programs {
        seccompiler::apply_filter_all_threads(bpf).map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    }
    Ok(())
}

/// What `/proc/PID/task/*/status` says about one thread of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadSandbox {
    /// Thread id.
    pub tid: u32,
    /// The `Seccomp:` field (2 = filter mode).
    pub seccomp: u32,
    /// `CapEff`, `CapPrm`, `CapBnd`, `CapInh`, `CapAmb` as hex masks.
    pub caps: [u64; 5],
    /// `NoNewPrivs`.
    pub no_new_privs: bool,
}

impl ThreadSandbox {
    /// Whether this thread is fully confined.
    pub fn confined(&self) -> bool {
        self.seccomp == 2 && self.caps.iter().all(|c| *c == 0) && self.no_new_privs
    }
}

/// Reads every thread's sandbox state of process `pid` (the supervisor's check
/// before it marks a domain ready).
pub fn inspect_threads(pid: i32) -> std::io::Result<Vec<ThreadSandbox>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let status = std::fs::read_to_string(entry.path().join("status"))?;
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("");
        let hex = |name: &str| u64::from_str_radix(field(name), 16).unwrap_or(u64::MAX);
        out.push(ThreadSandbox {
            tid: entry.file_name().to_string_lossy().parse().unwrap_or(0),
            seccomp: field("Seccomp:").parse().unwrap_or(0),
            caps: [hex("CapEff:"), hex("CapPrm:"), hex("CapBnd:"), hex("CapInh:"), hex("CapAmb:")],
            no_new_privs: field("NoNewPrivs:") == "1",
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_policy_parses_compiles_and_has_reasons() {
        for role in Policy::roles() {
            let p = Policy::for_role(role).expect(role);
            assert!(!p.allow.is_empty(), "{role}");
            p.compile().unwrap_or_else(|e| panic!("{role}: {e}"));
        }
    }

    #[test]
    fn no_policy_opens_new_fds_except_recvmsg() {
        let p = Policy::for_role("base").expect("base");
        for forbidden in [
            "openat",
            "open",
            "socket",
            "memfd_create",
            "accept",
            "accept4",
            "dup",
            "dup2",
            "dup3",
            "pipe2",
            "execve",
            "clone",
            "clone3",
            "fork",
            "ioctl",
            "setns",
            "unshare",
            "ptrace",
            "mount",
        ] {
            assert!(p.allow.iter().all(|a| a.syscall != forbidden), "{forbidden} must not be allowed");
        }
        assert!(p.allow.iter().any(|a| a.syscall == "recvmsg"));
    }

    #[test]
    fn syscall_names_round_trip() {
        assert_eq!(syscall_name(syscall_number("openat").expect("openat")), "openat");
        assert_eq!(syscall_name(100_000), "syscall 100000");
        assert!(Policy::for_role("nope").is_err());
    }
}
