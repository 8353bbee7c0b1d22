//! capnet-runtime: binds protocol cores to devices, channels and real time.
//!
//! The same cores run in every composition (DESIGN, "Groups"); only this crate
//! differs between them:
//!
//! - [`MonoStack`]: one group — the ip and udp cores and the device in one thread,
//!   calling each other directly;
//! - [`two_group`]: driver | stack — the driver's device loops and the ip + udp
//!   cores joined by ipc channels and buffer pools, as two groups would be as two
//!   processes.
//!
//! [`Cores`] is what both share: the cores, moving outputs between each other.

#![forbid(unsafe_code)]

pub mod edge;
pub mod link;
pub mod two_group;

use capnet_proto::edge as wire;
use capnet_proto::Kind;

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant as StdInstant};

use capnet_driver::impair::{ImpairStats, Impairer, Impairment};
use capnet_ip::{Config, Instant, IpCore, IpProtocol, LocalDatagram, Output, TransportId};
use capnet_kernel_shim::device::{Device, DeviceKind, VNET_HDR_LEN};
use capnet_tcp::TcpCore;
use capnet_udp::UdpCore;

/// The transport id the udp core has in the ip core's demux table.
pub const UDP: TransportId = TransportId(1);
/// The transport id of the sockets domain's ICMP echo sockets.
pub const SOCKETS: TransportId = TransportId(2);
/// The transport id the tcp core has in the ip core's demux table.
pub const TCP: TransportId = TransportId(3);
/// The transport id of a tcp domain being swapped out, for the flows it keeps.
pub const TCP_OLD: TransportId = TransportId(4);

/// TCP segments for new connections the ip domain holds while a swap waits for
/// the old tcp domain to name its flows (a millisecond's worth, more than enough);
/// beyond it they are dropped, and the peers retransmit.
const MAX_HELD: usize = 4096;

/// Bits 24..32 of a tcp socket id as the sockets domain holds it name the tcp
/// domain (the link's [`link::Link::tag`]) the socket lives in: during a swap
/// there are two. No core's socket table reaches 2^24 slots.
const TAG_SHIFT: u32 = 24;
const TAG_MASK: u64 = 0xff << TAG_SHIFT;

/// An echo reply for an echo socket: (identifier, from, sequence, data).
pub type EchoReply = (u16, capnet_ip::Ipv4Address, u16, Vec<u8>);

/// Errors running a stack.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A device read or write failed.
    #[error("device I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// Making the channels or pools between groups failed.
    #[error("cannot join the groups: {0}")]
    Ipc(String),
    /// A peer group broke the channel protocol.
    #[error("peer group broke the channel protocol: {0}")]
    Peer(String),
}

/// The spin tokens every wait of this process takes (DESIGN, "Waking up"): a
/// waiter spins through its budget only while it holds one, and at most the
/// supervisor's limit (the cores but one, or none when groups outnumber cores)
/// hold one at once, so spinning never starves the domain it waits for. Shared by every group of a stack (a multi-writer region
/// the supervisor grants); without them ([`use_spin_tokens`] not called: tests
/// in one process) every wait blocks at once.
static SPIN_TOKENS: std::sync::OnceLock<SpinTokens> = std::sync::OnceLock::new();

/// Spin tokens over a region every group maps writable.
pub type SpinTokens = capnet_ipc::notify::SpinTokens<std::sync::Arc<capnet_ipc::region::Region>>;

/// Makes this process's waits spin with `tokens` (once, before any wait).
pub fn use_spin_tokens(tokens: SpinTokens) {
    let _ = SPIN_TOKENS.set(tokens);
}

/// The spin tokens waits take, if this process has them.
pub(crate) fn tokens() -> Option<&'static SpinTokens> {
    SPIN_TOKENS.get()
}

/// The protocol cores of one group (each present when its domain runs in this
/// group), the links to the domains of other groups, and the clock.
///
/// Outputs move between cores by direct calls when both run here, and over the
/// link to the other group otherwise; [`Cores::receive_links`] does the reverse.
#[derive(Debug)]
pub struct Cores {
    /// The ip core.
    pub ip: Option<IpCore>,
    /// The udp core.
    pub udp: Option<UdpCore>,
    /// The tcp core.
    pub tcp: Option<TcpCore>,
    /// Echo replies for echo sockets, waiting for the sockets domain.
    pub echo_replies: Vec<EchoReply>,
    /// Channels to the domains of other groups.
    pub links: Vec<link::Link>,
    /// A transport of another group said readiness may have changed: the
    /// sockets domain should look at its parked calls.
    pub activity: bool,
    /// The local tcp / udp core saw traffic or timers this round (an
    /// [`wire::Msg::Activity`] is due to a sockets domain in another group).
    touched: [bool; 2],
    /// The routing table as published to other domains, once asked for.
    routes: Option<capnet_ipc::region::Region>,
    /// ip side of a tcp swap: segments for new connections, held until the old
    /// tcp domain has named the flows it keeps (at most [`link::CALL_DEADLINE`]
    /// from `held_since`: a silent old domain loses its flows to the new one).
    held: Option<std::collections::VecDeque<wire::Msg>>,
    held_since: StdInstant,
    /// ip side: the flows the old tcp domain named, to apply once the links are back.
    flows_named: Option<Vec<(u16, wire::Addr, u16)>>,
    /// tcp side: this domain is being swapped out (it was told to retire).
    pub retiring: bool,
    /// tcp side: sockets whose last receive from the sockets domain found
    /// nothing, with its `max`: what comes is pushed ([`wire::Msg::Pushed`]).
    push_wanted: std::collections::BTreeMap<u64, u32>,
    /// sockets side: what tcp pushed, by (tagged) socket, until a receive takes it.
    pushed: std::collections::BTreeMap<u64, Result<Answer, SocketError>>,
    /// sockets side: sockets whose receive found nothing (tcp will push), with
    /// that receive's `max`; a push for any other counts as an unasked notice.
    expect_push: std::collections::BTreeMap<u64, u32>,
    epoch: StdInstant,
}

/// The receive buffer of the stack's TCP connections: twice the most an
/// application takes in one call (`capnet_sockets::MAX_TCP_READ`), so the window
/// stays open while a read's reply travels and is copied (docs/performance.md).
pub const STACK_RECV_BUFFER: usize = 2 << 20;

impl Cores {
    /// Every core, for `cfg`; UDP owns every UDP port and TCP every TCP port
    /// (with the tcp core's default settings but the receive buffer,
    /// [`STACK_RECV_BUFFER`]).
    pub fn new(cfg: Config, udp_queue_bytes: usize) -> Self {
        Self::group(&[Kind::Ip, Kind::Tcp, Kind::Udp], cfg, udp_queue_bytes)
    }

    /// The cores of `kinds` (those that have one: ip, tcp, udp), for `cfg`.
    pub fn group(kinds: &[Kind], cfg: Config, udp_queue_bytes: usize) -> Self {
        let local = cfg.addr.address();
        let mut tcp_cfg = capnet_tcp::Config::new(local, random_secret());
        tcp_cfg.mtu = cfg.mtu;
        tcp_cfg.recv_buffer = STACK_RECV_BUFFER;
        let ip = kinds.contains(&Kind::Ip).then(|| {
            let mut ip = IpCore::new(cfg, Instant::ZERO);
            ip.demux.insert(IpProtocol::Udp, 0..=65535, UDP);
            ip.demux.insert(IpProtocol::Tcp, 0..=65535, TCP);
            ip
        });
        Self {
            ip,
            udp: kinds.contains(&Kind::Udp).then(|| UdpCore::new(local, udp_queue_bytes)),
            tcp: kinds.contains(&Kind::Tcp).then(|| TcpCore::new(tcp_cfg)),
            echo_replies: Vec::new(),
            links: Vec::new(),
            activity: false,
            touched: [false; 2],
            routes: None,
            held: None,
            held_since: StdInstant::now(),
            flows_named: None,
            retiring: false,
            push_wanted: Default::default(),
            pushed: Default::default(),
            expect_push: Default::default(),
            epoch: StdInstant::now(),
        }
    }

    /// The ip core (every composition that runs a device has one).
    ///
    /// # Panics
    /// If this group does not run the ip domain (a caller bug).
    pub fn ip(&mut self) -> &mut IpCore {
        self.ip.as_mut().expect("this group runs no ip domain")
    }

    /// The udp core; panics if this group does not run the udp domain.
    pub fn udp(&mut self) -> &mut UdpCore {
        self.udp.as_mut().expect("this group runs no udp domain")
    }

    /// The tcp core; panics if this group does not run the tcp domain.
    pub fn tcp(&mut self) -> &mut TcpCore {
        self.tcp.as_mut().expect("this group runs no tcp domain")
    }

