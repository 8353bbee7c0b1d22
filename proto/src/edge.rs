//! What crosses a channel between two groups, when the domains at its ends are
//! not in one process: one message type per direction of each edge of the
//! graph, so a message that may not travel an edge does not compile (and one
//! that arrives on the wrong edge does not decode: the receiver validates every
//! message as its edge's type, on a private copy, `capnet_ipc::control`).
//!
//! | edge | this way | the other way |
//! |---|---|---|
//! | ip ⇄ tcp | [`IpToTcp`]: datagrams, ICMP errors, retire | [`TcpToIp`]: segments, the flows a retiring domain keeps |
//! | ip ⇄ udp | [`IpToUdp`]: datagrams, ICMP errors | [`UdpToIp`]: datagrams, port unreachables |
//! | sockets ⇄ tcp | [`SocketsToTcp`]: calls, push requests | [`TcpToSockets`]: answers, pushes, activity |
//! | sockets ⇄ udp | [`SocketsToUdp`]: calls | [`UdpToSockets`]: answers, activity |
//! | sockets ⇄ ip | [`SocketsToIp`]: echo-socket calls | [`IpToSockets`]: answers, echo replies |
//!
//! The calls are the transport API ([`TcpCall`], [`UdpCall`], [`EchoCall`]),
//! each answered by one [`Answer`] with the same id; a transport also sends
//! `Activity` when readiness may have changed, so the sockets domain re-examines
//! its parked calls only then. A TCP receive is no call but a one-way
//! `WantPush` the tcp domain answers with one `Pushed` when the socket has
//! something (at once if it has): a receive that waits costs two messages, and
//! the sockets domain never blocks on it.
//!
//! Payload travels as a [`Payload`]: its bytes inline, or lent — loans of the
//! sender's buffers (or buffers it was lent), named by pool and ticket, given
//! back on the same channel (`capnet_runtime::link`). ip lends tcp the
//! driver's frame buffers and tcp lends them on to the sockets domain; the
//! sockets domain lends tcp the applications' send buffers and tcp lends them
//! on to ip. The udp and echo edges carry their bytes inline.

use rkyv::{Archive, Deserialize, Serialize};

use crate::app::SocketError;
use crate::Kind;

/// An IPv4 address on the wire.
pub type Addr = [u8; 4];

/// A flow: (our port, the peer's address, the peer's port).
pub type Flow = (u16, Addr, u16);

/// Payload bytes on an edge.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum Payload {
    /// Carried in the message itself.
    Inline(#[rkyv(with = capnet_ipc::control::PayloadBytes)] Vec<u8>),
    /// Lent, in order (see the module docs), with what the sender could not
    /// lend carried between the loans.
    Lent(Vec<capnet_ipc::lent::Piece>),
}

impl Payload {
    /// The bytes, when they are in the message (a loan is not: it is read
    /// through the link that brought it).
    pub fn inline(&self) -> Option<&[u8]> {
        match self {
            Payload::Inline(b) => Some(b),
            Payload::Lent(_) => None,
        }
    }

    /// The bytes, owned, when they are in the message.
    pub fn into_inline(self) -> Option<Vec<u8>> {
        match self {
            Payload::Inline(b) => Some(b),
            Payload::Lent(_) => None,
        }
    }

    /// How many bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Inline(b) => b.len(),
            Payload::Lent(p) => p.iter().map(capnet_ipc::lent::Piece::len).sum(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Payload {
    /// Copied into the message, or lent when `pieces` (`data` as the
    /// caller's ledger lent it) came.
    pub fn lent_or_copied(data: &capnet_ipc::lent::Chain, pieces: Option<Vec<capnet_ipc::lent::Piece>>) -> Self {
        match pieces {
            Some(p) => Payload::Lent(p),
            None => Payload::Inline(data.to_vec()),
        }
    }

    /// The bytes as handles: the message's own, or the lender's buffers
    /// (checked against `views`), given back to `returns` when the last
    /// handle drops.
    pub fn into_chain(
        self,
        views: &capnet_ipc::lent::Views,
        returns: &std::sync::Arc<capnet_ipc::lent::Returns>,
    ) -> Result<capnet_ipc::lent::Chain, capnet_ipc::pool::PoolError> {
        match self {
            Payload::Inline(b) => Ok(capnet_ipc::lent::Lent::from_vec(b).into()),
            Payload::Lent(pieces) => views.borrow_all(pieces, returns),
        }
    }
}

/// An inline payload's bytes; a loan reads as none. For the edges that carry
/// their bytes inline: their receivers refuse a loan as a protocol error
/// before they serve the call ([`Payload::inline`]).
impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        self.inline().unwrap_or_default()
    }
}

