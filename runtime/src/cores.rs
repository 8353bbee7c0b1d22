//! A group's domains and what moves between them: frames into ip, datagrams
//! from ip to the transports and segments back, each to the core when its
//! domain runs in this group and over the domain's link when it does not.

use std::time::{Duration, Instant as StdInstant};

use capnet_ip::{Config, Delivery, Instant, IpCore, IpProtocol, Output};
use capnet_ipc::lent::Chain;
use capnet_ipc::msg::MsgEnd;
use capnet_proto::edge::{EdgeMsg, IcmpError, IpToSockets, Segment, TcpToIp, TcpToSockets, UdpToIp, UdpToSockets};
use capnet_proto::Kind;
use capnet_tcp::TcpCore;
use capnet_udp::UdpCore;

use crate::domain::ip::IpDomain;
use crate::domain::sockets::SocketsSide;
use crate::domain::tcp::{random_secret, TcpDomain};
use crate::domain::udp::UdpDomain;
use crate::link::{AnyLink, Link};
use crate::{RuntimeError, SOCKETS, TCP, TCP_OLD, TSO_BYTES, UDP};

/// The receive buffer of the stack's TCP connections: twice the most an
/// application takes in one call (`capnet_proto::app::MAX_TCP_READ`), so the
/// window stays open while a read's reply travels and is copied
/// (docs/performance.md).
pub const STACK_RECV_BUFFER: usize = 2 << 20;

/// Where a group's time comes from: the wall clock since the group started, or
/// a simulated clock that a test advances ([`crate::fake`]).
#[derive(Debug, Clone)]
pub enum Clock {
    /// Real time since this instant.
    Real(StdInstant),
    /// Simulated microseconds, shared by every group of a fake graph.
    Sim(std::sync::Arc<std::sync::atomic::AtomicI64>),
}

impl Clock {
    /// A simulated clock at zero.
    pub fn sim() -> Self {
        Clock::Sim(Default::default())
    }

    /// The time as the cores count it.
    pub fn now(&self) -> Instant {
        match self {
            Clock::Real(epoch) => Instant::from_micros(epoch.elapsed().as_micros() as i64),
            Clock::Sim(us) => Instant::from_micros(us.load(std::sync::atomic::Ordering::Acquire)),
        }
    }

    /// Moves a simulated clock on by `d` (a real one moves by itself).
    pub fn advance(&self, d: Duration) {
        if let Clock::Sim(us) = self {
            us.fetch_add(d.as_micros() as i64, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// The domains of one group, each with its core and its links.
#[derive(Debug)]
pub struct Cores {
    /// The ip domain, if this group runs it.
    pub ip: Option<IpDomain>,
    /// The tcp domain.
    pub tcp: Option<TcpDomain>,
    /// The udp domain.
    pub udp: Option<UdpDomain>,
    /// The sockets domain's side (its links to transports of other groups).
    pub sockets: SocketsSide,
    /// The pools of other groups this one may be lent buffers of (the
    /// driver's frame pool, for a tcp domain apart from ip; the
    /// applications' send pools, for tcp or ip apart from the sockets
    /// domain), granted by the supervisor.
    pub views: capnet_ipc::lent::Views,
    /// The send pools of the applications the sockets domain here serves
    /// (read through its own views of them): a tcp domain here lends their
    /// buffers on to ip in another group, which the supervisor granted them
    /// before the application was attached.
    pub app_sends: Vec<capnet_ipc::lent::PoolKey>,
    clock: Clock,
}

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
            IpDomain::new(ip)
        });
        Self {
            ip,
            udp: kinds.contains(&Kind::Udp).then(|| UdpDomain::new(UdpCore::new(local, udp_queue_bytes))),
            tcp: kinds.contains(&Kind::Tcp).then(|| TcpDomain::new(TcpCore::new(tcp_cfg))),
            sockets: SocketsSide::default(),
            views: capnet_ipc::lent::Views::new(),
            app_sends: Vec::new(),
            clock: Clock::Real(StdInstant::now()),
        }
    }

    /// The ip core.
    ///
    /// # Panics
    /// If this group does not run the ip domain (a caller bug).
    pub fn ip(&mut self) -> &mut IpCore {
        &mut self.ip.as_mut().expect("this group runs no ip domain").core
    }