    /// Publishes the ip domain's routing table in a sealed region of its own and
    /// returns it, to be granted read-only (made on the first call; republished on
    /// every call).
    pub fn publish_routes(&mut self) -> Result<&capnet_ipc::region::Region, RuntimeError> {
        let Some(ip) = self.ip.as_ref() else { return Err(RuntimeError::Ipc("no ip domain here".into())) };
        if self.routes.is_none() {
            let r = capnet_ipc::region::Region::create("capnet-routes", capnet_ip::publish::REGION_LEN)
                .map_err(|e| RuntimeError::Ipc(e.to_string()))?;
            self.routes = Some(r);
        }
        let region = self.routes.as_ref().ok_or_else(|| RuntimeError::Ipc("no routes region".into()))?;
        capnet_ip::publish::publish(region, ip.routes());
        Ok(region)
    }

    /// Time since the stack started, as the cores count it.
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// How long a runtime may wait before the cores' next deadline.
    pub fn wait_bound(&self, max_wait: Duration) -> Duration {
        let now = self.now();
        let next = [self.ip.as_ref().and_then(|c| c.poll_at()), self.tcp.as_ref().and_then(|c| c.poll_at())]
            .into_iter()
            .flatten()
            .min();
        match next {
            // smoltcp's Instant difference is absolute: a deadline already past waits 0.
            Some(at) if at <= now => Duration::ZERO,
            Some(at) => Duration::from_micros((at - now).total_micros()).min(max_wait),
            None => max_wait,
        }
    }

    /// Turns TCP segmentation offload on: for a device that takes virtio-net
    /// headers, on a link the driver does not impair (its stage keeps plain
    /// frames).
    pub fn use_tso(&mut self) {
        if let Some(tcp) = self.tcp.as_mut() {
            tcp.config_mut().tso = TSO_BYTES;
        }
    }

    /// The link from `local` to `remote`, if this group has one.
    fn link(&mut self, local: Kind, remote: Kind) -> Option<&mut link::Link> {
        self.links.iter_mut().find(|l| l.local == local && l.remote == remote)
    }

    /// Puts `link` in place of the link between the same two domains (a peer
    /// restarted with a fresh channel), or adds it.
    pub fn replace_link(&mut self, mut link: link::Link) {
        match (link.local, link.remote) {
            // A new sockets domain asked nothing of the old one's sockets.
            (Kind::Tcp, Kind::Sockets) => self.push_wanted.clear(),
            // A new tcp domain pushes nothing the old one owed.
            (Kind::Sockets, Kind::Tcp) => self.forget_pushes(|_| true),
            _ => {}
        }
        match self.links.iter_mut().find(|l| l.local == link.local && l.remote == link.remote && !l.retiring) {
            Some(old) => {
                link.tag = old.tag;
                *old = link
            }
            None => self.links.push(link),
        }
    }

    /// sockets side: forgets what was pushed or expected for the sockets whose
    /// tcp domain's tag `gone` picks.
    fn forget_pushes(&mut self, gone: impl Fn(u8) -> bool) {
        let tag_of = |k: &u64| (k >> TAG_SHIFT) as u8;
        self.pushed.retain(|k, _| !gone(tag_of(k)));
        self.expect_push.retain(|k, _| !gone(tag_of(k)));
    }

    /// sockets side: a socket closed or no longer read keeps nothing pushed.
    fn forget_socket(&mut self, s: TcpId) {
        self.pushed.remove(&s.to_raw());
        if self.expect_push.remove(&s.to_raw()).is_some() {
            // Its push may be on its way: one stray push more is no flood.
            if let Ok(l) = self.tcp_link(Some(s.to_raw())) {
                l.unasked.push_dropped();
            }
        }
    }

    /// tcp side: pushes to the sockets domain what its receives that found
    /// nothing would find now; whether it pushed anything.
    fn push_received(&mut self, now: Instant) -> bool {
        let (Some(tcp), Some(l)) =
            (self.tcp.as_mut(), self.links.iter_mut().find(|l| l.local == Kind::Tcp && l.remote == Kind::Sockets))
        else {
            return false;
        };
        let mut any = false;
        self.push_wanted.retain(|&s, &mut max| {
            let got = match tcp.recv(now, capnet_tcp::SocketId::from_raw(s), max as usize) {
                Ok(capnet_tcp::Received::Nothing) => return true,
                Ok(capnet_tcp::Received::Data(d)) => Ok(Answer::Data(d)),
                Ok(capnet_tcp::Received::Eof) => Ok(Answer::Eof),
                Err(e) => Err(capnet_sockets::tcp_error(e)),
            };
            l.send(&wire::Msg::Pushed { s, got });
            any = true;
            false
        });
        any
    }

    /// The first broken link's story, if any link broke.
    pub fn broken_link(&self) -> Option<String> {
        self.links.iter().find_map(|l| l.broken().map(str::to_owned))
    }

    /// Takes one frame from the device: an unfragmented datagram for udp or tcp
    /// goes to its core straight from the frame (no copy); everything else
    /// through the ip core's outputs. `vouched`: a TCP checksum the device left
    /// partial on the kernel's word ([`capnet_driver::vnet::to_plain`]).
    pub fn receive_frame(&mut self, frame: &[u8], vouched: bool) {
        let now = self.now();
        let Some(ip) = self.ip.as_mut() else { return };
        if let Some(d) = ip.receive_frame_local(now, frame) {
            let (tcp, udp, links, held, touched) =
                (&mut self.tcp, &mut self.udp, &mut self.links, &mut self.held, &mut self.touched);
            Self::deliver(tcp, udp, links, held, touched, now, &d, vouched);
        }
    }

