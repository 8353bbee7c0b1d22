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

pub mod two_group;

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

/// The packet-path cores of one stack, and the clock they run on.
#[derive(Debug)]
pub struct Cores {
    /// The ip core.
    pub ip: IpCore,
    /// The udp core.
    pub udp: UdpCore,
    /// The tcp core.
    pub tcp: TcpCore,
    /// Echo replies for echo sockets, waiting for the sockets domain.
    pub echo_replies: Vec<EchoReply>,
    /// The routing table as published to other domains, once asked for.
    routes: Option<capnet_ipc::region::Region>,
    epoch: StdInstant,
}

impl Cores {
    /// Cores for `cfg`; UDP owns every UDP port and TCP every TCP port (with the
    /// tcp core's default settings).
    pub fn new(cfg: Config, udp_queue_bytes: usize) -> Self {
        let local = cfg.addr.address();
        let mut tcp_cfg = capnet_tcp::Config::new(local, random_secret());
        tcp_cfg.mtu = cfg.mtu;
        let mut ip = IpCore::new(cfg, Instant::ZERO);
        ip.demux.insert(IpProtocol::Udp, 0..=65535, UDP);
        ip.demux.insert(IpProtocol::Tcp, 0..=65535, TCP);
        Self {
            ip,
            udp: UdpCore::new(local, udp_queue_bytes),
            tcp: TcpCore::new(tcp_cfg),
            echo_replies: Vec::new(),
            routes: None,
            epoch: StdInstant::now(),
        }
    }

    /// Publishes the ip domain's routing table in a sealed region of its own and
    /// returns it, to be granted read-only (made on the first call; republished on
    /// every call).
    pub fn publish_routes(&mut self) -> Result<&capnet_ipc::region::Region, RuntimeError> {
        if self.routes.is_none() {
            let r = capnet_ipc::region::Region::create("capnet-routes", capnet_ip::publish::REGION_LEN)
                .map_err(|e| RuntimeError::Ipc(e.to_string()))?;
            self.routes = Some(r);
        }
        let region = self.routes.as_ref().ok_or_else(|| RuntimeError::Ipc("no routes region".into()))?;
        capnet_ip::publish::publish(region, self.ip.routes());
        Ok(region)
    }

    /// Time since the stack started, as the cores count it.
    pub fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// How long a runtime may wait before the cores' next deadline.
    pub fn wait_bound(&self, max_wait: Duration) -> Duration {
        let now = self.now();
        let next = [self.ip.poll_at(), self.tcp.poll_at()].into_iter().flatten().min();
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
        self.tcp.config_mut().tso = TSO_BYTES;
    }

    /// Takes one frame from the device: an unfragmented datagram for udp or tcp
    /// goes to its core straight from the frame (no copy); everything else
    /// through the ip core's outputs.
    pub fn receive_frame(&mut self, frame: &[u8]) {
        let now = self.now();
        if let Some(d) = self.ip.receive_frame_local(now, frame) {
            self.deliver(now, &d);
        }
    }

    /// Hands a datagram to its transport core.
    fn deliver(&mut self, now: Instant, d: &LocalDatagram) {
        match d.to {
            UDP => self.udp.receive(d.src, d.dst, d.payload, d.ip_header),
            TCP => self.tcp.receive(now, d.src, d.dst, d.payload),
            _ => {}
        }
    }

