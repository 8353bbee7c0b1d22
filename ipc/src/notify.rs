//! Competitive spin-then-block, and the spin tokens that keep spinning in budget.
//!
//! DESIGN ("Waking up"): a consumer polls for a bounded time, then announces that it
//! will sleep (a word in its own area), re-checks, and waits on a futex word **the
//! producer writes**, with the value it last saw; the producer makes the wake system
//! call only when the consumer announced sleep. The check-then-sleep is the futex's
//! own compare-and-sleep, so a wake between the re-check and the wait is not lost.
//!
//! This module holds the pieces that do not depend on ring layout: the [`Futex`]
//! abstraction (the kernel's for real, a mutex-and-condvar model under loom), the
//! adaptive [`SpinPolicy`], and [`SpinTokens`]. [`crate::channel`] puts them together.

use std::time::Duration;

use crate::shm::ShmWrite;
use crate::sync::{AtomicU32, Ordering};

/// Compare-and-sleep on 32-bit words that may live in another process's area.
pub trait Futex {
    /// Sleeps until one of `words` no longer holds its value, a wake, the timeout,
    /// or a spurious return. Callers always re-check their condition.
    fn wait_any(&self, words: &[(&AtomicU32, u32)], timeout: Option<Duration>);
    /// Wakes every waiter on `word`.
    fn wake(&self, word: &AtomicU32);
}

/// The kernel's futex, shared (not `FUTEX_PRIVATE_FLAG`, which never wakes another
/// process). It works through a read-only mapping: the kernel only reads the word.
#[cfg(not(loom))]
#[derive(Debug, Clone, Copy, Default)]
pub struct LinuxFutex;

#[cfg(not(loom))]
impl Futex for LinuxFutex {
    fn wait_any(&self, words: &[(&AtomicU32, u32)], timeout: Option<Duration>) {
        use rustix::thread::futex;
        // EAGAIN (value changed), EINTR and ETIMEDOUT all mean "go and re-check".
        match words {
            [] => {}
            [(word, val)] => {
                let ts = timeout
                    .map(|d| futex::Timespec { tv_sec: d.as_secs() as i64, tv_nsec: i64::from(d.subsec_nanos()) });
                let _ = futex::wait(word, futex::Flags::empty(), *val, ts.as_ref());
            }
            many => {
                let mut waits = [futex::Wait::new(); 16];
                let n = many.len().min(waits.len());
                for (w, (word, val)) in waits.iter_mut().zip(many.iter()) {
                    w.val = u64::from(*val);
                    w.uaddr = futex::WaitPtr::new(word.as_ptr().cast());
                    w.flags = futex::WaitFlags::SIZE_U32;
                }
                // futex_waitv takes an absolute CLOCK_MONOTONIC deadline.
                let deadline = timeout.map(|d| {
                    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
                    let ns = now.tv_nsec as u64 + u64::from(d.subsec_nanos());
                    futex::Timespec {
                        tv_sec: now.tv_sec + d.as_secs() as i64 + (ns / 1_000_000_000) as i64,
                        tv_nsec: (ns % 1_000_000_000) as i64,
                    }
                });
                let _ =
                    futex::waitv(&waits[..n], futex::WaitvFlags::empty(), deadline.as_ref(), futex::ClockId::Monotonic);
            }
        }
    }

    fn wake(&self, word: &AtomicU32) {
        let _ = rustix::thread::futex::wake(word, rustix::thread::futex::Flags::empty(), i32::MAX as u32);
    }
}

/// The futex modelled for loom: compare and sleep are one step under a mutex, as
/// the kernel does them under its hash-bucket lock. Timeouts are ignored, so a lost
/// wakeup shows up as a loom deadlock instead of being papered over.
#[cfg(loom)]
#[derive(Debug, Default)]
pub struct LoomFutex {
    lock: loom::sync::Mutex<()>,
    cv: loom::sync::Condvar,
}

#[cfg(loom)]
impl Futex for LoomFutex {
    fn wait_any(&self, words: &[(&AtomicU32, u32)], _timeout: Option<Duration>) {
        let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // The kernel compares against the word's current value. A plain loom load may
        // return any value not yet overwritten in this thread's view; a no-op
        // read-modify-write always reads the latest one, as the kernel does.
        if words.iter().all(|(w, v)| w.fetch_add(0, Ordering::SeqCst) == *v) {
            drop(self.cv.wait(guard));
        }
    }
    fn wake(&self, _word: &AtomicU32) {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.cv.notify_all();
    }
}

impl<F: Futex + ?Sized> Futex for std::sync::Arc<F> {
    fn wait_any(&self, words: &[(&AtomicU32, u32)], timeout: Option<Duration>) {
        (**self).wait_any(words, timeout)
    }
    fn wake(&self, word: &AtomicU32) {
        (**self).wake(word)
    }
}