    /// Hands a datagram to its transport: its core here, or over the link (to
    /// a retiring tcp domain for the flows it keeps during a swap).
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        tcp: &mut Option<TcpCore>,
        udp: &mut Option<UdpCore>,
        links: &mut [link::Link],
        held: &mut Option<std::collections::VecDeque<wire::Msg>>,
        touched: &mut [bool; 2],
        now: Instant,
        d: &LocalDatagram,
        vouched: bool,
    ) {
        let kind = match d.to {
            UDP => Kind::Udp,
            TCP | TCP_OLD => Kind::Tcp,
            _ => return,
        };
        match (kind, tcp, udp) {
            (Kind::Tcp, Some(tcp), _) => {
                touched[0] = true;
                match vouched {
                    true => tcp.receive_vouched(now, d.src, d.dst, d.payload),
                    false => tcp.receive(now, d.src, d.dst, d.payload),
                }
            }
            (Kind::Udp, _, Some(udp)) => {
                touched[1] = true;
                udp.receive(d.src, d.dst, d.payload, d.ip_header)
            }
            _ => {
                let mut payload = d.payload.to_vec();
                if vouched {
                    capnet_tcp::complete_checksum(d.src, d.dst, &mut payload);
                }
                let msg = wire::Msg::Deliver {
                    src: d.src.octets(),
                    dst: d.dst.octets(),
                    payload,
                    ip_header: d.ip_header.to_vec(),
                };
                match held.as_mut() {
                    Some(h) if d.to == TCP => {
                        if h.len() < MAX_HELD {
                            h.push_back(msg);
                        }
                    }
                    _ => {
                        let old = d.to == TCP_OLD;
                        if let Some(l) =
                            links.iter_mut().find(|l| l.local == Kind::Ip && l.remote == kind && l.retiring == old)
                        {
                            l.send(&msg);
                        }
                    }
                }
            }
        }
    }

    /// Runs timers and moves every output between the cores and onto links;
    /// frames for the device go to `emit`, with the segment size a TSO frame is
    /// to be cut into (only when the tcp core's `Config::tso` is on).
    pub fn pump(&mut self, mut emit: impl FnMut(Vec<u8>, Option<u16>)) {
        let now = self.now();
        let pushed = !self.push_wanted.is_empty() && self.push_received(now);
        if self.held.is_some() && self.held_since.elapsed() > link::CALL_DEADLINE {
            self.release_held();
        }
        if let Some(ip) = self.ip.as_mut() {
            ip.poll(now);
        }
        if let Some(tcp) = self.tcp.as_mut() {
            if tcp.poll_at().is_some_and(|at| at <= now) {
                self.touched[0] = true;
            }
            tcp.poll(now);
        }
        loop {
            let mut progressed = false;
            while let Some(out) = self.ip.as_mut().and_then(IpCore::pop_output) {
                progressed = true;
                match out {
                    Output::Frame(f) => emit(f, None),
                    Output::TsoFrame { frame, mss } => emit(frame, Some(mss)),
                    Output::Deliver(d) => {
                        let local = LocalDatagram {
                            to: d.to,
                            src: d.src,
                            dst: d.dst,
                            protocol: d.protocol,
                            payload: &d.payload,
                            ip_header: &d.ip_header,
                        };
                        Self::deliver(
                            &mut self.tcp,
                            &mut self.udp,
                            &mut self.links,
                            &mut self.held,
                            &mut self.touched,
                            now,
                            &local,
                            false,
                        )
                    }
                    Output::EchoReply(r) if r.to == SOCKETS => match self.link(Kind::Ip, Kind::Sockets) {
                        Some(l) => l.send(&wire::Msg::EchoReply {
                            ident: r.ident,
                            from: r.from.octets(),
                            seq: r.seq,
                            data: r.data,
                        }),
                        None => self.echo_replies.push((r.ident, r.from, r.seq, r.data)),
                    },
                    Output::EchoReply(_) => {}
                    Output::Icmp(e) => {
                        let kind = if matches!(e.to, TCP | TCP_OLD) { Kind::Tcp } else { Kind::Udp };
                        let flow = (e.local_port, e.remote, e.remote_port);
                        self.on_icmp(kind, e.to == TCP_OLD, flow, e.icmp_type, e.icmp_code, e.reporter)
                    }
                }
            }
            while let Some(out) = self.udp.as_mut().and_then(UdpCore::pop_output) {
                progressed = true;
                match out {
                    capnet_udp::Output::Send { dst, segment } => self.send_ip(Kind::Udp, now, dst, 17, segment, None),
                    capnet_udp::Output::PortUnreachable { to, quote } => match self.ip.as_mut() {
                        Some(ip) => ip.send_unreachable(now, to, 3, &quote),
                        None => {
                            if let Some(l) = self.link(Kind::Udp, Kind::Ip) {
                                l.send(&wire::Msg::Unreachable { to: to.octets(), quote });
                            }
                        }
                    },
                }
            }
            while let Some(capnet_tcp::Output::Send { dst, segment, tso }) =
                self.tcp.as_mut().and_then(TcpCore::pop_output)
            {
                progressed = true;
                self.send_ip(Kind::Tcp, now, dst, 6, segment, tso);
            }
            if !progressed {
                break;
            }
        }
        // A sockets domain elsewhere hears once that readiness may have changed,
        // and again only after it has called since. A push this round tells it
        // as much (it looks at every parked call on one).
        for (i, kind) in [Kind::Tcp, Kind::Udp].into_iter().enumerate() {
            if std::mem::take(&mut self.touched[i]) && !(kind == Kind::Tcp && pushed) {
                if let Some(l) = self.link(kind, Kind::Sockets) {
                    if !l.activity_sent {
                        l.activity_sent = true;
                        l.send(&wire::Msg::Activity);
                    }
                }
            }
        }
        for l in &mut self.links {
            l.flush();
        }
    }

    /// A transport's segment to the ip domain: here, or over the link.
    fn send_ip(
        &mut self,
        from: Kind,
        now: Instant,
        dst: capnet_ip::Ipv4Address,
        protocol: u8,
        segment: Vec<u8>,
        tso: Option<u16>,
    ) {
        match self.ip.as_mut() {
            // TCP without DF: the ip core's ICMP errors do not carry the next-hop
            // MTU yet, so path MTU discovery is not done (docs/tcp.md).
            Some(ip) => {
                let _ = match (protocol, tso) {
                    (_, Some(mss)) => ip.send_tso(now, dst, &segment, mss),
                    (6, None) => ip.send(now, dst, IpProtocol::Tcp, &segment, false),
                    _ => ip.send(now, dst, IpProtocol::Udp, &segment, false),
                };
            }
            None => {
                if let Some(l) = self.link(from, Kind::Ip) {
                    l.send(&wire::Msg::Send { dst: dst.octets(), protocol, segment, tso });
                }
            }
        }
    }

    /// An ICMP error for a transport's flow (local port, remote address, remote
    /// port): to its core here, or over the link (the retiring tcp domain's when
    /// `old`).
    fn on_icmp(
        &mut self,
        kind: Kind,
        old: bool,
        (local_port, remote, remote_port): (u16, capnet_ip::Ipv4Address, u16),
        icmp_type: u8,
        icmp_code: u8,
        reporter: capnet_ip::Ipv4Address,
    ) {
        match (kind, self.tcp.as_mut(), self.udp.as_mut()) {
            (Kind::Tcp, Some(tcp), _) => {
                self.touched[0] = true;
                tcp.on_icmp(local_port, remote, remote_port, icmp_type, icmp_code)
            }
            (Kind::Udp, _, Some(udp)) => {
                self.touched[1] = true;
                udp.on_icmp(local_port, remote, remote_port, icmp_type, icmp_code, reporter)
            }
            _ => {
                let l = self.links.iter_mut().find(|l| l.local == Kind::Ip && l.remote == kind && l.retiring == old);
                if let Some(l) = l {
                    l.send(&wire::Msg::Icmp {
                        local_port,
                        remote: remote.octets(),
                        remote_port,
                        icmp_type,
                        icmp_code,
                        reporter: reporter.octets(),
                    });
                }
            }
        }
    }

    /// Takes every message from every link and acts on it: datagrams into the
    /// cores here, calls answered, activity noted. Returns whether any arrived.
    pub fn receive_links(&mut self) -> bool {
        let now = self.now();
        let mut any = false;
        let mut links = std::mem::take(&mut self.links);
        for l in &mut links {
            l.recv(|l, m| {
                any = true;
                self.on_message(now, l, m);
            });
        }
        // Links made while we held them (none today) would be lost: keep both.
        links.append(&mut self.links);
        self.links = links;
        if let Some(flows) = self.flows_named.take() {
            self.keep_old_flows(&flows);
        }
        any
    }

    /// ip side: a new tcp domain joins beside the present one (`capnet swap
    /// tcp`) over `link`. On the sockets side new listeners and connections go
    /// to it from now on; on the ip side the old domain is asked to name the
    /// flows it keeps, and segments of new connections wait until it has.
    pub fn tcp_beside(&mut self, mut link: link::Link) {
        let local = link.local;
        let mut tag = 0;
        for l in self.links.iter_mut().filter(|l| l.local == local && l.remote == Kind::Tcp) {
            l.retiring = true;
            tag = l.tag.wrapping_add(1);
            if local == Kind::Ip {
                l.send(&wire::Msg::Retire);
                l.flush();
            }
        }
        if local == Kind::Ip {
            self.held = Some(std::collections::VecDeque::new());
            self.held_since = StdInstant::now();
        }
        link.tag = tag;
        self.links.push(link);
    }

    /// ip side: the old tcp domain named its flows: they stay with it, every
    /// other segment (those held included) goes to the new one.
    fn keep_old_flows(&mut self, flows: &[(u16, wire::Addr, u16)]) {
        if let Some(ip) = self.ip.as_mut() {
            for (local_port, remote, remote_port) in flows {
                ip.demux.insert_flow(IpProtocol::Tcp, *local_port, (*remote).into(), *remote_port, TCP_OLD);
            }
        }
        self.release_held();
    }

    /// Sends the segments held during a swap's switch where the demux says now.
    fn release_held(&mut self) {
        let Some(held) = self.held.take() else { return };
        for m in held {
            let wire::Msg::Deliver { src, payload, .. } = &m else { continue };
            let Some((src_port, dst_port)) = capnet_tcp::segment_ports(payload) else { continue };
            let old = self
                .ip
                .as_ref()
                .and_then(|ip| ip.demux.lookup_flow(IpProtocol::Tcp, dst_port, (*src).into(), src_port))
                == Some(TCP_OLD);
            let l = self.links.iter_mut().find(|l| l.local == Kind::Ip && l.remote == Kind::Tcp && l.retiring == old);
            if let Some(l) = l {
                l.send(&m);
            }
        }
    }

    /// The swapped-out tcp domain is gone (it finished its last connection, or
    /// died): its link goes, and on the ip side its flows with it.
    pub fn tcp_retired(&mut self) {
        let old: Vec<u8> = self.links.iter().filter(|l| l.remote == Kind::Tcp && l.retiring).map(|l| l.tag).collect();
        self.forget_pushes(|t| old.contains(&t));
        self.links.retain(|l| !(l.remote == Kind::Tcp && l.retiring));
        if let Some(ip) = self.ip.as_mut() {
            ip.demux.remove(TCP_OLD);
        }
        self.release_held();
    }

    /// Whether the sockets domain's tcp socket `s` lives in a retiring tcp
    /// domain (or one no link reaches any more).
    pub fn tcp_socket_retiring(&self, s: TcpId) -> bool {
        let tag = (s.to_raw() >> TAG_SHIFT) as u8;
        !self.links.iter().any(|l| l.local == Kind::Sockets && l.remote == Kind::Tcp && l.tag == tag && !l.retiring)
    }

    /// tcp side: told to retire, it holds only connections in TIME-WAIT (which
    /// need no more than their peer's silence) or none.
    pub fn drained(&self) -> bool {
        self.retiring
            && self
                .tcp
                .as_ref()
                .is_some_and(|t| t.sockets().0.iter().all(|c| c.state == capnet_tcp::ConnState::TimeWait))
    }

    /// One message from the domain at the other end of `l`.
    fn on_message(&mut self, now: Instant, l: &mut link::Link, m: wire::Msg) {
        use wire::Msg;
        let ip4 = capnet_ip::Ipv4Address::from;
        match (l.local, m) {
            (Kind::Tcp, Msg::Deliver { src, dst, payload, .. }) if self.tcp.is_some() => {
                self.touched[0] = true;
                self.tcp().receive(now, ip4(src), ip4(dst), &payload);
            }
            (Kind::Udp, Msg::Deliver { src, dst, payload, ip_header }) if self.udp.is_some() => {
                self.touched[1] = true;
                self.udp().receive(ip4(src), ip4(dst), &payload, &ip_header);
            }
            (Kind::Tcp | Kind::Udp, Msg::Icmp { local_port, remote, remote_port, icmp_type, icmp_code, reporter }) => {
                self.on_icmp(
                    l.local,
                    false,
                    (local_port, ip4(remote), remote_port),
                    icmp_type,
                    icmp_code,
                    ip4(reporter),
                )
            }
            (Kind::Sockets, Msg::EchoReply { ident, from, seq, data }) => {
                self.activity = true; // a parked receive on an echo socket may complete
                self.echo_replies.push((ident, ip4(from), seq, data))
            }
            (Kind::Ip, Msg::Send { dst, protocol: protocol @ (6 | 17), segment, tso }) if self.ip.is_some() => {
                let from = if protocol == 6 { Kind::Tcp } else { Kind::Udp };
                if from == l.remote {
                    self.send_ip(from, now, ip4(dst), protocol, segment, tso.filter(|_| protocol == 6));
                } else {
                    l.protocol_error(format!("{} sent a datagram of protocol {protocol}", l.remote));
                }
            }
            (Kind::Ip, Msg::Unreachable { to, quote }) if self.ip.is_some() && l.remote == Kind::Udp => {
                self.ip().send_unreachable(now, ip4(to), 3, &quote)
            }
            (_, Msg::Call { id, call }) if l.remote == Kind::Sockets => {
                l.activity_sent = false;
                let answer = self.answer(l.local, call);
                l.send(&Msg::Answer { id, answer });
            }
            (Kind::Tcp, Msg::WantPush { s, max }) if l.remote == Kind::Sockets && self.tcp.is_some() => {
                l.activity_sent = false;
                self.push_wanted.insert(s, max);
            }
            (Kind::Sockets, Msg::Pushed { s, got }) if l.remote == Kind::Tcp && s & TAG_MASK == 0 => {
                let key = s | u64::from(l.tag) << TAG_SHIFT;
                match (self.expect_push.remove(&key), &got) {
                    // Closed here while the push was on its way: allowed once for
                    // each expected push dropped (`link::Unasked`); any other is a flood.
                    (None, _) => {
                        if !l.unasked.stray_push() {
                            l.protocol_error(format!("{} floods pushes nobody asked for", l.remote));
                        }
                    }
                    (Some(max), Ok(Answer::Data(d))) if d.len() > max as usize => {
                        l.protocol_error(format!("{} pushed {} bytes where {max} were asked", l.remote, d.len()))
                    }
                    (Some(_), _) => {
                        self.pushed.insert(key, got);
                        self.activity = true;
                    }
                }
            }
            (Kind::Sockets, Msg::Activity) => {
                if !l.unasked.notice() {
                    l.protocol_error(format!("{} floods activity notices nobody asked for", l.remote));
                }
                self.activity = true
            }
            (Kind::Tcp, Msg::Retire) if l.remote == Kind::Ip && self.tcp.is_some() => {
                self.retiring = true;
                let (conns, _) = self.tcp().sockets();
                let flows = conns.iter().map(|c| (c.local_port, c.remote.octets(), c.remote_port)).collect();
                l.send(&Msg::Flows { flows });
            }
            // Named too late (the switch went ahead without them): nothing to keep.
            (Kind::Ip, Msg::Flows { flows }) if l.remote == Kind::Tcp && l.retiring => {
                if self.held.is_some() {
                    self.flows_named = Some(flows);
                }
            }
            // A call waits for its answer (one at a time per link) and breaks the
            // link when it gives up, so an answer outside a call answers nothing.
            (Kind::Sockets, Msg::Answer { id, .. }) => {
                l.protocol_error(format!("{} sent an answer to no call ({id})", l.remote))
            }
            (_, other) => l.protocol_error(format!("{} sent {other:?}, which it may not send here", l.remote)),
        }
    }

    /// Answers a call of the sockets domain with the core of `kind` here.
    fn answer(&mut self, kind: Kind, call: wire::Call) -> Result<wire::Answer, capnet_sockets::SocketError> {
        use capnet_sockets::{SocketError, Transports};
        use wire::{Answer, Call};
        let ip4 = capnet_ip::Ipv4Address::from;
        let tcp_id = capnet_tcp::SocketId::from_raw;
        let udp_id = capnet_udp::SocketId::from_raw;
        let owner = match &call {
            Call::UdpBind { .. }
            | Call::UdpPort { .. }
            | Call::UdpConnect { .. }
            | Call::UdpSend { .. }
            | Call::UdpRecv { .. }
            | Call::UdpClose { .. } => Kind::Udp,
            Call::EchoClaim { .. } | Call::EchoRelease { .. } | Call::EchoSend { .. } => Kind::Ip,
            _ => Kind::Tcp,
        };
        if owner != kind {
            return Err(SocketError::Invalid(format!("the {kind} domain does not answer {owner} calls")));
        }
        // A socket closed, or no longer read, gets nothing pushed.
        if let Call::TcpClose { s } | Call::TcpAbort { s } | Call::TcpShutdown { s, read: true, .. } = &call {
            self.push_wanted.remove(s);
        }
        Ok(match call {
            Call::UdpBind { port } => Answer::Id(self.udp_bind(port)?.to_raw()),
            Call::UdpPort { s } => Answer::Port(self.udp_port(udp_id(s))?),
            Call::UdpConnect { s, addr, port } => {
                self.udp_connect(udp_id(s), ip4(addr), port)?;
                Answer::Done
            }
            Call::UdpSend { s, to, data } => {
                self.udp_send(udp_id(s), to.map(|(a, p)| (ip4(a), p)), &data)?;
                Answer::Done
            }
            Call::UdpRecv { s, max } => Answer::Datagrams(
                self.udp_recv(udp_id(s), max as usize)?
                    .into_iter()
                    .map(|d| (d.src.octets(), d.src_port, d.data))
                    .collect(),
            ),
            Call::UdpClose { s } => {
                self.udp_close(udp_id(s))?;
                Answer::Done
            }
            Call::EchoClaim { ident } => Answer::Bool(self.echo_claim(ident)?),
            Call::EchoRelease { ident } => {
                self.echo_release(ident)?;
                Answer::Done
            }
            Call::EchoSend { dst, ident, seq, data } => {
                self.echo_send(ip4(dst), ident, seq, &data)?;
                Answer::Done
            }
            Call::TcpListen { port, backlog } => Answer::Id(self.tcp_listen(port, backlog as usize)?.to_raw()),
            Call::TcpLocalPort { s } => Answer::Port(self.tcp_local_port(tcp_id(s))?),
            Call::TcpAccept { l } => Answer::Accepted(self.tcp_accept(tcp_id(l))?.map(capnet_tcp::SocketId::to_raw)),
            Call::TcpEndpoints { s } => {
                let e = self.tcp_endpoints(tcp_id(s))?;
                Answer::Endpoints(e.local_port, e.remote.octets(), e.remote_port)
            }
            Call::TcpConnect { addr, port } => Answer::Id(self.tcp_connect(ip4(addr), port)?.to_raw()),
            Call::TcpConnected { s } => Answer::Bool(self.tcp_connected(tcp_id(s))?),
            Call::TcpSend { s, data } => Answer::Count(self.tcp_send(tcp_id(s), &data)? as u32),
            Call::TcpShutdown { s, read, write } => {
                self.tcp_shutdown(tcp_id(s), read, write)?;
                Answer::Done
            }
            Call::TcpClose { s } => {
                self.tcp_close(tcp_id(s))?;
                Answer::Done
            }
            Call::TcpAbort { s } => {
                self.tcp_abort(tcp_id(s))?;
                Answer::Done
            }
            Call::TcpSetOption { s, option } => {
                self.tcp_set_option(tcp_id(s), edge::sock_opt(&option)?)?;
                Answer::Done
            }
            Call::TcpReady { s } => Answer::Ready(edge::ready_bits(self.tcp_ready(tcp_id(s))?)),
        })
    }

    /// The link to a tcp domain in another group: the one socket `raw` (tagged)
    /// lives in, or for a new socket the one not retiring.
    fn tcp_link(&mut self, raw: Option<u64>) -> Result<&mut link::Link, SocketError> {
        self.links
            .iter_mut()
            .find(|l| {
                l.local == Kind::Sockets
                    && l.remote == Kind::Tcp
                    && match raw {
                        Some(r) => l.tag == (r >> TAG_SHIFT) as u8,
                        None => !l.retiring,
                    }
            })
            .ok_or_else(|| SocketError::Invalid("no tcp domain is reachable".into()))
    }

    /// A call to a tcp domain in another group: the one socket `s` lives in (by
    /// its tag), or for a new socket the one not retiring. Socket ids in the
    /// answer come back tagged with that domain's link.
    fn tcp_remote(&mut self, s: Option<TcpId>, make: impl FnOnce(u64) -> Call) -> Result<Answer, SocketError> {
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
        Ok(match l.call(make(raw.map_or(0, |r| r & !TAG_MASK)))? {
            Answer::Id(id) => Answer::Id(retag(id)?),
            Answer::Accepted(Some(id)) => Answer::Accepted(Some(retag(id)?)),
            a => a,
        })
    }

    /// A call to the domain of `kind` in another group, over its link.
    fn remote(&mut self, kind: Kind, call: wire::Call) -> Result<wire::Answer, capnet_sockets::SocketError> {
        match self.link(Kind::Sockets, kind) {
            Some(l) => l.call(call),
            None => Err(capnet_sockets::SocketError::Invalid(format!("no {kind} domain is reachable"))),
        }
    }
}

