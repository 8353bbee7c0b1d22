//! The sockets domain's runtime side: how the sockets core reaches each
//! transport (and ip, for echo sockets) — a direct call on the core when it
//! runs in this group, a call over the link otherwise — and what the tcp
//! domain pushed for receives that found nothing.
//!
//! [`SocketsHost`] is the rest of the sockets domain's runtime: the socket table
//! (`capnet_sockets::SocketsCore`) and the applications' channels it serves.

use std::collections::BTreeMap;
use std::time::Duration;

use capnet_ipc::control::{decode, encode_with};
use capnet_ipc::lent::{Chain, Ledger, Lent, PoolKey, Returns, Views};
use capnet_ipc::msg::{MsgEnd, MsgHalf};
use capnet_sockets::{AppId, SocketsCore};
use std::sync::Arc;

use capnet_ip::Ipv4Address;
use capnet_proto::app::SocketError;
use capnet_proto::edge::{
    Answer, EchoCall, IpToSockets, Payload, SocketsToIp, SocketsToTcp, SocketsToUdp, TcpCall, TcpToSockets, UdpCall,
    UdpToSockets,
};
use capnet_sockets::Transports;
use capnet_tcp::SocketId as TcpId;

use crate::link::Link;
use crate::{edge, AppHost, Cores, EchoReply, RuntimeError};

/// Socket ids of a tcp domain in another group carry its link's tag in these
/// bits, so that during a swap each call reaches the domain its socket lives in.
const TAG_SHIFT: u32 = 24;
const TAG_MASK: u64 = 0xff << TAG_SHIFT;

/// What a push of tcp brought for a receive.
#[derive(Debug)]
enum Pushed {
    Data(Chain),
    Eof,
}

/// The sockets domain's side of a group's runtime.
#[derive(Debug, Default)]
pub struct SocketsSide {
    /// To tcp: the present domain, and during a swap the retiring one.
    pub(crate) tcp: Vec<Link<SocketsToTcp, TcpToSockets>>,
    /// To udp.
    pub(crate) udp: Vec<Link<SocketsToUdp, UdpToSockets>>,
    /// To ip (echo sockets).
    pub(crate) ip: Vec<Link<SocketsToIp, IpToSockets>>,
    /// Echo replies for echo sockets, waiting for the sockets core.
    pub echo_replies: Vec<EchoReply>,
    /// A transport of another group said readiness may have changed: the
    /// sockets core should look at its parked calls.
    pub activity: bool,
    /// What tcp pushed, by (tagged) socket, until a receive takes it: the
    /// bytes as handles (on the buffers tcp lent us, or on its copy).
    pushed: BTreeMap<u64, Result<Pushed, SocketError>>,
    /// Sockets whose receive found nothing (tcp will push), with that receive's
    /// `max`; a push for any other counts as an unasked notice.
    expect_push: BTreeMap<u64, u32>,
}

impl SocketsSide {
    /// Forgets what was pushed or expected for the sockets whose tcp domain's
    /// tag `gone` picks.
    pub(crate) fn forget_pushes(&mut self, gone: impl Fn(u8) -> bool) {
        let tag_of = |k: &u64| (k >> TAG_SHIFT) as u8;
        self.pushed.retain(|k, _| !gone(tag_of(k)));
        self.expect_push.retain(|k, _| !gone(tag_of(k)));
    }

    /// A new tcp domain joins beside the present one (`capnet swap tcp`): new
    /// listeners and connections go to it from now on.
    pub(crate) fn tcp_beside(&mut self, mut link: Link<SocketsToTcp, TcpToSockets>) {
        let mut tag = 0;
        for l in &mut self.tcp {
            l.retiring = true;
            tag = l.tag.wrapping_add(1);
        }
        link.tag = tag;
        self.tcp.push(link);
    }

    /// The swapped-out tcp domain is gone: its link and what it pushed go.
    pub(crate) fn tcp_retired(&mut self) {
        let old: Vec<u8> = self.tcp.iter().filter(|l| l.retiring).map(|l| l.tag).collect();
        self.forget_pushes(|t| old.contains(&t));
        self.tcp.retain(|l| !l.retiring);
    }

    /// Whether tcp socket `s` lives in a retiring tcp domain (or one no link
    /// reaches any more).
    pub fn tcp_socket_retiring(&self, s: TcpId) -> bool {
        let tag = (s.to_raw() >> TAG_SHIFT) as u8;
        !self.tcp.iter().any(|l| l.tag == tag && !l.retiring)
    }

