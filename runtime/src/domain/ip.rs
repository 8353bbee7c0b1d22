//! The ip domain's runtime: its core, its links to the transports and to the
//! sockets domain (echo sockets) when those run in other groups, the published
//! routing table, and the switch of a tcp swap (segments of new connections
//! held until the old tcp domain has named the flows it keeps).

use std::collections::VecDeque;

use capnet_ip::{Chain, Delivery, Instant, IpCore, IpProtocol, Ipv4Address};
use capnet_ipc::lent::Views;
use capnet_proto::app::SocketError;
use capnet_proto::edge::{
    Answer, Datagram, EchoCall, Flow, IcmpError, IpToSockets, IpToTcp, IpToUdp, Payload, SocketsToIp, TcpToIp, UdpToIp,
};

use crate::link::{self, Link};
use crate::{RuntimeError, SOCKETS, TCP, TCP_OLD};

/// Segments held for a new tcp domain during a swap's switch, at most.
const MAX_HELD: usize = 4096;

/// The ip domain of a group.
#[derive(Debug)]
pub struct IpDomain {
    /// Its core.
    pub core: IpCore,
    /// Its links, and what waits on them.
    pub(crate) out: IpLinks,
    /// The routing table as published to other domains, once asked for.
    routes: Option<capnet_ipc::region::Region>,
}

/// The ip domain's links to domains of other groups.
#[derive(Debug, Default)]
pub(crate) struct IpLinks {
    /// To tcp: the present domain, and during a swap the retiring one.
    pub tcp: Vec<Link<IpToTcp, TcpToIp>>,
    /// To udp.
    pub udp: Vec<Link<IpToUdp, UdpToIp>>,
    /// To the sockets domain (echo sockets).
    pub sockets: Vec<Link<IpToSockets, SocketsToIp>>,
    /// During a tcp swap: segments for new connections, held until the old tcp
    /// domain has named the flows it keeps (at most [`link::CALL_DEADLINE`]
    /// from `held_since`: a silent old domain loses its flows to the new one).
    pub held: Option<VecDeque<((u16, u16), IpToTcp)>>,
    held_since: Option<Instant>,
    /// The flows the old tcp domain named, to apply once the links are back.
    flows_named: Option<Vec<Flow>>,
    /// Datagrams for udp this round, sent as one message ([`IpLinks::flush_udp`]).
    udp_batch: Vec<Datagram>,
    udp_batch_bytes: usize,
}

impl IpDomain {
    pub(crate) fn new(core: IpCore) -> Self {
        Self { core, out: IpLinks::default(), routes: None }
    }

    /// Publishes the routing table in a sealed region of its own and returns it,
    /// to be granted read-only (made on the first call; republished on every call).
    pub fn publish_routes(&mut self) -> Result<&capnet_ipc::region::Region, RuntimeError> {
        if self.routes.is_none() {
            let r = capnet_ipc::region::Region::create("capnet-routes", capnet_ip::publish::REGION_LEN)
                .map_err(|e| RuntimeError::Ipc(e.to_string()))?;
            self.routes = Some(r);
        }
        let region = self.routes.as_ref().ok_or_else(|| RuntimeError::Ipc("no routes region".into()))?;
        capnet_ip::publish::publish(region, self.core.routes());
        Ok(region)
    }

    /// A new tcp domain joins beside the present one (`capnet swap tcp`): the
    /// old one is asked to name the flows it keeps, and segments of new
    /// connections wait until it has.
    pub(crate) fn tcp_beside(&mut self, mut link: Link<IpToTcp, TcpToIp>, now: Instant) {
        let mut tag = 0;
        for l in &mut self.out.tcp {
            l.retiring = true;
            tag = l.tag.wrapping_add(1);
            l.send(&IpToTcp::Retire);
            l.flush();
        }
        self.out.held = Some(VecDeque::new());
        self.out.held_since = Some(now);
        link.tag = tag;
        self.out.tcp.push(link);
    }

    /// The swapped-out tcp domain is gone: its link and its flows go.
    pub(crate) fn tcp_retired(&mut self) {
        self.out.tcp.retain(|l| !l.retiring);
        self.core.demux.remove(TCP_OLD);
        self.release_held();
    }

    /// A held segment has waited past the deadline: the switch goes ahead.
    pub(crate) fn release_if_late(&mut self, now: Instant) {
        let deadline = capnet_ip::Duration::from_micros(link::CALL_DEADLINE.as_micros() as u64);
        if self.out.held_since.is_some_and(|t| now - t > deadline) {
            self.release_held();
        }
    }

