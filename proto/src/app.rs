//! The application protocol: what crosses an application's channel, as rkyv
//! archives validated on a private copy. Addresses travel as octets.

use crate::edge::Payload;
use rkyv::{Archive, Deserialize, Serialize};

/// An unforgeable socket handle: slot, generation, and the owning application's
/// secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Archive, Serialize, Deserialize)]
pub struct Handle {
    /// Table slot.
    pub slot: u32,
    /// Bumped each time the slot is reused.
    pub generation: u32,
    /// The application's secret.
    pub secret: u64,
}

/// A call and the id its response will carry: on the channel its bytes to
/// send are a [`Payload`] (inline, or lent from the application's pool); the
/// sockets domain takes them as handles (`Request<Chain>`).
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Request<D = Payload> {
    /// Chosen by the client; echoed in the response.
    pub id: u64,
    /// What to do.
    pub call: Call<D>,
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Outgoing {
    /// Destination (`None`: the connected peer).
    pub to: Option<([u8; 4], u16)>,
    /// Payload.
    #[rkyv(with = capnet_ipc::control::PayloadBytes)]
    pub data: Vec<u8>,
}

/// A datagram received.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Incoming {
    /// Sender.
    pub from: ([u8; 4], u16),
    /// Payload.
    #[rkyv(with = capnet_ipc::control::PayloadBytes)]
    pub data: Vec<u8>,
}

/// The calls.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum Call<D = Payload> {
    /// Bind a UDP socket (0: ephemeral).
    UdpBind {
        /// Port.
        port: u16,
    },
    /// Fix a UDP socket's peer.
    UdpConnect {
        /// Socket.
        handle: Handle,
        /// Peer address.
        addr: [u8; 4],
        /// Peer port.
        port: u16,
    },
    /// Send datagrams, in order (like `sendmmsg`): answered with how many
    /// went (`Sent`; an error only when the first could not).
    UdpSend {
        /// Socket.
        handle: Handle,
        /// The datagrams.
        datagrams: Vec<Outgoing>,
    },
    /// Receive up to `max` datagrams (0 counts as 1; at most
    /// [`UDP_BATCH`], about `capnet_sockets::UDP_BATCH_BYTES` of payload), the
    /// next echo reply, or up to `max` bytes of a TCP stream; with `wait`,
    /// park until something comes.
    Recv {
        /// Socket.
        handle: Handle,
        /// Most datagrams (UDP) or bytes (TCP) to return.
        max: u32,
        /// Park instead of answering WouldBlock.
        wait: bool,
    },
    /// Give up the parked request `id` (the client's timeout passed): it is
    /// answered `TimedOut`.
    Cancel {
        /// The parked request's id.
        id: u64,
    },
    /// Close a socket.
    Close {
        /// Socket.
        handle: Handle,
    },
    /// Open an ICMP echo socket (a free identifier is chosen).
    EchoOpen,
    /// Send an echo request.
    EchoSend {
        /// Socket.
        handle: Handle,
        /// Destination.
        dst: [u8; 4],
        /// Sequence number.
        seq: u16,
        /// Payload.
        #[rkyv(with = capnet_ipc::control::PayloadBytes)]
        data: Vec<u8>,
    },
    /// Listen for TCP connections on `port` (0: ephemeral).
    TcpListen {
        /// Port.
        port: u16,
        /// SYN and accept queue limit.
        backlog: u32,
    },
    /// Take an established connection from a listener; with `wait`, park until one
    /// comes.
    TcpAccept {
        /// The listener.
        handle: Handle,
        /// Park instead of answering WouldBlock.
        wait: bool,
    },
    /// Open a TCP connection (the handshake starts; see `TcpConnected`).
    TcpConnect {
        /// Peer address.
        addr: [u8; 4],
        /// Peer port.
        port: u16,
    },
    /// Whether the handshake finished: `Done`, an error, or (with `wait`) parked
    /// until one of those.
    TcpConnected {
        /// The connection.
        handle: Handle,
        /// Park instead of answering WouldBlock.
        wait: bool,
    },
    /// Queue bytes on a connection: answered with how many fit (`Sent`).
    TcpSend {
        /// The connection.
        handle: Handle,
        /// The bytes.
        data: D,
    },
    /// Shut down reading and/or writing.
    TcpShutdown {
        /// The connection.
        handle: Handle,
        /// Reading.
        read: bool,
        /// Writing (a FIN follows the queued data).
        write: bool,
    },
    /// Reset the connection now (linger 0) and free the handle.
    TcpAbort {
        /// The connection.
        handle: Handle,
    },
    /// Set a connection option.
    TcpSetOption {
        /// The connection.
        handle: Handle,
        /// The option.
        option: TcpOption,
    },
    /// Readiness of several sockets; with `wait`, park until one is ready.
    Poll {
        /// (socket, interest bits: [`READABLE`], [`WRITABLE`]).
        items: Vec<(Handle, u8)>,
        /// Park until something is ready.
        wait: bool,
    },
}