    /// A socket closed or no longer read keeps nothing pushed.
    fn forget_socket(&mut self, s: TcpId) {
        self.pushed.remove(&s.to_raw());
        if self.expect_push.remove(&s.to_raw()).is_some() {
            // Its push may be on its way: one stray push more is no flood.
            if let Ok(l) = self.tcp_link(Some(s.to_raw())) {
                l.unasked.push_dropped();
            }
        }
    }

    /// The link to the tcp domain socket `raw` (tagged) lives in, or for a new
    /// socket the one not retiring.
    fn tcp_link(&mut self, raw: Option<u64>) -> Result<&mut Link<SocketsToTcp, TcpToSockets>, SocketError> {
        self.tcp
            .iter_mut()
            .find(|l| match raw {
                Some(r) => l.tag == (r >> TAG_SHIFT) as u8,
                None => !l.retiring,
            })
            .ok_or_else(|| SocketError::Invalid("no tcp domain is reachable".into()))
    }

    /// A call to a tcp domain in another group: the one socket `s` lives in (by
    /// its tag), or for a new socket the one not retiring. Socket ids in the
    /// answer come back tagged with that domain's link.
    /// Bytes to send are lent when they are all in an application's send
    /// pool (the supervisor grants it to tcp before the application attaches),
    /// else copied into the call.
    fn tcp_call(&mut self, s: Option<TcpId>, make: impl FnOnce(u64) -> TcpCall<Chain>) -> Result<Answer, SocketError> {
        let raw = s.map(TcpId::to_raw);
        let l = self.tcp_link(raw)?;
        let tag = u64::from(l.tag) << TAG_SHIFT;
        let retag = |id: u64| {
            if id & TAG_MASK == 0 {
                Ok(id | tag)
            } else {
                Err(SocketError::Invalid(format!("the tcp domain named socket {id:#x}, beyond any table")))
            }
        };
        let call = make(raw.map_or(0, |r| r & !TAG_MASK))
            .map_payload(|c| l.lend(&c, |k| k.id == capnet_proto::app::SEND_POOL));
        Ok(match l.call(call)? {
            Answer::Id(id) => Answer::Id(retag(id)?),
            Answer::Accepted(Some(id)) => Answer::Accepted(Some(retag(id)?)),
            a => a,
        })
    }

    /// Takes what the transports and ip sent; whether anything arrived.
    /// Buffers tcp lends are read through `views`.
    pub(crate) fn receive_links(&mut self, views: &Views) -> bool {
        let mut any = false;
        let Self { tcp, udp, ip, echo_replies, activity, pushed, expect_push } = self;
        // A call waits for its answer (one at a time per link) and breaks the
        // link when it gives up, so an answer outside a call answers nothing.
        let no_call = |who: &str, id: u64| format!("{who} sent an answer to no call ({id})");
        for l in tcp.iter_mut() {
            l.recv(|l, m| {
                any = true;
                match m {
                    TcpToSockets::Pushed { s, got } if s & TAG_MASK == 0 => {
                        let key = s | u64::from(l.tag) << TAG_SHIFT;
                        match (expect_push.remove(&key), &got) {
                            // Closed here while the push was on its way: allowed once for
                            // each expected push dropped (`link::Unasked`); any other is a flood.
                            (None, _) => {
                                if !l.unasked.stray_push() {
                                    l.protocol_error("tcp floods pushes nobody asked for".into());
                                }
                            }
                            (Some(max), Ok(Answer::Data(d))) if d.len() > max as usize => {
                                l.protocol_error(format!("tcp pushed {} bytes where {max} were asked", d.len()))
                            }
                            (Some(_), _) => {
                                let got = match got {
                                    Ok(Answer::Data(d)) => match l.borrow(d, views) {
                                        Ok(c) => Ok(Pushed::Data(c)),
                                        Err(why) => return l.protocol_error(why),
                                    },
                                    Ok(Answer::Eof) => Ok(Pushed::Eof),
                                    Ok(a) => Err(odd(a)),
                                    Err(e) => Err(e),
                                };
                                pushed.insert(key, got);
                                *activity = true;
                            }
                        }
                    }
                    TcpToSockets::Pushed { s, .. } => {
                        l.protocol_error(format!("tcp pushed for socket {s:#x}, beyond any table"))
                    }
                    TcpToSockets::Activity => notice(l, activity),
                    TcpToSockets::Answer { id, .. } => l.protocol_error(no_call("tcp", id)),
                }
            });
        }
        for l in udp.iter_mut() {
            l.recv(|l, m| {
                any = true;
                match m {
                    UdpToSockets::Activity => notice(l, activity),
                    UdpToSockets::Answer { id, .. } => l.protocol_error(no_call("udp", id)),
                }
            });
        }
        for l in ip.iter_mut() {
            l.recv(|l, m| {
                any = true;
                match m {
                    IpToSockets::EchoReply { ident, from, seq, data } => {
                        *activity = true; // a parked receive on an echo socket may complete
                        match data.into_inline() {
                            Some(data) => echo_replies.push((ident, Ipv4Address::from(from), seq, data)),
                            None => l.protocol_error("it lent bytes on an edge that carries them inline".into()),
                        }
                    }
                    IpToSockets::Answer { id, .. } => l.protocol_error(no_call("ip", id)),
                }
            });
        }
        any
    }
}