    /// The udp core; panics if this group does not run the udp domain.
    pub fn udp(&mut self) -> &mut UdpCore {
        &mut self.udp.as_mut().expect("this group runs no udp domain").core
    }

    /// The tcp core; panics if this group does not run the tcp domain.
    pub fn tcp(&mut self) -> &mut TcpCore {
        &mut self.tcp.as_mut().expect("this group runs no tcp domain").core
    }

    /// Time since the stack started, as the cores count it.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// Takes its time from `clock` from now on (before any traffic: the cores'
    /// timers are on the clock they started with).
    pub fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    /// How long a runtime may wait before the cores' next deadline.
    pub fn wait_bound(&self, max_wait: Duration) -> Duration {
        let now = self.now();
        let next = [self.ip.as_ref().and_then(|d| d.core.poll_at()), self.tcp.as_ref().and_then(|d| d.core.poll_at())]
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
            tcp.core.config_mut().tso = TSO_BYTES;
        }
    }

    /// Told to retire, the tcp domain here holds only connections in TIME-WAIT
    /// or none.
    pub fn drained(&self) -> bool {
        self.tcp.as_ref().is_some_and(TcpDomain::drained)
    }

    /// Every link of the group, whatever its edge (no allocation: `pump` walks
    /// them every round).
    pub fn links(&mut self) -> impl Iterator<Item = &mut dyn AnyLink> + '_ {
        fn any<O: EdgeMsg, I: EdgeMsg>(l: &mut Link<O, I>) -> &mut dyn AnyLink {
            l
        }
        let ip = self.ip.iter_mut().flat_map(|d| {
            d.out.tcp.iter_mut().map(any).chain(d.out.udp.iter_mut().map(any)).chain(d.out.sockets.iter_mut().map(any))
        });
        let tcp = self.tcp.iter_mut().flat_map(|d| d.ip.iter_mut().map(any).chain(d.sockets.iter_mut().map(any)));
        let udp = self.udp.iter_mut().flat_map(|d| d.ip.iter_mut().map(any).chain(d.sockets.iter_mut().map(any)));
        let s = &mut self.sockets;
        let sockets = s.tcp.iter_mut().map(any).chain(s.udp.iter_mut().map(any)).chain(s.ip.iter_mut().map(any));
        ip.chain(tcp).chain(udp).chain(sockets)
    }

    /// The channel ends of every link not broken, to wait on.
    pub fn link_ends(&mut self) -> Vec<&mut capnet_ipc::shm_channel::ShmEnd> {
        self.links().filter(|l| l.broken().is_none()).map(|l| l.channel()).collect()
    }

    /// The first broken link's story, if any link broke.
    pub fn broken_link(&mut self) -> Option<String> {
        self.links().find_map(|l| l.broken().map(str::to_owned))
    }

    /// Joins `end` as the link from domain `local` (of this group) to `remote`,
    /// in place of the link between the same two domains (a peer restarted
    /// with a fresh channel, keeping its swap tag), or as a new one.
    pub fn replace_link(&mut self, local: Kind, remote: Kind, end: MsgEnd) -> Result<(), RuntimeError> {
        let missing = || RuntimeError::Ipc(format!("no {local} domain here for a channel to {remote}"));
        match (local, remote) {
            (Kind::Ip, Kind::Tcp) => put(&mut self.ip.as_mut().ok_or_else(missing)?.out.tcp, end),
            (Kind::Ip, Kind::Udp) => put(&mut self.ip.as_mut().ok_or_else(missing)?.out.udp, end),
            (Kind::Ip, Kind::Sockets) => put(&mut self.ip.as_mut().ok_or_else(missing)?.out.sockets, end),
            (Kind::Tcp, Kind::Ip) => put(&mut self.tcp.as_mut().ok_or_else(missing)?.ip, end),
            (Kind::Tcp, Kind::Sockets) => {
                let tcp = self.tcp.as_mut().ok_or_else(missing)?;
                // A new sockets domain asked nothing of the old one's sockets.
                tcp.push_wanted.clear();
                put(&mut tcp.sockets, end)
            }
            (Kind::Udp, Kind::Ip) => put(&mut self.udp.as_mut().ok_or_else(missing)?.ip, end),
            (Kind::Udp, Kind::Sockets) => put(&mut self.udp.as_mut().ok_or_else(missing)?.sockets, end),
            (Kind::Sockets, Kind::Tcp) => {
                // A new tcp domain pushes nothing the old one owed.
                self.sockets.forget_pushes(|_| true);
                put(&mut self.sockets.tcp, end)
            }
            (Kind::Sockets, Kind::Udp) => put(&mut self.sockets.udp, end),
            (Kind::Sockets, Kind::Ip) => put(&mut self.sockets.ip, end),
            _ => return Err(RuntimeError::Ipc(format!("the graph has no message edge from {local} to {remote}"))),
        }
        Ok(())
    }

    /// A new tcp domain joins beside the present one (`capnet swap tcp`) over
    /// `end`, from this group's `local` domain (ip or sockets). On the sockets
    /// side new listeners and connections go to it from now on; on the ip side
    /// the old domain is asked to name the flows it keeps, and segments of new
    /// connections wait until it has.
    pub fn tcp_beside(&mut self, local: Kind, end: MsgEnd) -> Result<(), RuntimeError> {
        match (local, self.ip.as_mut()) {
            (Kind::Ip, Some(ip)) => ip.tcp_beside(Link::new(end), self.clock.now()),
            (Kind::Sockets, _) => self.sockets.tcp_beside(Link::new(end)),
            _ => return Err(RuntimeError::Ipc(format!("a tcp domain cannot join beside another from {local}"))),
        }
        Ok(())
    }

    /// The swapped-out tcp domain is gone (it finished its last connection, or
    /// died): its link goes, and on the ip side its flows with it.
    pub fn tcp_retired(&mut self) {
        self.sockets.tcp_retired();
        if let Some(ip) = self.ip.as_mut() {
            ip.tcp_retired();
        }
    }

    /// Takes one frame from the device: an unfragmented datagram for udp or tcp
    /// goes to its core as a handle on the frame's buffer (no copy); everything
    /// else through the ip core's outputs. `vouched`: a TCP checksum the device
    /// left partial on the kernel's word ([`capnet_driver::vnet::to_plain`]).
    pub fn receive_frame(&mut self, frame: &Chain, vouched: bool) {
        let now = self.now();
        let Some(ip) = self.ip.as_mut() else { return };
        if let Some(d) = ip.core.receive_frame_local(now, frame) {
            deliver(&mut ip.out, &mut self.tcp, &mut self.udp, now, &d, vouched);
        }
    }

    /// Runs timers and moves every output between the cores and onto links;
    /// frames for the device go to `emit`, with the segment size a TSO frame is
    /// to be cut into (only when the tcp core's `Config::tso` is on).
    pub fn pump(&mut self, mut emit: impl FnMut(Chain, Option<u16>)) {
        let now = self.now();
        let pushed = self.tcp.as_mut().is_some_and(|t| !t.push_wanted.is_empty() && t.push_received(now, &self.views));
        if let Some(ip) = self.ip.as_mut() {
            ip.release_if_late(now);
            ip.core.poll(now);
        }
        if let Some(tcp) = self.tcp.as_mut() {
            if tcp.core.poll_at().is_some_and(|at| at <= now) {
                tcp.touched = true;
            }
            tcp.core.poll(now);
        }
        loop {
            let mut progressed = false;
            while let Some(out) = self.ip.as_mut().and_then(|ip| ip.core.pop_output()) {
                progressed = true;
                match out {
                    Output::Frame(f) => emit(f, None),
                    Output::TsoFrame { frame, mss } => emit(frame, Some(mss)),
                    Output::Deliver(d) => {
                        if let Some(ip) = self.ip.as_mut() {
                            deliver(&mut ip.out, &mut self.tcp, &mut self.udp, now, &d, false)
                        }
                    }
                    Output::EchoReply(r) if r.to == SOCKETS => {
                        match self.ip.as_mut().and_then(|ip| ip.out.sockets.first_mut()) {
                            Some(l) => l.send(&IpToSockets::EchoReply {
                                ident: r.ident,
                                from: r.from.octets(),
                                seq: r.seq,
                                data: r.data.into(),
                            }),
                            None => self.sockets.echo_replies.push((r.ident, r.from, r.seq, r.data)),
                        }
                    }
                    Output::EchoReply(_) => {}
                    Output::Icmp(e) => {
                        let error = IcmpError {
                            local_port: e.local_port,
                            remote: e.remote.octets(),
                            remote_port: e.remote_port,
                            icmp_type: e.icmp_type,
                            icmp_code: e.icmp_code,
                            reporter: e.reporter.octets(),
                        };
                        self.on_icmp(matches!(e.to, TCP | TCP_OLD), e.to == TCP_OLD, error)
                    }
                }
            }
            while let Some(out) = self.udp.as_mut().and_then(|u| u.core.pop_output()) {
                progressed = true;
                match out {
                    capnet_udp::Output::Send { dst, segment } => match (self.ip.as_mut(), self.udp.as_mut()) {
                        (Some(ip), _) => crate::domain::ip::send(&mut ip.core, now, dst, false, &segment.into(), None),
                        (None, Some(u)) => {
                            if let Some(l) = u.ip.first_mut() {
                                l.send(&UdpToIp::Send(Segment {
                                    dst: dst.octets(),
                                    head: Vec::new(),
                                    segment: segment.into(),
                                    tso: None,
                                }));
                            }
                        }
                        (None, None) => {}
                    },
                    capnet_udp::Output::PortUnreachable { to, quote } => match (self.ip.as_mut(), self.udp.as_mut()) {
                        (Some(ip), _) => ip.core.send_unreachable(now, to, 3, &quote),
                        (None, Some(u)) => {
                            if let Some(l) = u.ip.first_mut() {
                                l.send(&UdpToIp::Unreachable { to: to.octets(), quote });
                            }
                        }
                        (None, None) => {}
                    },
                }
            }
            while let Some(capnet_tcp::Output::Send { dst, segment, tso }) =
                self.tcp.as_mut().and_then(|t| t.core.pop_output())
            {
                progressed = true;
                match (self.ip.as_mut(), self.tcp.as_mut()) {
                    (Some(ip), _) => crate::domain::ip::send(&mut ip.core, now, dst, true, &segment, tso),
                    (None, Some(t)) => {
                        if let Some(l) = t.ip.first_mut() {
                            // The header inline, the payload lent (buffers of
                            // the applications' send pools, which ip views).
                            let (views, apps) = (&self.views, &self.app_sends);
                            let (head, segment) = l.lend_headed(segment, |k| views.is_current(k) || apps.contains(&k));
                            l.send(&TcpToIp::Send(Segment { dst: dst.octets(), head, segment, tso }));
                        }
                    }
                    (None, None) => {}
                }
            }
            if !progressed {
                break;
            }
        }
        // A sockets domain elsewhere hears once that readiness may have changed,
        // and again only after it has called since. A push this round tells it
        // as much (it looks at every parked call on one).
        if let Some(t) = self.tcp.as_mut() {
            if std::mem::take(&mut t.touched) && !pushed {
                if let Some(l) = t.sockets.first_mut().filter(|l| !l.activity_sent) {
                    l.activity_sent = true;
                    l.send(&TcpToSockets::Activity);
                }
            }
        }
        if let Some(u) = self.udp.as_mut() {
            if std::mem::take(&mut u.touched) {
                if let Some(l) = u.sockets.first_mut().filter(|l| !l.activity_sent) {
                    l.activity_sent = true;
                    l.send(&UdpToSockets::Activity);
                }
            }
        }
        if let Some(ip) = self.ip.as_mut() {
            ip.out.flush_udp();
        }
        for l in self.links() {
            l.flush();
        }
    }

    /// An ICMP error for a transport's flow: to its core here, or over ip's
    /// link (the retiring tcp domain's when `old`).
    fn on_icmp(&mut self, tcp: bool, old: bool, e: IcmpError) {
        let ip4 = capnet_ip::Ipv4Address::from;
        match (tcp, self.tcp.as_mut(), self.udp.as_mut()) {
            (true, Some(t), _) => {
                t.touched = true;
                t.core.on_icmp(e.local_port, ip4(e.remote), e.remote_port, e.icmp_type, e.icmp_code)
            }
            (false, _, Some(u)) => {
                u.touched = true;
                u.core.on_icmp(e.local_port, ip4(e.remote), e.remote_port, e.icmp_type, e.icmp_code, ip4(e.reporter))
            }
            _ => {
                if let Some(ip) = self.ip.as_mut() {
                    ip.out.icmp(tcp, old, e);
                }
            }
        }
    }

    /// Takes every message from every link and acts on it: datagrams into the
    /// cores here, calls answered, activity noted. Returns whether any arrived.
    pub fn receive_links(&mut self) -> bool {
        let now = self.now();
        let mut any = false;
        if let Some(ip) = self.ip.as_mut() {
            any |= ip.receive_links(now, &self.views);
        }
        if let Some(tcp) = self.tcp.as_mut() {
            any |= tcp.receive_links(now, &self.views);
        }
        if let Some(udp) = self.udp.as_mut() {
            any |= udp.receive_links();
        }
        any |= self.sockets.receive_links(&self.views);
        any
    }
}

