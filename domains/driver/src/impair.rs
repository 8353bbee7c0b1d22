//! Seeded impairment of one direction of a link.
//!
//! Each frame pushed in is, independently and in this order: dropped with
//! probability `loss`; corrupted (one random bit flipped) with probability
//! `corrupt`; duplicated with probability `duplicate`; held back by an extra
//! `reorder_delay` with probability `reorder` (so later frames overtake it); and
//! released after `delay`. The same seed and the same inputs give the same outputs,
//! so a failing test replays exactly.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

/// What to do to a direction's frames.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// Probability a frame is dropped.
    pub loss: f64,
    /// Probability a frame is sent twice.
    pub duplicate: f64,
    /// Probability a frame is held back by `reorder_delay`.
    pub reorder: f64,
    /// How long a reordered frame is held back beyond `delay`.
    pub reorder_delay: Duration,
    /// Probability one bit of a frame is flipped.
    pub corrupt: f64,
    /// Delay every frame by this much.
    pub delay: Duration,
    /// The random seed.
    pub seed: u64,
}

impl Impairment {
    /// No impairment at all.
    pub const NONE: Self = Self {
        loss: 0.0,
        duplicate: 0.0,
        reorder: 0.0,
        reorder_delay: Duration::from_millis(1),
        corrupt: 0.0,
        delay: Duration::ZERO,
        seed: 0,
    };

    /// Only loss, with `seed`.
    pub fn loss(p: f64, seed: u64) -> Self {
        Self { loss: p, seed, ..Self::NONE }
    }

    /// Whether this changes anything (so the driver can skip the stage).
    pub fn is_none(&self) -> bool {
        self.loss == 0.0 && self.duplicate == 0.0 && self.reorder == 0.0 && self.corrupt == 0.0 && self.delay.is_zero()
    }

    /// Checks that probabilities are in [0, 1].
    pub fn validate(&self) -> Result<(), ImpairError> {
        for (name, p) in
            [("loss", self.loss), ("duplicate", self.duplicate), ("reorder", self.reorder), ("corrupt", self.corrupt)]
        {
            if !(0.0..=1.0).contains(&p) {
                return Err(ImpairError { name, value: p });
            }
        }
        Ok(())
    }
}

/// A probability outside [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error("impairment {name} = {value} is not a probability between 0 and 1")]
pub struct ImpairError {
    /// Which setting.
    pub name: &'static str,
    /// Its value.
    pub value: f64,
}

/// What the stage did, for `capnet status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImpairStats {
    /// Frames pushed in.
    pub frames: u64,
    /// Dropped.
    pub dropped: u64,
    /// Sent twice.
    pub duplicated: u64,
    /// Held back.
    pub reordered: u64,
    /// A bit flipped.
    pub corrupted: u64,
}

/// One direction's impairment stage.
#[derive(Debug)]
pub struct Impairer {
    cfg: Impairment,
    rng: Pcg64Mcg,
    seq: u64,
    held: BinaryHeap<Reverse<(Duration, u64, Vec<u8>)>>,
    /// What it did.
    pub stats: ImpairStats,
}

impl Impairer {
    /// A stage with `cfg` (validated).
    pub fn new(cfg: Impairment) -> Result<Self, ImpairError> {
        cfg.validate()?;
        Ok(Self::unchecked(cfg))
    }

    /// A stage that changes nothing.
    pub fn perfect() -> Self {
        Self::unchecked(Impairment::NONE)
    }

    fn unchecked(cfg: Impairment) -> Self {
        Self {
            cfg,
            rng: Pcg64Mcg::seed_from_u64(cfg.seed),
            seq: 0,
            held: BinaryHeap::new(),
            stats: ImpairStats::default(),
        }
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random::<f64>() < p
    }

    /// Takes a frame at `now`.
    pub fn push(&mut self, now: Duration, mut frame: Vec<u8>) {
        self.stats.frames += 1;
        if self.chance(self.cfg.loss) {
            self.stats.dropped += 1;
            return;
        }
        if !frame.is_empty() && self.chance(self.cfg.corrupt) {
            let bit = self.rng.random_range(0..frame.len() * 8);
            frame[bit / 8] ^= 1 << (bit % 8);
            self.stats.corrupted += 1;
        }
        let copies = if self.chance(self.cfg.duplicate) {
            self.stats.duplicated += 1;
            2
        } else {
            1
        };
        let mut at = now + self.cfg.delay;
        if self.chance(self.cfg.reorder) {
            at += self.cfg.reorder_delay;
            self.stats.reordered += 1;
        }
        for i in 0..copies {
            self.seq += 1;
            let f = if i + 1 == copies { std::mem::take(&mut frame) } else { frame.clone() };
            self.held.push(Reverse((at, self.seq, f)));
        }
    }

    /// The next frame due at or before `now`, in release order (ties in arrival
    /// order).
    pub fn pop(&mut self, now: Duration) -> Option<Vec<u8>> {
        if self.held.peek().is_some_and(|Reverse((at, _, _))| *at <= now) {
            return self.held.pop().map(|Reverse((_, _, f))| f);
        }
        None
    }

    /// When the next held frame is due.
    pub fn poll_at(&self) -> Option<Duration> {
        self.held.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Frames held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}