/// An activity notice arrived on `l`: allowed only as often as we asked.
fn notice<O: capnet_proto::edge::EdgeMsg, I: capnet_proto::edge::EdgeMsg>(l: &mut Link<O, I>, activity: &mut bool) {
    if !l.unasked.notice() {
        l.protocol_error(format!("{} floods activity notices nobody asked for", l.remote));
    }
    *activity = true
}

fn odd(a: Answer) -> SocketError {
    SocketError::Invalid(format!("unexpected answer {a:?}"))
}

fn done(a: Answer) -> Result<(), SocketError> {
    match a {
        Answer::Done => Ok(()),
        a => Err(odd(a)),
    }
}

fn tcp_id(a: Answer) -> Result<TcpId, SocketError> {
    match a {
        Answer::Id(s) => Ok(TcpId::from_raw(s)),
        a => Err(odd(a)),
    }
}

fn udp_id(a: Answer) -> Result<capnet_udp::SocketId, SocketError> {
    match a {
        Answer::Id(s) => Ok(capnet_udp::SocketId::from_raw(s)),
        a => Err(odd(a)),
    }
}

fn port(a: Answer) -> Result<u16, SocketError> {
    match a {
        Answer::Port(p) => Ok(p),
        a => Err(odd(a)),
    }
}

fn boolean(a: Answer) -> Result<bool, SocketError> {
    match a {
        Answer::Bool(b) => Ok(b),
        a => Err(odd(a)),
    }
}

