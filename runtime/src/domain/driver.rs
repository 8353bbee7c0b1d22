//! The driver domain's runtime: the reader and writer threads over the device
//! (or an in-memory wire), each owning one end of the frame channel to ip.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use capnet_ipc::channel::ChannelParams;
use capnet_ipc::lent::{Chain, Ledger, LoanPool};
use capnet_ipc::notify::SpinPolicy;
use capnet_ipc::shm_channel::{self, ShmEnd};
use capnet_ipc::{Descriptor, End, Interest, Waiter};

use crate::device::{set_nonblocking, Captured, Device, FdDevice, Impaired, Stage};
use crate::{DeviceStats, LinkImpairment, RuntimeError};

use crate::frames::*;

#[cfg(feature = "hostile")]
const WIRE_ONLY: u32 = 1 << 31;
/// How often a blocked driver thread looks at its stop flag.
const STOP_CHECK: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct Driver {
    stop: Arc<AtomicBool>,
    /// Garbage for each thread to write over its channel indices (the hostile
    /// mode of a test); 0: none.
    #[cfg(feature = "hostile")]
    scribble: Arc<std::sync::atomic::AtomicU32>,
    rejoin: Arc<Rejoin>,
    live: [Arc<std::sync::Mutex<DeviceStats>>; 2],
    reader: JoinHandle<Result<DeviceStats, RuntimeError>>,
    writer: JoinHandle<Result<DeviceStats, RuntimeError>>,
}

impl Driver {
    /// The counters as the threads last published them (after every batch).
    pub fn stats(&self) -> DeviceStats {
        let get = |m: &Arc<std::sync::Mutex<DeviceStats>>| *m.lock().unwrap_or_else(|e| e.into_inner());
        combine(get(&self.live[0]), get(&self.live[1]))
    }

    /// Whether a thread of the data path ended on its own (an error: see
    /// [`Driver::stop`]).
    pub fn ended(&self) -> bool {
        self.reader.is_finished() || self.writer.is_finished()
    }

    /// Has both threads write `garbage` over their channel indices — only the
    /// wire's, with `wire_only`: the hostile mode of a test (what a compromised
    /// driver could do to areas it owns).
    #[cfg(feature = "hostile")]
    pub fn scribble(&self, garbage: u32, wire_only: bool) {
        let g = (garbage & !WIRE_ONLY).max(1) | if wire_only { WIRE_ONLY } else { 0 };
        self.scribble.store(g, Ordering::Release);
    }

    /// Joins a restarted stack group: the threads drop the old channels (and
    /// whatever the old ip domain held of the rx pool) and carry on with the new.
    pub fn rejoin(&self, half: DriverHalf, stack: HalfGrant) -> Result<(), RuntimeError> {
        let params = ChannelParams::default();
        let Half { pool: rx_pool, r_area, t_area } = half.0;
        let stack_reader = Ledger::by_buffer(FRAME_LAYOUT.count, QUOTA as usize);
        let r = shm_channel::attach::<Descriptor>(r_area, stack.r_area, End::A, params).map_err(peer_err)?;
        let t = shm_channel::attach::<Descriptor>(t_area, stack.t_area, End::B, params).map_err(peer_err)?;
        let input = FramesIn::new(t, TX_POOL, stack.pool)?;
        *self.rejoin.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some((rx_pool, stack_reader, r));
        *self.rejoin.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(input);
        self.rejoin.pending[0].store(true, Ordering::Release);
        self.rejoin.pending[1].store(true, Ordering::Release);
        Ok(())
    }

    /// The writer reads frames ip lends from application send pool `fd`
    /// (`Some`), named `alias` on channel T, or forgets it (`None`).
    pub fn app_pool(&self, alias: u16, fd: Option<OwnedFd>) {
        self.rejoin.app_pools.lock().unwrap_or_else(|e| e.into_inner()).push((alias, fd));
    }

