//! The tcp domain's runtime: its core, its links to ip and to the sockets
//! domain when those run in other groups, the receives it pushes, and retiring
//! during a swap.

use std::collections::BTreeMap;

use capnet_ipc::lent::Chain;
use capnet_proto::app::SocketError;
use capnet_proto::edge::{Answer, IpToTcp, SocketsToTcp, TcpCall, TcpToIp, TcpToSockets};
use capnet_tcp::{ConnState, Instant, Received, SocketId, TcpCore};

use crate::edge;
use crate::link::Link;

/// The tcp domain of a group.
#[derive(Debug)]
pub struct TcpDomain {
    /// Its core.
    pub core: TcpCore,
    /// To the ip domain, if it runs in another group.
    pub(crate) ip: Vec<Link<TcpToIp, IpToTcp>>,
    /// To the sockets domain, if it runs in another group.
    pub(crate) sockets: Vec<Link<TcpToSockets, SocketsToTcp>>,
    /// This domain is being swapped out (it was told to retire).
    pub retiring: bool,
    /// Sockets whose last receive from the sockets domain found nothing, with
    /// its `max`: what comes is pushed ([`TcpToSockets::Pushed`]).
    pub(crate) push_wanted: BTreeMap<u64, u32>,
    /// The core saw traffic or timers this round (an activity notice is due to
    /// a sockets domain in another group).
    pub(crate) touched: bool,
}

impl TcpDomain {
    pub(crate) fn new(core: TcpCore) -> Self {
        Self {
            core,
            ip: Vec::new(),
            sockets: Vec::new(),
            retiring: false,
            push_wanted: BTreeMap::new(),
            touched: false,
        }
    }

    /// Told to retire, it holds only connections in TIME-WAIT (which need no
    /// more than their peer's silence) or none.
    pub fn drained(&self) -> bool {
        self.retiring && self.core.sockets().0.iter().all(|c| c.state == ConnState::TimeWait)
    }

    /// Pushes to the sockets domain what its receives that found nothing would
    /// find now; whether it pushed anything.
    /// What tcp lent us is lent on only on the pools' current generations
    /// in `views`.
    pub(crate) fn push_received(&mut self, now: Instant, views: &capnet_ipc::lent::Views) -> bool {
        let Some(l) = self.sockets.first_mut() else { return false };
        let core = &mut self.core;
        let mut any = false;
        self.push_wanted.retain(|&s, &mut max| {
            let got = match core.recv(now, SocketId::from_raw(s), max as usize) {
                Ok(Received::Nothing) => return true,
                Ok(Received::Data(d)) => Ok(Answer::Data(l.lend(&d, |k| views.is_current(k)))),
                Ok(Received::Eof) => Ok(Answer::Eof),
                Err(e) => Err(capnet_sockets::tcp_error(e)),
            };
            l.send(&TcpToSockets::Pushed { s, got });
            any = true;
            false
        });
        any
    }

