//! Channels: two rings between two ends, each end writing only its own area.
//!
//! DESIGN ("Channel"): a channel is two regions, one per end. Each holds what that
//! end writes — its outbound slots and tail, its inbound head, its sleep word and a
//! wake-sequence word — behind a header that both ends check on attach. Each end maps
//! its own area read-write and the other's read-only, so every shared byte has one
//! writer and a hostile end can scribble only on its own area.
//!
//! Area layout (byte offsets; each hot word on its own cache line):
//!
//! | offset | word | written by the owner when |
//! |---|---|---|
//! | 0 | header: magic, version, end, epoch, capacity, slot size, length | at creation |
//! | 64 | tail of the owner's outbound ring | it pushes |
//! | 128 | head of the owner's inbound ring | it pops |
//! | 192 | sleep word: `gen << 2 \| WANT_RX \| WANT_SPACE`, 0 when awake | it sleeps and wakes |
//! | 196 | wake sequence: bumped to wake the peer; the peer's futex word | it wakes the peer |
//! | 200 | wake stamp: CLOCK_MONOTONIC ns of the last bump | it wakes the peer |
//! | 256 | outbound slots | it pushes |
//!
//! The sleep word carries what the sleeper waits for, so a producer wakes a consumer
//! only if it waits for data and a consumer wakes a producer only if it waits for
//! space; and a generation, so each sleep is woken by at most one system call.

use std::mem::size_of;
use std::time::Duration;

use crate::descriptor::ShmSafe;
use crate::notify::{now_ns, Futex, SpinPolicy, SpinTokens};
use crate::ring::{Consumer, Producer, RingError, RingLayout};
use crate::shm::{ShmRead, ShmWrite};
use crate::sync::{fence, Ordering};

/// "CAPNETCH", little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"CAPNETCH");
/// Layout version; bumped on any change to the table above.
pub const VERSION: u32 = 1;
/// The default ring capacity: deep enough for the 256–1000-descriptor window the
/// design measured as the condition for streaming at < 0.02 wakes per message.
pub const DEFAULT_CAPACITY: u32 = 1024;

const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_END: usize = 12;
const H_EPOCH: usize = 16;
const H_CAPACITY: usize = 24;
const H_SLOT: usize = 28;
const H_LEN: usize = 32;
const TAIL: usize = 64;
const HEAD: usize = 128;
const SLEEP: usize = 192;
const WAKE_SEQ: usize = 196;
const WAKE_STAMP: usize = 200;
const SLOTS: usize = 256;

const WANT_RX: u32 = 1;
const WANT_SPACE: u32 = 2;

/// Which end of a channel an area belongs to (so two areas cannot be swapped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The end the supervisor lists first in the graph.
    A = 0,
    /// The other end.
    B = 1,
}

impl End {
    /// The opposite end.
    pub fn other(self) -> Self {
        match self {
            End::A => End::B,
            End::B => End::A,
        }
    }
}

/// What both ends agree on before attaching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelParams {
    /// Slots per ring, a power of two.
    pub capacity: u32,
    /// Bumped by the supervisor each time the channel is re-created (revocation).
    pub epoch: u64,
}

impl Default for ChannelParams {
    fn default() -> Self {
        Self { capacity: DEFAULT_CAPACITY, epoch: 1 }
    }
}

/// Bytes one end's area needs for slots of type `T`.
pub fn area_len<T>(capacity: u32) -> usize {
    SLOTS + capacity as usize * size_of::<T>()
}

