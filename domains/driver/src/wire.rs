//! The in-memory wire: two stack instances joined with no system calls, each
//! direction through its own impairment stage.

use std::time::Duration;

use crate::impair::{ImpairError, Impairer, Impairment};

/// One end of the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first stack.
    A,
    /// The second stack.
    B,
}

/// A point-to-point Ethernet link in memory.
#[derive(Debug)]
pub struct MemWire {
    a_to_b: Impairer,
    b_to_a: Impairer,
}

impl MemWire {
    /// A wire with the given impairment in each direction.
    pub fn new(a_to_b: Impairment, b_to_a: Impairment) -> Result<Self, ImpairError> {
        Ok(Self { a_to_b: Impairer::new(a_to_b)?, b_to_a: Impairer::new(b_to_a)? })
    }

    /// A perfect wire.
    pub fn perfect() -> Self {
        Self { a_to_b: Impairer::perfect(), b_to_a: Impairer::perfect() }
    }

    /// `from` transmits a frame at `now`.
    pub fn send(&mut self, from: Side, now: Duration, frame: Vec<u8>) {
        self.direction(from).push(now, frame);
    }

    /// The next frame that has arrived at `at` by `now`.
    pub fn recv(&mut self, at: Side, now: Duration) -> Option<Vec<u8>> {
        let from = match at {
            Side::A => Side::B,
            Side::B => Side::A,
        };
        self.direction(from).pop(now)
    }

    /// When the next frame arrives anywhere.
    pub fn poll_at(&self) -> Option<Duration> {
        match (self.a_to_b.poll_at(), self.b_to_a.poll_at()) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        }
    }

    /// The impairment stage of frames sent by `from`.
    pub fn direction(&mut self, from: Side) -> &mut Impairer {
        match from {
            Side::A => &mut self.a_to_b,
            Side::B => &mut self.b_to_a,
        }
    }
}