/// A secret for the tcp core's ISNs and port choice, from the system's random
/// source (a fixed secret only if the kernel refuses: ISNs stay unique per
/// connection either way, thanks to the clock term).
fn random_secret() -> [u64; 2] {
    let mut b = [0u8; 16];
    let _ = rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty());
    let (x, y) = b.split_at(8);
    [u64::from_ne_bytes(x.try_into().unwrap_or_default()), u64::from_ne_bytes(y.try_into().unwrap_or_default())]
}

/// A composition of the packet path an application thread drives: it polls, and
/// calls the udp core in between. Tests are written once against this trait.
pub trait Stack {
    /// Waits up to `max_wait` for work, then does all that is ready.
    fn poll(&mut self, max_wait: Duration) -> Result<(), RuntimeError>;
    /// The cores (the application side calls the udp core between polls).
    fn cores(&mut self) -> &mut Cores;
    /// The device side's counters, where this composition keeps them in the same
    /// thread (`None` when the driver is a group of its own).
    fn device_stats(&self) -> Option<DeviceStats> {
        None
    }
}

/// Impairment of the link, per direction, applied by the driver (this kernel has no
/// netem).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkImpairment {
    /// Frames from the device to the stack.
    pub inbound: Impairment,
    /// Frames from the stack to the device.
    pub outbound: Impairment,
}

