//! What the supervisor and a group process exchange on the supervisor socket
//! (length-prefixed rkyv messages), and the attach handshake's reply.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use capnet_ipc::control::{decode, encode, MAX_CONTROL_LEN};
use rkyv::{Archive, Deserialize, Serialize};

/// Bytes of a group's status region (its report as JSON).
pub const STATUS_LEN: usize = 1 << 20;

/// A supervisor-socket message could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed or closed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The message could not be encoded or was not a valid archive.
    #[error(transparent)]
    Codec(#[from] capnet_ipc::control::ControlError),
    /// Its length prefix is past [`MAX_CONTROL_LEN`].
    #[error("a message of {0} bytes is over the limit")]
    TooLong(usize),
}

/// What the supervisor tells a group it starts.
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct GroupSpec {
    /// The group's name.
    pub name: String,
    /// Its domains: (name, kind).
    pub domains: Vec<(String, String)>,
    /// The channels that leave the group, in the order their capabilities are
    /// exchanged: (channel, local domain kind, remote domain kind).
    pub links: Vec<(String, String, String)>,
    /// The seccomp roles whose union it runs under.
    pub seccomp: Vec<String>,
    /// The stack's MAC address.
    pub mac: [u8; 6],
    /// The stack's address.
    pub addr: [u8; 4],
    /// Its prefix length.
    pub prefix: u8,
    /// The gateway (the kernel's side of the TAP).
    pub gateway: [u8; 4],
    /// The tcp domain's congestion control for new connections.
    pub tcp_cc: String,
    /// MiB the tcp domain may buffer for all connections together.
    pub tcp_memory_mib: u32,
    /// Zero-window probes of a closed connection before it resets.
    pub tcp_orphan_retries: u32,
    /// Seeded loss each way (driver).
    pub loss: f64,
    /// Seeded reordering each way (driver).
    pub reorder: f64,
    /// The impairment's seed.
    pub seed: u64,
    /// The device takes virtio-net headers (so TCP may use segmentation offload
    /// when the link is not impaired).
    pub vnet: bool,
    /// The driver has no device: an in-memory wire to another capnet instance,
    /// joined later (`Control::WireSide`, `Control::WirePeer`).
    pub wire: bool,
    /// Spin tokens at most held at once (the machine's cores − 1); the region
    /// holding the count is the first capability granted.
    pub spin_limit: u32,
    /// The group runs tcp apart from ip: ip lends it the driver's frame
    /// buffers, and a read-only view of the driver's frame pool follows the
    /// channels as the last capability (again, after a restart re-made it,
    /// with [`Control::FramePool`]).
    pub frame_pool: bool,
}

