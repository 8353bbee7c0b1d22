//! What crosses a channel between two groups, when the domains at its ends are
//! not in one process: rkyv messages, validated by the receiver on a private copy
//! (`capnet_ipc::control`), carried by `capnet_ipc::msg`.
//!
//! - ip ⇄ a transport (tcp, udp, and the sockets domain's echo sockets): the
//!   datagrams ip delivers and the ones the transport sends, ICMP errors and
//!   echo replies — one-way messages, never waited for;
//! - sockets → a transport or ip: the transport call (the sockets core's `Transports`)
//!   calls, each a [`Call`] answered by one [`Answer`] with the same id; the
//!   transport also sends [`Msg::Activity`] when readiness may have changed, so
//!   the sockets domain re-examines its parked calls only then;
//! - sockets → tcp, a TCP receive: no call, but a one-way [`Msg::WantPush`] the
//!   tcp domain answers with one [`Msg::Pushed`] when the socket has something
//!   (at once if it has): a receive that waits costs two messages, and the
//!   sockets domain never blocks on it.

use rkyv::{Archive, Deserialize, Serialize};

use crate::app::SocketError;

/// An IPv4 address on the wire.
pub type Addr = [u8; 4];

/// One message between domains of different groups.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum Msg {
    /// ip → transport: a datagram for it.
    Deliver {
        /// Source address.
        src: Addr,
        /// Destination address (ours).
        dst: Addr,
        /// The transport's bytes (header and payload).
        payload: Vec<u8>,
        /// The IPv4 header it came with (for ICMP quotes).
        ip_header: Vec<u8>,
    },
    /// ip → transport: an ICMP error about one of its flows.
    Icmp {
        /// Our port of the flow.
        local_port: u16,
        /// The peer.
        remote: Addr,
        /// The peer's port.
        remote_port: u16,
        /// ICMP type.
        icmp_type: u8,
        /// ICMP code.
        icmp_code: u8,
        /// Who sent the error.
        reporter: Addr,
    },
    /// ip → sockets: an echo reply for an echo socket.
    EchoReply {
        /// Identifier.
        ident: u16,
        /// From.
        from: Addr,
        /// Sequence number.
        seq: u16,
        /// Payload.
        data: Vec<u8>,
    },
    /// transport → ip: send a segment (TCP: with a segment size for TSO).
    Send {
        /// Destination.
        dst: Addr,
        /// IP protocol number (6 or 17).
        protocol: u8,
        /// The transport's bytes.
        segment: Vec<u8>,
        /// For a TCP segment to be cut by the device: its segment size.
        tso: Option<u16>,
    },
    /// udp → ip: a port unreachable for a datagram to a closed port.
    Unreachable {
        /// Whom to tell.
        to: Addr,
        /// The IP header and first bytes of the offending datagram.
        quote: Vec<u8>,
    },
    /// sockets → transport or ip: a call, answered by an [`Msg::Answer`].
    Call {
        /// Matches the answer.
        id: u64,
        /// What.
        call: Call,
    },
    /// The answer to a [`Msg::Call`].
    Answer {
        /// The call's id.
        id: u64,
        /// The result.
        answer: Result<Answer, SocketError>,
    },
    /// transport → sockets: readiness may have changed (parked calls may now
    /// complete).
    Activity,
    /// sockets → tcp: a receive of at most `max` bytes waits on socket `s`:
    /// push what it gets ([`Msg::Pushed`]) as soon as there is something — at
    /// once if there is already. One-way: nothing answers it but the push.
    WantPush {
        /// The socket (tcp's own id).
        s: u64,
        /// The most bytes to push.
        max: u32,
    },
    /// tcp → sockets: what a receive on socket `s` gets (data, end of stream
    /// or an error), taken from the socket for the sockets domain: the one
    /// answer to a [`Msg::WantPush`].
    Pushed {
        /// The socket (tcp's own id).
        s: u64,
        /// `Answer::Data` (at most the waiting call's `max` bytes), `Answer::Eof`, or the error.
        got: Result<Answer, SocketError>,
    },
    /// ip → tcp, during a swap: a new tcp domain takes every new connection;
    /// name yours (answered by [`Msg::Flows`]) and finish them.
    Retire,
    /// tcp → ip: the flows a retiring tcp domain keeps, as (local port, remote
    /// address, remote port) — every connection it holds at [`Msg::Retire`].
    Flows {
        /// The flows.
        flows: Vec<(u16, Addr, u16)>,
    },
}

/// A transport call (the sockets core's `Transports`) call. Socket ids are the
/// transport cores' own, as raw numbers (the core checks their generation).
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum Call {
    UdpBind { port: u16 },
    UdpPort { s: u64 },
    UdpConnect { s: u64, addr: Addr, port: u16 },
    UdpSend { s: u64, to: Option<(Addr, u16)>, data: Vec<u8> },
    UdpRecv { s: u64, max: u32 },
    UdpClose { s: u64 },
    EchoClaim { ident: u16 },
    EchoRelease { ident: u16 },
    EchoSend { dst: Addr, ident: u16, seq: u16, data: Vec<u8> },
    TcpListen { port: u16, backlog: u32 },
    TcpLocalPort { s: u64 },
    TcpAccept { l: u64 },
    TcpEndpoints { s: u64 },
    TcpConnect { addr: Addr, port: u16 },
    TcpConnected { s: u64 },
    TcpSend { s: u64, data: Vec<u8> },
    TcpShutdown { s: u64, read: bool, write: bool },
    TcpClose { s: u64 },
    TcpAbort { s: u64 },
    TcpSetOption { s: u64, option: Opt },
    TcpReady { s: u64 },
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

/// A successful [`Call`]'s result.
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
    Data(Vec<u8>),
    /// The peer finished.
    Eof,
    /// The datagrams that were queued: (from, port, payload) each.
    Datagrams(Vec<(Addr, u16, Vec<u8>)>),
    /// A connection's endpoints: (our port, peer, peer's port).
    Endpoints(u16, Addr, u16),
    /// Readiness bits: readable 1, writable 2, error 4, hup 8.
    Ready(u8),
}

#[cfg(test)]
mod tests {
    use super::*;
    use capnet_ipc::control::{decode, encode};

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let msgs = [
            Msg::Deliver {
                src: [10, 77, 0, 1],
                dst: [10, 77, 0, 2],
                payload: vec![1; 1500],
                ip_header: vec![0x45; 20],
            },
            Msg::Call { id: 7, call: Call::TcpSetOption { s: 1 << 33, option: Opt::KeepAlive(Some((1000, 500, 3))) } },
            Msg::Answer { id: 7, answer: Err(SocketError::Invalid("no such cc".into())) },
            Msg::Answer { id: 8, answer: Ok(Answer::Datagrams(vec![([1, 2, 3, 4], 53, vec![9; 10])])) },
            Msg::Send { dst: [10, 77, 0, 1], protocol: 6, segment: vec![2; 64_000], tso: Some(1448) },
            Msg::Activity,
            Msg::Pushed { s: 5, got: Ok(Answer::Data(vec![1, 2, 3])) },
            Msg::WantPush { s: 5, max: 4096 },
        ];
        for m in msgs {
            let bytes = encode(&m).expect("encode");
            assert_eq!(decode::<Msg>(&bytes).expect("decode"), m);
        }
        // Whatever a hostile peer writes is refused, never trusted.
        for garbage in [vec![0xffu8; 64], vec![0u8; 3], vec![0x41; 4096]] {
            assert!(decode::<Msg>(&garbage).is_err(), "{} bytes of garbage accepted", garbage.len());
        }
    }
}
