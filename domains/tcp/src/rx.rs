//! The receive side's queues: data in order for the application, and a
//! bounded queue of segments that arrived ahead of a hole — both chains of
//! handles on the buffers the segments arrived in (nothing is copied here).

use capnet_ipc::lent::Chain;

use crate::seq::Seq;

/// Out-of-order data, sorted by sequence number, contiguous pieces joined:
/// bounded in bytes (by the window) and in the number of holes.
#[derive(Debug, Default)]
pub struct OutOfOrder {
    /// (start, data, FIN after the data); no two touch.
    segs: Vec<(Seq, Chain, bool)>,
    bytes: usize,
}

/// At most this many disjoint ranges are held ahead of a hole.
pub const MAX_OOO_SEGMENTS: usize = 256;

impl OutOfOrder {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Handles held on a lender's pool (against the loan quota).
    pub fn loans(&self) -> usize {
        self.segs.iter().map(|(_, d, _)| d.loans()).sum()
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
    pub fn insert(&mut self, seq: Seq, data: &Chain, fin: bool, max_bytes: usize) -> bool {
        if self.bytes + data.len() > max_bytes {
            return false;
        }
        // Cut `data` into the pieces not covered yet.
        let mut pieces: Vec<(Seq, Chain, bool)> = Vec::new();
        let (mut start, end) = (seq, seq.plus(data.len()));
        for (s, d, _) in &self.segs {
            let e = s.plus(d.len());
            if e.le(start) || s.ge(end) {
                continue;
            }
            if s.gt(start) {
                let from = start.since(seq);
                pieces.push((start, data.range(from, s.since(seq) - from), false));
            }
            start = start.max(e);
        }
        if start.lt(end) {
            pieces.push((start, data.range(start.since(seq), end.since(start)), fin));
        } else if fin {
            // Only the FIN is new: remember it on the segment that ends there.
            if let Some(last) = self.segs.iter_mut().find(|(s, d, _)| s.plus(d.len()) == end) {
                last.2 = true;
            }
        }
        let mut held = true;
        for (at_seq, piece, piece_fin) in pieces {
            if piece.is_empty() && !piece_fin {
                continue;
            }
            let at = self.segs.iter().position(|(s, _, _)| s.gt(at_seq)).unwrap_or(self.segs.len());
            let end = at_seq.plus(piece.len());
            let touches = self.segs.get(at).is_some_and(|n| n.0 == end)
                || at
                    .checked_sub(1)
                    .is_some_and(|i| !self.segs[i].2 && self.segs[i].0.plus(self.segs[i].1.len()) == at_seq);
            if !touches && self.segs.len() >= MAX_OOO_SEGMENTS {
                held = false;
                continue;
            }
            self.bytes += piece.len();
            self.segs.insert(at, (at_seq, piece, piece_fin));
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
        self.segs[i].1.append(next);
        self.segs[i].2 = fin;
    }

    /// Moves what now continues at `nxt` onto `buf`; returns the new `rcv_nxt`
    /// and whether a FIN was reached.
    pub fn drain_into(&mut self, mut nxt: Seq, buf: &mut Chain) -> (Seq, bool) {
        let mut fin = false;
        while let Some((s, d, f)) = self.segs.first() {
            if s.gt(nxt) {
                break;
            }
            let end = s.plus(d.len());
            let (s, f) = (*s, *f);
            let (_, mut d, _) = self.segs.remove(0);
            self.bytes -= d.len();
            if end.gt(nxt) {
                d.advance(nxt.since(s));
                buf.append(d);
                nxt = end;
            }
            if f && nxt == end {
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

    fn l(b: &[u8]) -> Chain {
        Chain::from(b)
    }

    #[test]
    fn holes_fill_in_order_and_overlaps_keep_old_bytes() {
        let mut q = OutOfOrder::default();
        assert!(q.insert(Seq(10), &l(b"klmno"), false, 1000));
        assert!(q.insert(Seq(5), &l(b"FGHIJKL"), false, 1000)); // overlaps the head of 10..15
        assert_eq!(q.bytes(), 10);
        assert!(q.insert(Seq(15), &l(b"pq"), true, 1000));
        assert_eq!(q.ranges().collect::<Vec<_>>(), vec![(Seq(5), Seq(17))], "touching pieces are one range");
        let mut buf = Chain::new();
        let (nxt, fin) = q.drain_into(Seq(3), &mut buf);
        assert_eq!((nxt, fin), (Seq(3), false), "a hole at 3..5 holds everything back");
        buf.append(l(b"de"));
        let (nxt, fin) = q.drain_into(Seq(5), &mut buf);
        assert_eq!(buf.to_vec(), b"deFGHIJklmnopq");
        assert_eq!((nxt, fin), (Seq(17), true));
        assert!(q.is_empty() && q.bytes() == 0);
    }

    #[test]
    fn bounded() {
        let mut q = OutOfOrder::default();
        assert!(!q.insert(Seq(0), &l(&[0; 100]), false, 50));
        for i in 0..MAX_OOO_SEGMENTS {
            assert!(q.insert(Seq(i as u32 * 10), &l(b"x"), false, 1 << 20));
        }
        assert!(q.insert(Seq(1), &l(b"y"), false, 1 << 20), "touching an existing range costs no entry");
        assert!(!q.insert(Seq(100_000), &l(b"x"), false, 1 << 20));
    }
}