impl LinkImpairment {
    /// A perfect link.
    pub const NONE: Self = Self { inbound: Impairment::NONE, outbound: Impairment::NONE };

    /// The same seeded `loss` and `reorder` (frames held back 1 ms) each way,
    /// each direction with its own random sequence.
    pub fn symmetric(loss: f64, reorder: f64, seed: u64) -> Self {
        let way = |seed| Impairment { loss, reorder, seed, ..Impairment::NONE };
        Self { inbound: way(seed), outbound: way(seed.wrapping_add(1)) }
    }
}

/// One direction's impairment stage on the driver's clock (time since start).
#[derive(Debug)]
struct Stage {
    stage: Impairer,
    epoch: StdInstant,
    /// No impairment configured: frames bypass the stage (no copy, no allocation).
    passthrough: bool,
}

impl Stage {
    fn new(cfg: Impairment) -> Result<Self, RuntimeError> {
        let stage = Impairer::new(cfg).map_err(|e| RuntimeError::Ipc(e.to_string()))?;
        Ok(Self { stage, epoch: StdInstant::now(), passthrough: cfg.is_none() })
    }

    /// Counts a frame that bypassed the stage, so its counters stay complete.
    fn passed(&mut self) {
        self.stage.stats.frames += 1;
    }

    fn push(&mut self, frame: Vec<u8>) {
        let now = self.epoch.elapsed();
        self.stage.push(now, frame);
    }

    fn pop(&mut self) -> Option<Vec<u8>> {
        self.stage.pop(self.epoch.elapsed())
    }

    /// How long until the next held frame is due (zero if one is due).
    fn due_in(&self) -> Option<Duration> {
        self.stage.poll_at().map(|at| at.saturating_sub(self.epoch.elapsed()))
    }
}

/// A composition that also serves applications' channels (the sockets domain's
/// side of `capnet::net`).
pub trait AppHost: Stack {
    /// Like [`Stack::poll`], also returning early when one of `apps` has work.
    fn poll_apps(
        &mut self,
        max_wait: Duration,
        apps: &mut [&mut capnet_ipc::shm_channel::ShmEnd],
    ) -> Result<(), RuntimeError>;
    /// Runs the cores' outputs now (after the application side called them).
    fn push(&mut self) -> Result<(), RuntimeError>;
}

/// The most payload one TSO segment carries (its IP datagram stays under 64 KiB).
pub const TSO_BYTES: usize = 64_000;

/// How long the mono composition waits on its device while applications are
/// attached: a futex wake cannot interrupt `poll(2)`, so it looks at their
/// channels at least this often (their calls wait at most this long).
pub const MONO_APP_TICK: Duration = Duration::from_millis(1);

/// A copy of every frame the device reads or writes, sent to a capture socket
/// while one is installed (`capnet capture`). Each copy is one message on a
/// `SOCK_SEQPACKET` socket: 8 bytes of wall-clock time (µs since the epoch,
/// little-endian) and the frame. A capture that cannot keep up loses frames
/// (counted), never slows the device; a closed capture socket ends the capture.
#[derive(Debug, Clone, Default)]
pub struct FrameTap(std::sync::Arc<TapState>);

#[derive(Debug, Default)]
struct TapState {
    on: std::sync::atomic::AtomicBool,
    sink: std::sync::Mutex<Option<OwnedFd>>,
    dropped: std::sync::atomic::AtomicU64,
}

impl FrameTap {
    /// Starts copying frames to `sock` (replacing an earlier capture).
    pub fn install(&self, sock: OwnedFd) {
        *self.0.sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(sock);
        self.0.on.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Frames a slow capture lost.
    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Copies `frame` to the capture, if one runs.
    pub fn record(&self, frame: &[u8]) {
        use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
        if !self.0.on.load(Acquire) {
            return;
        }
        let micros =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        let head = micros.to_le_bytes();
        let mut sink = self.0.sink.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fd) = sink.as_ref() else { return };
        let parts = [std::io::IoSlice::new(&head), std::io::IoSlice::new(frame)];
        let flags = rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL;
        match rustix::net::sendmsg(fd, &parts, &mut rustix::net::SendAncillaryBuffer::default(), flags) {
            Ok(_) => {}
            Err(rustix::io::Errno::AGAIN) => {
                self.0.dropped.fetch_add(1, Relaxed);
            }
            Err(_) => {
                // The reader went away: the capture is over.
                *sink = None;
                self.0.on.store(false, Release);
            }
        }
    }
}

/// Counters the device side of a runtime keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Frames read from the device.
    pub frames_read: u64,
    /// Frames written to the device.
    pub frames_written: u64,
    /// Bytes of frames read from and written to the device (each a copy the
    /// kernel makes in the read or write system call).
    pub device_bytes: u64,
    /// Writes the device refused (e.g. link down): the frame is dropped.
    pub write_errors: u64,
    /// Frames whose virtio-net header was malformed or asked for segmentation.
    pub vnet_refused: u64,
    /// TCP frames whose partial checksum was taken on the kernel's word
    /// (checksum offload into a TCP core in the same process).
    pub checksums_vouched: u64,
    /// Times an in-memory wire's peer broke the channel protocol and was dropped.
    pub wire_refused: u64,
    /// Frames from a wire dropped because the stack held every buffer it may.
    pub rx_dropped: u64,
    /// What the inbound impairment did.
    pub inbound: ImpairStats,
    /// What the outbound impairment did.
    pub outbound: ImpairStats,
}

/// A non-blocking copy of a device's fd, and whether its frames carry the
/// virtio-net header.
fn device_fd(dev: &Device) -> Result<(OwnedFd, bool), RuntimeError> {
    let vnet = matches!(dev.kind(), DeviceKind::Tap(o) if o.vnet_hdr);
    Ok((set_nonblocking(dev.fd().try_clone_to_owned()?)?, vnet))
}

/// The plain frame inside what the device handed over: as is, or with the
/// virtio-net header stripped and a partial checksum completed (in place) —
/// or, with `vouch`, a partial TCP checksum left for the kernel's word (the
/// `bool`: the frame must go to a TCP core told so). `None` (counted) for a
/// frame the header makes unusable.
fn plain_frame<'a>(raw: &'a mut [u8], vnet: bool, vouch: bool, stats: &mut DeviceStats) -> Option<(&'a [u8], bool)> {
    if !vnet {
        return Some((raw, false));
    }
    match capnet_driver::vnet::to_plain(raw, vouch) {
        Ok((frame, vouched)) => {
            stats.checksums_vouched += u64::from(vouched);
            Some((frame, vouched))
        }
        Err(_) => {
            stats.vnet_refused += 1;
            None
        }
    }
}