/// Attaching to a peer's area failed: the channel is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// Capacity is zero or not a power of two.
    #[error("ring capacity {0} is not a power of two ≥ 2")]
    Capacity(u32),
    /// The area is smaller than the layout needs.
    #[error("channel area is {actual} bytes, the layout needs {needed}")]
    TooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        actual: usize,
    },
    /// The peer's header is not a capnet channel header.
    #[error("peer area has magic {0:#018x}, not a capnet channel (wrong fd granted?)")]
    Magic(u64),
    /// The peer speaks another layout version.
    #[error("peer channel layout version {theirs}, ours is {ours}: rebuild both domains from one tree")]
    Version {
        /// Our version.
        ours: u32,
        /// Theirs.
        theirs: u32,
    },
    /// The peer's area claims to be the wrong end.
    #[error("peer area says it is end {theirs}, expected {expected} (the two areas were swapped)")]
    End {
        /// Expected end number.
        expected: u32,
        /// End number found.
        theirs: u32,
    },
    /// The peer's header disagrees with ours on epoch, capacity, slot size or length.
    #[error("peer channel header disagrees on {field}: ours {ours}, theirs {theirs} (stale or mismatched channel)")]
    Mismatch {
        /// Which field.
        field: &'static str,
        /// Our value.
        ours: u64,
        /// Their value.
        theirs: u64,
    },
}

/// Writes the header of a fresh area for end `end` (before it is sealed or shared).
pub fn init_area<M: ShmWrite, T: ShmSafe>(mine: &M, end: End, params: ChannelParams) -> Result<(), AttachError> {
    if params.capacity < 2 || !params.capacity.is_power_of_two() {
        return Err(AttachError::Capacity(params.capacity));
    }
    let needed = area_len::<T>(params.capacity);
    if mine.len() < needed {
        return Err(AttachError::TooSmall { needed, actual: mine.len() });
    }
    mine.store64(H_MAGIC, MAGIC, Ordering::Relaxed);
    mine.store32(H_VERSION, VERSION, Ordering::Relaxed);
    mine.store32(H_END, end as u32, Ordering::Relaxed);
    mine.store64(H_EPOCH, params.epoch, Ordering::Relaxed);
    mine.store32(H_CAPACITY, params.capacity, Ordering::Relaxed);
    mine.store32(H_SLOT, size_of::<T>() as u32, Ordering::Relaxed);
    mine.store64(H_LEN, needed as u64, Ordering::Relaxed);
    Ok(())
}

/// Copies the peer's header out once and checks every field against ours.
fn check_peer<P: ShmRead, T>(peer: &P, end: End, params: ChannelParams) -> Result<(), AttachError> {
    let needed = area_len::<T>(params.capacity);
    if peer.len() < SLOTS {
        return Err(AttachError::TooSmall { needed, actual: peer.len() });
    }
    let magic = peer.load64(H_MAGIC, Ordering::Acquire);
    if magic != MAGIC {
        return Err(AttachError::Magic(magic));
    }
    let version = peer.load32(H_VERSION, Ordering::Relaxed);
    if version != VERSION {
        return Err(AttachError::Version { ours: VERSION, theirs: version });
    }
    let their_end = peer.load32(H_END, Ordering::Relaxed);
    if their_end != end.other() as u32 {
        return Err(AttachError::End { expected: end.other() as u32, theirs: their_end });
    }
    let fields = [
        ("epoch", params.epoch, peer.load64(H_EPOCH, Ordering::Relaxed)),
        ("capacity", u64::from(params.capacity), u64::from(peer.load32(H_CAPACITY, Ordering::Relaxed))),
        ("slot size", size_of::<T>() as u64, u64::from(peer.load32(H_SLOT, Ordering::Relaxed))),
        ("length", needed as u64, peer.load64(H_LEN, Ordering::Relaxed)),
    ];
    for (field, ours, theirs) in fields {
        if ours != theirs {
            return Err(AttachError::Mismatch { field, ours, theirs });
        }
    }
    if peer.len() < needed {
        return Err(AttachError::TooSmall { needed, actual: peer.len() });
    }
    Ok(())
}

/// What a waiting end waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    /// Inbound entries to pop.
    pub rx: bool,
    /// Outbound space to push into.
    pub space: bool,
}

impl Interest {
    /// Wait for inbound entries (the default).
    pub const RX: Self = Self { rx: true, space: false };
    /// Wait for outbound space.
    pub const SPACE: Self = Self { rx: false, space: true };
    /// Wait for either.
    pub const BOTH: Self = Self { rx: true, space: true };
    /// Nothing: this end is not waited on.
    pub const NONE: Self = Self { rx: false, space: false };

