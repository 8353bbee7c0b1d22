//! How an application gets its own channel to the sockets domain.
//!
//! The application connects to the supervisor's application socket
//! (`app.sock` in the [`run_dir`], mode 0600 in an owner-only directory; the caller's
//! uid is checked with `SO_PEERCRED`, and the application checks the
//! supervisor's, [`connect_trusted`]). The application sends its channel area and
//! pool first (`SCM_RIGHTS`, read and map only); the supervisor takes them off
//! its main loop with a short deadline, so a handshake that never finishes
//! delays nobody and leaves nothing behind. Only then does it give the sockets
//! domain the new channel (nothing of an aborted handshake ever reached it) and
//! answer [`AttachReply`]: `Accepted`, then the sockets domain's area and pool,
//! or `Refused` with the reason (the stack serves as many applications as the
//! sockets domain has fds for). Each side maps the other's regions read-only. The
//! Unix socket stays open for the life of the attachment: its closing is how the
//! supervisor learns the application is gone (and how the application learns
//! that it was cut off).

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use capnet_ipc::lent::LoanPool;
use capnet_ipc::msg::{MsgEnd, MsgError, MsgGrant, MsgHalf};
use capnet_ipc::End;
use capnet_kernel_shim::cap::{recv_caps, send_caps, Cap, CapError, CapKind, Rights};
use capnet_proto::app::{SEND_LAYOUT, SEND_POOL};

/// Whether the other end closed the attachment socket `sock` (the application
/// left, or the supervisor exited or cut it off). Never blocks.
pub fn closed_by_peer(sock: &UnixStream) -> bool {
    let mut probe = [0u8; 1];
    let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
    matches!(nix::sys::socket::recv(std::os::fd::AsRawFd::as_raw_fd(sock), &mut probe, flags), Ok(0))
}

/// Where the supervisor of the stack in `netns` keeps its sockets, pid and
/// logs: `/run/capnet/NETNS` for root; for an ordinary user (unprivileged mode)
/// `/tmp/capnet-UID/NETNS`, UID as the host sees it — the same path inside the
/// supervisor's own user namespace as outside it.
pub fn run_dir(netns: &str) -> PathBuf {
    use capnet_kernel_shim::userns;
    let base = if userns::privileged() {
        PathBuf::from("/run/capnet")
    } else {
        format!("/tmp/capnet-{}", userns::host_uid()).into()
    };
    base.join(netns)
}

/// Connects to a supervisor's socket (`app.sock`, `control.sock`) at `path`,
/// trusting nothing in a shared `/tmp`: first the run directory and its base
/// (`/tmp/capnet-UID` or `/run/capnet`) and the socket itself must be no
/// symlinks, belong to this user or root, and be writable by nobody else — so
/// another user cannot have put a socket of theirs there; then the process
/// serving it (`SO_PEERCRED`) must run as this user or root. Nothing is sent
/// before both checks pass.
pub fn connect_trusted(path: &std::path::Path) -> std::io::Result<UnixStream> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let me = nix::unistd::geteuid().as_raw();
    let refuse = |what: String| {
        Error::new(ErrorKind::PermissionDenied, format!("refusing to talk to {}: {what}", path.display()))
    };
    let (dir, base) = match (path.parent(), path.parent().and_then(|d| d.parent())) {
        (Some(d), Some(b)) => (d, b),
        _ => return Err(refuse("it is not inside a run directory".into())),
    };
    for d in [base, dir] {
        let m = match std::fs::symlink_metadata(d) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(e),
            Err(e) => return Err(refuse(format!("{}: {e}", d.display()))),
        };
        if !m.file_type().is_dir() {
            return Err(refuse(format!("{} is not a directory (a symlink?)", d.display())));
        }
        if m.uid() != me && m.uid() != 0 {
            return Err(refuse(format!("{} belongs to uid {}, not to us (uid {me}) or root", d.display(), m.uid())));
        }
        if m.mode() & 0o022 != 0 {
            return Err(refuse(format!("{} may be written by others (mode {:o})", d.display(), m.mode() & 0o777)));
        }
    }
    let m = std::fs::symlink_metadata(path)?;
    if !m.file_type().is_socket() || (m.uid() != me && m.uid() != 0) {
        return Err(refuse(format!("it is not a socket of ours (uid {}, {:?})", m.uid(), m.file_type())));
    }
    let sock = UnixStream::connect(path)?;
    let peer = nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| refuse(format!("no peer credentials: {e}")))?;
    if peer.uid() != me && peer.uid() != 0 {
        return Err(refuse(format!("it is served by uid {}, not by us (uid {me}) or root", peer.uid())));
    }
    Ok(sock)
}

/// The application socket of the stack in `netns`.
pub fn app_socket(netns: &str) -> PathBuf {
    run_dir(netns).join("app.sock")
}