    /// Joins a wire's peer (our side adopted from blanks, the peer's side as
    /// its supervisor granted it) in place of the old peer, if any.
    pub fn plug(&self, ours: StackHalf, peer: HalfGrant) -> Result<(), RuntimeError> {
        let (input, out) = ours.attach(peer, Peer::Wire)?;
        *self.rejoin.wire.lock().unwrap_or_else(|e| e.into_inner()) = (Some(input), Some(out));
        self.rejoin.pending[2].store(true, Ordering::Release);
        self.rejoin.pending[3].store(true, Ordering::Release);
        Ok(())
    }

    /// Stops both threads and returns their combined counters.
    pub fn stop(self) -> Result<DeviceStats, RuntimeError> {
        self.stop.store(true, Ordering::Relaxed);
        let join = |h: JoinHandle<Result<DeviceStats, RuntimeError>>| {
            h.join().unwrap_or_else(|_| Err(RuntimeError::Peer("driver thread panicked".into())))
        };
        Ok(combine(join(self.reader)?, join(self.writer)?))
    }
}

/// The reader's counters with the writer's.
fn combine(r: DeviceStats, w: DeviceStats) -> DeviceStats {
    DeviceStats {
        frames_written: w.frames_written,
        write_errors: w.write_errors,
        send_pieces_in_place: w.send_pieces_in_place,
        frames_dropped_pool_gone: w.frames_dropped_pool_gone,
        outbound: w.outbound,
        wire_refused: r.wire_refused + w.wire_refused,
        device_bytes: r.device_bytes + w.device_bytes,
        ..r
    }
}

impl DriverHalf {
    /// Joins the stack group's grant and starts the reader and writer threads on
    /// the device fd (`vnet`: its frames carry the virtio-net header) — or, with
    /// no fd, on an in-memory wire to another capnet instance, which
    /// [`Driver::plug`] joins later. When this returns, both threads have started,
    /// so a sandbox entered next covers them (see `sandbox::enter`).
    pub fn run(
        self,
        device: Option<OwnedFd>,
        vnet: bool,
        stack: HalfGrant,
        link: LinkImpairment,
        tap: crate::FrameTap,
    ) -> Result<Driver, RuntimeError> {
        let fd = device.map(set_nonblocking).transpose()?;
        let params = ChannelParams::default();
        let Half { pool: rx_pool, r_area, t_area } = self.0;
        let stack_reader = Ledger::by_buffer(FRAME_LAYOUT.count, QUOTA as usize);
        let r_driver = shm_channel::attach::<Descriptor>(r_area, stack.r_area, End::A, params).map_err(peer_err)?;
        let t_driver = shm_channel::attach::<Descriptor>(t_area, stack.t_area, End::B, params).map_err(peer_err)?;
        let mut t_driver = FramesIn::new(t_driver, TX_POOL, stack.pool)?;
        let stop = Arc::new(AtomicBool::new(false));
        let scribble = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let rejoin = Arc::new(Rejoin::default());
        t_driver.incoming = rejoin.app_pools.clone();
        let wfd = fd.as_ref().map(OwnedFd::try_clone).transpose()?;
        let none = capnet_driver::impair::Impairment::NONE;
        let rx = Edge::new(fd, vnet, &tap, LinkImpairment { inbound: link.inbound, outbound: none })?;
        let tx = Edge::new(wfd, vnet, &tap, LinkImpairment { inbound: none, outbound: link.outbound })?;
        let live: [Arc<std::sync::Mutex<DeviceStats>>; 2] = [Arc::default(), Arc::default()];
        let started = Arc::new(std::sync::Barrier::new(3));
        let reader = {
            let (stop, live, started) = (stop.clone(), live[0].clone(), started.clone());
            let side = DeviceSide { edge: rx, scribble: scribble.clone(), rejoin: rejoin.clone(), stop, live };
            std::thread::Builder::new().name("driver-rx".into()).spawn(move || {
                started.wait();
                reader_loop(side, rx_pool, stack_reader, r_driver)
            })?
        };
        let writer = {
            let (stop, live, started) = (stop.clone(), live[1].clone(), started.clone());
            let side = DeviceSide { edge: tx, scribble: scribble.clone(), rejoin: rejoin.clone(), stop, live };
            std::thread::Builder::new().name("driver-tx".into()).spawn(move || {
                started.wait();
                writer_loop(side, t_driver)
            })?
        };
        started.wait();
        Ok(Driver {
            stop,
            #[cfg(feature = "hostile")]
            scribble,
            rejoin,
            live,
            reader,
            writer,
        })
    }
}

