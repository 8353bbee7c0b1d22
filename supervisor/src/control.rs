//! The control socket: length-prefixed rkyv messages between the CLI and a running
//! supervisor, validated on a private copy (capnet_ipc::control), callers checked
//! with `SO_PEERCRED`.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use rkyv::{Archive, Deserialize, Serialize};

/// Where a supervisor keeps its sockets, pid and log.
pub use capnet::attach::run_dir;

/// Makes the run directory of the stack in `netns`, owner-only. Unprivileged,
/// its parent is `/tmp/capnet-UID`: one that exists must be ours and writable by
/// nobody else (someone may have made it first in the shared `/tmp`).
pub fn make_run_dir(netns: &str) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let dir = run_dir(netns);
    let base = dir.parent().ok_or_else(|| anyhow!("{} has no parent", dir.display()))?;
    match std::fs::DirBuilder::new().mode(0o700).create(base) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("making {}", base.display())),
    }
    let meta = std::fs::symlink_metadata(base)?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o022 != 0 {
        bail!(
            "{} is not a directory of ours that only we may write: refusing to keep capnet's sockets there",
            base.display()
        );
    }
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

/// The control socket of the stack in `netns`.
pub fn socket_path(netns: &str) -> PathBuf {
    run_dir(netns).join("control.sock")
}

/// What the CLI asks.
#[derive(Debug, Archive, Serialize, Deserialize, PartialEq)]
pub enum Request {
    /// The status object, as JSON.
    Status,
    /// Stop and clean up.
    Down,
    /// Copies of the driver's frames: answered `Ok`, then the reading end of a
    /// `SOCK_SEQPACKET` socket as a capability.
    Capture,
    /// Restart a domain (its group) now, as if it had died.
    Restart(String),
    /// Another instance joins this one's in-memory wire (`capnet up --wire-to`):
    /// its side follows as capabilities; answered `Ok`, then ours.
    Wire {
        /// The other instance's namespace (to join it again after a restart here).
        from: String,
    },
    /// The instance owning the wire asks the one that joined it to join again
    /// (its driver restarted, or dropped a peer that broke the wire).
    WireAgain,
    /// Replace a domain with another program (`capnet swap DOMAIN --with BINARY`).
    Swap {
        /// The domain.
        domain: String,
        /// The new program's absolute path.
        binary: String,
    },
}

/// What the supervisor answers.
#[derive(Debug, Archive, Serialize, Deserialize, PartialEq)]
pub enum Reply {
    /// The status object, as JSON text.
    Status(String),
    /// Done.
    Ok,
    /// Refused, with the reason.
    Refused(String),
}

/// One length-prefixed rkyv message each way: the same framing the supervisor
/// uses with its groups.
pub use capnet_proto::group::{recv_msg as recv, send_msg as send};

/// Asks the stack in `netns` one thing.
pub fn ask(netns: &str, req: &Request) -> Result<Reply> {
    ask_keep(netns, req).map(|(reply, _)| reply)
}

/// Asks the stack in `netns` one thing and keeps the connection (for what the
/// supervisor sends after its reply).
pub fn ask_keep(netns: &str, req: &Request) -> Result<(Reply, UnixStream)> {
    let path = socket_path(netns);
    let s = match capnet::attach::connect_trusted(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(e),
        Err(e) => {
            let why = format!("capnet is not up in namespace {netns} (no answer on {})", path.display());
            bail!("{why}: start it with `capnet up` ({e})")
        }
    };
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    send(&s, req)?;
    let reply = recv(&s).map_err(|e| anyhow!("the supervisor did not answer: {e}"))?;
    Ok((reply, s))
}
