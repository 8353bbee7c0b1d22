//! The device layer: frames to and from a device fd (with or without the
//! virtio-net header), the impairment stages, the capture tap, and the
//! counters the device side keeps.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant as StdInstant};

use capnet_driver::impair::{ImpairStats, Impairer, Impairment};
use capnet_ipc::lent::{Chain, Filled, Lent, LoanPool};
use capnet_kernel_shim::device::{Device as NetDevice, DeviceKind, VNET_HDR_LEN};

use crate::RuntimeError;

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
pub(crate) struct Stage {
    pub(crate) stage: Impairer,
    epoch: StdInstant,
    /// No impairment configured: frames bypass the stage (no copy, no allocation).
    pub(crate) passthrough: bool,
}

impl Stage {
    pub(crate) fn new(cfg: Impairment) -> Result<Self, RuntimeError> {
        let stage = Impairer::new(cfg).map_err(|e| RuntimeError::Ipc(e.to_string()))?;
        Ok(Self { stage, epoch: StdInstant::now(), passthrough: cfg.is_none() })
    }

    /// Counts a frame that bypassed the stage, so its counters stay complete.
    pub(crate) fn passed(&mut self) {
        self.stage.stats.frames += 1;
    }

    pub(crate) fn push(&mut self, frame: Vec<u8>) {
        let now = self.epoch.elapsed();
        self.stage.push(now, frame);
    }

    pub(crate) fn pop(&mut self) -> Option<Vec<u8>> {
        self.stage.pop(self.epoch.elapsed())
    }

    /// How long until the next held frame is due (zero if one is due).
    pub(crate) fn due_in(&self) -> Option<Duration> {
        self.stage.poll_at().map(|at| at.saturating_sub(self.epoch.elapsed()))
    }
}

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

    /// Whether a capture runs (a frame held in a pool is copied out only then).
    pub fn active(&self) -> bool {
        self.0.on.load(std::sync::atomic::Ordering::Acquire)
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
    /// Buffers of the frame pool out now (held here, or lent and not yet
    /// given back): a gauge, the pool's occupancy.
    pub pool_in_use: u64,
    /// Pieces of ip's frames read in place from applications' send pools.
    pub send_pieces_in_place: u64,
    /// ip's frames dropped for naming an application's pool just forgotten
    /// (lent before ip heard the application left).
    pub frames_dropped_pool_gone: u64,
    /// What the inbound impairment did.
    pub inbound: ImpairStats,
    /// What the outbound impairment did.
    pub outbound: ImpairStats,
}

/// A non-blocking copy of a device's fd, and whether its frames carry the
/// virtio-net header.
pub(crate) fn device_fd(dev: &NetDevice) -> Result<(OwnedFd, bool), RuntimeError> {
    let vnet = matches!(dev.kind(), DeviceKind::Tap(o) if o.vnet_hdr);
    Ok((set_nonblocking(dev.fd().try_clone_to_owned()?)?, vnet))
}