/// The sockets core reaches each transport (and ip, for echo sockets) through
/// one call per operation: `Cores::tcp_call`, `Cores::udp_call` and
/// `Cores::echo_call` hand it to the core here (`domain::{tcp, udp, ip}::serve`,
/// the one place a call becomes a core's method) or over the link to the
/// domain's group, where the same `serve` answers it. Payload stays borrowed on
/// the local path: a call is generic over its payload, `&[u8]` here and
/// `Payload` on a link.
impl Transports for Cores {
    fn udp_bind(&mut self, port: u16) -> Result<capnet_udp::SocketId, SocketError> {
        self.udp_call(UdpCall::Bind { port }).and_then(udp_id)
    }
    fn udp_port(&mut self, s: capnet_udp::SocketId) -> Result<u16, SocketError> {
        self.udp_call(UdpCall::Port { s: s.to_raw() }).and_then(port)
    }
    fn udp_connect(&mut self, s: capnet_udp::SocketId, addr: Ipv4Address, port: u16) -> Result<(), SocketError> {
        self.udp_call(UdpCall::Connect { s: s.to_raw(), addr: addr.octets(), port }).and_then(done)
    }
    fn udp_send(
        &mut self,
        s: capnet_udp::SocketId,
        to: Option<(Ipv4Address, u16)>,
        data: &[u8],
    ) -> Result<(), SocketError> {
        let to = to.map(|(a, p)| (a.octets(), p));
        self.udp_call(UdpCall::Send { s: s.to_raw(), to, data }).and_then(done)
    }
    fn udp_recv(&mut self, s: capnet_udp::SocketId, max: usize) -> Result<Vec<capnet_udp::Datagram>, SocketError> {
        match self.udp_call(UdpCall::Recv { s: s.to_raw(), max: max as u32 })? {
            // More than asked for, or a datagram over the IP limit: the udp
            // domain broke the protocol.
            Answer::Datagrams(d)
                if d.len() <= max && d.iter().all(|x| x.2.len() <= 65_535 && x.2.inline().is_some()) =>
            {
                Ok(d.into_iter()
                    .map(|(src, src_port, data)| capnet_udp::Datagram {
                        src: Ipv4Address::from(src),
                        src_port,
                        data: data.into_inline().unwrap_or_default(),
                    })
                    .collect())
            }
            a => Err(odd(a)),
        }
    }
    fn udp_close(&mut self, s: capnet_udp::SocketId) -> Result<(), SocketError> {
        self.udp_call(UdpCall::Close { s: s.to_raw() }).and_then(done)
    }
    fn echo_claim(&mut self, ident: u16) -> Result<bool, SocketError> {
        self.echo_call(EchoCall::Claim { ident }).and_then(boolean)
    }
    fn echo_release(&mut self, ident: u16) -> Result<(), SocketError> {
        self.echo_call(EchoCall::Release { ident }).and_then(done)
    }
    fn echo_send(&mut self, dst: Ipv4Address, ident: u16, seq: u16, data: &[u8]) -> Result<(), SocketError> {
        self.echo_call(EchoCall::Send { dst: dst.octets(), ident, seq, data }).and_then(done)
    }
    fn tcp_listen(&mut self, port: u16, backlog: usize) -> Result<TcpId, SocketError> {
        self.tcp_call(None, |_| TcpCall::Listen { port, backlog: backlog as u32 }).and_then(tcp_id)
    }
    fn tcp_local_port(&mut self, s: TcpId) -> Result<u16, SocketError> {
        self.tcp_call(Some(s), |s| TcpCall::LocalPort { s }).and_then(port)
    }
    fn tcp_accept(&mut self, l: TcpId) -> Result<Option<TcpId>, SocketError> {
        match self.tcp_call(Some(l), |l| TcpCall::Accept { l })? {
            Answer::Accepted(s) => Ok(s.map(TcpId::from_raw)),
            a => Err(odd(a)),
        }
    }
    fn tcp_endpoints(&mut self, s: TcpId) -> Result<capnet_tcp::Endpoints, SocketError> {
        match self.tcp_call(Some(s), |s| TcpCall::Endpoints { s })? {
            Answer::Endpoints(local_port, remote, remote_port) => {
                Ok(capnet_tcp::Endpoints { local_port, remote: Ipv4Address::from(remote), remote_port })
            }
            a => Err(odd(a)),
        }
    }
    fn tcp_connect(&mut self, addr: Ipv4Address, port: u16) -> Result<TcpId, SocketError> {
        self.tcp_call(None, |_| TcpCall::Connect { addr: addr.octets(), port }).and_then(tcp_id)
    }
    fn tcp_connected(&mut self, s: TcpId) -> Result<bool, SocketError> {
        self.tcp_call(Some(s), |s| TcpCall::Connected { s }).and_then(boolean)
    }
    fn tcp_send(&mut self, s: TcpId, data: Chain) -> Result<usize, SocketError> {
        match self.tcp_call(Some(s), |s| TcpCall::Send { s, data })? {
            Answer::Count(n) => Ok(n as usize),
            a => Err(odd(a)),
        }
    }
    /// A receive is no call between groups: the sockets domain answers it from
    /// what tcp pushed, and otherwise asks for a push (`WantPush`) once.
    fn tcp_recv(&mut self, s: TcpId, max: usize) -> Result<capnet_tcp::Received, SocketError> {
        let now = self.now();
        if let Some(t) = self.tcp.as_mut() {
            return t.core.recv(now, s, max).map_err(capnet_sockets::tcp_error);
        }
        let side = &mut self.sockets;
        let key = s.to_raw();
        if max == 0 {
            return Ok(capnet_tcp::Received::Nothing);
        }
        // What tcp pushed first.
        if let Some(got) = side.pushed.remove(&key) {
            return match got? {
                Pushed::Data(mut d) => {
                    let head = d.split_to(max);
                    if !d.is_empty() {
                        side.pushed.insert(key, Ok(Pushed::Data(d)));
                    }
                    Ok(capnet_tcp::Received::Data(head))
                }
                Pushed::Eof => Ok(capnet_tcp::Received::Eof),
            };
        }
        // Nothing here: tcp pushes what the receive gets, now or when it comes
        // (and with it the activity that brings the caller back).
        if !side.expect_push.contains_key(&key) {
            side.tcp_link(Some(key))?.ask(&SocketsToTcp::WantPush { s: key & !TAG_MASK, max: max as u32 });
            side.expect_push.insert(key, max as u32);
        }
        Ok(capnet_tcp::Received::Nothing)
    }
    fn tcp_shutdown(&mut self, s: TcpId, read: bool, write: bool) -> Result<(), SocketError> {
        if read {
            self.sockets.forget_socket(s);
        }
        self.tcp_call(Some(s), |s| TcpCall::Shutdown { s, read, write }).and_then(done)
    }
    fn tcp_close(&mut self, s: TcpId) -> Result<(), SocketError> {
        self.sockets.forget_socket(s);
        self.tcp_call(Some(s), |s| TcpCall::Close { s }).and_then(done)
    }
    fn tcp_abort(&mut self, s: TcpId) -> Result<(), SocketError> {
        self.sockets.forget_socket(s);
        self.tcp_call(Some(s), |s| TcpCall::Abort { s }).and_then(done)
    }
    fn tcp_set_option(&mut self, s: TcpId, opt: capnet_tcp::SockOpt) -> Result<(), SocketError> {
        self.tcp_call(Some(s), |s| TcpCall::SetOption { s, option: edge::opt(opt) }).and_then(done)
    }
    fn tcp_ready(&mut self, s: TcpId) -> Result<capnet_tcp::Ready, SocketError> {
        match self.tcp_call(Some(s), |s| TcpCall::Ready { s })? {
            Answer::Ready(b) => {
                let mut r = edge::ready_from(b);
                // What tcp pushed (from another group) is ours to read now.
                r.readable |= self.sockets.pushed.contains_key(&s.to_raw());
                Ok(r)
            }
            a => Err(odd(a)),
        }
    }
}