/// Puts a device fd in non-blocking mode (the runtimes wait in `poll(2)`).
pub fn set_nonblocking(fd: OwnedFd) -> Result<OwnedFd, RuntimeError> {
    let flags = rustix::fs::fcntl_getfl(&fd).map_err(std::io::Error::from)?;
    rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK).map_err(std::io::Error::from)?;
    Ok(fd)
}

/// Waits until `fd` is readable or `wait` passes.
fn wait_readable(fd: &OwnedFd, wait: Duration) -> Result<(), RuntimeError> {
    let ts = rustix::time::Timespec { tv_sec: wait.as_secs() as i64, tv_nsec: i64::from(wait.subsec_nanos()) };
    let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
    match rustix::event::poll(&mut fds, Some(&ts)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => Err(std::io::Error::from(e).into()),
    }
}

/// Writes one frame to the device (behind a virtio-net header that asks for
/// nothing, if the device wants one), counting the outcome.
fn write_frame(fd: &OwnedFd, frame: &[u8], vnet: bool, tso: Option<u16>, stats: &mut DeviceStats, tap: &FrameTap) {
    tap.record(frame);
    let r = if vnet {
        let hdr = tso.and_then(|mss| capnet_driver::vnet::tso_header(frame, mss)).unwrap_or(capnet_driver::vnet::PLAIN);
        rustix::io::writev(fd, &[std::io::IoSlice::new(&hdr), std::io::IoSlice::new(frame)])
    } else {
        rustix::io::write(fd, frame)
    };
    match r {
        Ok(n) => {
            stats.frames_written += 1;
            stats.device_bytes += n as u64;
        }
        Err(_) => stats.write_errors += 1,
    }
}

/// Reads one frame if one is ready (`None` when the device has nothing).
fn read_frame(fd: &OwnedFd, buf: &mut [u8]) -> Result<Option<usize>, RuntimeError> {
    loop {
        return match rustix::io::read(fd, &mut *buf) {
            Ok(n) => Ok(Some(n)),
            Err(rustix::io::Errno::AGAIN) => Ok(None),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => Err(std::io::Error::from(e).into()),
        };
    }
}

/// The ip and udp cores in one thread over one device.
#[derive(Debug)]
pub struct MonoStack {
    fd: OwnedFd,
    vnet: bool,
    cores: Cores,
    buf: Vec<u8>,
    inbound: Stage,
    outbound: Stage,
    /// The device side's counters.
    pub stats: DeviceStats,
    /// Copies of the device's frames for `capnet capture`.
    pub tap: FrameTap,
    /// Rings while the stack sleeps on channels and a frame arrives.
    watch: DeviceWatch,
    waiter: capnet_ipc::Waiter,
    /// The last round stopped reading at its budget: the device may hold more.
    backlog: bool,
}

/// How the mono stack sleeps on its applications' channels (futexes) and its
/// device (`poll(2)`) at once, which no one system call does: while it sleeps,
/// a thread of its own blocks in `poll(2)` on the device and, when a frame is
/// there, rings a doorbell — a message on an in-process channel the stack waits
/// on among the others. Without it the stack would have to look at one of the
/// two every [`MONO_APP_TICK`], and every call or frame would wait for that tick.
#[derive(Debug)]
struct DeviceWatch {
    /// The stack's end of the doorbell channel.
    bell: capnet_ipc::shm_channel::ShmEnd,
    /// 1 while the stack sleeps and wants a ring (the watcher waits for it).
    armed: std::sync::Arc<std::sync::atomic::AtomicU32>,
    rung: Vec<capnet_ipc::Descriptor>,
}

/// `armed` value that tells the watcher to end.
const WATCH_STOP: u32 = 2;

impl DeviceWatch {
    /// Starts the watcher on a copy of `fd` (before the sandbox: no thread may
    /// be started inside it).
    fn start(fd: &OwnedFd) -> Result<Self, RuntimeError> {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let ipc = |e: capnet_ipc::shm_channel::ShmChannelError| RuntimeError::Ipc(e.to_string());
        let params = capnet_ipc::channel::ChannelParams { capacity: 16, epoch: 1 };
        let (mut ring, bell) = capnet_ipc::shm_channel::pair("capnet-doorbell", params).map_err(ipc)?;
        let fd = fd.try_clone().map_err(RuntimeError::Io)?;
        let armed = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let watcher = armed.clone();
        // Returns only once the thread has finished starting: thread start runs
        // with signals blocked, and a sandbox entered meanwhile would kill it there.
        let started = std::sync::Arc::new(std::sync::Barrier::new(2));
        let up = started.clone();
        std::thread::Builder::new()
            .name("device-watch".into())
            .spawn(move || {
                up.wait();
                loop {
                    let mut a = watcher.load(Acquire);
                    while a == 0 {
                        let _ = rustix::thread::futex::wait(&watcher, rustix::thread::futex::Flags::PRIVATE, 0, None);
                        a = watcher.load(Acquire);
                    }
                    if a == WATCH_STOP {
                        return;
                    }
                    // Woken every 100 ms while idle, to see whether the stack is gone
                    // (a pipe to stop it would be an fd no grant explains).
                    let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
                    let tick = rustix::time::Timespec { tv_sec: 0, tv_nsec: 100_000_000 };
                    if !matches!(rustix::event::poll(&mut fds, Some(&tick)), Ok(1..)) {
                        continue;
                    }
                    if watcher.compare_exchange(1, 0, AcqRel, Acquire).is_ok() {
                        let _ = ring.send(&[capnet_ipc::Descriptor::default()]);
                    }
                }
            })
            .map_err(RuntimeError::Io)?;
        started.wait();
        Ok(Self { bell, armed, rung: Vec::new() })
    }

    /// The stack is about to sleep: ring when a frame arrives.
    fn arm(&self) {
        let (acqrel, acq) = (std::sync::atomic::Ordering::AcqRel, std::sync::atomic::Ordering::Acquire);
        if self.armed.compare_exchange(0, 1, acqrel, acq).is_ok() {
            let _ = rustix::thread::futex::wake(&self.armed, rustix::thread::futex::Flags::PRIVATE, 1);
        }
    }

    /// The stack woke: forget the rings (it reads the device whatever woke it).
    fn quiet(&mut self) {
        let _ = self.armed.compare_exchange(
            1,
            0,
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
        );
        self.rung.clear();
        let _ = self.bell.recv(&mut self.rung, 16);
    }
}

impl Drop for DeviceWatch {
    fn drop(&mut self) {
        // Ends a watcher waiting to be armed, or one in poll(2) at its next tick.
        self.armed.store(WATCH_STOP, std::sync::atomic::Ordering::Release);
        let _ = rustix::thread::futex::wake(&self.armed, rustix::thread::futex::Flags::PRIVATE, 1);
    }
}

impl MonoStack {
    /// A stack on `dev` (plain frames) with ip configuration `cfg`, its link
    /// impaired as `link` says.
    pub fn new(dev: Device, cfg: Config, udp_queue_bytes: usize, link: LinkImpairment) -> Result<Self, RuntimeError> {
        Self::with_cores(dev, Cores::new(cfg, udp_queue_bytes), link)
    }

    /// A stack on `dev` running `cores` (which must include ip).
    pub fn with_cores(dev: Device, cores: Cores, link: LinkImpairment) -> Result<Self, RuntimeError> {
        let (fd, vnet) = device_fd(&dev)?;
        Self::on_fd(fd, vnet, cores, link)
    }

    /// A stack on a device fd granted as a capability (`vnet`: its frames carry
    /// the virtio-net header), running `cores` (which must include ip).
    pub fn on_fd(fd: OwnedFd, vnet: bool, mut cores: Cores, link: LinkImpairment) -> Result<Self, RuntimeError> {
        let fd = set_nonblocking(fd)?;
        if vnet && link.outbound.is_none() {
            cores.use_tso();
        }
        let mut s = Self {
            vnet,
            cores,
            buf: vec![0u8; 65536 + VNET_HDR_LEN],
            inbound: Stage::new(link.inbound)?,
            outbound: Stage::new(link.outbound)?,
            stats: DeviceStats::default(),
            tap: FrameTap::default(),
            watch: DeviceWatch::start(&fd)?,
            waiter: capnet_ipc::Waiter::new(capnet_ipc::notify::SpinPolicy::DEFAULT),
            backlog: false,
            fd,
        };
        s.flush();
        Ok(s)
    }

    /// The device side's counters, with the impairment stages'.
    pub fn device_stats(&self) -> DeviceStats {
        DeviceStats { inbound: self.inbound.stage.stats, outbound: self.outbound.stage.stats, ..self.stats }
    }