#[cfg(feature = "hostile")]
impl Cores {
    /// The hostile mode of a test: sends `n` messages nobody asked for as fast
    /// as each link to the sockets domain takes them — activity notices
    /// (`flood`), answers to no call (`answers`) or, from tcp, pushed receives
    /// (`pushes`).
    pub fn hostile_flood(&mut self, what: &str, n: usize) {
        use capnet_proto::edge::{Answer, IpToSockets};
        let answer = || Ok(Answer::Done);
        if let Some(t) = self.tcp.as_mut() {
            let m = match what {
                "flood" => TcpToSockets::Activity,
                "pushes" => TcpToSockets::Pushed { s: 1, got: Ok(Answer::Data(vec![0; 64].into())) },
                _ => TcpToSockets::Answer { id: u64::MAX, answer: answer() },
            };
            t.sockets.iter_mut().for_each(|l| l.flood(&m, n));
        }
        if what == "pushes" {
            return;
        }
        if let Some(u) = self.udp.as_mut() {
            let m = match what {
                "flood" => UdpToSockets::Activity,
                _ => UdpToSockets::Answer { id: u64::MAX, answer: answer() },
            };
            u.sockets.iter_mut().for_each(|l| l.flood(&m, n));
        }
        if let (Some(ip), "answers") = (self.ip.as_mut(), what) {
            let m = IpToSockets::Answer { id: u64::MAX, answer: answer() };
            ip.out.sockets.iter_mut().for_each(|l| l.flood(&m, n));
        }
    }
}