    /// Sends the segments held during a swap's switch where the demux says now.
    fn release_held(&mut self) {
        self.out.held_since = None;
        let Some(held) = self.out.held.take() else { return };
        for ((src_port, dst_port), m) in held {
            let IpToTcp::Deliver(d) = &m else { continue };
            let old = self.core.demux.lookup_flow(IpProtocol::Tcp, dst_port, d.src.into(), src_port) == Some(TCP_OLD);
            if let Some(l) = self.out.tcp.iter_mut().find(|l| l.retiring == old) {
                l.send(&m);
            }
        }
    }

    /// Takes what the transports and the sockets domain sent; whether anything
    /// arrived.
    /// What tcp lends (the applications' send buffers) is read through `views`.
    pub(crate) fn receive_links(&mut self, now: Instant, views: &Views) -> bool {
        let mut any = false;
        let ip4 = Ipv4Address::from;
        let Self { core, out, .. } = self;
        let IpLinks { tcp, udp, sockets, held, flows_named, .. } = out;
        for l in tcp.iter_mut() {
            l.recv(|l, m| {
                any = true;
                match m {
                    TcpToIp::Send(s) => match l.borrow(s.segment, views) {
                        Ok(payload) => {
                            let mut segment = Chain::from(s.head);
                            segment.append(payload);
                            send(core, now, ip4(s.dst), true, &segment, s.tso)
                        }
                        Err(why) => l.protocol_error(why),
                    },
                    // Named too late (the switch went ahead without them): nothing to keep.
                    TcpToIp::Flows(flows) if l.retiring => {
                        if held.is_some() {
                            *flows_named = Some(flows);
                        }
                    }
                    TcpToIp::Flows(_) => l.protocol_error("tcp named its flows unasked".into()),
                }
            });
        }
        for l in udp.iter_mut() {
            l.recv(|l, m| {
                any = true;
                match m {
                    UdpToIp::Send(s) => match s.segment.into_inline() {
                        Some(b) => {
                            let mut segment = Chain::from(s.head);
                            segment.append(b.into());
                            send(core, now, ip4(s.dst), false, &segment, None)
                        }
                        None => l.protocol_error("it lent bytes on an edge that carries them inline".into()),
                    },
                    UdpToIp::Unreachable { to, quote } => core.send_unreachable(now, ip4(to), 3, &quote),
                }
            });
        }
        for l in sockets.iter_mut() {
            l.recv(|l, SocketsToIp::Call { id, call }| {
                any = true;
                l.activity_sent = false;
                let answer = serve_echo(core, now, call);
                l.send(&IpToSockets::Answer { id, answer });
            });
        }
        if let Some(flows) = self.out.flows_named.take() {
            for (local_port, remote, remote_port) in &flows {
                self.core.demux.insert_flow(IpProtocol::Tcp, *local_port, (*remote).into(), *remote_port, TCP_OLD);
            }
            self.release_held();
        }
        any
    }
}

impl IpLinks {
    /// A datagram for tcp in another group: to the domain the demux named (the
    /// retiring one for the flows it keeps), or held during a swap's switch.
    /// `vouched`: its checksum is still partial, on the kernel's word — it is
    /// completed first, as the tcp domain there will verify it.
    ///
    /// The segment is lent: the tcp domain reads it out of the buffer it
    /// arrived in (the driver's, lent to us). A vouched one is copied, to
    /// complete its checksum, and so is one held during a swap's switch (it
    /// may go to either domain, and a loan is the link's it was made on).
    pub(crate) fn deliver_tcp(&mut self, d: &Delivery, vouched: bool) {
        let old = d.to == TCP_OLD;
        let holding = self.held.is_some() && d.to == TCP;
        let Some(l) = self.tcp.iter_mut().find(|l| l.retiring == old) else { return };
        let payload = match vouched || holding {
            true => {
                let mut b = d.payload.to_vec();
                if vouched {
                    capnet_tcp::complete_checksum(d.src, d.dst, &mut b);
                }
                Payload::Inline(b)
            }
            // Its handles are on the frame channel's pool as it is now, which
            // every group ip lends to views.
            false => l.lend(&d.payload, |_| true),
        };
        let m = IpToTcp::Deliver(datagram(d, payload));
        match self.held.as_mut() {
            Some(h) if d.to == TCP => {
                let mut ports = [0u8; 4];
                d.payload.peek(0, &mut ports);
                let ports = (u16::from_be_bytes([ports[0], ports[1]]), u16::from_be_bytes([ports[2], ports[3]]));
                if h.len() < MAX_HELD {
                    h.push_back((ports, m));
                }
            }
            _ => l.send(&m),
        }
    }

