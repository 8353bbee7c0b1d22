//! Single-producer single-consumer rings split across two single-writer areas.
//!
//! The producer's area holds the slots and the tail; the consumer's area holds the
//! head. Each side writes only its own area and keeps a private copy of its own index
//! and a cached copy of the peer's, so a hot loop touches the peer's cache line only
//! when the cache runs out. Indices run free (wrapping `u32`), capacity is a power of
//! two, slot `i` lives at `i & (capacity - 1)`.
//!
//! Distrust: every peer index is loaded once, then checked. A tail that went
//! backwards or is more than `capacity` ahead of our head, or a head that passed our
//! tail, is a [`RingError`] — the ring is then broken for good and every later call
//! returns the same error; it never panics, loops or reads outside its area. Slots
//! are copied out word by word with atomic loads before anyone looks at them.

use std::marker::PhantomData;
use std::mem::size_of;

use crate::descriptor::{from_words, to_words, ShmSafe, MAX_SLOT_WORDS};
use crate::shm::{ShmRead, ShmWrite};
use crate::sync::Ordering;

/// A peer broke the ring protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The producer's tail moved backwards.
    #[error("peer's tail went backwards ({seen} after {before}); cutting the channel off")]
    TailBackwards {
        /// Tail seen before.
        before: u32,
        /// Tail seen now.
        seen: u32,
    },
    /// The producer's tail claims more entries than the ring holds.
    #[error("peer's tail {tail} is more than the capacity ahead of head {head}; cutting the channel off")]
    TailOverrun {
        /// Our head.
        head: u32,
        /// The claimed tail.
        tail: u32,
    },
    /// The consumer's head went backwards or passed our tail.
    #[error("peer's head {seen} is outside [{before}, {tail}]; cutting the channel off")]
    HeadOutOfRange {
        /// Head seen before.
        before: u32,
        /// Head seen now.
        seen: u32,
        /// Our tail.
        tail: u32,
    },
}

/// Where a ring lives inside its two areas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Number of slots, a power of two.
    pub capacity: u32,
    /// Byte offset of the first slot in the producer's area (8-aligned).
    pub slots: usize,
    /// Byte offset of the tail word in the producer's area.
    pub tail: usize,
    /// Byte offset of the head word in the consumer's area.
    pub head: usize,
}

impl RingLayout {
    /// Bytes of slot storage for `T`.
    pub fn slot_bytes<T>(&self) -> usize {
        self.capacity as usize * size_of::<T>()
    }
}

fn words_of<T: ShmSafe>() -> usize {
    const {
        assert!(
            size_of::<T>() > 0 && size_of::<T>() % 8 == 0 && size_of::<T>() <= MAX_SLOT_WORDS * 8,
            "ring slots are 1 to MAX_SLOT_WORDS whole 64-bit words"
        )
    };
    size_of::<T>() / 8
}

/// The writing side of a ring.
#[derive(Debug)]
pub struct Producer<M, P, T> {
    mine: M,
    peer: P,
    layout: RingLayout,
    tail: u32,
    cached_head: u32,
    broken: Option<RingError>,
    /// Private staging for slot words (allocated once: no per-call zeroing).
    scratch: Box<[u64]>,
    _t: PhantomData<T>,
}

impl<M: ShmWrite, P: ShmRead, T: ShmSafe> Producer<M, P, T> {
    /// A producer writing slots and tail into `mine` and reading the head from `peer`.
    /// Both indices start at what the areas hold now (zero for fresh areas).
    pub fn new(mine: M, peer: P, layout: RingLayout) -> Self {
        assert!(layout.capacity.is_power_of_two(), "ring capacity must be a power of two");
        assert!(layout.slots + layout.slot_bytes::<T>() <= mine.len(), "ring slots exceed the area");
        let tail = mine.load32(layout.tail, Ordering::Relaxed);
        Self { mine, peer, layout, tail, cached_head: tail, broken: None, scratch: scratch(), _t: PhantomData }
    }

    /// The producer's own area.
    pub fn mine(&self) -> &M {
        &self.mine
    }

    /// The peer's area.
    pub fn peer(&self) -> &P {
        &self.peer
    }