/// What the supervisor asks a running group.
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub enum Control {
    /// Adopt the blank channel area and pool that follow as capabilities, as the
    /// sockets domain's side of application `app`'s channel (answer: `Adopted`).
    AdoptApp(u64),
    /// Application `app`'s own area and pool follow: attach them.
    AppGrant(u64),
    /// Application `app` left: close its sockets.
    Detach(u64),
    /// Adopt the blank pool and areas that follow as this group's side of an
    /// in-memory wire (answer: `Relinked("wire")`).
    WireSide,
    /// The wire's other instance's side follows: join it, in place of any
    /// earlier peer (answer: `Joined("wire")`).
    WirePeer,
    /// Copy every frame of the driver to the `SOCK_SEQPACKET` socket that follows
    /// as a capability (`capnet capture`).
    Capture,
    /// The group at the other end of this channel is being restarted: adopt the
    /// blank regions that follow as this side of a fresh channel (answer:
    /// `Relinked`).
    Relink(String),
    /// The restarted peer's side of this channel follows: join it in place of
    /// the old channel (answer: `Joined`) — or, after `Beside`, next to it.
    Peer(String),
    /// A second tcp domain joins at the other end of this channel (`capnet swap
    /// tcp`): adopt the blank regions that follow as this side of a channel to
    /// it, keeping the present one for the old domain (answer: `Relinked`).
    Beside(String),
    /// The tcp domain swapped out on this channel is gone: drop its channel
    /// (and on the ip side its flows).
    Retired(String),
    /// A domain restarted without state: `tcp`, `udp` or `echo` (ip's echo
    /// claims) for the sockets domain; `sockets` for a transport (every socket
    /// it held belonged to the old sockets domain's applications).
    Lost(String),
    /// The driver's frame pool was made again (the driver or ip restarted): a
    /// view of the new one follows as a capability (answer:
    /// `Relinked("frame pool")`). Loans of the old one stay readable.
    FramePool,
    /// Application `app`'s send pool follows as a capability: view it, for
    /// the loans of its buffers that reach this group (tcp or ip apart from
    /// the sockets domain; the driver apart from ip, which names it `alias`
    /// on the frame channel, `frames::APP_POOL_ALIASES`; answer:
    /// `Relinked(APP_POOL)`). Sent before the sockets domain is granted the
    /// application (to the driver first), and to a restarted group before
    /// its channels are joined: nobody is lent a buffer of a pool it does not
    /// view yet.
    AppPool {
        /// The application.
        app: u64,
        /// The pool id the frame channel names its pool by.
        alias: u16,
    },
    /// Application `app` is gone: forget its send pool (handles on it keep
    /// their mapping until they drop).
    AppPoolGone(u64),
}

/// The name a frame pool's renewal is answered by, in `Relinked`.
pub const FRAME_POOL: &str = "frame pool";

/// The name an application's send pool's view is answered by, in `Relinked`.
pub const APP_POOL: &str = "application send pool";

/// The name the wire goes by in `Relinked` and `Joined`.
pub const WIRE: &str = "wire";

/// What a group tells the supervisor.
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub enum Event {
    /// Setup is done and the sandbox is entered.
    Ready,
    /// The blank regions for application `app` are ours now (mapped and
    /// sealed); the pools `pools` (ids) whose buffers we may lend it follow as
    /// capabilities (none follow when there are none), to grant it read-only.
    Adopted {
        /// The application.
        app: u64,
        /// The pools to grant it.
        pools: Vec<u16>,
    },
    /// This side of the fresh channel is ours now.
    Relinked(String),
    /// The new peer on this channel is joined (after `Peer`).
    Joined(String),
    /// This tcp domain, told to retire, has finished its last connection.
    Drained,
    /// The peer on this channel broke its protocol (garbage, a loan it never
    /// had, a message it may not send): the supervisor cuts it off.
    Broken {
        /// The channel.
        channel: String,
        /// What the peer did.
        why: String,
        /// The peer is the tcp domain being swapped out (not the one the
        /// graph runs on this channel now).
        old: bool,
    },
    /// The sockets domain cut application `app` off (it broke its channel's
    /// protocol, or left too many replies unread): the supervisor closes its
    /// attachment, so the
    /// application sees the stack go away instead of waiting on a dead channel.
    CutOff {
        /// The application.
        app: u64,
        /// What it did.
        why: String,
    },
    /// Something failed; the group goes on or exits, as it says.
    Failed(String),
}

/// Sends one length-prefixed rkyv message on a supervisor socket.
pub fn send_msg<T>(mut sock: &UnixStream, msg: &T) -> Result<(), FrameError>
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rkyv::rancor::Error,
        >,
    >,
{
    let bytes = encode(msg)?;
    let mut frame = (bytes.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&bytes);
    sock.write_all(&frame)?;
    Ok(())
}

/// Receives one length-prefixed rkyv message, validated on a private copy.
pub fn recv_msg<T>(mut sock: &UnixStream) -> Result<T, FrameError>
where
    T: Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    let mut len = [0u8; 4];
    sock.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_CONTROL_LEN {
        return Err(FrameError::TooLong(len));
    }
    let mut buf = vec![0u8; len];
    sock.read_exact(&mut buf)?;
    Ok(decode(&buf)?)
}