    fn bits(self) -> u32 {
        (u32::from(self.rx) * WANT_RX) | (u32::from(self.space) * WANT_SPACE)
    }
}

/// Counters one end keeps in private memory (published by the runtime).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EndStats {
    /// Entries pushed.
    pub sent: u64,
    /// Entries popped.
    pub received: u64,
    /// futex wake system calls made for the peer.
    pub wakes: u64,
    /// Protocol violations by the peer seen on this end (a broken ring is counted
    /// once; the end stays broken and every later call returns the same error).
    pub violations: u64,
}

/// One end of a channel: an outbound ring, an inbound ring, and the wake protocol.
#[derive(Debug)]
pub struct ChannelEnd<M, P, T, F> {
    tx: Producer<M, P, T>,
    rx: Consumer<M, P, T>,
    futex: F,
    /// What [`Waiter::wait`] waits for on this end.
    pub interest: Interest,
    sleep_gen: u32,
    peer_sleep_woken: u32,
    last_peer_wake_seq: u32,
    /// This end's counters.
    pub stats: EndStats,
}

impl<M, P, T, F> ChannelEnd<M, P, T, F>
where
    M: ShmWrite + Clone,
    P: ShmRead + Clone,
    T: ShmSafe,
    F: Futex,
{
    /// Attaches end `end` over its own initialised area `mine` (see [`init_area`])
    /// and the peer's area `peer`, after checking the peer's header.
    pub fn attach(mine: M, peer: P, end: End, params: ChannelParams, futex: F) -> Result<Self, AttachError> {
        check_peer::<P, T>(&peer, end, params)?;
        let layout = RingLayout { capacity: params.capacity, slots: SLOTS, tail: TAIL, head: HEAD };
        let last_peer_wake_seq = peer.load32(WAKE_SEQ, Ordering::Acquire);
        Ok(Self {
            tx: Producer::new(mine.clone(), peer.clone(), layout),
            rx: Consumer::new(mine, peer, layout),
            futex,
            interest: Interest::RX,
            sleep_gen: 0,
            peer_sleep_woken: 0,
            last_peer_wake_seq,
            stats: EndStats::default(),
        })
    }

    /// Pushes as many of `items` as fit; wakes the peer if it sleeps waiting for data.
    pub fn send(&mut self, items: &[T]) -> Result<usize, RingError> {
        let n = self.counted(|e| e.tx.push(items))?;
        if n > 0 {
            self.stats.sent += n as u64;
            self.wake_peer_if(WANT_RX);
        }
        Ok(n)
    }

    /// Pops up to `max` entries into `out`; wakes the peer if it sleeps waiting for
    /// space.
    pub fn recv(&mut self, out: &mut Vec<T>, max: usize) -> Result<usize, RingError> {
        let n = self.counted(|e| e.rx.pop(out, max))?;
        if n > 0 {
            self.stats.received += n as u64;
            self.wake_peer_if(WANT_SPACE);
        }
        Ok(n)
    }

    /// Writes garbage over this end's own published indices (its outbound tail
    /// and inbound head): what a compromised domain can do to the area it owns.
    /// Only for tests of the neighbours' defences (the hostile mode); the peer
    /// detects it on its next call and its ring reports `RingError` for good.
    #[cfg(feature = "hostile")]
    pub fn scribble(&mut self, garbage: u32) {
        self.tx.mine().store32(TAIL, garbage, Ordering::Release);
        self.tx.mine().store32(HEAD, garbage.wrapping_mul(7), Ordering::Release);
    }

    /// Free outbound slots (refreshing the peer's head if none are cached).
    pub fn space(&mut self) -> Result<usize, RingError> {
        self.counted(|e| e.tx.free(1))
    }

    /// Like [`ChannelEnd::space`], refreshing the peer's head unless at least
    /// `want` slots are known free (`space` refreshes only when none are).
    pub fn space_for(&mut self, want: usize) -> Result<usize, RingError> {
        self.counted(|e| e.tx.free(want))
    }

    /// Inbound entries ready (refreshing the peer's tail if none are cached).
    pub fn pending(&mut self) -> Result<usize, RingError> {
        self.counted(|e| e.rx.available())
    }

    /// Whether the peer has broken either ring (the runtime then reports it and the
    /// supervisor cuts the channel off).
    pub fn is_broken(&self) -> bool {
        self.stats.violations > 0
    }

    /// Runs a ring operation, counting the first violation it reveals.
    fn counted(&mut self, op: impl FnOnce(&mut Self) -> Result<usize, RingError>) -> Result<usize, RingError> {
        let r = op(self);
        if r.is_err() && self.stats.violations == 0 {
            self.stats.violations = 1;
        }
        r
    }

    /// Outbound entries the peer has not yet taken, as last seen.
    pub fn outbound_in_flight(&self) -> u32 {
        self.tx.in_flight()
    }

    fn ready(&mut self) -> bool {
        let rx = self.interest.rx && !matches!(self.rx.available(), Ok(0));
        let space = self.interest.space && !matches!(self.tx.free(1), Ok(0));
        rx || space
    }

    /// The Dekker half of the wake protocol, after our index store.
    fn wake_peer_if(&mut self, cause: u32) {
        // SeqCst fence pairs with the SeqCst fence in `Waiter::wait` between the
        // peer's sleep announcement and its re-check: either the peer's re-check sees
        // our index store, or we see its sleep word here.
        fence(Ordering::SeqCst);
        // Acquire pairs with the Release store in `announce_sleep`: the peer read our
        // wake sequence before announcing, so our bump below is after that read.
        let sleep = self.tx.peer().load32(SLEEP, Ordering::Acquire);
        if sleep & cause != 0 && sleep != self.peer_sleep_woken {
            self.peer_sleep_woken = sleep;
            let mine = self.tx.mine();
            mine.store64(WAKE_STAMP, now_ns(), Ordering::Relaxed);
            // Release pairs with the Acquire load of our wake sequence in
            // `Waiter::wait`, which then sees the stamp above.
            mine.fetch_add32(WAKE_SEQ, 1, Ordering::Release);
            self.futex.wake(mine.word32(WAKE_SEQ));
            self.stats.wakes += 1;
        }
    }

    fn announce_sleep(&mut self) -> bool {
        let bits = self.interest.bits();
        if bits == 0 {
            return false;
        }
        self.sleep_gen = self.sleep_gen.wrapping_add(1) & (u32::MAX >> 2);
        // Release: see `Waiter::wait` (the wake-sequence read comes first).
        self.rx.mine().store32(SLEEP, (self.sleep_gen << 2) | bits, Ordering::Release);
        true
    }

    fn end_sleep(&mut self) {
        self.rx.mine().store32(SLEEP, 0, Ordering::Relaxed);
    }
}