    /// Runs timers and moves every output between the cores; frames for the
    /// device go to `emit`, with the segment size a TSO frame is to be cut into
    /// (only when the tcp core's `Config::tso` is on).
    pub fn pump(&mut self, mut emit: impl FnMut(Vec<u8>, Option<u16>)) {
        let now = self.now();
        self.ip.poll(now);
        self.tcp.poll(now);
        loop {
            let mut progressed = false;
            while let Some(out) = self.ip.pop_output() {
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
                        self.deliver(now, &local)
                    }
                    Output::EchoReply(r) if r.to == SOCKETS => self.echo_replies.push((r.ident, r.from, r.seq, r.data)),
                    Output::EchoReply(_) => {}
                    Output::Icmp(e) if e.to == TCP => {
                        self.tcp.on_icmp(e.local_port, e.remote, e.remote_port, e.icmp_type, e.icmp_code)
                    }
                    Output::Icmp(e) => {
                        self.udp.on_icmp(e.local_port, e.remote, e.remote_port, e.icmp_type, e.icmp_code, e.reporter)
                    }
                }
            }
            while let Some(out) = self.udp.pop_output() {
                progressed = true;
                match out {
                    capnet_udp::Output::Send { dst, segment } => {
                        let _ = self.ip.send(now, dst, IpProtocol::Udp, &segment, false);
                    }
                    capnet_udp::Output::PortUnreachable { to, quote } => self.ip.send_unreachable(now, to, 3, &quote),
                }
            }
            while let Some(capnet_tcp::Output::Send { dst, segment, tso }) = self.tcp.pop_output() {
                progressed = true;
                // Without DF: the ip core's ICMP errors do not carry the next-hop
                // MTU yet, so path MTU discovery is not done (docs/tcp.md).
                let _ = match tso {
                    Some(mss) => self.ip.send_tso(now, dst, &segment, mss),
                    None => self.ip.send(now, dst, IpProtocol::Tcp, &segment, false),
                };
            }
            if !progressed {
                return;
            }
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

/// Counters the device side of a runtime keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Frames read from the device.
    pub frames_read: u64,
    /// Frames written to the device.
    pub frames_written: u64,
    /// Writes the device refused (e.g. link down): the frame is dropped.
    pub write_errors: u64,
    /// Frames whose virtio-net header was malformed or asked for segmentation.
    pub vnet_refused: u64,
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
/// virtio-net header stripped and a partial checksum completed (in place).
/// `None` (counted) for a frame the header makes unusable.
fn plain_frame<'a>(raw: &'a mut [u8], vnet: bool, stats: &mut DeviceStats) -> Option<&'a [u8]> {
    if !vnet {
        return Some(raw);
    }
    match capnet_driver::vnet::to_plain(raw) {
        Ok(frame) => Some(frame),
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
fn write_frame(fd: &OwnedFd, frame: &[u8], vnet: bool, tso: Option<u16>, stats: &mut DeviceStats) {
    let r = if vnet {
        let hdr = tso.and_then(|mss| capnet_driver::vnet::tso_header(frame, mss)).unwrap_or(capnet_driver::vnet::PLAIN);
        rustix::io::writev(fd, &[std::io::IoSlice::new(&hdr), std::io::IoSlice::new(frame)])
    } else {
        rustix::io::write(fd, frame)
    };
    match r {
        Ok(_) => stats.frames_written += 1,
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
}

impl MonoStack {
    /// A stack on `dev` (plain frames) with ip configuration `cfg`, its link
    /// impaired as `link` says.
    pub fn new(dev: Device, cfg: Config, udp_queue_bytes: usize, link: LinkImpairment) -> Result<Self, RuntimeError> {
        let (fd, vnet) = device_fd(&dev)?;
        let mut cores = Cores::new(cfg, udp_queue_bytes);
        if vnet && link.outbound.is_none() {
            cores.use_tso();
        }
        let mut s = Self {
            fd,
            vnet,
            cores,
            buf: vec![0u8; 65536 + VNET_HDR_LEN],
            inbound: Stage::new(link.inbound)?,
            outbound: Stage::new(link.outbound)?,
            stats: DeviceStats::default(),
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
        while let Some(f) = self.inbound.pop() {
            self.cores.receive_frame(&f);
        }
        let (out, fd, vnet, stats) = (&mut self.outbound, &self.fd, self.vnet, &mut self.stats);
        self.cores.pump(|frame, tso| {
            if out.passthrough {
                out.passed();
                write_frame(fd, &frame, vnet, tso, stats);
            } else {
                out.push(frame);
            }
        });
        while let Some(frame) = self.outbound.pop() {
            write_frame(&self.fd, &frame, self.vnet, None, &mut self.stats);
        }
    }
}

impl Stack for MonoStack {
    fn poll(&mut self, max_wait: Duration) -> Result<(), RuntimeError> {
        self.flush();
        let mut wait = self.cores.wait_bound(max_wait);
        for due in [self.inbound.due_in(), self.outbound.due_in()].into_iter().flatten() {
            wait = wait.min(due);
        }
        wait_readable(&self.fd, wait)?;
        while let Some(n) = read_frame(&self.fd, &mut self.buf)? {
            self.stats.frames_read += 1;
            let Some(frame) = plain_frame(&mut self.buf[..n], self.vnet, &mut self.stats) else {
                continue;
            };
            if self.inbound.passthrough {
                self.inbound.passed();
                self.cores.receive_frame(frame);
            } else {
                self.inbound.push(frame.to_vec());
            }
            self.flush();
        }
        self.flush();
        Ok(())
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
        let wait = if apps.is_empty() { max_wait } else { max_wait.min(MONO_APP_TICK) };
        self.poll(wait)
    }

    fn push(&mut self) -> Result<(), RuntimeError> {
        self.flush();
        Ok(())
    }
}

/// The sockets domain reaches the transports of this stack by direct calls.
impl capnet_sockets::Transports for Cores {
    fn udp_bind(&mut self, port: u16) -> Result<capnet_udp::SocketId, capnet_udp::UdpError> {
        self.udp.bind(port)
    }
    fn udp_port(&self, s: capnet_udp::SocketId) -> Result<u16, capnet_udp::UdpError> {
        self.udp.local_port(s)
    }
    fn udp_connect(
        &mut self,
        s: capnet_udp::SocketId,
        addr: capnet_ip::Ipv4Address,
        port: u16,
    ) -> Result<(), capnet_udp::UdpError> {
        self.udp.connect(s, addr, port)
    }
    fn udp_send(
        &mut self,
        s: capnet_udp::SocketId,
        to: Option<(capnet_ip::Ipv4Address, u16)>,
        data: &[u8],
    ) -> Result<(), capnet_udp::UdpError> {
        self.udp.send_to(s, to, data)
    }
    fn udp_recv(&mut self, s: capnet_udp::SocketId) -> Result<Option<capnet_udp::Datagram>, capnet_udp::UdpError> {
        self.udp.recv_from(s)
    }
    fn udp_close(&mut self, s: capnet_udp::SocketId) -> Result<(), capnet_udp::UdpError> {
        self.udp.close(s)
    }
    fn echo_claim(&mut self, ident: u16) -> bool {
        if self.ip.demux.lookup(IpProtocol::Icmp, ident).is_some() {
            return false;
        }
        self.ip.demux.insert(IpProtocol::Icmp, ident..=ident, SOCKETS);
        true
    }
    fn echo_release(&mut self, ident: u16) {
        self.ip.demux.remove_range(IpProtocol::Icmp, ident..=ident);
    }
    fn tcp_listen(&mut self, port: u16, backlog: usize) -> Result<capnet_tcp::SocketId, capnet_tcp::TcpError> {
        self.tcp.listen(port, backlog)
    }
    fn tcp_local_port(&self, s: capnet_tcp::SocketId) -> Result<u16, capnet_tcp::TcpError> {
        self.tcp.local_port(s)
    }
    fn tcp_accept(&mut self, l: capnet_tcp::SocketId) -> Result<Option<capnet_tcp::SocketId>, capnet_tcp::TcpError> {
        self.tcp.accept(l)
    }
    fn tcp_endpoints(&self, s: capnet_tcp::SocketId) -> Result<capnet_tcp::Endpoints, capnet_tcp::TcpError> {
        self.tcp.endpoints(s)
    }
    fn tcp_connect(
        &mut self,
        addr: capnet_ip::Ipv4Address,
        port: u16,
    ) -> Result<capnet_tcp::SocketId, capnet_tcp::TcpError> {
        let now = self.now();
        self.tcp.connect(now, addr, port)
    }
    fn tcp_connected(&self, s: capnet_tcp::SocketId) -> Result<bool, capnet_tcp::TcpError> {
        self.tcp.connected(s)
    }
    fn tcp_send(&mut self, s: capnet_tcp::SocketId, data: &[u8]) -> Result<usize, capnet_tcp::TcpError> {
        let now = self.now();
        self.tcp.send(now, s, data)
    }
    fn tcp_recv(&mut self, s: capnet_tcp::SocketId, max: usize) -> Result<capnet_tcp::Received, capnet_tcp::TcpError> {
        let now = self.now();
        self.tcp.recv(now, s, max)
    }
    fn tcp_shutdown(&mut self, s: capnet_tcp::SocketId, read: bool, write: bool) -> Result<(), capnet_tcp::TcpError> {
        let now = self.now();
        self.tcp.shutdown(now, s, read, write)
    }
    fn tcp_close(&mut self, s: capnet_tcp::SocketId) -> Result<(), capnet_tcp::TcpError> {
        let now = self.now();
        self.tcp.close(now, s)
    }
    fn tcp_abort(&mut self, s: capnet_tcp::SocketId) -> Result<(), capnet_tcp::TcpError> {
        self.tcp.abort(s)
    }
    fn tcp_set_option(
        &mut self,
        s: capnet_tcp::SocketId,
        opt: capnet_tcp::SockOpt,
    ) -> Result<(), capnet_tcp::TcpError> {
        let now = self.now();
        self.tcp.set_option(now, s, opt)
    }
    fn tcp_ready(&self, s: capnet_tcp::SocketId) -> Result<capnet_tcp::Ready, capnet_tcp::TcpError> {
        self.tcp.ready(s)
    }
    fn echo_send(
        &mut self,
        dst: capnet_ip::Ipv4Address,
        ident: u16,
        seq: u16,
        data: &[u8],
    ) -> Result<(), capnet_sockets::SocketError> {
        let now = self.now();
        self.ip.send_echo_request(now, dst, ident, seq, data).map_err(|e| match e {
            capnet_ip::SendError::NoRoute(_) => capnet_sockets::SocketError::NoRoute,
            _ => capnet_sockets::SocketError::TooLarge,
        })
    }
}
