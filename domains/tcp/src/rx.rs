//! The receive side's byte queues: data in order for the application, and a
//! bounded queue of segments that arrived ahead of a hole.

use std::collections::VecDeque;

use crate::seq::Seq;

/// Out-of-order data, sorted by sequence number, contiguous pieces joined:
/// bounded in bytes (by the window) and in the number of holes.
#[derive(Debug, Default)]
pub struct OutOfOrder {
    /// (start, data, FIN after the data); no two touch.
    segs: Vec<(Seq, Vec<u8>, bool)>,
    bytes: usize,
}

/// At most this many disjoint ranges are held ahead of a hole.
pub const MAX_OOO_SEGMENTS: usize = 256;

impl OutOfOrder {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Is nothing held?
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// The ranges held, `[start, end)`, in sequence order: what a SACK option
    /// reports (RFC 2018 §3).
    pub fn ranges(&self) -> impl DoubleEndedIterator<Item = (Seq, Seq)> + '_ {
        self.segs.iter().map(|(s, d, _)| (*s, s.plus(d.len()))).filter(|(s, e)| s != e)
    }

    /// Holds `data` starting at `seq` (already trimmed to the window, beyond
    /// `rcv_nxt`). Overlaps with what is held keep the older bytes. Returns false
    /// when the bytes would overflow the window, or a piece would be one range
    /// too many (what was held is kept).
    pub fn insert(&mut self, seq: Seq, data: &[u8], fin: bool, max_bytes: usize) -> bool {
        if self.bytes + data.len() > max_bytes {
            return false;
        }
        // Cut `data` into the pieces not covered yet.
        let mut pieces: Vec<(Seq, Vec<u8>, bool)> = Vec::new();
        let (mut start, end) = (seq, seq.plus(data.len()));
        for (s, d, _) in &self.segs {
            let e = s.plus(d.len());
            if e.le(start) || s.ge(end) {
                continue;
            }
            if s.gt(start) {
                let from = start.since(seq);
                pieces.push((start, data[from..s.since(seq)].to_vec(), false));
            }
            start = start.max(e);
        }
        if start.lt(end) {
            pieces.push((start, data[start.since(seq)..].to_vec(), fin));
        } else if fin {
            // Only the FIN is new: remember it on the segment that ends there.
            if let Some(last) = self.segs.iter_mut().find(|(s, d, _)| s.plus(d.len()) == end) {
                last.2 = true;
            }
        }
        let mut held = true;
        for p in pieces {
            if p.1.is_empty() && !p.2 {
                continue;
            }
            let at = self.segs.iter().position(|(s, _, _)| s.gt(p.0)).unwrap_or(self.segs.len());
            let end = p.0.plus(p.1.len());
            let touches = self.segs.get(at).is_some_and(|n| n.0 == end)
                || at
                    .checked_sub(1)
                    .is_some_and(|i| !self.segs[i].2 && self.segs[i].0.plus(self.segs[i].1.len()) == p.0);
            if !touches && self.segs.len() >= MAX_OOO_SEGMENTS {
                held = false;
                continue;
            }
            self.bytes += p.1.len();
            self.segs.insert(at, p);
            // Join it to the neighbours it touches: one entry per range.
            if at + 1 < self.segs.len() {
                self.join(at);
            }
            if at > 0 {
                self.join(at - 1);
            }
        }
        held
    }

    /// Joins entry `i` and the next if they touch (and `i` has no FIN).
    fn join(&mut self, i: usize) {
        let (s, d, f) = &self.segs[i];
        if *f || s.plus(d.len()) != self.segs[i + 1].0 {
            return;
        }
        let (_, next, fin) = self.segs.remove(i + 1);
        self.segs[i].1.extend_from_slice(&next);
        self.segs[i].2 = fin;
    }

    /// Moves what now continues at `nxt` into `buf`; returns the new `rcv_nxt`
    /// and whether a FIN was reached.
    pub fn drain_into(&mut self, mut nxt: Seq, buf: &mut VecDeque<u8>) -> (Seq, bool) {
        let mut fin = false;
        while let Some((s, d, f)) = self.segs.first() {
            if s.gt(nxt) {
                break;
            }
            let end = s.plus(d.len());
            if end.gt(nxt) {
                buf.extend(&d[nxt.since(*s)..]);
                nxt = end;
            }
            let f = *f && nxt == end;
            self.bytes -= d.len();
            self.segs.remove(0);
            if f {
                fin = true;
                break;
            }
        }
        if fin {
            self.segs.clear();
            self.bytes = 0;
        }
        (nxt, fin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_fill_in_order_and_overlaps_keep_old_bytes() {
        let mut q = OutOfOrder::default();
        assert!(q.insert(Seq(10), b"klmno", false, 1000));
        assert!(q.insert(Seq(5), b"FGHIJKL", false, 1000)); // overlaps the head of 10..15
        assert_eq!(q.bytes(), 10);
        assert!(q.insert(Seq(15), b"pq", true, 1000));
        assert_eq!(q.ranges().collect::<Vec<_>>(), vec![(Seq(5), Seq(17))], "touching pieces are one range");
        let mut buf = VecDeque::new();
        let (nxt, fin) = q.drain_into(Seq(3), &mut buf);
        assert_eq!((nxt, fin), (Seq(3), false), "a hole at 3..5 holds everything back");
        buf.extend(b"de");
        let (nxt, fin) = q.drain_into(Seq(5), &mut buf);
        assert_eq!(buf.iter().copied().collect::<Vec<u8>>(), b"deFGHIJklmnopq");
        assert_eq!((nxt, fin), (Seq(17), true));
        assert!(q.is_empty() && q.bytes() == 0);
    }

    #[test]
    fn bounded() {
        let mut q = OutOfOrder::default();
        assert!(!q.insert(Seq(0), &[0; 100], false, 50));
        for i in 0..MAX_OOO_SEGMENTS {
            assert!(q.insert(Seq(i as u32 * 10), b"x", false, 1 << 20));
        }
        assert!(q.insert(Seq(1), b"y", false, 1 << 20), "touching an existing range costs no entry");
        assert!(!q.insert(Seq(100_000), b"x", false, 1 << 20));
    }
}
