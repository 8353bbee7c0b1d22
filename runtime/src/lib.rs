//! capnet-runtime: binds protocol cores to a device and to real time.
//!
//! [`MonoStack`] is the one-group composition of the packet path: the ip and udp
//! cores in one thread, calling each other directly, over a device fd (a TAP or an
//! AF_PACKET socket from kernel-shim). Everything that differs between compositions
//! lives in runtimes like this one, never in a core; the factored runtime joins the
//! same cores over ipc channels instead of function calls.

#![forbid(unsafe_code)]

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant as StdInstant};

use capnet_ip::{Config, Instant, IpCore, IpProtocol, Output, TransportId};
use capnet_kernel_shim::device::{Device, DeviceKind, VNET_HDR_LEN};
use capnet_udp::UdpCore;

/// The transport id the udp core has in the ip core's demux table.
pub const UDP: TransportId = TransportId(1);

/// Errors running a stack.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The device needs offloads this runtime does not handle yet.
    #[error("device {0} was opened with the virtio-net header; the mono runtime takes plain frames for now")]
    Offloads(String),
    /// A device read or write failed.
    #[error("device I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Counters the runtime adds to the cores'.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuntimeStats {
    /// Frames read from the device.
    pub frames_read: u64,
    /// Frames written to the device.
    pub frames_written: u64,
    /// Writes the device refused (e.g. link down): the frame is dropped.
    pub write_errors: u64,
}

/// The ip and udp cores in one thread over one device.
#[derive(Debug)]
pub struct MonoStack {
    fd: OwnedFd,
    ip: IpCore,
    udp: UdpCore,
    epoch: StdInstant,
    buf: Vec<u8>,
    /// The runtime's own counters.
    pub stats: RuntimeStats,
}

impl MonoStack {
    /// A stack on `dev` (plain frames) with ip configuration `cfg`; UDP owns every
    /// UDP port.
    pub fn new(dev: Device, cfg: Config, udp_queue_bytes: usize) -> Result<Self, RuntimeError> {
        if matches!(dev.kind(), DeviceKind::Tap(o) if o.vnet_hdr) {
            return Err(RuntimeError::Offloads(dev.name().to_owned()));
        }
        let fd = dev.fd().try_clone_to_owned()?;
        let flags = rustix::fs::fcntl_getfl(&fd).map_err(std::io::Error::from)?;
        rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK).map_err(std::io::Error::from)?;
        let epoch = StdInstant::now();
        let local = cfg.addr.address();
        let mut ip = IpCore::new(cfg, Instant::ZERO);
        ip.demux.insert(IpProtocol::Udp, 0..=65535, UDP);
        let mut s = Self {
            fd,
            ip,
            udp: UdpCore::new(local, udp_queue_bytes),
            epoch,
            buf: vec![0u8; 65536 + VNET_HDR_LEN],
            stats: RuntimeStats::default(),
        };
        s.pump()?;
        Ok(s)
    }

    /// The ip core.
    pub fn ip(&self) -> &IpCore {
        &self.ip
    }

    /// The udp core (the application side calls it between polls).
    pub fn udp(&mut self) -> &mut UdpCore {
        &mut self.udp
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Waits up to `max_wait` for the device or a timer, then processes every frame
    /// that is ready (drain to empty) and every output that results.
    pub fn poll(&mut self, max_wait: Duration) -> Result<(), RuntimeError> {
        let now = self.now();
        let timer = self.ip.poll_at().map(|at| Duration::from_micros((at - now).total_micros()));
        let wait = timer.map_or(max_wait, |t| t.min(max_wait));
        let ts = rustix::time::Timespec { tv_sec: wait.as_secs() as i64, tv_nsec: i64::from(wait.subsec_nanos()) };
        let mut fds = [rustix::event::PollFd::new(&self.fd, rustix::event::PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
        loop {
            match rustix::io::read(&self.fd, &mut self.buf) {
                Ok(0) => break,
                Ok(n) => {
                    self.stats.frames_read += 1;
                    let now = self.now();
                    self.ip.receive_frame(now, &self.buf[..n]);
                    self.pump()?;
                }
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(std::io::Error::from(e).into()),
            }
        }
        let now = self.now();
        self.ip.poll(now);
        self.pump()
    }

    /// Moves every output between the cores and onto the device.
    pub fn pump(&mut self) -> Result<(), RuntimeError> {
        loop {
            let now = self.now();
            let mut progressed = false;
            while let Some(out) = self.ip.pop_output() {
                progressed = true;
                match out {
                    Output::Frame(f) => self.write(&f),
                    Output::Deliver(d) if d.to == UDP => self.udp.receive(d.src, d.dst, &d.payload, &d.ip_header),
                    Output::Deliver(_) => {}
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
            if !progressed {
                return Ok(());
            }
        }
    }

    fn write(&mut self, frame: &[u8]) {
        match rustix::io::write(&self.fd, frame) {
            Ok(_) => self.stats.frames_written += 1,
            Err(_) => self.stats.write_errors += 1,
        }
    }

    /// The device fd (for callers that multiplex several stacks).
    pub fn device_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