/// Puts a link over `end` in place of the one (not retiring) in `slot`, keeping
/// its tag, or adds it.
fn put<O: capnet_proto::edge::EdgeMsg, I: capnet_proto::edge::EdgeMsg>(slot: &mut Vec<Link<O, I>>, end: MsgEnd) {
    let mut link = Link::new(end);
    match slot.iter_mut().find(|l| !l.retiring) {
        Some(old) => {
            link.tag = old.tag;
            *old = link
        }
        None => slot.push(link),
    }
}

/// Hands a datagram to its transport: its core here, or over ip's link.
fn deliver(
    out: &mut crate::domain::ip::IpLinks,
    tcp: &mut Option<TcpDomain>,
    udp: &mut Option<UdpDomain>,
    now: Instant,
    d: &Delivery,
    vouched: bool,
) {
    match (d.to, tcp, udp) {
        (TCP | TCP_OLD, Some(t), _) => {
            t.touched = true;
            match vouched {
                true => t.core.receive_vouched(now, d.src, d.dst, &d.payload),
                false => t.core.receive(now, d.src, d.dst, &d.payload),
            }
        }
        (TCP | TCP_OLD, None, _) => out.deliver_tcp(d, vouched),
        (UDP, _, Some(u)) => {
            u.touched = true;
            u.core.receive(d.src, d.dst, &d.payload.to_vec(), &d.ip_header)
        }
        (UDP, _, None) => out.deliver_udp(d),
        _ => {}
    }
}