/// Where the plain frame lies in what the device handed over: all of it, or
/// past the virtio-net header with a partial checksum completed (in place) —
/// or, with `vouch`, a partial TCP checksum left for the kernel's word (the
/// `bool`: the frame must go to a TCP core told so). `None` (counted) for a
/// frame the header makes unusable.
pub(crate) fn plain_range(
    raw: &mut [u8],
    vnet: bool,
    vouch: bool,
    stats: &mut DeviceStats,
) -> Option<(std::ops::Range<usize>, bool)> {
    if !vnet {
        return Some((0..raw.len(), false));
    }
    let base = raw.as_ptr() as usize;
    match capnet_driver::vnet::to_plain(raw, vouch) {
        Ok((frame, vouched)) => {
            stats.checksums_vouched += u64::from(vouched);
            let start = frame.as_ptr() as usize - base;
            Some((start..start + frame.len(), vouched))
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
pub(crate) fn wait_readable(fd: &OwnedFd, wait: Duration) -> Result<(), RuntimeError> {
    let ts = rustix::time::Timespec { tv_sec: wait.as_secs() as i64, tv_nsec: i64::from(wait.subsec_nanos()) };
    let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
    match rustix::event::poll(&mut fds, Some(&ts)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => Err(std::io::Error::from(e).into()),
    }
}

/// Writes one frame to the device (behind a virtio-net header that asks for
/// nothing, if the device wants one), counting the outcome.
/// Writes `frame` — its headers and the handles on its payload, where they
/// are — to the device with one `writev`, behind the virtio-net header if the
/// device takes one (asking for TSO when `tso` says so).
pub(crate) fn write_frame(fd: &OwnedFd, frame: &Chain, vnet: bool, tso: Option<u16>, stats: &mut DeviceStats) {
    let hdr = match vnet {
        true => {
            // Headers only: Ethernet, IPv4 and TCP with options.
            let mut head = [0u8; 14 + 60 + 60];
            let n = frame.peek(0, &mut head);
            let tso = tso.and_then(|mss| capnet_driver::vnet::tso_header(&head[..n], mss));
            Some(tso.unwrap_or(capnet_driver::vnet::PLAIN))
        }
        false => None,
    };
    let r =
        capnet_ipc::lent::write_chain(std::os::fd::AsFd::as_fd(fd), hdr.as_ref().map_or(&[][..], |h| &h[..]), frame);
    match r {
        Ok(n) => {
            stats.frames_written += 1;
            stats.device_bytes += n as u64;
        }
        Err(_) => stats.write_errors += 1,
    }
}

/// Reads one frame if one is ready (`None` when the device has nothing).
pub(crate) fn read_frame(fd: &OwnedFd, buf: &mut [u8]) -> Result<Option<usize>, RuntimeError> {
    loop {
        return match rustix::io::read(fd, &mut *buf) {
            Ok(n) => Ok(Some(n)),
            Err(rustix::io::Errno::AGAIN) => Ok(None),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => Err(std::io::Error::from(e).into()),
        };
    }
}

/// A network device as a runtime sees it: frames in, frames out. [`FdDevice`]
/// is the device itself (a TAP or AF_PACKET fd); [`Captured`] and [`Impaired`]
/// wrap a device, as smoltcp's `phy::Device` is wrapped by `PcapWriter` and
/// `FaultInjector`. A runtime composes `Impaired<Captured<FdDevice>>`: the
/// capture sits nearest the device (it sees what the device read, and what the
/// device is asked to write), the impairment between it and the stack.
pub trait Device {
    /// One frame, if one is ready and `pool` has a buffer free: read straight
    /// into a buffer of `pool` and handed back plain (no virtio-net header, a
    /// handle on the buffer), with whether its TCP checksum was left partial on
    /// the kernel's word (only when `vouch` allows that: the frame goes
    /// straight to a TCP core of this process).
    fn receive(&mut self, pool: &mut LoanPool, vouch: bool) -> Result<Option<(Chain, bool)>, RuntimeError>;
    /// Sends `frame` (`tso`: the segment size the device is to cut it into).
    fn transmit(&mut self, frame: &Chain, tso: Option<u16>);
    /// Sends what a wrapper held back and is due now.
    fn transmit_due(&mut self) {}
    /// How long until a frame a wrapper holds is due (zero: one is), either way.
    fn due_in(&self) -> Option<Duration> {
        None
    }
    /// Whether frames pass both ways untouched (no stage holds or copies them).
    fn passthrough(&self) -> bool {
        true
    }
    /// Waits until a frame may be ready, or `wait` passes.
    fn wait(&self, wait: Duration) -> Result<(), RuntimeError>;
    /// The device's fd (to watch from another thread).
    fn fd(&self) -> &OwnedFd;
    /// Its counters, its wrappers' included.
    fn stats(&self) -> DeviceStats;
}

/// The device itself: a non-blocking fd of frames, with or without the
/// virtio-net header.
#[derive(Debug)]
pub struct FdDevice {
    fd: OwnedFd,
    vnet: bool,
    stats: DeviceStats,
}

impl FdDevice {
    /// The device on `fd` (made non-blocking); `vnet`: its frames carry the
    /// virtio-net header.
    pub fn new(fd: OwnedFd, vnet: bool) -> Result<Self, RuntimeError> {
        Ok(Self { fd: set_nonblocking(fd)?, vnet, stats: DeviceStats::default() })
    }

    /// The device `dev` (a copy of its fd).
    pub fn of(dev: &NetDevice) -> Result<Self, RuntimeError> {
        let (fd, vnet) = device_fd(dev)?;
        Self::new(fd, vnet)
    }

    /// Whether its frames carry the virtio-net header.
    pub fn vnet(&self) -> bool {
        self.vnet
    }
}

impl Device for FdDevice {
    fn receive(&mut self, pool: &mut LoanPool, vouch: bool) -> Result<Option<(Chain, bool)>, RuntimeError> {
        if pool.room() < 65536 + VNET_HDR_LEN {
            return Err(RuntimeError::Ipc(format!(
                "a frame pool of {}-byte buffers cannot hold every frame",
                pool.room()
            )));
        }
        let (fd, vnet, stats) = (&self.fd, self.vnet, &mut self.stats);
        loop {
            // Read in place: the kernel's copy is the only one.
            let got = pool.fill_with(|buf| -> Result<Filled<Option<bool>>, RuntimeError> {
                let Some(n) = read_frame(fd, buf)? else { return Ok(None) };
                stats.frames_read += 1;
                stats.device_bytes += n as u64;
                // A frame its header makes unusable is counted and skipped.
                Ok(Some(match plain_range(&mut buf[..n], vnet, vouch, stats) {
                    Some((range, vouched)) => (range, Some(vouched)),
                    None => (0..0, None),
                }))
            })?;
            match got {
                None => return Ok(None),
                Some((_, None)) => continue,
                Some((frame, Some(vouched))) => return Ok(Some((Chain::from(frame), vouched))),
            }
        }
    }

    fn transmit(&mut self, frame: &Chain, tso: Option<u16>) {
        write_frame(&self.fd, frame, self.vnet, tso, &mut self.stats);
    }

    fn wait(&self, wait: Duration) -> Result<(), RuntimeError> {
        wait_readable(&self.fd, wait)
    }

    fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    fn stats(&self) -> DeviceStats {
        self.stats
    }
}

/// A device whose frames, both ways, are copied to a capture while one runs.
#[derive(Debug)]
pub struct Captured<D> {
    inner: D,
    tap: FrameTap,
}

impl<D: Device> Captured<D> {
    /// `inner`, its frames copied to `tap`'s capture.
    pub fn new(inner: D, tap: FrameTap) -> Self {
        Self { inner, tap }
    }
}

impl<D: Device> Device for Captured<D> {
    fn receive(&mut self, pool: &mut LoanPool, vouch: bool) -> Result<Option<(Chain, bool)>, RuntimeError> {
        let got = self.inner.receive(pool, vouch)?;
        if let Some((frame, _)) = &got {
            if self.tap.active() {
                self.tap.record(&frame.to_vec());
            }
        }
        Ok(got)
    }

    fn transmit(&mut self, frame: &Chain, tso: Option<u16>) {
        if self.tap.active() {
            self.tap.record(&frame.to_vec());
        }
        self.inner.transmit(frame, tso);
    }

    fn transmit_due(&mut self) {
        self.inner.transmit_due()
    }

    fn due_in(&self) -> Option<Duration> {
        self.inner.due_in()
    }

    fn passthrough(&self) -> bool {
        self.inner.passthrough()
    }

    fn wait(&self, wait: Duration) -> Result<(), RuntimeError> {
        self.inner.wait(wait)
    }

    fn fd(&self) -> &OwnedFd {
        self.inner.fd()
    }

    fn stats(&self) -> DeviceStats {
        self.inner.stats()
    }
}

/// A device behind the link's impairment, one stage each way: with none
/// configured a frame passes untouched (no copy); otherwise the stage holds a
/// copy, and what it lets through comes out when due (and never with a
/// vouched checksum: a stage may corrupt what it holds).
#[derive(Debug)]
pub struct Impaired<D> {
    inner: D,
    inbound: Stage,
    outbound: Stage,
}

impl<D: Device> Impaired<D> {
    /// `inner`, impaired as `link` says.
    pub fn new(inner: D, link: LinkImpairment) -> Result<Self, RuntimeError> {
        Ok(Self { inner, inbound: Stage::new(link.inbound)?, outbound: Stage::new(link.outbound)? })
    }

    /// The wrapped device.
    pub fn inner(&self) -> &D {
        &self.inner
    }
}

impl<D: Device> Device for Impaired<D> {
    fn receive(&mut self, pool: &mut LoanPool, vouch: bool) -> Result<Option<(Chain, bool)>, RuntimeError> {
        let stage = &mut self.inbound;
        if stage.passthrough {
            let got = self.inner.receive(pool, vouch)?;
            if got.is_some() {
                stage.passed();
            }
            return Ok(got);
        }
        // What the stage holds is copied (and the buffer goes back at once).
        while let Some((frame, _)) = self.inner.receive(pool, false)? {
            stage.push(frame.to_vec());
        }
        Ok(stage.pop().map(|frame| (Chain::from(Lent::from_vec(frame)), false)))
    }

    fn transmit(&mut self, frame: &Chain, tso: Option<u16>) {
        if self.outbound.passthrough {
            self.outbound.passed();
            self.inner.transmit(frame, tso);
        } else {
            self.outbound.push(frame.to_vec());
        }
    }

    fn transmit_due(&mut self) {
        while let Some(frame) = self.outbound.pop() {
            self.inner.transmit(&Lent::from_vec(frame).into(), None);
        }
        self.inner.transmit_due();
    }

    fn due_in(&self) -> Option<Duration> {
        [self.inbound.due_in(), self.outbound.due_in(), self.inner.due_in()].into_iter().flatten().min()
    }

    fn passthrough(&self) -> bool {
        self.inbound.passthrough && self.outbound.passthrough && self.inner.passthrough()
    }

    fn wait(&self, wait: Duration) -> Result<(), RuntimeError> {
        self.inner.wait(wait)
    }

    fn fd(&self) -> &OwnedFd {
        self.inner.fd()
    }

    fn stats(&self) -> DeviceStats {
        DeviceStats { inbound: self.inbound.stage.stats, outbound: self.outbound.stage.stats, ..self.inner.stats() }
    }
}