impl<D> Request<D> {
    /// The same request with its bytes to send turned into `E` by `f` (which
    /// may refuse them: a loan the caller may not make).
    pub fn map_data<E, X>(self, f: impl FnOnce(D) -> Result<E, X>) -> Result<Request<E>, X> {
        let call = match self.call {
            Call::TcpSend { handle, data } => Call::TcpSend { handle, data: f(data)? },
            Call::UdpBind { port } => Call::UdpBind { port },
            Call::UdpConnect { handle, addr, port } => Call::UdpConnect { handle, addr, port },
            Call::UdpSend { handle, datagrams } => Call::UdpSend { handle, datagrams },
            Call::Recv { handle, max, wait } => Call::Recv { handle, max, wait },
            Call::Cancel { id } => Call::Cancel { id },
            Call::Close { handle } => Call::Close { handle },
            Call::EchoOpen => Call::EchoOpen,
            Call::EchoSend { handle, dst, seq, data } => Call::EchoSend { handle, dst, seq, data },
            Call::TcpListen { port, backlog } => Call::TcpListen { port, backlog },
            Call::TcpAccept { handle, wait } => Call::TcpAccept { handle, wait },
            Call::TcpConnect { addr, port } => Call::TcpConnect { addr, port },
            Call::TcpConnected { handle, wait } => Call::TcpConnected { handle, wait },
            Call::TcpShutdown { handle, read, write } => Call::TcpShutdown { handle, read, write },
            Call::TcpAbort { handle } => Call::TcpAbort { handle },
            Call::TcpSetOption { handle, option } => Call::TcpSetOption { handle, option },
            Call::Poll { items, wait } => Call::Poll { items, wait },
        };
        Ok(Request { id: self.id, call })
    }
}

/// The id of an application's send pool: the buffers it fills with the bytes
/// it writes and lends the sockets domain (granted at attach, read-only).
pub const SEND_POOL: u16 = 16;
/// An application's send pool: 256 buffers of 64 KiB (16 MiB of address
/// space; pages are touched only as writes fill them).
pub const SEND_LAYOUT: capnet_ipc::pool::PoolLayout =
    capnet_ipc::pool::PoolLayout { buf_size: 64 << 10, count: 256, headroom: 0 };
/// Writes shorter than this go inline in the call (a loan and its return
/// cost two ring entries, more than copying a few KiB); longer ones are lent.
pub const LEND_MIN: usize = 4096;

/// Readable (data, EOF, a pending connection, or an error).
pub const READABLE: u8 = 1;
/// Writable (send room, a finished handshake, or an error).
pub const WRITABLE: u8 = 2;
/// The connection ended with an error.
pub const ERROR: u8 = 4;
/// Both directions are finished.
pub const HANGUP: u8 = 8;

/// TCP socket options.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum TcpOption {
    /// Nagle's algorithm off (`true`) or on.
    NoDelay(bool),
    /// Delayed acknowledgments on (`true`) or off.
    DelayedAck(bool),
    /// Keep-alive: (idle ms, interval ms, probes), or off.
    KeepAlive(Option<(u64, u64, u32)>),
    /// The congestion control algorithm, by name ("newreno", "cubic"); on a
    /// listener, for the connections it accepts.
    CongestionControl(String),
}

/// A response to the request with the same id (generic over a stream's bytes
/// as [`Reply`]).
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Response<D = Payload> {
    /// The request's id.
    pub id: u64,
    /// The outcome.
    pub reply: Reply<D>,
}