/// Monotonic nanoseconds, comparable across processes (CLOCK_MONOTONIC). Under
/// loom there is no clock: it returns 0 and spin budgets are zero.
pub fn now_ns() -> u64 {
    #[cfg(loom)]
    {
        0
    }
    #[cfg(not(loom))]
    {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        (t.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(t.tv_nsec as u64)
    }
}

/// How long to spin before sleeping, adapted to the measured cost of a wake.
///
/// The competitive rule: spinning for as long as a block-and-wake costs is never
/// worse than twice the better of the two choices. The wake cost is measured on every
/// real wake (the waker stamps the time just before its futex call; the woken side
/// reads the clock as it returns) and averaged. Samples come from a peer we do not
/// trust, so each is clamped, and so is the budget: a lying peer can only move our
/// budget within `[min_ns, max_ns]`, never make us spin unboundedly.
#[derive(Debug, Clone, Copy)]
pub struct SpinPolicy {
    /// Current budget in nanoseconds.
    pub budget_ns: u64,
    /// Lower bound of the budget (0 disables spinning).
    pub min_ns: u64,
    /// Upper bound: the design's safe ceiling for a spin is 20 µs.
    pub max_ns: u64,
    /// Averaged wake cost (EWMA, 1/8 weight per sample).
    pub wake_cost_ns: u64,
}

impl SpinPolicy {
    /// Start from the wake cost measured on this machine kind (3.6–7 µs).
    pub const DEFAULT: Self = Self { budget_ns: 5_000, min_ns: 500, max_ns: 20_000, wake_cost_ns: 5_000 };
    /// Never spin: block at once (loom models and latency-insensitive domains).
    pub const NEVER: Self = Self { budget_ns: 0, min_ns: 0, max_ns: 0, wake_cost_ns: 0 };

    /// Feeds one measured wake latency in nanoseconds.
    pub fn record_wake(&mut self, sample_ns: u64) {
        if self.max_ns == 0 {
            return;
        }
        let sample = sample_ns.min(4 * self.max_ns);
        self.wake_cost_ns = self.wake_cost_ns - self.wake_cost_ns / 8 + sample / 8;
        self.budget_ns = self.wake_cost_ns.clamp(self.min_ns, self.max_ns);
    }
}

impl Default for SpinPolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A shared count that lets at most `limit` domains spin at once (cores − 1).
///
/// The one area with several writers (every domain), so the count is distrusted: a
/// count at or above the limit — whatever garbage put it there — only makes callers
/// block instead of spinning; a count of zero with spinners about means at most a
/// few more spin, each still bounded by its budget. Every operation is a bounded
/// number of compare-and-swaps: nothing here can loop forever.
#[derive(Debug)]
pub struct SpinTokens<S> {
    area: S,
    off: usize,
    limit: u32,
}

impl<S: ShmWrite> SpinTokens<S> {
    /// Tokens counted in the `u32` at `off` of `area`, at most `limit` held at once.
    pub fn new(area: S, off: usize, limit: u32) -> Self {
        Self { area, off, limit }
    }

    /// The limit for this machine: cores − 1 (0 on one core: never spin).
    pub fn limit_for_this_machine() -> u32 {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32).saturating_sub(1)
    }

    /// Takes a token if fewer than `limit` are out.
    pub fn try_acquire(&self) -> bool {
        let word = self.area.word32(self.off);
        let mut cur = word.load(Ordering::Relaxed);
        for _ in 0..4 {
            if cur >= self.limit {
                return false;
            }
            match word.compare_exchange_weak(cur, cur + 1, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
        false
    }

    /// Gives a token back. Never takes the count below zero.
    pub fn release(&self) {
        let word = self.area.word32(self.off);
        let mut cur = word.load(Ordering::Relaxed);
        for _ in 0..8 {
            if cur == 0 {
                return;
            }
            match word.compare_exchange_weak(cur, cur - 1, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// The count as it stands (for statistics).
    pub fn outstanding(&self) -> u32 {
        self.area.load32(self.off, Ordering::Relaxed)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::shm::{HeapWords, ShmRead};

    #[test]
    fn tokens_limit_spinners() {
        let t = SpinTokens::new(HeapWords::new(8), 0, 1);
        assert!(t.try_acquire());
        assert!(!t.try_acquire(), "second spinner must block with limit 1");
        t.release();
        assert!(t.try_acquire());
    }

    #[test]
    fn corrupted_token_count_only_blocks_sooner() {
        let area = std::sync::Arc::new(HeapWords::new(8));
        let t = SpinTokens::new(area.clone(), 0, 1);
        for garbage in [u32::MAX, 2, 1 << 31] {
            area.store32(0, garbage, Ordering::Relaxed);
            assert!(!t.try_acquire(), "count {garbage} must not grant a token");
            t.release();
            assert!(area.load32(0, Ordering::Relaxed) < garbage, "release decrements without wrapping");
        }
        area.store32(0, 0, Ordering::Relaxed);
        t.release();
        assert_eq!(area.load32(0, Ordering::Relaxed), 0, "release at zero stays at zero");
    }

    #[test]
    fn spin_budget_follows_wake_cost_within_bounds() {
        let mut p = SpinPolicy::DEFAULT;
        for _ in 0..100 {
            p.record_wake(u64::MAX);
        }
        assert_eq!(p.budget_ns, p.max_ns);
        for _ in 0..200 {
            p.record_wake(0);
        }
        assert_eq!(p.budget_ns, p.min_ns);
        for _ in 0..200 {
            p.record_wake(3_000);
        }
        assert!((2_500..=3_000).contains(&p.budget_ns), "budget {} tracks 3 µs", p.budget_ns);
    }
}