    /// Free slots as of the last look at the peer's head, refreshing it if `want`
    /// more are needed than the cache promises.
    pub fn free(&mut self, want: usize) -> Result<usize, RingError> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        let cap = self.layout.capacity;
        let mut free = cap - self.tail.wrapping_sub(self.cached_head);
        if (free as usize) < want {
            // Acquire pairs with the Release store of the head in `Consumer::pop`:
            // the consumer has finished copying every slot before the head passes it,
            // so we may overwrite those slots now.
            let seen = self.peer.load32(self.layout.head, Ordering::Acquire);
            let moved = seen.wrapping_sub(self.cached_head);
            if moved > self.tail.wrapping_sub(self.cached_head) {
                let e = RingError::HeadOutOfRange { before: self.cached_head, seen, tail: self.tail };
                self.broken = Some(e);
                return Err(e);
            }
            self.cached_head = seen;
            free = cap - self.tail.wrapping_sub(seen);
        }
        Ok(free as usize)
    }

    /// Pushes as many of `items` as fit, in order; returns how many.
    pub fn push(&mut self, items: &[T]) -> Result<usize, RingError> {
        let n = self.free(items.len())?.min(items.len());
        if n == 0 {
            return Ok(0);
        }
        let words = words_of::<T>();
        let buf = &mut self.scratch;
        let mut done = 0;
        while done < n {
            // One run: contiguous slots (up to the wrap) that fit the stack buffer.
            let k = run_len(self.layout.capacity, self.tail.wrapping_add(done as u32), n - done, words);
            let slot = (self.tail.wrapping_add(done as u32) & (self.layout.capacity - 1)) as usize;
            for (j, item) in items[done..done + k].iter().enumerate() {
                to_words(item, &mut buf[j * words..(j + 1) * words]);
            }
            self.mine.store64_run(self.layout.slots + slot * size_of::<T>(), &buf[..k * words]);
            done += k;
        }
        self.tail = self.tail.wrapping_add(n as u32);
        // Release pairs with the Acquire load of the tail in `Consumer::available`:
        // the slot stores above are visible before the consumer sees the new tail.
        self.mine.store32(self.layout.tail, self.tail, Ordering::Release);
        Ok(n)
    }

    /// Entries pushed but not yet known to be consumed.
    pub fn in_flight(&self) -> u32 {
        self.tail.wrapping_sub(self.cached_head)
    }
}

/// Words copied per run through a stack buffer.
const RUN_WORDS: usize = 256;

fn scratch() -> Box<[u64]> {
    vec![0; RUN_WORDS].into_boxed_slice()
}

/// Slots in the next contiguous run from `index`: at most `left`, not past the
/// wrap, and fitting [`RUN_WORDS`].
fn run_len(capacity: u32, index: u32, left: usize, words: usize) -> usize {
    let to_wrap = (capacity - (index & (capacity - 1))) as usize;
    left.min(to_wrap).min(RUN_WORDS / words)
}

/// The reading side of a ring.
#[derive(Debug)]
pub struct Consumer<M, P, T> {
    mine: M,
    peer: P,
    layout: RingLayout,
    head: u32,
    cached_tail: u32,
    broken: Option<RingError>,
    /// Private staging for slot words copied out of the peer's area.
    scratch: Box<[u64]>,
    _t: PhantomData<T>,
}

impl<M: ShmWrite, P: ShmRead, T: ShmSafe> Consumer<M, P, T> {
    /// A consumer reading slots and tail from `peer` and writing its head into `mine`.
    pub fn new(mine: M, peer: P, layout: RingLayout) -> Self {
        assert!(layout.capacity.is_power_of_two(), "ring capacity must be a power of two");
        let head = mine.load32(layout.head, Ordering::Relaxed);
        Self { mine, peer, layout, head, cached_tail: head, broken: None, scratch: scratch(), _t: PhantomData }
    }

    /// The consumer's own area.
    pub fn mine(&self) -> &M {
        &self.mine
    }

    /// The peer's area.
    pub fn peer(&self) -> &P {
        &self.peer
    }

    /// Entries ready to pop, refreshing the cached tail when the cache is empty.
    pub fn available(&mut self) -> Result<usize, RingError> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        let mut avail = self.cached_tail.wrapping_sub(self.head);
        if avail == 0 {
            // Acquire pairs with the Release store of the tail in `Producer::push`.
            let seen = self.peer.load32(self.layout.tail, Ordering::Acquire);
            let ahead = seen.wrapping_sub(self.head);
            if ahead > self.layout.capacity {
                let e = if (seen.wrapping_sub(self.cached_tail) as i32) < 0 {
                    RingError::TailBackwards { before: self.cached_tail, seen }
                } else {
                    RingError::TailOverrun { head: self.head, tail: seen }
                };
                self.broken = Some(e);
                return Err(e);
            }
            self.cached_tail = seen;
            avail = ahead;
        }
        Ok(avail as usize)
    }

    /// Pops up to `max` entries into `out`; returns how many.
    pub fn pop(&mut self, out: &mut Vec<T>, max: usize) -> Result<usize, RingError> {
        let n = self.available()?.min(max);
        if n == 0 {
            return Ok(0);
        }
        let words = words_of::<T>();
        out.reserve(n);
        let buf = &mut self.scratch;
        let mut done = 0;
        while done < n {
            let k = run_len(self.layout.capacity, self.head.wrapping_add(done as u32), n - done, words);
            let slot = (self.head.wrapping_add(done as u32) & (self.layout.capacity - 1)) as usize;
            self.peer.load64_run(self.layout.slots + slot * size_of::<T>(), &mut buf[..k * words]);
            out.extend(buf[..k * words].chunks_exact(words).map(from_words::<T>));
            done += k;
        }
        self.head = self.head.wrapping_add(n as u32);
        // Release pairs with the Acquire load of the head in `Producer::free`: our
        // copies of the slots are complete before the producer may reuse them.
        self.mine.store32(self.layout.head, self.head, Ordering::Release);
        Ok(n)
    }
}
