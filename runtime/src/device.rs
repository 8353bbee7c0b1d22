//! The device layer: frames to and from a device fd (with or without the
//! virtio-net header), the impairment stages, the capture tap, and the
//! counters the device side keeps.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant as StdInstant};

use capnet_driver::impair::{ImpairStats, Impairer, Impairment};
use capnet_kernel_shim::device::{Device, DeviceKind};

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
pub(crate) fn device_fd(dev: &Device) -> Result<(OwnedFd, bool), RuntimeError> {
    let vnet = matches!(dev.kind(), DeviceKind::Tap(o) if o.vnet_hdr);
    Ok((set_nonblocking(dev.fd().try_clone_to_owned()?)?, vnet))
}

/// The plain frame inside what the device handed over: as is, or with the
/// virtio-net header stripped and a partial checksum completed (in place) —
/// or, with `vouch`, a partial TCP checksum left for the kernel's word (the
/// `bool`: the frame must go to a TCP core told so). `None` (counted) for a
/// frame the header makes unusable.
pub(crate) fn plain_frame<'a>(
    raw: &'a mut [u8],
    vnet: bool,
    vouch: bool,
    stats: &mut DeviceStats,
) -> Option<(&'a [u8], bool)> {
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
pub(crate) fn write_frame(
    fd: &OwnedFd,
    frame: &[u8],
    vnet: bool,
    tso: Option<u16>,
    stats: &mut DeviceStats,
    tap: &FrameTap,
) {
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