    /// Takes what ip and the sockets domain sent; whether anything arrived.
    pub(crate) fn receive_links(&mut self, now: Instant, views: &capnet_ipc::lent::Views) -> bool {
        let mut any = false;
        let Self { core, ip, sockets, retiring, push_wanted, touched } = self;
        for l in ip.iter_mut() {
            l.recv(|l, m| {
                any = true;
                let ip4 = capnet_ip::Ipv4Address::from;
                match m {
                    IpToTcp::Deliver(d) => {
                        *touched = true;
                        match l.borrow(d.payload, views) {
                            Ok(segment) => core.receive(now, ip4(d.src), ip4(d.dst), &segment),
                            Err(why) => l.protocol_error(why),
                        }
                    }
                    IpToTcp::Icmp(e) => {
                        *touched = true;
                        core.on_icmp(e.local_port, ip4(e.remote), e.remote_port, e.icmp_type, e.icmp_code);
                    }
                    IpToTcp::Retire => {
                        *retiring = true;
                        let (conns, _) = core.sockets();
                        let flows = conns.iter().map(|c| (c.local_port, c.remote.octets(), c.remote_port)).collect();
                        l.send(&TcpToIp::Flows(flows));
                    }
                }
            });
        }
        for l in sockets.iter_mut() {
            l.recv(|l, m| {
                any = true;
                l.activity_sent = false;
                match m {
                    SocketsToTcp::Call { id, call } => {
                        // A send's bytes: the application's send buffers, lent
                        // on (or inline, for a small one).
                        let mut refused = None;
                        let call = call.map_payload(|p| {
                            l.borrow(p, views).unwrap_or_else(|why| {
                                refused = Some(why);
                                Chain::new()
                            })
                        });
                        if let Some(why) = refused {
                            return l.protocol_error(why);
                        }
                        // A socket closed, or no longer read, gets nothing pushed.
                        if let TcpCall::Close { s } | TcpCall::Abort { s } | TcpCall::Shutdown { s, read: true, .. } =
                            &call
                        {
                            push_wanted.remove(s);
                        }
                        let answer = serve(core, now, call);
                        l.send(&TcpToSockets::Answer { id, answer });
                    }
                    SocketsToTcp::WantPush { s, max } => {
                        push_wanted.insert(s, max);
                    }
                }
            });
        }
        any
    }
}

/// Answers a call of the sockets domain with the tcp core: the one place a
/// `TcpCall` becomes the core's method, for a sockets domain here or in another
/// group.
pub fn serve(core: &mut TcpCore, now: Instant, call: TcpCall<Chain>) -> Result<Answer, SocketError> {
    let e = capnet_sockets::tcp_error;
    let id = SocketId::from_raw;
    Ok(match call {
        TcpCall::Listen { port, backlog } => Answer::Id(core.listen(port, backlog as usize).map_err(e)?.to_raw()),
        TcpCall::LocalPort { s } => Answer::Port(core.local_port(id(s)).map_err(e)?),
        TcpCall::Accept { l } => Answer::Accepted(core.accept(id(l)).map_err(e)?.map(SocketId::to_raw)),
        TcpCall::Endpoints { s } => {
            let ends = core.endpoints(id(s)).map_err(e)?;
            Answer::Endpoints(ends.local_port, ends.remote.octets(), ends.remote_port)
        }
        TcpCall::Connect { addr, port } => Answer::Id(core.connect(now, addr.into(), port).map_err(e)?.to_raw()),
        TcpCall::Connected { s } => Answer::Bool(core.connected(id(s)).map_err(e)?),
        TcpCall::Send { s, data } => Answer::Count(core.send(now, id(s), data).map_err(e)? as u32),
        TcpCall::Shutdown { s, read, write } => {
            core.shutdown(now, id(s), read, write).map_err(e)?;
            Answer::Done
        }
        TcpCall::Close { s } => {
            core.close(now, id(s)).map_err(e)?;
            Answer::Done
        }
        TcpCall::Abort { s } => {
            core.abort(id(s)).map_err(e)?;
            Answer::Done
        }
        TcpCall::SetOption { s, option } => {
            core.set_option(now, id(s), edge::sock_opt(&option)?).map_err(e)?;
            Answer::Done
        }
        TcpCall::Ready { s } => Answer::Ready(edge::ready_bits(core.ready(id(s)).map_err(e)?)),
    })
}

/// A secret for the tcp core's ISNs and port choice, from the system's random
/// source (a fixed secret only if the kernel refuses: ISNs stay unique per
/// connection either way, thanks to the clock term).
pub(crate) fn random_secret() -> [u64; 2] {
    let mut b = [0u8; 16];
    let _ = rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty());
    let (x, y) = b.split_at(8);
    [u64::from_ne_bytes(x.try_into().unwrap_or_default()), u64::from_ne_bytes(y.try_into().unwrap_or_default())]
}
