//! The sender's SACK scoreboard (RFC 2018, RFC 6675): which bytes above
//! `SND.UNA` the peer reported holding, and from that which are lost and how much
//! is still in the network ("pipe").

use crate::seq::Seq;

/// RFC 6675 §2: DupThresh.
pub const DUP_THRESH: usize = 3;

/// At most this many disjoint SACKed ranges are remembered; a peer reporting
/// more loses the highest ones (only making the sender more conservative).
pub const MAX_RANGES: usize = 64;

/// SACKed ranges `[start, end)`, sorted, disjoint and not adjacent, all above
/// the cumulative ACK.
#[derive(Debug, Default, Clone)]
pub struct Scoreboard {
    ranges: Vec<(Seq, Seq)>,
}

impl Scoreboard {
    /// Forgets everything (after a reneging peer's timeout).
    pub fn clear(&mut self) {
        self.ranges.clear();
    }

    /// Is nothing SACKed?
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ranges held.
    pub fn ranges(&self) -> &[(Seq, Seq)] {
        &self.ranges
    }

    /// The cumulative ACK moved to `una`: drop what it covers.
    pub fn acked(&mut self, una: Seq) {
        self.ranges.retain(|&(_, e)| e.gt(una));
        if let Some(first) = self.ranges.first_mut() {
            first.0 = first.0.max(una);
        }
    }

    /// Records a block `[l, r)` the peer reported, given what is acknowledged
    /// (`una`) and sent (`max`). Blocks at or below `una` (D-SACK, RFC 2883) and
    /// blocks beyond anything sent are ignored. Returns the bytes newly SACKed.
    pub fn add(&mut self, l: Seq, r: Seq, una: Seq, max: Seq) -> usize {
        if !l.lt(r) || r.le(una) || r.gt(max) || r.since(l) > max.since(una) {
            return 0;
        }
        let l = l.max(una);
        let before = self.sacked_between(l, r);
        // Merge with every range it overlaps or touches.
        let mut start = l;
        let mut end = r;
        self.ranges.retain(|&(s, e)| {
            let touches = s.le(end) && start.le(e);
            if touches {
                start = start.min(s);
                end = end.max(e);
            }
            !touches
        });
        let at = self.ranges.iter().position(|&(s, _)| s.gt(start)).unwrap_or(self.ranges.len());
        self.ranges.insert(at, (start, end));
        self.ranges.truncate(MAX_RANGES);
        r.since(l) - before
    }

    /// SACKed bytes within `[a, b)`.
    pub fn sacked_between(&self, a: Seq, b: Seq) -> usize {
        self.ranges.iter().filter(|&&(s, e)| s.lt(b) && a.lt(e)).map(|&(s, e)| e.min(b).since(s.max(a))).sum()
    }

    /// Bytes within `[a, b)` not SACKed.
    pub fn unsacked_between(&self, a: Seq, b: Seq) -> usize {
        if !a.lt(b) {
            return 0;
        }
        b.since(a) - self.sacked_between(a, b)
    }

    /// The end of the SACKed range holding `s`, if one does.
    pub fn sacked_until(&self, s: Seq) -> Option<Seq> {
        self.ranges.iter().find(|&&(a, e)| a.le(s) && s.lt(e)).map(|&(_, e)| e)
    }

    /// The start of the first SACKed range beginning after `s`.
    pub fn next_sacked_after(&self, s: Seq) -> Option<Seq> {
        self.ranges.iter().map(|&(a, _)| a).find(|a| a.gt(s))
    }

    /// The highest SACKed sequence number (the end of the top range).
    pub fn highest(&self) -> Option<Seq> {
        self.ranges.last().map(|&(_, e)| e)
    }

    /// RFC 6675 §4 IsLost, as a boundary: every un-SACKed byte below the returned
    /// sequence number has DupThresh SACKed ranges, or more than
    /// (DupThresh − 1)·SMSS SACKed bytes, above it. `una` when nothing is lost.
    pub fn lost_below(&self, una: Seq, mss: usize) -> Seq {
        let mut bytes = 0;
        for (n, &(s, e)) in self.ranges.iter().rev().enumerate() {
            bytes += e.since(s);
            if n + 1 >= DUP_THRESH || bytes > (DUP_THRESH - 1) * mss {
                return s;
            }
        }
        una
    }

    /// The first un-SACKed range at or after `from` and below `limit`: its start
    /// and length.
    pub fn hole(&self, from: Seq, limit: Seq) -> Option<(Seq, usize)> {
        let mut at = from;
        while let Some(end) = self.sacked_until(at) {
            at = end;
        }
        if !at.lt(limit) {
            return None;
        }
        let end = self.next_sacked_after(at).map_or(limit, |n| n.min(limit));
        Some((at, end.since(at)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_merge_and_trim() {
        let mut sb = Scoreboard::default();
        let (una, max) = (Seq(1000), Seq(20_000));
        assert_eq!(sb.add(Seq(3000), Seq(4000), una, max), 1000);
        assert_eq!(sb.add(Seq(5000), Seq(6000), una, max), 1000);
        assert_eq!(sb.add(Seq(3500), Seq(5000), una, max), 1000, "bridges the gap");
        assert_eq!(sb.ranges(), &[(Seq(3000), Seq(6000))]);
        assert_eq!(sb.add(Seq(500), Seq(1000), una, max), 0, "D-SACK below una is ignored");
        assert_eq!(sb.add(Seq(19_000), Seq(21_000), una, max), 0, "beyond anything sent");
        sb.acked(Seq(4000));
        assert_eq!(sb.ranges(), &[(Seq(4000), Seq(6000))]);
        assert_eq!(sb.unsacked_between(Seq(4000), Seq(7000)), 1000);
    }

    #[test]
    fn is_lost_after_three_ranges_or_enough_bytes() {
        let mss = 1000;
        let mut sb = Scoreboard::default();
        let (una, max) = (Seq(0), Seq(100_000));
        sb.add(Seq(2000), Seq(3000), una, max);
        assert_eq!(sb.lost_below(una, mss), una, "one segment SACKed: nothing lost yet");
        sb.add(Seq(4000), Seq(5000), una, max);
        sb.add(Seq(6000), Seq(7000), una, max);
        assert_eq!(sb.lost_below(una, mss), Seq(2000), "three ranges above 0..2000");
        let mut sb = Scoreboard::default();
        sb.add(Seq(10_000), Seq(13_000), una, max);
        assert_eq!(sb.lost_below(una, mss), Seq(10_000), "more than 2 MSS above");
        assert_eq!(sb.hole(Seq(0), Seq(20_000)), Some((Seq(0), 10_000)));
        assert_eq!(sb.hole(Seq(10_500), Seq(20_000)), Some((Seq(13_000), 7000)));
    }
}