    /// A datagram for udp in another group: batched with the round's others.
    pub(crate) fn deliver_udp(&mut self, d: &Delivery) {
        if self.udp.is_empty() {
            return;
        }
        if self.udp_batch.len() == capnet_proto::app::UDP_BATCH
            || self.udp_batch_bytes + d.payload.len() > capnet_sockets::UDP_BATCH_BYTES
        {
            self.flush_udp();
        }
        self.udp_batch_bytes += d.payload.len();
        self.udp_batch.push(datagram(d, Payload::Inline(d.payload.to_vec())));
    }

    /// Sends udp the datagrams batched so far.
    pub(crate) fn flush_udp(&mut self) {
        self.udp_batch_bytes = 0;
        let batch = std::mem::take(&mut self.udp_batch);
        if let (Some(l), false) = (self.udp.first_mut(), batch.is_empty()) {
            l.send(&IpToUdp::Deliver(batch));
        }
    }

    /// An ICMP error for a transport's flow in another group (the retiring tcp
    /// domain's when `old`).
    pub(crate) fn icmp(&mut self, tcp: bool, old: bool, e: IcmpError) {
        if tcp {
            if let Some(l) = self.tcp.iter_mut().find(|l| l.retiring == old) {
                l.send(&IpToTcp::Icmp(e));
            }
        } else if let Some(l) = self.udp.first_mut() {
            l.send(&IpToUdp::Icmp(e));
        }
    }
}

/// A transport's segment, to send (TCP without DF: the ip core's ICMP errors
/// do not carry the next-hop MTU yet, so path MTU discovery is not done,
/// docs/tcp.md).
pub(crate) fn send(core: &mut IpCore, now: Instant, dst: Ipv4Address, tcp: bool, segment: &Chain, tso: Option<u16>) {
    let _ = match (tcp, tso) {
        (true, Some(mss)) => core.send_tso(now, dst, segment, mss),
        (true, None) => core.send(now, dst, IpProtocol::Tcp, segment, false),
        (false, _) => core.send(now, dst, IpProtocol::Udp, segment, false),
    };
}

fn datagram(d: &Delivery, payload: Payload) -> Datagram {
    Datagram { src: d.src.octets(), dst: d.dst.octets(), payload, ip_header: d.ip_header.to_vec() }
}

/// Answers an echo-socket call of the sockets domain with the ip core (here or
/// from another group): the one place an `EchoCall` becomes the core's method.
pub fn serve_echo<P: AsRef<[u8]>>(core: &mut IpCore, now: Instant, call: EchoCall<P>) -> Result<Answer, SocketError> {
    Ok(match call {
        EchoCall::Claim { ident } => Answer::Bool(echo_claim(core, ident)),
        EchoCall::Release { ident } => {
            echo_release(core, ident);
            Answer::Done
        }
        EchoCall::Send { dst, ident, seq, data } => {
            echo_send(core, now, dst.into(), ident, seq, data.as_ref())?;
            Answer::Done
        }
    })
}

/// Claims echo identifier `ident` for the sockets domain's echo sockets (false
/// if taken).
fn echo_claim(core: &mut IpCore, ident: u16) -> bool {
    if core.demux.lookup(IpProtocol::Icmp, ident).is_some() {
        return false;
    }
    core.demux.insert(IpProtocol::Icmp, ident..=ident, SOCKETS);
    true
}

/// Releases an echo identifier.
fn echo_release(core: &mut IpCore, ident: u16) {
    core.demux.remove_range(IpProtocol::Icmp, ident..=ident);
}

/// Sends an echo request.
fn echo_send(
    core: &mut IpCore,
    now: Instant,
    dst: Ipv4Address,
    ident: u16,
    seq: u16,
    data: &[u8],
) -> Result<(), SocketError> {
    core.send_echo_request(now, dst, ident, seq, data).map_err(|e| match e {
        capnet_ip::SendError::NoRoute(_) => SocketError::NoRoute,
        _ => SocketError::TooLarge,
    })
}