impl Cores {
    /// A call on the tcp domain: its core here, or over the link to the tcp
    /// domain socket `s` lives in (for a new socket, the one not retiring).
    /// `make` gets the socket's id as that domain knows it.
    /// Bytes to send go as handles to a core here; to a tcp domain in another
    /// group as loans (see [`SocketsSide::tcp_call`]).
    fn tcp_call(&mut self, s: Option<TcpId>, make: impl FnOnce(u64) -> TcpCall<Chain>) -> Result<Answer, SocketError> {
        let now = self.now();
        match self.tcp.as_mut() {
            Some(t) => super::tcp::serve(&mut t.core, now, make(s.map_or(0, TcpId::to_raw))),
            None => self.sockets.tcp_call(s, make),
        }
    }

    /// A call on the udp domain: its core here, or over the link.
    fn udp_call(&mut self, call: UdpCall<&[u8]>) -> Result<Answer, SocketError> {
        match (self.udp.as_mut(), self.sockets.udp.first_mut()) {
            (Some(u), _) => super::udp::serve(&mut u.core, call),
            (None, Some(l)) => l.call(call.owned()),
            (None, None) => Err(SocketError::Invalid("no udp domain is reachable".into())),
        }
    }

    /// A call on the ip domain's echo sockets: its core here, or over the link.
    fn echo_call(&mut self, call: EchoCall<&[u8]>) -> Result<Answer, SocketError> {
        let now = self.now();
        match (self.ip.as_mut(), self.sockets.ip.first_mut()) {
            (Some(ip), _) => super::ip::serve_echo(&mut ip.core, now, call),
            (None, Some(l)) => l.call(call.owned()),
            (None, None) => Err(SocketError::Invalid("no ip domain is reachable".into())),
        }
    }
}

/// One attached application.
#[derive(Debug)]
struct App {
    id: u64,
    core_id: AppId,
    msg: MsgEnd,
    /// Replies the channel had no room for, in order, and their bytes.
    outbox: std::collections::VecDeque<Vec<u8>>,
    outbox_bytes: usize,
    /// The pools it was granted at attach: received data on them is lent.
    lends: Vec<PoolKey>,
    /// What it holds of them, by ticket.
    ledger: Ledger,
    tickets: Vec<u64>,
    /// Since when it has held its quota of loans (cut off past
    /// [`LOAN_DEADLINE`]).
    full_since: Option<std::time::Instant>,
    /// Its send pool: the bytes it sends come as loans of its buffers.
    sends: Views,
    /// That pool's key (in [`Cores::app_sends`] while it is attached).
    send_key: PoolKey,
    /// Where those go when the last handle drops (tcp acknowledged them, or
    /// did not take them), to be given back on its channel.
    returns: Arc<Returns>,
    back: Vec<u64>,
}