impl From<Vec<u8>> for Payload {
    fn from(b: Vec<u8>) -> Self {
        Payload::Inline(b)
    }
}

/// ip → a transport: a datagram for it (to tcp: lent; to udp: inline).
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Datagram {
    /// Source address.
    pub src: Addr,
    /// Destination address (ours).
    pub dst: Addr,
    /// The transport's bytes (header and payload).
    pub payload: Payload,
    /// The IPv4 header it came with (for ICMP quotes).
    pub ip_header: Vec<u8>,
}

/// ip → a transport: an ICMP error about one of its flows.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct IcmpError {
    /// Our port of the flow.
    pub local_port: u16,
    /// The peer.
    pub remote: Addr,
    /// The peer's port.
    pub remote_port: u16,
    /// ICMP type.
    pub icmp_type: u8,
    /// ICMP code.
    pub icmp_code: u8,
    /// Who sent the error.
    pub reporter: Addr,
}

/// A transport → ip: a segment to send.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Segment {
    /// Destination.
    pub dst: Addr,
    /// The transport's header, inline (the bytes it wrote itself).
    pub head: Vec<u8>,
    /// The rest of the transport's bytes: from tcp lent (the applications'
    /// send buffers, which ip views), from udp inline.
    pub segment: Payload,
    /// For a TCP segment to be cut by the device: its segment size.
    pub tso: Option<u16>,
}

/// ip → tcp.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum IpToTcp {
    /// A segment for it.
    Deliver(Datagram),
    /// An ICMP error about one of its connections.
    Icmp(IcmpError),
    /// During a swap: a new tcp domain takes every new connection; name yours
    /// (answered by [`TcpToIp::Flows`]) and finish them.
    Retire,
}

/// tcp → ip.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum TcpToIp {
    /// Send a segment (with a segment size for TSO).
    Send(Segment),
    /// The flows a retiring tcp domain keeps — every connection it holds at
    /// [`IpToTcp::Retire`].
    Flows(Vec<Flow>),
}

/// ip → udp.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum IpToUdp {
    /// Datagrams for it, in order: what one round of ip's brought (at most
    /// [`crate::app::UDP_BATCH`], about `UDP_BATCH_BYTES` of payload), one
    /// message for many.
    Deliver(Vec<Datagram>),
    /// An ICMP error about one of its flows.
    Icmp(IcmpError),
}

/// udp → ip.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum UdpToIp {
    /// Send a datagram (`tso` is always `None`).
    Send(Segment),
    /// A port unreachable for a datagram to a closed port.
    Unreachable {
        /// Whom to tell.
        to: Addr,
        /// The IP header and first bytes of the offending datagram.
        quote: Vec<u8>,
    },
}

/// sockets → tcp.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum SocketsToTcp {
    /// A call, answered by a [`TcpToSockets::Answer`] with its id.
    Call {
        /// Matches the answer.
        id: u64,
        /// What.
        call: TcpCall,
    },
    /// A receive of at most `max` bytes waits on socket `s`: push what it gets
    /// ([`TcpToSockets::Pushed`]) as soon as there is something — at once if
    /// there is already. One-way: nothing answers it but the push.
    WantPush {
        /// The socket (tcp's own id).
        s: u64,
        /// The most bytes to push.
        max: u32,
    },
}