#[derive(Default)]
struct Rejoin {
    reader: std::sync::Mutex<Option<(LoanPool, Ledger, ShmEnd)>>,
    writer: std::sync::Mutex<Option<FramesIn>>,
    /// A wire's new peer: the reader's part and the writer's.
    wire: std::sync::Mutex<(Option<FramesIn>, Option<FramesOut>)>,
    /// Applications' send pools the writer reads ip's frames from (`Some`:
    /// a view of it) or forgets (`None`), by alias: its channel T's queue.
    app_pools: Arc<AliasQueue>,
    /// Set for the reader and writer (channels to ip), then the same for the wire.
    pending: [AtomicBool; 4],
}

impl std::fmt::Debug for Rejoin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rejoin").finish_non_exhaustive()
    }
}

/// What a driver thread moves its frames to or from, the stop flag, and where
/// to publish its counters.
struct DeviceSide {
    edge: Edge,
    scribble: Arc<std::sync::atomic::AtomicU32>,
    rejoin: Arc<Rejoin>,
    stop: Arc<AtomicBool>,
    live: Arc<std::sync::Mutex<DeviceStats>>,
}

/// A driver thread's outer side: the device behind its capture and its
/// direction's impairment, or, with no device, an in-memory wire (joined by
/// [`Driver::plug`]) — a channel, not a device: its frames pass the capture
/// and the stage here, between the wire's batches and the pool.
enum Edge {
    Device(Box<Impaired<Captured<FdDevice>>>),
    Wire { tap: crate::FrameTap, impair: Stage },
}

impl Edge {
    fn new(fd: Option<OwnedFd>, vnet: bool, tap: &crate::FrameTap, link: LinkImpairment) -> Result<Self, RuntimeError> {
        Ok(match fd {
            Some(fd) => {
                Edge::Device(Box::new(Impaired::new(Captured::new(FdDevice::new(fd, vnet)?, tap.clone()), link)?))
            }
            None => {
                let impair = if link.inbound.is_none() { link.outbound } else { link.inbound };
                Edge::Wire { tap: tap.clone(), impair: Stage::new(impair)? }
            }
        })
    }

    /// How long until a frame the stage holds is due.
    fn due_in(&self) -> Option<Duration> {
        match self {
            Edge::Device(d) => d.due_in(),
            Edge::Wire { impair, .. } => impair.due_in(),
        }
    }

    /// This thread's counters: the device's (with its stage's), or the wire's
    /// with the stage's, and `own` (what the thread counts itself).
    fn stats(&self, own: DeviceStats, inbound: bool) -> DeviceStats {
        match self {
            Edge::Device(d) => {
                let dev = d.stats();
                DeviceStats {
                    rx_dropped: own.rx_dropped,
                    wire_refused: own.wire_refused,
                    pool_in_use: own.pool_in_use,
                    send_pieces_in_place: own.send_pieces_in_place,
                    frames_dropped_pool_gone: own.frames_dropped_pool_gone,
                    ..dev
                }
            }
            Edge::Wire { impair, .. } if inbound => DeviceStats { inbound: impair.stage.stats, ..own },
            Edge::Wire { impair, .. } => DeviceStats { outbound: impair.stage.stats, ..own },
        }
    }
}

/// The hostile mode of a test: writes the requested garbage over this thread's
/// channel indices once — its channel to ip unless the garbage is for the wire
/// only, and its wire end if it has one (wire-only garbage waits for a wire).
/// True when the wire alone was scribbled: the thread then leaves it as it is
/// (its next send or receive would write sound indices over the garbage before
/// the peer looked), so the peer finds it on its next look.
#[cfg(feature = "hostile")]
fn scribble_once(garbage: u32, scribbled: &mut bool, end: &mut ShmEnd, wire: Option<&mut ShmEnd>) -> bool {
    let wire_only = garbage & WIRE_ONLY != 0;
    if garbage == 0 || *scribbled || (wire_only && wire.is_none()) {
        return false;
    }
    *scribbled = true;
    if !wire_only {
        end.scribble(garbage);
    }
    if let Some(w) = wire {
        w.scribble(garbage & !WIRE_ONLY);
    }
    wire_only
}