/// The handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// A capability was refused or the socket failed.
    #[error(transparent)]
    Cap(#[from] CapError),
    /// The channel or pool could not be made or attached.
    #[error(transparent)]
    Msg(#[from] MsgError),
    /// The peer sent the wrong capabilities.
    #[error("the peer sent {0} capabilities, not a channel area and a pool")]
    Shape(usize),
    /// The supervisor did not attach the application.
    #[error("the stack refused the attachment: {0}")]
    Refused(String),
}

fn grant(sock: &UnixStream, half: &MsgHalf, send: &LoanPool) -> Result<(), AttachError> {
    let g = half.grant()?;
    let all = Rights::READ | Rights::MAP | Rights::GRANT;
    let area = Cap::new(CapKind::ChannelEnd, all, 0, g.area)?;
    let pool = Cap::new(CapKind::Pool, all, 1, g.pool)?;
    let sends =
        send.region().fd().try_clone_to_owned().map_err(|e| AttachError::Refused(format!("the send pool: {e}")))?;
    let sends = Cap::new(CapKind::Pool, all, 2, sends)?;
    let ro = Rights::READ | Rights::MAP;
    send_caps(sock.as_fd(), &[(&area, ro), (&pool, ro), (&sends, ro)])?;
    Ok(())
}

/// A channel area and pool, then `pools` more pools, as capabilities.
fn take(sock: &UnixStream, pools: usize) -> Result<(MsgGrant, Vec<OwnedFd>), AttachError> {
    let caps = recv_caps(sock.as_fd())?;
    let shape = caps.len() == 2 + pools
        && caps[0].kind == CapKind::ChannelEnd
        && caps[1..].iter().all(|c| c.kind == CapKind::Pool);
    if !shape {
        return Err(AttachError::Shape(caps.len()));
    }
    let mut fds = caps.into_iter().map(Cap::into_fd);
    match (fds.next(), fds.next()) {
        (Some(area), Some(pool)) => Ok((MsgGrant { area, pool }, fds.collect())),
        _ => Err(AttachError::Shape(0)),
    }
}

/// What the supervisor answers an application that sent its side.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum AttachReply {
    /// The sockets domain's area and pool follow as capabilities, then the
    /// pools (numbered as listed) whose buffers it may lend the application:
    /// granted read-only, read through ipc only.
    Accepted {
        /// The lent pools' ids, in the order their capabilities follow.
        pools: Vec<u16>,
    },
    /// Not attached, and why.
    Refused(String),
}

/// What an application grants the stack: its channel's area and pool, and
/// its send pool (the buffers it lends the bytes it writes in).
#[derive(Debug)]
pub struct AppSide {
    /// Its side of the channel.
    pub msg: MsgGrant,
    /// Its send pool.
    pub send_pool: OwnedFd,
}

/// The supervisor's first step, off its main loop: the application's side
/// (checked as capabilities: kinds and seals).
pub fn take_app_side(sock: &UnixStream) -> Result<AppSide, AttachError> {
    let (msg, mut pools) = take(sock, 1)?;
    let send_pool = pools.pop().ok_or(AttachError::Shape(2))?;
    Ok(AppSide { msg, send_pool })
}

/// The supervisor's last step: `Accepted`, then the sockets domain's area and
/// pool (made by the supervisor, adopted and sealed by the sockets domain)
/// and the pools it lends from (`lends`: id and fd), read-only.
pub fn accept(sock: &UnixStream, sockets_side: MsgGrant, lends: Vec<(u16, OwnedFd)>) -> Result<(), AttachError> {
    let pools = lends.iter().map(|(id, _)| *id).collect();
    capnet_proto::group::send_msg(sock, &AttachReply::Accepted { pools })
        .map_err(|e| AttachError::Refused(e.to_string()))?;
    let all = Rights::READ | Rights::MAP | Rights::GRANT;
    let mut caps = vec![
        Cap::new(CapKind::ChannelEnd, all, 0, sockets_side.area)?,
        Cap::new(CapKind::Pool, all, 1, sockets_side.pool)?,
    ];
    for (i, (_, fd)) in lends.into_iter().enumerate() {
        caps.push(Cap::new(CapKind::Pool, all, 2 + i as u32, fd)?);
    }
    let ro = Rights::READ | Rights::MAP;
    send_caps(sock.as_fd(), &caps.iter().map(|c| (c, ro)).collect::<Vec<_>>())?;
    Ok(())
}

/// What an application holds once attached.
#[derive(Debug)]
pub struct Joined {
    /// Its channel to the sockets domain.
    pub msg: MsgEnd,
    /// The pools the stack may lend it buffers of (id, fd).
    pub pools: Vec<(u16, OwnedFd)>,
    /// Its send pool, granted to the stack read-only.
    pub send_pool: LoanPool,
}

/// The application's side: grant first (its channel and its send pool), then
/// take (or hear why not): its channel, and the pools the stack may lend it
/// buffers of.
pub fn join(sock: &UnixStream, name: &str) -> Result<Joined, AttachError> {
    let half = MsgHalf::new(name, End::B)?;
    let send_pool = LoanPool::create(&format!("{name}-send"), SEND_POOL, SEND_LAYOUT)
        .map_err(|e| AttachError::Refused(format!("no send pool: {e}")))?;
    grant(sock, &half, &send_pool)?;
    let ids = match capnet_proto::group::recv_msg::<AttachReply>(sock) {
        Ok(AttachReply::Accepted { pools }) => pools,
        Ok(AttachReply::Refused(why)) => return Err(AttachError::Refused(why)),
        Err(e) => return Err(AttachError::Refused(format!("the supervisor closed the attachment ({e})"))),
    };
    if ids.len() > 16 {
        return Err(AttachError::Shape(ids.len()));
    }
    let (peer, pools) = take(sock, ids.len())?;
    Ok(Joined { msg: half.attach(End::B, peer)?, pools: ids.into_iter().zip(pools).collect(), send_pool })
}