    /// Delivers inbound frames that are due, runs the cores, and writes outbound
    /// frames that are due.
    fn flush(&mut self) {
        self.cores.receive_links();
        while let Some(f) = self.inbound.pop() {
            self.cores.receive_frame(&f, false);
        }
        let (out, fd, vnet, stats, tap) = (&mut self.outbound, &self.fd, self.vnet, &mut self.stats, &self.tap);
        self.cores.pump(|frame, tso| {
            if out.passthrough {
                out.passed();
                write_frame(fd, &frame, vnet, tso, stats, tap);
            } else {
                out.push(frame);
            }
        });
        while let Some(frame) = self.outbound.pop() {
            write_frame(&self.fd, &frame, self.vnet, None, &mut self.stats, &self.tap);
        }
    }
}

/// Frames the monolithic stack reads from its device in one round, before it
/// serves its applications again.
const MONO_READ_BUDGET: usize = 8;

impl MonoStack {
    /// Sleeps until a frame, a message on a link or an application's channel,
    /// or the cores' next deadline; then takes every frame and runs the cores.
    fn run(
        &mut self,
        max_wait: Duration,
        apps: &mut [&mut capnet_ipc::shm_channel::ShmEnd],
    ) -> Result<(), RuntimeError> {
        self.flush();
        let mut wait = self.cores.wait_bound(max_wait);
        for due in [self.inbound.due_in(), self.outbound.due_in()].into_iter().flatten() {
            wait = wait.min(due);
        }
        if self.backlog {
            // Frames are waiting: no sleep (and no doorbell to ring at once).
        } else if apps.is_empty() && self.cores.links.is_empty() {
            wait_readable(&self.fd, wait)?;
        } else if !wait.is_zero() {
            self.watch.arm();
            let mut ends: Vec<&mut capnet_ipc::shm_channel::ShmEnd> =
                self.cores.links.iter_mut().filter(|l| l.broken().is_none()).map(link::Link::channel).collect();
            ends.extend(apps.iter_mut().map(|e| &mut **e));
            ends.insert(0, &mut self.watch.bell);
            wait_on(&mut self.waiter, ends, wait);
            self.watch.quiet();
        }
        // At most a budget of frames a round: a sender the ACKs keep busy fills
        // the device as fast as it is read, and the applications' calls (which
        // drain the receive buffers and so open the windows) wait for the round.
        let mut budget = MONO_READ_BUDGET;
        self.backlog = false;
        while let Some(n) = read_frame(&self.fd, &mut self.buf)? {
            budget -= 1;
            self.backlog = budget == 0;
            self.stats.frames_read += 1;
            self.stats.device_bytes += n as u64;
            // Checksums are vouched for only on frames that go straight to the
            // cores: an impairment stage may corrupt what it holds.
            let vouch = self.inbound.passthrough;
            let Some((frame, vouched)) = plain_frame(&mut self.buf[..n], self.vnet, vouch, &mut self.stats) else {
                continue;
            };
            self.tap.record(frame);
            if self.inbound.passthrough {
                self.inbound.passed();
                self.cores.receive_frame(frame, vouched);
            } else {
                self.inbound.push(frame.to_vec());
            }
            self.flush();
            if self.backlog {
                break;
            }
        }
        self.flush();
        Ok(())
    }
}

impl Stack for MonoStack {
    fn poll(&mut self, max_wait: Duration) -> Result<(), RuntimeError> {
        self.run(max_wait, &mut [])
    }

    fn cores(&mut self) -> &mut Cores {
        &mut self.cores
    }

    fn device_stats(&self) -> Option<DeviceStats> {
        Some(MonoStack::device_stats(self))
    }
}

impl AppHost for MonoStack {
    fn poll_apps(
        &mut self,
        max_wait: Duration,
        apps: &mut [&mut capnet_ipc::shm_channel::ShmEnd],
    ) -> Result<(), RuntimeError> {
        self.run(max_wait, apps)
    }

    fn push(&mut self) -> Result<(), RuntimeError> {
        self.flush();
        Ok(())
    }
}

/// Waits on `ends` (the design's spin-then-block) for at most `wait`. A group
/// with more ends than one wait covers waits on the first ones and looks at the
/// rest every [`MONO_APP_TICK`].
pub(crate) fn wait_on(
    waiter: &mut capnet_ipc::Waiter,
    mut ends: Vec<&mut capnet_ipc::shm_channel::ShmEnd>,
    wait: Duration,
) {
    if ends.is_empty() {
        std::thread::sleep(wait); // nothing to wake us but the clock
        return;
    }
    let mut wait = wait;
    if ends.len() > capnet_ipc::channel::MAX_WAIT_ENDS {
        ends.truncate(capnet_ipc::channel::MAX_WAIT_ENDS);
        wait = wait.min(MONO_APP_TICK);
    }
    waiter.wait(&mut ends, Some(wait), tokens());
}

/// A group without the ip domain (transports and/or sockets): its cores, woken
/// by its links and the applications' channels.
#[derive(Debug)]
pub struct Plain {
    cores: Cores,
    waiter: capnet_ipc::Waiter,
}

impl Plain {
    /// The group running `cores`.
    pub fn new(cores: Cores) -> Self {
        Self { cores, waiter: capnet_ipc::Waiter::new(capnet_ipc::notify::SpinPolicy::DEFAULT) }
    }

    fn pump(&mut self) {
        // No ip here, so no frame ever comes out.
        self.cores.pump(|_, _| {});
    }
}

impl Stack for Plain {
    fn poll(&mut self, max_wait: Duration) -> Result<(), RuntimeError> {
        self.poll_apps(max_wait, &mut [])
    }

    fn cores(&mut self) -> &mut Cores {
        &mut self.cores
    }
}

impl AppHost for Plain {
    fn poll_apps(
        &mut self,
        max_wait: Duration,
        apps: &mut [&mut capnet_ipc::shm_channel::ShmEnd],
    ) -> Result<(), RuntimeError> {
        let arrived = self.cores.receive_links();
        self.pump();
        if !arrived {
            let wait = self.cores.wait_bound(max_wait);
            let mut ends: Vec<&mut capnet_ipc::shm_channel::ShmEnd> =
                self.cores.links.iter_mut().filter(|l| l.broken().is_none()).map(link::Link::channel).collect();
            ends.extend(apps.iter_mut().map(|e| &mut **e));
            wait_on(&mut self.waiter, ends, wait);
            self.cores.receive_links();
            self.pump();
        }
        Ok(())
    }

    fn push(&mut self) -> Result<(), RuntimeError> {
        self.pump();
        Ok(())
    }
}