/// Outcomes. Generic over a stream's bytes: a [`Payload`] on the channel (the
/// bytes, or loans of buffers of the pools the application was granted at
/// attach, read in place and given back by ticket on the same channel), a
/// chain of handles inside the sockets domain.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum Reply<D = Payload> {
    /// Done, nothing to return.
    Done,
    /// A socket was made (`port`: its UDP port, or its echo identifier).
    Bound {
        /// Its handle.
        handle: Handle,
        /// Its port or identifier.
        port: u16,
    },
    /// Datagrams received, in order (at least one; like `recvmmsg`).
    Datagrams {
        /// The datagrams.
        datagrams: Vec<Incoming>,
    },
    /// An echo reply.
    EchoReply {
        /// Who answered.
        from: [u8; 4],
        /// Its sequence number.
        seq: u16,
        /// Its payload.
        #[rkyv(with = capnet_ipc::control::PayloadBytes)]
        data: Vec<u8>,
    },
    /// A connection taken from a listener.
    Accepted {
        /// Its handle.
        handle: Handle,
        /// Our port.
        port: u16,
        /// The peer.
        peer: ([u8; 4], u16),
    },
    /// How many bytes a send queued (0: the send buffer is full).
    Sent {
        /// Bytes queued.
        n: u32,
    },
    /// Bytes of a stream; empty means the peer finished (EOF).
    Data {
        /// The bytes.
        data: D,
    },
    /// Readiness: (index into the items, bits) for each ready one.
    Ready {
        /// The ready items.
        events: Vec<(u32, u8)>,
    },
    /// The call failed.
    Err(SocketError),
}

impl<D> Reply<D> {
    /// The same reply with a stream's bytes turned into `E`.
    pub fn map_data<E>(self, f: impl FnOnce(D) -> E) -> Reply<E> {
        match self {
            Reply::Data { data } => Reply::Data { data: f(data) },
            Reply::Done => Reply::Done,
            Reply::Bound { handle, port } => Reply::Bound { handle, port },
            Reply::Datagrams { datagrams } => Reply::Datagrams { datagrams },
            Reply::EchoReply { from, seq, data } => Reply::EchoReply { from, seq, data },
            Reply::Accepted { handle, port, peer } => Reply::Accepted { handle, port, peer },
            Reply::Sent { n } => Reply::Sent { n },
            Reply::Ready { events } => Reply::Ready { events },
            Reply::Err(e) => Reply::Err(e),
        }
    }
}

/// Socket call errors; each maps to one `io::ErrorKind` in the client library.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize, thiserror::Error)]
pub enum SocketError {
    /// Not a handle of this application (forged or foreign).
    #[error("not a socket of this application (forged or foreign handle)")]
    BadHandle,
    /// The socket was closed, or the stack restarted since.
    #[error("stale socket handle: the socket was closed or the stack restarted")]
    StaleHandle,
    /// The call does not fit the socket's kind.
    #[error("wrong kind of socket for this call")]
    WrongKind,
    /// The port is in use.
    #[error("address in use")]
    AddrInUse,
    /// No destination.
    #[error("destination address required")]
    NoDestination,
    /// Too large for one datagram.
    #[error("message too large")]
    TooLarge,
    /// Nothing to receive now.
    #[error("operation would block")]
    WouldBlock,
    /// The timeout passed.
    #[error("timed out")]
    TimedOut,
    /// ICMP port unreachable came back: the peer refused.
    #[error("connection refused (ICMP port unreachable)")]
    Refused,
    /// Another ICMP error.
    #[error("ICMP error type {0} code {1}")]
    Icmp(u8, u8),
    /// No route to the destination.
    #[error("no route to host")]
    NoRoute,
    /// The peer reset the connection.
    #[error("connection reset by peer")]
    Reset,
    /// Not connected (any more).
    #[error("not connected")]
    NotConnected,
    /// Writing after a shutdown.
    #[error("broken pipe")]
    BrokenPipe,
    /// An argument the domain does not accept.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The application holds all it may of something (see `Quotas`).
    #[error("application quota reached: {what} (at most {limit})")]
    Quota {
        /// What: sockets, echo identifiers, parked calls, polled items.
        what: String,
        /// The quota.
        limit: u32,
    },
}

/// The most datagrams one call moves each way (`Call::Recv` on a UDP socket,
/// `Call::UdpSend`), and one receive of the sockets domain takes from the udp
/// domain.
pub const UDP_BATCH: usize = 64;

/// The most bytes one TCP receive returns (a message must stay under the
/// channel's message size). About 1 MiB rather than 256 KiB: an application
/// has one call outstanding, and while its reply travels and is copied the
/// connection's buffer fills — with 256 KiB calls Linux sending to a one-group
/// stack over a TAP was held by our receive window half of the time (`ss -ti`:
/// `rwnd_limited` 44–52 %); with 1000 KiB calls and 2 MiB buffers the stack
/// receives twice as fast (docs/performance.md).
pub const MAX_TCP_READ: usize = 1000 * 1024;