/// tcp → sockets.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum TcpToSockets {
    /// The answer to a [`SocketsToTcp::Call`].
    Answer {
        /// The call's id.
        id: u64,
        /// The result.
        answer: Result<Answer, SocketError>,
    },
    /// What a receive on socket `s` gets (data, end of stream or an error),
    /// taken from the socket for the sockets domain: the one answer to a
    /// [`SocketsToTcp::WantPush`].
    Pushed {
        /// The socket (tcp's own id).
        s: u64,
        /// `Answer::Data` (at most the waiting call's `max` bytes), `Answer::Eof`, or the error.
        got: Result<Answer, SocketError>,
    },
    /// Readiness may have changed (parked calls may now complete).
    Activity,
}

/// sockets → udp.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum SocketsToUdp {
    /// A call, answered by a [`UdpToSockets::Answer`] with its id.
    Call {
        /// Matches the answer.
        id: u64,
        /// What.
        call: UdpCall,
    },
}

/// udp → sockets.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum UdpToSockets {
    /// The answer to a [`SocketsToUdp::Call`].
    Answer {
        /// The call's id.
        id: u64,
        /// The result.
        answer: Result<Answer, SocketError>,
    },
    /// Readiness may have changed (parked calls may now complete).
    Activity,
}

/// sockets → ip (its echo sockets).
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum SocketsToIp {
    /// A call, answered by an [`IpToSockets::Answer`] with its id.
    Call {
        /// Matches the answer.
        id: u64,
        /// What.
        call: EchoCall,
    },
}

/// ip → sockets.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum IpToSockets {
    /// The answer to a [`SocketsToIp::Call`].
    Answer {
        /// The call's id.
        id: u64,
        /// The result.
        answer: Result<Answer, SocketError>,
    },
    /// An echo reply for an echo socket.
    EchoReply {
        /// Identifier.
        ident: u16,
        /// From.
        from: Addr,
        /// Sequence number.
        seq: u16,
        /// Payload.
        data: Payload,
    },
}

/// A call of the sockets domain on a tcp domain. Socket ids are the core's own,
/// as raw numbers (the core checks their generation). Generic over its payload:
/// `Payload` on a link, `&[u8]` for a core in the same group (no copy).
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum TcpCall<P = Payload> {
    Listen { port: u16, backlog: u32 },
    LocalPort { s: u64 },
    Accept { l: u64 },
    Endpoints { s: u64 },
    Connect { addr: Addr, port: u16 },
    Connected { s: u64 },
    Send { s: u64, data: P },
    Shutdown { s: u64, read: bool, write: bool },
    Close { s: u64 },
    Abort { s: u64 },
    SetOption { s: u64, option: Opt },
    Ready { s: u64 },
}

/// A call of the sockets domain on a udp domain (generic over its payload as
/// [`TcpCall`]).
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum UdpCall<P = Payload> {
    Bind { port: u16 },
    Port { s: u64 },
    Connect { s: u64, addr: Addr, port: u16 },
    Send { s: u64, to: Option<(Addr, u16)>, data: P },
    Recv { s: u64, max: u32 },
    Close { s: u64 },
}

/// A call of the sockets domain on the ip domain, for its echo sockets (generic
/// over its payload as [`TcpCall`]).
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum EchoCall<P = Payload> {
    Claim { ident: u16 },
    Release { ident: u16 },
    Send { dst: Addr, ident: u16, seq: u16, data: P },
}

/// Payload copied out of a caller's bytes to travel a link (counted).
fn copied(data: &[u8]) -> Payload {
    capnet_ipc::pool::count_copy(data.len());
    data.to_vec().into()
}

impl<P> TcpCall<P> {
    /// The same call with its payload turned into `Q` (by `f`: copied or lent
    /// to travel a link, taken as handles off one).
    pub fn map_payload<Q>(self, f: impl FnOnce(P) -> Q) -> TcpCall<Q> {
        match self {
            TcpCall::Listen { port, backlog } => TcpCall::Listen { port, backlog },
            TcpCall::LocalPort { s } => TcpCall::LocalPort { s },
            TcpCall::Accept { l } => TcpCall::Accept { l },
            TcpCall::Endpoints { s } => TcpCall::Endpoints { s },
            TcpCall::Connect { addr, port } => TcpCall::Connect { addr, port },
            TcpCall::Connected { s } => TcpCall::Connected { s },
            TcpCall::Send { s, data } => TcpCall::Send { s, data: f(data) },
            TcpCall::Shutdown { s, read, write } => TcpCall::Shutdown { s, read, write },
            TcpCall::Close { s } => TcpCall::Close { s },
            TcpCall::Abort { s } => TcpCall::Abort { s },
            TcpCall::SetOption { s, option } => TcpCall::SetOption { s, option },
            TcpCall::Ready { s } => TcpCall::Ready { s },
        }
    }
}