/// The sockets domain reaches each transport (and ip, for echo sockets) by a
/// direct call when it runs in this group, and by a call over the link otherwise.
impl capnet_sockets::Transports for Cores {
    fn udp_bind(&mut self, port: u16) -> Result<capnet_udp::SocketId, SocketError> {
        match self.udp.as_mut() {
            Some(u) => u.bind(port).map_err(capnet_sockets::udp_error),
            None => match self.remote(Kind::Udp, Call::UdpBind { port })? {
                Answer::Id(s) => Ok(capnet_udp::SocketId::from_raw(s)),
                a => Err(odd(a)),
            },
        }
    }
    fn udp_port(&mut self, s: capnet_udp::SocketId) -> Result<u16, SocketError> {
        match self.udp.as_mut() {
            Some(u) => u.local_port(s).map_err(capnet_sockets::udp_error),
            None => match self.remote(Kind::Udp, Call::UdpPort { s: s.to_raw() })? {
                Answer::Port(p) => Ok(p),
                a => Err(odd(a)),
            },
        }
    }
    fn udp_connect(&mut self, s: capnet_udp::SocketId, addr: Ipv4Address, port: u16) -> Result<(), SocketError> {
        match self.udp.as_mut() {
            Some(u) => u.connect(s, addr, port).map_err(capnet_sockets::udp_error),
            None => done(self.remote(Kind::Udp, Call::UdpConnect { s: s.to_raw(), addr: addr.octets(), port })?),
        }
    }
    fn udp_send(
        &mut self,
        s: capnet_udp::SocketId,
        to: Option<(Ipv4Address, u16)>,
        data: &[u8],
    ) -> Result<(), SocketError> {
        match self.udp.as_mut() {
            Some(u) => u.send_to(s, to, data).map_err(capnet_sockets::udp_error),
            None => {
                let to = to.map(|(a, p)| (a.octets(), p));
                done(self.remote(Kind::Udp, Call::UdpSend { s: s.to_raw(), to, data: data.to_vec() })?)
            }
        }
    }
    fn udp_recv(&mut self, s: capnet_udp::SocketId, max: usize) -> Result<Vec<capnet_udp::Datagram>, SocketError> {
        match self.udp.as_mut() {
            Some(u) => u.recv_many(s, max, capnet_sockets::UDP_BATCH_BYTES).map_err(capnet_sockets::udp_error),
            None => match self.remote(Kind::Udp, Call::UdpRecv { s: s.to_raw(), max: max as u32 })? {
                // More than asked for, or a datagram over the IP limit: the udp
                // domain broke the protocol.
                Answer::Datagrams(d) if d.len() <= max && d.iter().all(|x| x.2.len() <= 65_535) => Ok(d
                    .into_iter()
                    .map(|(src, src_port, data)| capnet_udp::Datagram { src: Ipv4Address::from(src), src_port, data })
                    .collect()),
                a => Err(odd(a)),
            },
        }
    }
    fn udp_close(&mut self, s: capnet_udp::SocketId) -> Result<(), SocketError> {
        match self.udp.as_mut() {
            Some(u) => u.close(s).map_err(capnet_sockets::udp_error),
            None => done(self.remote(Kind::Udp, Call::UdpClose { s: s.to_raw() })?),
        }
    }
    fn echo_claim(&mut self, ident: u16) -> Result<bool, SocketError> {
        match self.ip.as_mut() {
            Some(ip) => {
                if ip.demux.lookup(IpProtocol::Icmp, ident).is_some() {
                    return Ok(false);
                }
                ip.demux.insert(IpProtocol::Icmp, ident..=ident, SOCKETS);
                Ok(true)
            }
            None => match self.remote(Kind::Ip, Call::EchoClaim { ident })? {
                Answer::Bool(b) => Ok(b),
                a => Err(odd(a)),
            },
        }
    }
    fn echo_release(&mut self, ident: u16) -> Result<(), SocketError> {
        match self.ip.as_mut() {
            Some(ip) => {
                ip.demux.remove_range(IpProtocol::Icmp, ident..=ident);
                Ok(())
            }
            None => done(self.remote(Kind::Ip, Call::EchoRelease { ident })?),
        }
    }
    fn echo_send(&mut self, dst: Ipv4Address, ident: u16, seq: u16, data: &[u8]) -> Result<(), SocketError> {
        let now = self.now();
        match self.ip.as_mut() {
            Some(ip) => ip.send_echo_request(now, dst, ident, seq, data).map_err(|e| match e {
                capnet_ip::SendError::NoRoute(_) => SocketError::NoRoute,
                _ => SocketError::TooLarge,
            }),
            None => done(self.remote(Kind::Ip, Call::EchoSend { dst: dst.octets(), ident, seq, data: data.to_vec() })?),
        }
    }
    fn tcp_listen(&mut self, port: u16, backlog: usize) -> Result<TcpId, SocketError> {
        match self.tcp.as_mut() {
            Some(t) => t.listen(port, backlog).map_err(capnet_sockets::tcp_error),
            None => tcp_id(self.tcp_remote(None, |_| Call::TcpListen { port, backlog: backlog as u32 })?),
        }
    }
    fn tcp_local_port(&mut self, s: TcpId) -> Result<u16, SocketError> {
        match self.tcp.as_mut() {
            Some(t) => t.local_port(s).map_err(capnet_sockets::tcp_error),
            None => match self.tcp_remote(Some(s), |s| Call::TcpLocalPort { s })? {
                Answer::Port(p) => Ok(p),
                a => Err(odd(a)),
            },
        }
    }
    fn tcp_accept(&mut self, l: TcpId) -> Result<Option<TcpId>, SocketError> {
        match self.tcp.as_mut() {
            Some(t) => t.accept(l).map_err(capnet_sockets::tcp_error),
            None => match self.tcp_remote(Some(l), |l| Call::TcpAccept { l })? {
                Answer::Accepted(c) => Ok(c.map(TcpId::from_raw)),
                a => Err(odd(a)),
            },
        }
    }
    fn tcp_endpoints(&mut self, s: TcpId) -> Result<capnet_tcp::Endpoints, SocketError> {
        match self.tcp.as_mut() {
            Some(t) => t.endpoints(s).map_err(capnet_sockets::tcp_error),
            None => match self.tcp_remote(Some(s), |s| Call::TcpEndpoints { s })? {
                Answer::Endpoints(local_port, remote, remote_port) => {
                    Ok(capnet_tcp::Endpoints { local_port, remote: Ipv4Address::from(remote), remote_port })
                }
                a => Err(odd(a)),
            },
        }
    }
    fn tcp_connect(&mut self, addr: Ipv4Address, port: u16) -> Result<TcpId, SocketError> {
        let now = self.now();
        match self.tcp.as_mut() {
            Some(t) => t.connect(now, addr, port).map_err(capnet_sockets::tcp_error),
            None => tcp_id(self.tcp_remote(None, |_| Call::TcpConnect { addr: addr.octets(), port })?),
        }
    }
    fn tcp_connected(&mut self, s: TcpId) -> Result<bool, SocketError> {
        match self.tcp.as_mut() {
            Some(t) => t.connected(s).map_err(capnet_sockets::tcp_error),
            None => match self.tcp_remote(Some(s), |s| Call::TcpConnected { s })? {
                Answer::Bool(b) => Ok(b),
                a => Err(odd(a)),
            },
        }
    }
    fn tcp_send(&mut self, s: TcpId, data: &[u8]) -> Result<usize, SocketError> {
        let now = self.now();
        match self.tcp.as_mut() {
            Some(t) => t.send(now, s, data).map_err(capnet_sockets::tcp_error),
            None => match self.tcp_remote(Some(s), |s| Call::TcpSend { s, data: data.to_vec() })? {
                Answer::Count(n) => Ok(n as usize),
                a => Err(odd(a)),
            },
        }
    }
    fn tcp_recv(&mut self, s: TcpId, max: usize) -> Result<capnet_tcp::Received, SocketError> {
        let now = self.now();
        if let Some(t) = self.tcp.as_mut() {
            return t.recv(now, s, max).map_err(capnet_sockets::tcp_error);
        }
        let key = s.to_raw();
        if max == 0 {
            return Ok(capnet_tcp::Received::Nothing);
        }
        // What tcp pushed first.
        if let Some(got) = self.pushed.remove(&key) {
            return match got? {
                Answer::Data(mut d) => {
                    if d.len() > max {
                        self.pushed.insert(key, Ok(Answer::Data(d.split_off(max))));
                    }
                    Ok(capnet_tcp::Received::Data(d))
                }
                Answer::Eof => Ok(capnet_tcp::Received::Eof),
                a => Err(odd(a)),
            };
        }
        // Nothing here: tcp pushes what the receive gets, now or when it comes
        // (and with it the activity that brings the caller back).
        if !self.expect_push.contains_key(&key) {
            self.tcp_link(Some(key))?.ask(&wire::Msg::WantPush { s: key & !TAG_MASK, max: max as u32 });
            self.expect_push.insert(key, max as u32);
        }
        Ok(capnet_tcp::Received::Nothing)
    }
    fn tcp_shutdown(&mut self, s: TcpId, read: bool, write: bool) -> Result<(), SocketError> {
        let now = self.now();
        if read {
            self.forget_socket(s);
        }
        match self.tcp.as_mut() {
            Some(t) => t.shutdown(now, s, read, write).map_err(capnet_sockets::tcp_error),
            None => done(self.tcp_remote(Some(s), |s| Call::TcpShutdown { s, read, write })?),
        }
    }
    fn tcp_close(&mut self, s: TcpId) -> Result<(), SocketError> {
        let now = self.now();
        self.forget_socket(s);
        match self.tcp.as_mut() {
            Some(t) => t.close(now, s).map_err(capnet_sockets::tcp_error),
            None => done(self.tcp_remote(Some(s), |s| Call::TcpClose { s })?),
        }
    }
    fn tcp_abort(&mut self, s: TcpId) -> Result<(), SocketError> {
        self.forget_socket(s);
        match self.tcp.as_mut() {
            Some(t) => t.abort(s).map_err(capnet_sockets::tcp_error),
            None => done(self.tcp_remote(Some(s), |s| Call::TcpAbort { s })?),
        }
    }
    fn tcp_set_option(&mut self, s: TcpId, opt: capnet_tcp::SockOpt) -> Result<(), SocketError> {
        let now = self.now();
        match self.tcp.as_mut() {
            Some(t) => t.set_option(now, s, opt).map_err(capnet_sockets::tcp_error),
            None => done(self.tcp_remote(Some(s), |s| Call::TcpSetOption { s, option: edge::opt(opt) })?),
        }
    }
    fn tcp_ready(&mut self, s: TcpId) -> Result<capnet_tcp::Ready, SocketError> {
        match self.tcp.as_mut() {
            Some(t) => t.ready(s).map_err(capnet_sockets::tcp_error),
            None => match self.tcp_remote(Some(s), |s| Call::TcpReady { s })? {
                Answer::Ready(b) => {
                    let mut r = edge::ready_from(b);
                    // What tcp pushed is ours to read now.
                    r.readable |= self.pushed.contains_key(&s.to_raw());
                    Ok(r)
                }
                a => Err(odd(a)),
            },
        }
    }
}

type TcpId = capnet_tcp::SocketId;
use capnet_ip::Ipv4Address;
use capnet_sockets::SocketError;
use wire::{Answer, Call};

/// An answer that does not fit its call: the peer broke the protocol.
fn odd(a: Answer) -> SocketError {
    SocketError::Invalid(format!("a transport answered with {a:?}"))
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
