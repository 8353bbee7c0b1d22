//! How an application gets its own channel to the sockets domain.
//!
//! The application connects to the supervisor's application socket
//! (`app.sock` in the [`run_dir`], mode 0600 in an owner-only directory; the caller's
//! uid is checked with `SO_PEERCRED`). The supervisor sends its end's channel area
//! and pool as capabilities (`SCM_RIGHTS`, read and map only); the application
//! answers with its own; each side maps the other's read-only. The Unix socket stays
//! open for the life of the attachment: its closing is how the supervisor learns the
//! application is gone.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use capnet_ipc::msg::{MsgEnd, MsgError, MsgGrant, MsgHalf};
use capnet_ipc::End;
use capnet_kernel_shim::cap::{recv_caps, send_caps, Cap, CapError, CapKind, Rights};

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
}

fn grant(sock: &UnixStream, half: &MsgHalf) -> Result<(), AttachError> {
    let g = half.grant()?;
    let all = Rights::READ | Rights::MAP | Rights::GRANT;
    let area = Cap::new(CapKind::ChannelEnd, all, 0, g.area)?;
    let pool = Cap::new(CapKind::Pool, all, 1, g.pool)?;
    let ro = Rights::READ | Rights::MAP;
    send_caps(sock.as_fd(), &[(&area, ro), (&pool, ro)])?;
    Ok(())
}

fn take(sock: &UnixStream) -> Result<MsgGrant, AttachError> {
    let mut caps = recv_caps(sock.as_fd())?;
    if caps.len() != 2 || caps[0].kind != CapKind::ChannelEnd || caps[1].kind != CapKind::Pool {
        return Err(AttachError::Shape(caps.len()));
    }
    let pool = caps.pop().map(Cap::into_fd);
    let area = caps.pop().map(Cap::into_fd);
    match (area, pool) {
        (Some(area), Some(pool)) => Ok(MsgGrant { area, pool }),
        _ => Err(AttachError::Shape(0)),
    }
}

/// The supervisor's side: grants the sockets domain's area and pool (made by
/// the supervisor, adopted and sealed by the sockets domain) read-only, then
/// takes the application's.
pub fn grant_and_take(sock: &UnixStream, sockets_side: MsgGrant) -> Result<MsgGrant, AttachError> {
    let all = Rights::READ | Rights::MAP | Rights::GRANT;
    let area = Cap::new(CapKind::ChannelEnd, all, 0, sockets_side.area)?;
    let pool = Cap::new(CapKind::Pool, all, 1, sockets_side.pool)?;
    let ro = Rights::READ | Rights::MAP;
    send_caps(sock.as_fd(), &[(&area, ro), (&pool, ro)])?;
    take(sock)
}

/// The application's side: take first, then grant.
pub fn join(sock: &UnixStream, name: &str) -> Result<MsgEnd, AttachError> {
    let peer = take(sock)?;
    let half = MsgHalf::new(name, End::B)?;
    grant(sock, &half)?;
    Ok(half.attach(End::B, peer)?)
}