impl UdpCall<&[u8]> {
    /// The call with its payload copied out, to travel a link.
    pub fn owned(self) -> UdpCall {
        match self {
            UdpCall::Bind { port } => UdpCall::Bind { port },
            UdpCall::Port { s } => UdpCall::Port { s },
            UdpCall::Connect { s, addr, port } => UdpCall::Connect { s, addr, port },
            UdpCall::Send { s, to, data } => UdpCall::Send { s, to, data: copied(data) },
            UdpCall::Recv { s, max } => UdpCall::Recv { s, max },
            UdpCall::Close { s } => UdpCall::Close { s },
        }
    }
}

impl EchoCall<&[u8]> {
    /// The call with its payload copied out, to travel a link.
    pub fn owned(self) -> EchoCall {
        match self {
            EchoCall::Claim { ident } => EchoCall::Claim { ident },
            EchoCall::Release { ident } => EchoCall::Release { ident },
            EchoCall::Send { dst, ident, seq, data } => EchoCall::Send { dst, ident, seq, data: copied(data) },
        }
    }
}

/// A TCP socket option on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum Opt {
    /// Nagle off.
    NoDelay(bool),
    /// Delayed ACKs on.
    DelayedAck(bool),
    /// Keep-alive: (idle ms, interval ms, count), or off.
    KeepAlive(Option<(u64, u64, u32)>),
    /// A congestion control by name.
    CongestionControl(String),
}

/// A successful call's result.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum Answer {
    /// Nothing to return.
    Done,
    /// A new socket.
    Id(u64),
    /// A connection taken from a listener, if one was waiting.
    Accepted(Option<u64>),
    /// A port.
    Port(u16),
    /// Yes or no.
    Bool(bool),
    /// Bytes taken.
    Count(u32),
    /// Bytes received.
    Data(Payload),
    /// The peer finished.
    Eof,
    /// The datagrams that were queued: (from, port, payload) each.
    Datagrams(Vec<(Addr, u16, Payload)>),
    /// A connection's endpoints: (our port, peer, peer's port).
    Endpoints(u16, Addr, u16),
    /// Readiness bits: readable 1, writable 2, error 4, hup 8.
    Ready(u8),
}

/// A message type of one direction of an edge: who sends it to whom.
pub trait EdgeMsg: capnet_ipc::control::Encode + capnet_ipc::control::Decode + std::fmt::Debug {
    /// The sending domain.
    const FROM: Kind;
    /// The receiving domain.
    const TO: Kind;
}

/// The messages of a caller's direction (sockets → a transport) carry calls
/// of type `C`.
pub trait Calls<C>: EdgeMsg {
    /// Call `c`, numbered `id`.
    fn call(id: u64, c: C) -> Self;
}

/// The messages of a callee's direction (a transport → sockets) carry answers.
pub trait Answers: EdgeMsg {
    /// The answer to call `id`.
    fn answer(id: u64, answer: Result<Answer, SocketError>) -> Self;
    /// This message as an answer (its call's id and result), or itself if it
    /// is something else.
    fn into_answer(self) -> Result<(u64, Result<Answer, SocketError>), Self>;
}

macro_rules! edges {
    ($($t:ident: $from:ident => $to:ident),* $(,)?) => {
        $(impl EdgeMsg for $t {
            const FROM: Kind = Kind::$from;
            const TO: Kind = Kind::$to;
        })*
    };
}