/// Without the `hostile` feature nothing can ask for garbage: never scribbles.
#[cfg(not(feature = "hostile"))]
fn scribble_once(_: u32, _: &mut bool, _: &mut ShmEnd, _: Option<&mut ShmEnd>) -> bool {
    false
}

/// Sends every descriptor of `items`, waiting for ring space as needed (until stopped).
fn send_all(
    end: &mut ShmEnd,
    items: &[Descriptor],
    waiter: &mut Waiter,
    stop: &AtomicBool,
) -> Result<(), RuntimeError> {
    let mut sent = 0;
    while sent < items.len() && !stop.load(Ordering::Relaxed) {
        let k = end.send(&items[sent..]).map_err(peer_err)?;
        if k == 0 {
            end.interest = Interest::SPACE;
            waiter.wait(&mut [&mut *end], Some(STOP_CHECK), crate::tokens());
            end.interest = Interest::RX;
        }
        sent += k;
    }
    Ok(())
}

/// Device → rx pool → channel R; takes back returned loans.
fn reader_loop(side: DeviceSide, pool: LoanPool, stack: Ledger, end: ShmEnd) -> Result<DeviceStats, RuntimeError> {
    let DeviceSide { mut edge, scribble, rejoin, stop, live, .. } = side;
    let (mut pool, mut stack, mut end) = (pool, stack, end);
    let mut scribbled = false;
    let mut broken = false;
    let mut stats = DeviceStats::default();
    let mut waiter = Waiter::new(SpinPolicy::NEVER);
    let (mut inbox, mut batch) = (Vec::with_capacity(1024), Vec::with_capacity(BATCH));
    let mut wire: Option<FramesIn> = None;
    while !stop.load(Ordering::Relaxed) {
        if rejoin.pending[0].swap(false, Ordering::Acquire) {
            if let Some((p, r, e)) = rejoin.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
                (pool, stack, end, broken) = (p, r, e, false);
            }
        }
        if rejoin.pending[2].swap(false, Ordering::Acquire) {
            wire = rejoin.wire.lock().unwrap_or_else(|e| e.into_inner()).0.take();
        }
        if broken {
            // The stack broke the channel (or died): wait for a new one; the
            // device's frames wait in its queue meanwhile.
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let round = (|| -> Result<(), RuntimeError> {
            let garbage = scribble.load(Ordering::Relaxed);
            if scribble_once(garbage, &mut scribbled, &mut end, wire.as_mut().map(|w| &mut w.end)) {
                wire = None;
            }
            stats.pool_in_use = pool.in_use() as u64;
            *live.lock().unwrap_or_else(|e| e.into_inner()) = edge.stats(stats, true);
            inbox.clear();
            end.recv(&mut inbox, 1024).map_err(peer_err)?;
            for d in &inbox {
                if !d.has(Descriptor::RETURN) || d.pool != RX_POOL {
                    return Err(RuntimeError::Peer(format!("stack sent {d:?} on the receive channel")));
                }
                stack.returned(u64::from(d.index)).map_err(peer_err)?;
            }
            // A frame is one buffer (the pool's are as large as the largest
            // frame), read only when one is free and the stack may hold it.
            let quota_left = (QUOTA as usize).saturating_sub(stack.out());
            let room = end.space_for(1).map_err(peer_err)?.min(pool.free()).min(quota_left).min(RX_BATCH);
            if room == 0 {
                // Out of buffers or ring slots: wait for the stack to return some.
                waiter.wait(&mut [&mut end], Some(STOP_CHECK), crate::tokens());
                return Ok(());
            }
            let due = edge.due_in().map_or(STOP_CHECK, |d| d.min(STOP_CHECK));
            batch.clear();
            // Lends a frame (a chain of handles on our buffers) to the stack.
            let lend = |frame: &Chain, stack: &mut Ledger, batch: &mut Vec<Descriptor>| -> Result<(), RuntimeError> {
                let pieces = frame.pieces();
                for (i, l) in frame.iter().enumerate() {
                    let loan = stack.lend(l).map_err(ipc_err)?;
                    let flags = if i + 1 < pieces { Descriptor::MORE } else { 0 };
                    batch.push(Descriptor {
                        pool: RX_POOL,
                        flags,
                        index: loan.index,
                        offset: loan.offset,
                        len: loan.len,
                    });
                }
                Ok(())
            };
            // A frame from a wire or the impairment is copied into our pool.
            let copy_in = |pool: &mut LoanPool, bytes: &[u8]| -> Option<Chain> {
                let mut c = Chain::new();
                pool.fill_chain(bytes, &mut c).then_some(c)
            };
            // One from the wire's peer, straight out of its buffers (one copy).
            let copy_chain_in = |pool: &mut LoanPool, frame: &Chain| -> Option<Chain> {
                let mut c = Chain::new();
                pool.fill_chain_with(frame.len(), &mut c, |at, buf| {
                    frame.range(at, buf.len()).copy_to(buf);
                })
                .then_some(c)
            };
            match (&mut edge, wire.as_mut()) {
                (Edge::Device(dev), _) => {
                    dev.wait(due)?;
                    // Straight from the device into the pool (through the
                    // impairment's copy when it holds frames), never more than
                    // fits: the rest waits in the device's queue.
                    while batch.len() < room {
                        let Some((frame, _)) = dev.receive(&mut pool, false)? else { break };
                        // What the impairment held comes as a private copy.
                        let frame = match frame.loans() == frame.pieces() {
                            true => frame,
                            false => match copy_in(&mut pool, &frame.to_vec()) {
                                Some(c) => c,
                                None => break,
                            },
                        };
                        lend(&frame, &mut stack, &mut batch)?;
                    }
                }
                // A wire whose peer has not joined: nothing comes.
                (Edge::Wire { .. }, None) => std::thread::sleep(due.min(Duration::from_millis(5))),
                (Edge::Wire { tap, impair }, Some(w)) => {
                    // From the peer's pool straight into ours (what is left waits
                    // in the wire's ring).
                    let got = w.recv(room - batch.len(), |frame, _| {
                        stats.frames_read += 1;
                        if tap.active() {
                            tap.record(&frame.to_vec());
                        }
                        if impair.passthrough {
                            impair.passed();
                            match copy_chain_in(&mut pool, frame) {
                                Some(c) => lend(&c, &mut stack, &mut batch)?,
                                None => stats.rx_dropped += 1,
                            }
                        } else {
                            impair.push(frame.to_vec());
                        }
                        Ok(())
                    });
                    match got {
                        Ok(0) if impair.due_in().is_none() => {
                            waiter.wait(&mut [&mut w.end], Some(due), crate::tokens());
                        }
                        Ok(_) => {}
                        // The peer broke the wire: it is dropped until the
                        // peer's supervisor joins a new one.
                        Err(RuntimeError::Peer(_)) => {
                            stats.wire_refused += 1;
                            wire = None;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            if let Edge::Wire { impair, .. } = &mut edge {
                while !impair.passthrough && batch.len() < room {
                    let Some(frame) = impair.pop() else { break };
                    let Some(c) = copy_in(&mut pool, &frame) else { break };
                    lend(&c, &mut stack, &mut batch)?;
                }
            }
            send_all(&mut end, &batch, &mut waiter, &stop)?;
            Ok(())
        })();
        match round {
            Ok(()) => {}
            Err(RuntimeError::Peer(_)) => broken = true,
            Err(e) => return Err(e),
        }
    }
    Ok(edge.stats(stats, true))
}

/// Channel T → device: each frame a chain of handles on the stack's buffers,
/// written where it lies (one `writev`); a buffer goes back when its last
/// handle drops (at once, or once the wire's peer took its copy).
fn writer_loop(side: DeviceSide, input: FramesIn) -> Result<DeviceStats, RuntimeError> {
    let DeviceSide { mut edge, scribble, rejoin, stop, live, .. } = side;
    let mut input = input;
    let mut scribbled = false;
    let mut broken = false;
    let mut stats = DeviceStats::default();
    let mut waiter = Waiter::new(SpinPolicy::DEFAULT);
    // Without a device: the wire's peer, and the frames waiting for room in it.
    let mut wire: Option<FramesOut> = None;
    let mut backlog = VecDeque::new();
    while !stop.load(Ordering::Relaxed) {
        if rejoin.pending[1].swap(false, Ordering::Acquire) {
            if let Some(mut i) = rejoin.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
                // The applications' pools stay ours across a new ip.
                i.inherit_aliases(&mut input);
                (input, broken) = (i, false);
            }
        }
        if rejoin.pending[3].swap(false, Ordering::Acquire) {
            wire = rejoin.wire.lock().unwrap_or_else(|e| e.into_inner()).1.take();
        }
        if broken {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let round = (|| -> Result<(), RuntimeError> {
            let garbage = scribble.load(Ordering::Relaxed);
            if scribble_once(garbage, &mut scribbled, &mut input.end, wire.as_mut().map(|w| &mut w.end)) {
                wire = None;
            }
            (stats.send_pieces_in_place, stats.frames_dropped_pool_gone) = (input.borrowed_pieces, input.dropped_gone);
            *live.lock().unwrap_or_else(|e| e.into_inner()) = edge.stats(stats, false);
            match &mut edge {
                Edge::Device(dev) => dev.transmit_due(),
                Edge::Wire { tap, impair } => {
                    while let Some(frame) = impair.pop() {
                        to_wire(&mut backlog, wire.is_some(), frame.into(), &mut stats, tap);
                    }
                }
            }
            let plugged = wire.is_some();
            let got = input.recv(256, |frame, mss| {
                match &mut edge {
                    Edge::Device(dev) => dev.transmit(frame, mss),
                    // No TSO on a wire: the frame goes whole, as handles until
                    // the peer's pool takes its copy.
                    Edge::Wire { tap, impair } if impair.passthrough => {
                        impair.passed();
                        to_wire(&mut backlog, plugged, frame.clone(), &mut stats, tap)
                    }
                    Edge::Wire { impair, .. } => impair.push(frame.to_vec()),
                }
                Ok(())
            })?;
            wire_round(&mut wire, &mut backlog, &mut stats);
            if got == 0 {
                let wait = edge.due_in().map_or(STOP_CHECK, |d| d.min(STOP_CHECK));
                match wire.as_mut() {
                    // Returns from the peer make room for the backlog.
                    Some(w) if !backlog.is_empty() => {
                        waiter.wait(&mut [&mut input.end, &mut w.end], Some(wait), crate::tokens())
                    }
                    _ => waiter.wait(&mut [&mut input.end], Some(wait), crate::tokens()),
                };
            }
            Ok(())
        })();
        match round {
            Ok(()) => {}
            Err(RuntimeError::Peer(_)) => broken = true,
            Err(e) => return Err(e),
        }
    }
    Ok(edge.stats(stats, false))
}

/// Queues a frame for the wire's peer; without a peer it is dropped (no
/// carrier), and beyond [`MAX_BACKLOG`] the oldest goes.
fn to_wire(
    backlog: &mut VecDeque<(Chain, Option<u16>)>,
    plugged: bool,
    frame: Chain,
    stats: &mut DeviceStats,
    tap: &crate::FrameTap,
) {
    if tap.active() {
        tap.record(&frame.to_vec());
    }
    if !plugged {
        stats.write_errors += 1;
        return;
    }
    backlog.push_back((frame, None));
    stats.frames_written += 1;
    if backlog.len() > MAX_BACKLOG {
        backlog.pop_front();
        stats.write_errors += 1;
    }
}

/// Takes the wire peer's returns and lends it what fits of the backlog; a peer
/// that broke the protocol is dropped until its supervisor joins a new one.
fn wire_round(wire: &mut Option<FramesOut>, backlog: &mut VecDeque<(Chain, Option<u16>)>, stats: &mut DeviceStats) {
    let Some(w) = wire.as_mut() else { return };
    if let Err(_why) = w.take_returns().and_then(|_| w.send(backlog, &[])) {
        stats.wire_refused += 1;
        *wire = None;
    }
}
