//! Sequence numbers: 32-bit, compared modulo 2^32 (RFC 9293 §3.4).

/// A TCP sequence number. Ordering is circular, so it is not `Ord`: use
/// [`Seq::lt`] and friends, valid while the two numbers are within 2^31.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Seq(pub u32);

impl Seq {
    /// `self + n`, wrapping.
    pub fn plus(self, n: usize) -> Seq {
        Seq(self.0.wrapping_add(n as u32))
    }

    /// `self - n`, wrapping.
    pub fn minus(self, n: usize) -> Seq {
        Seq(self.0.wrapping_sub(n as u32))
    }

    /// The signed distance `self - other`.
    pub fn diff(self, other: Seq) -> i64 {
        i64::from(self.0.wrapping_sub(other.0) as i32)
    }

    /// The distance from `from` to `self` when `self` is not before `from` (else 0).
    pub fn since(self, from: Seq) -> usize {
        self.diff(from).max(0) as usize
    }

    /// `self < other` circularly.
    pub fn lt(self, other: Seq) -> bool {
        self.diff(other) < 0
    }

    /// `self <= other` circularly.
    pub fn le(self, other: Seq) -> bool {
        self.diff(other) <= 0
    }

    /// `self > other` circularly.
    pub fn gt(self, other: Seq) -> bool {
        self.diff(other) > 0
    }

    /// `self >= other` circularly.
    pub fn ge(self, other: Seq) -> bool {
        self.diff(other) >= 0
    }

    /// The later of two.
    pub fn max(self, other: Seq) -> Seq {
        if self.ge(other) {
            self
        } else {
            other
        }
    }

    /// The earlier of two.
    pub fn min(self, other: Seq) -> Seq {
        if self.le(other) {
            self
        } else {
            other
        }
    }
}

impl From<smoltcp::wire::TcpSeqNumber> for Seq {
    fn from(s: smoltcp::wire::TcpSeqNumber) -> Self {
        Seq(s.0 as u32)
    }
}

impl From<Seq> for smoltcp::wire::TcpSeqNumber {
    fn from(s: Seq) -> Self {
        smoltcp::wire::TcpSeqNumber(s.0 as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::Seq;

    #[test]
    fn comparisons_wrap() {
        let a = Seq(u32::MAX - 1);
        let b = a.plus(4);
        assert_eq!(b, Seq(2));
        assert!(a.lt(b) && b.gt(a) && a.le(a) && b.ge(b));
        assert_eq!(b.since(a), 4);
        assert_eq!(a.since(b), 0);
        assert_eq!(b.minus(4), a);
    }
}