impl App {
    /// A stream's bytes for the application: each handle on a pool it was
    /// granted lent (the others copied between the loans), when its quota and
    /// the domain's allow; else copied into the reply.
    fn lend(&mut self, data: Chain, lent_total: &mut usize) -> Payload {
        let granted = |l: &Lent| l.pool_key().is_some_and(|k| self.lends.contains(&k));
        let n = data.iter().filter(|l| granted(l)).count();
        if self.ledger.room() < n {
            self.full_since.get_or_insert_with(std::time::Instant::now);
        }
        let loans = (*lent_total + n <= MAX_LENT_TO_APPS).then(|| self.ledger.lend_chain(&data, granted)).flatten();
        *lent_total += loans.as_ref().map_or(0, |p| p.iter().filter(|p| p.loan().is_some()).count());
        Payload::lent_or_copied(&data, loans)
    }
}

/// Loans one application may hold at once (each read returns its own at once).
pub const APP_LOAN_QUOTA: usize = 64;
/// Loans all applications together may hold: a quarter of a frame pool, so
/// applications that never give back cannot hold the stack's pool shut.
pub const MAX_LENT_TO_APPS: usize = 256;
/// How long an application may hold its quota of loans before it is cut off.
pub const LOAN_DEADLINE: Duration = Duration::from_secs(2);

/// Reply bytes waiting for an application that does not read them (beyond the
/// channel's own sixteen message buffers): past this it is cut off, so one that
/// never reads cannot grow the sockets domain without end (one reply is at most
/// a message, about 1 MiB).
pub const MAX_APP_OUTBOX: usize = 16 << 20;

/// The sockets domain and the applications it serves.
#[derive(Debug)]
pub struct SocketsHost {
    /// The socket table.
    pub core: SocketsCore,
    list: Vec<App>,
    /// Applications whose blank regions are adopted, waiting for their grant,
    /// and the pools they are granted (see [`AppHost::lend_pools`]).
    pub pending: Vec<(u64, MsgHalf, Vec<PoolKey>)>,
    /// Applications cut off since the supervisor last heard: (id, why).
    pub cut_off: Vec<(u64, String)>,
    /// Buffers lent to applications so far (each read's chain counts each).
    pub loans_made: u64,
}

impl Default for SocketsHost {
    fn default() -> Self {
        Self { core: SocketsCore::new(), list: Vec::new(), pending: Vec::new(), cut_off: Vec::new(), loans_made: 0 }
    }
}

impl SocketsHost {
    /// Attaches application `id` over its channel `msg`, granted views of
    /// the pools `lends`, with its send pool `send_pool` (refused if it is not
    /// one; recorded in `cores`' [`Cores::app_sends`]).
    pub fn add(
        &mut self,
        id: u64,
        msg: MsgEnd,
        lends: Vec<PoolKey>,
        send_pool: std::os::fd::OwnedFd,
        cores: &mut Cores,
    ) -> Result<(), capnet_ipc::pool::PoolError> {
        let mut sends = Views::new();
        let send_key = sends.add(capnet_proto::app::SEND_POOL, send_pool)?;
        cores.app_sends.push(send_key);
        let mut secret = [0u8; 8];
        let _ = rustix::rand::getrandom(&mut secret, rustix::rand::GetRandomFlags::empty());
        let core_id = self.core.attach(u64::from_ne_bytes(secret));
        self.list.push(App {
            id,
            core_id,
            msg,
            outbox: Default::default(),
            outbox_bytes: 0,
            lends,
            ledger: Ledger::new(APP_LOAN_QUOTA),
            tickets: Vec::new(),
            full_since: None,
            sends,
            send_key,
            returns: Returns::new(),
            back: Vec::new(),
        });
        Ok(())
    }

    /// Loans all applications hold now.
    pub fn lent(&self) -> usize {
        self.list.iter().map(|a| a.ledger.out()).sum()
    }

    /// Application `id` left: its sockets close.
    pub fn detach(&mut self, id: u64, cores: &mut Cores) {
        if let Some(k) = self.list.iter().position(|a| a.id == id) {
            let app = self.list.remove(k);
            cores.app_sends.retain(|k| *k != app.send_key);
            self.core.detach(app.core_id, cores);
        }
    }