edges! {
    IpToTcp: Ip => Tcp,
    TcpToIp: Tcp => Ip,
    IpToUdp: Ip => Udp,
    UdpToIp: Udp => Ip,
    SocketsToTcp: Sockets => Tcp,
    TcpToSockets: Tcp => Sockets,
    SocketsToUdp: Sockets => Udp,
    UdpToSockets: Udp => Sockets,
    SocketsToIp: Sockets => Ip,
    IpToSockets: Ip => Sockets,
}

macro_rules! calls {
    ($($out:ident($call:ident) <=> $back:ident),* $(,)?) => {
        $(impl Calls<$call> for $out {
            fn call(id: u64, call: $call) -> Self {
                $out::Call { id, call }
            }
        }

        impl Answers for $back {
            fn answer(id: u64, answer: Result<Answer, SocketError>) -> Self {
                $back::Answer { id, answer }
            }
            fn into_answer(self) -> Result<(u64, Result<Answer, SocketError>), Self> {
                match self {
                    $back::Answer { id, answer } => Ok((id, answer)),
                    other => Err(other),
                }
            }
        })*
    };
}

calls! {
    SocketsToTcp(TcpCall) <=> TcpToSockets,
    SocketsToUdp(UdpCall) <=> UdpToSockets,
    SocketsToIp(EchoCall) <=> IpToSockets,
}

#[cfg(test)]
mod tests {
    use super::*;
    use capnet_ipc::control::{decode, encode};

    fn round_trip<M: EdgeMsg + PartialEq>(msgs: Vec<M>) {
        for m in msgs {
            let bytes = encode(&m).expect("encode");
            assert_eq!(decode::<M>(&bytes).expect("decode"), m);
        }
        // Whatever a hostile peer writes is refused, never trusted.
        for garbage in [vec![0xffu8; 64], vec![0u8; 3], vec![0x41; 4096]] {
            assert!(decode::<M>(&garbage).is_err(), "{} bytes of garbage accepted as {}", garbage.len(), M::FROM);
        }
    }

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let datagram = Datagram {
            src: [10, 77, 0, 1],
            dst: [10, 77, 0, 2],
            payload: vec![1; 1500].into(),
            ip_header: vec![0x45; 20],
        };
        round_trip(vec![IpToTcp::Deliver(datagram.clone()), IpToTcp::Retire]);
        round_trip(vec![IpToUdp::Deliver(vec![datagram])]);
        round_trip(vec![
            TcpToIp::Send(Segment {
                dst: [10, 77, 0, 1],
                head: vec![1; 32],
                segment: vec![2; 64_000].into(),
                tso: Some(1448),
            }),
            TcpToIp::Flows(vec![(80, [10, 77, 0, 1], 40000)]),
        ]);
        round_trip(vec![
            SocketsToTcp::Call {
                id: 7,
                call: TcpCall::SetOption { s: 1 << 33, option: Opt::KeepAlive(Some((1000, 500, 3))) },
            },
            SocketsToTcp::WantPush { s: 5, max: 4096 },
        ]);
        round_trip(vec![
            TcpToSockets::Answer { id: 7, answer: Err(SocketError::Invalid("no such cc".into())) },
            TcpToSockets::Activity,
            TcpToSockets::Pushed { s: 5, got: Ok(Answer::Data(vec![1, 2, 3].into())) },
        ]);
        round_trip(vec![UdpToSockets::Answer {
            id: 8,
            answer: Ok(Answer::Datagrams(vec![([1, 2, 3, 4], 53, vec![9; 10].into())])),
        }]);
    }

    /// A message of one edge does not decode as another edge's: what arrives on
    /// the wrong channel is garbage there, not a message it may not send.
    #[test]
    fn a_message_of_one_edge_is_not_one_of_another() {
        let bytes = encode(&IpToTcp::Retire).expect("encode");
        assert!(decode::<IpToUdp>(&bytes).is_err(), "ip → tcp's Retire decoded as ip → udp");
        let bytes = encode(&TcpToSockets::Activity).expect("encode");
        assert!(decode::<SocketsToTcp>(&bytes).is_err(), "tcp → sockets decoded as sockets → tcp");
    }
}