/// How many channel ends one [`Waiter::wait`] can sleep on (futex_waitv's limit is
/// 128; a domain has a handful of channels).
pub const MAX_WAIT_ENDS: usize = 16;

/// Counters of one waiting thread.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WaiterStats {
    /// Calls to [`Waiter::wait`].
    pub waits: u64,
    /// Waits satisfied while spinning.
    pub spins_won: u64,
    /// futex wait system calls.
    pub sleeps: u64,
}

/// Why [`Waiter::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Some end has what it is interested in (or is broken: its next call says so).
    Ready,
    /// The timeout passed, or a spurious wake; nothing is ready.
    Idle,
}

/// Spin-then-block over a set of channel ends, for one thread.
#[derive(Debug, Default)]
pub struct Waiter {
    /// The adaptive spin budget.
    pub policy: SpinPolicy,
    /// Counters.
    pub stats: WaiterStats,
}

impl Waiter {
    /// A waiter with the given spin policy.
    pub fn new(policy: SpinPolicy) -> Self {
        Self { policy, stats: WaiterStats::default() }
    }

    /// Waits until one of `ends` (at most [`MAX_WAIT_ENDS`]) is ready for its [`ChannelEnd::interest`], the
    /// timeout passes, or a spurious wake. Callers drain every end to empty before
    /// calling this (the design's drain-to-empty rule), and loop on `Idle`.
    ///
    /// Spins first if `tokens` grants a token and the budget is non-zero; then reads
    /// the peers' wake sequences, announces sleep on every end, re-checks, and sleeps
    /// on those sequences with the values read.
    pub fn wait<M, P, T, F, S>(
        &mut self,
        ends: &mut [&mut ChannelEnd<M, P, T, F>],
        timeout: Option<Duration>,
        tokens: Option<&SpinTokens<S>>,
    ) -> WaitOutcome
    where
        M: ShmWrite + Clone,
        P: ShmRead + Clone,
        T: ShmSafe,
        F: Futex,
        S: ShmWrite,
    {
        assert!(ends.len() <= MAX_WAIT_ENDS, "wait on at most {MAX_WAIT_ENDS} channel ends");
        self.stats.waits += 1;
        if ends.iter_mut().any(|e| e.ready()) {
            return WaitOutcome::Ready;
        }
        if self.spin(ends, tokens) {
            self.stats.spins_won += 1;
            return WaitOutcome::Ready;
        }
        // Read each peer's wake sequence *before* announcing sleep. The Release
        // store of the announcement pairs with the Acquire load of it in
        // `wake_peer_if`, so a peer that sees this announcement bumps the sequence
        // after our read: its first wake for this sleep always changes the value we
        // wait on, and one wake per announced sleep is enough.
        let mut expected = [0u32; MAX_WAIT_ENDS];
        for (slot, e) in expected.iter_mut().zip(ends.iter()) {
            // Acquire pairs with the Release bump in `wake_peer_if` (for the stamp).
            *slot = e.rx.peer().load32(WAKE_SEQ, Ordering::Acquire);
        }
        let mut announced = false;
        for e in ends.iter_mut() {
            announced |= e.announce_sleep();
        }
        if !announced {
            return WaitOutcome::Idle;
        }
        // SeqCst fence pairs with the one in `wake_peer_if`: either the peer sees our
        // sleep word after its index store, or our re-check below sees its index.
        fence(Ordering::SeqCst);
        let ready = ends.iter_mut().any(|e| e.ready());
        if !ready {
            let words: Vec<_> = ends
                .iter()
                .zip(expected.iter())
                .filter(|(e, _)| e.interest.bits() != 0)
                .map(|(e, v)| (e.rx.peer().word32(WAKE_SEQ), *v))
                .collect();
            self.stats.sleeps += 1;
            if let Some(first) = ends.first() {
                first.futex.wait_any(&words, timeout);
            }
        }
        let woke_at = now_ns();
        for e in ends.iter_mut() {
            e.end_sleep();
            let seq = e.rx.peer().load32(WAKE_SEQ, Ordering::Acquire);
            if seq != e.last_peer_wake_seq {
                e.last_peer_wake_seq = seq;
                if !ready {
                    let stamp = e.rx.peer().load64(WAKE_STAMP, Ordering::Relaxed);
                    self.policy.record_wake(woke_at.saturating_sub(stamp));
                }
            }
        }
        if ready || ends.iter_mut().any(|e| e.ready()) {
            WaitOutcome::Ready
        } else {
            WaitOutcome::Idle
        }
    }

    fn spin<M, P, T, F, S>(&mut self, ends: &mut [&mut ChannelEnd<M, P, T, F>], tokens: Option<&SpinTokens<S>>) -> bool
    where
        M: ShmWrite + Clone,
        P: ShmRead + Clone,
        T: ShmSafe,
        F: Futex,
        S: ShmWrite,
    {
        let budget = self.policy.budget_ns;
        if budget == 0 {
            return false;
        }
        let Some(tokens) = tokens else { return false };
        if !tokens.try_acquire() {
            return false;
        }
        let start = now_ns();
        let mut won = false;
        'spin: loop {
            for _ in 0..32 {
                if ends.iter_mut().any(|e| e.ready()) {
                    won = true;
                    break 'spin;
                }
                std::hint::spin_loop();
            }
            if now_ns().saturating_sub(start) >= budget {
                break;
            }
        }
        tokens.release();
        won
    }
}