    /// One round: wait (at most `tick`) for the group's channels or an
    /// application, run calls, answer.
    pub fn serve(&mut self, host: &mut dyn AppHost, tick: Duration) -> Result<(), RuntimeError> {
        {
            let mut ends: Vec<_> = self.list.iter_mut().map(|a| a.msg.channel()).collect();
            host.poll_apps(tick, &mut ends)?;
        }
        let mut gone = Vec::new();
        let mut requests = false;
        for (i, app) in self.list.iter_mut().enumerate() {
            let mut garbage = None;
            let core = &mut self.core;
            let (sends, returns) = (&app.sends, &app.returns);
            let r = app.msg.recv(|m| match decode::<capnet_proto::app::Request>(m) {
                Ok(req) if garbage.is_none() => match req.map_data(|p| p.into_chain(sends, returns)) {
                    Ok(req) => {
                        requests = true;
                        core.request(app.core_id, req, host.cores());
                    }
                    Err(e) => garbage = Some(format!("it lent a buffer it may not: {e}")),
                },
                Ok(_) => {}
                Err(e) => garbage = Some(format!("a message that is not a request: {e}")),
            });
            if let Some(why) = r.err().map(|e| e.to_string()).or(garbage) {
                gone.push((i, format!("it broke its channel's protocol: {why}")));
            }
            app.msg.take_returned_loans(&mut app.tickets);
            for t in app.tickets.drain(..) {
                if let Err(e) = app.ledger.returned(t) {
                    gone.push((i, format!("it gave back a loan it does not hold: {e}")));
                    break;
                }
            }
            if app.ledger.room() > 0 {
                app.full_since = None;
            } else if app.full_since.is_some_and(|t| t.elapsed() > LOAN_DEADLINE) {
                gone.push((i, format!("it held its {APP_LOAN_QUOTA} loans past {LOAN_DEADLINE:?}")));
            }
        }
        let cores = host.cores();
        for (ident, from, seq, data) in std::mem::take(&mut cores.sockets.echo_replies) {
            self.core.echo_reply(ident, from, seq, data);
        }
        // Parked calls are looked at when something may have changed: always when
        // the transports run here, else when one said so or a call came in.
        let local = cores.tcp.is_some() || cores.udp.is_some();
        if local || requests || std::mem::take(&mut cores.sockets.activity) {
            self.core.poll_ready(cores);
        }
        let mut lent_total = self.lent();
        let lent_before = lent_total;
        while let Some((id, resp)) = self.core.pop_response() {
            let Some(k) = self.list.iter().position(|a| a.core_id == id) else { continue };
            let app = &mut self.list[k];
            let reply = resp.reply.map_data(|d| app.lend(d, &mut lent_total));
            let resp = capnet_proto::app::Response { id: resp.id, reply };
            // Straight into the channel when nothing waits before it; else queued.
            let _ = encode_with(&resp, |bytes| {
                if !app.outbox.is_empty() || !matches!(app.msg.send(bytes), Ok(true)) {
                    app.outbox_bytes += bytes.len();
                    app.outbox.push_back(bytes.to_vec());
                }
            });
            if app.outbox_bytes > MAX_APP_OUTBOX && !gone.iter().any(|(i, _)| *i == k) {
                gone.push((k, format!("it leaves its replies unread (over {} MiB waiting)", MAX_APP_OUTBOX >> 20)));
            }
        }
        self.loans_made += (lent_total - lent_before) as u64;
        for app in &mut self.list {
            // Its buffers tcp let go of go back.
            app.returns.take(&mut app.back);
            if !app.back.is_empty() {
                // (A channel that broke is found broken by its next receive.)
                let _ = app.msg.return_loans(&app.back);
                app.back.clear();
            }
            while let Some(m) = app.outbox.front() {
                match app.msg.send(m) {
                    Ok(true) => {
                        app.outbox_bytes -= m.len();
                        app.outbox.pop_front();
                    }
                    _ => break,
                }
            }
        }
        gone.sort_by_key(|(i, _)| *i);
        gone.dedup_by_key(|(i, _)| *i);
        for (i, why) in gone.into_iter().rev() {
            let app = self.list.remove(i);
            tracing::warn!("application {} cut off: {why}", app.id);
            host.cores().app_sends.retain(|k| *k != app.send_key);
            self.core.detach(app.core_id, host.cores());
            self.cut_off.push((app.id, why));
        }
        host.push()
    }
}
