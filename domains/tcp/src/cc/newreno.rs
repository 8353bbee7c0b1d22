//! NewReno's window rules (RFC 5681 §3.1; recovery per RFC 6582 / RFC 6675 lives
//! in the sender).

use smoltcp::time::Instant;

use super::{initial_window, Ack, CongestionControl};

/// NewReno: slow start, then one MSS per window; halve on loss.
#[derive(Debug, Clone)]
pub struct NewReno {
    cwnd: usize,
    ssthresh: usize,
    /// Bytes acknowledged in congestion avoidance, toward the next MSS of growth.
    avoid_acked: usize,
}

impl NewReno {
    /// A connection's start: the initial window, an unbounded threshold.
    pub fn new(mss: usize) -> Self {
        Self::with_window(initial_window(mss), usize::MAX)
    }

    /// Taking over a running connection.
    pub fn with_window(cwnd: usize, ssthresh: usize) -> Self {
        Self { cwnd, ssthresh, avoid_acked: 0 }
    }
}

impl CongestionControl for NewReno {
    fn name(&self) -> &'static str {
        "newreno"
    }

    fn cwnd(&self) -> usize {
        self.cwnd
    }

    fn ssthresh(&self) -> usize {
        self.ssthresh
    }

    fn on_ack(&mut self, ack: &Ack) {
        if self.cwnd < self.ssthresh {
            // RFC 5681 §3.1 (with RFC 3465's L = 1 SMSS): cwnd += min(N, SMSS).
            self.cwnd += ack.acked.min(ack.mss);
        } else {
            // RFC 5681 §3.1, congestion avoidance by byte counting: one SMSS per
            // cwnd's worth of acknowledged bytes.
            self.avoid_acked += ack.acked;
            if self.avoid_acked >= self.cwnd {
                self.avoid_acked -= self.cwnd;
                self.cwnd += ack.mss;
            }
        }
    }

    fn on_loss(&mut self, _now: Instant, flight: usize, mss: usize) {
        // RFC 5681 §3.2 (4): ssthresh = max(FlightSize / 2, 2*SMSS).
        self.ssthresh = (flight / 2).max(2 * mss);
        self.cwnd = self.ssthresh;
        self.avoid_acked = 0;
    }

    fn on_recovered(&mut self, flight: usize, mss: usize) {
        // RFC 6582 §3.2 (3), full acknowledgment, option (2):
        // cwnd = min(ssthresh, max(FlightSize, SMSS) + SMSS).
        self.cwnd = self.ssthresh.min(flight.max(mss) + mss);
    }

    fn on_timeout(&mut self, _now: Instant, flight: usize, mss: usize) {
        // RFC 5681 §3.1 (4) and the loss window LW = 1 SMSS.
        self.ssthresh = (flight / 2).max(2 * mss);
        self.cwnd = mss;
        self.avoid_acked = 0;
    }
}

#[cfg(test)]
mod tests {
    use smoltcp::time::Duration;

    use super::*;

    fn ack(acked: usize) -> Ack {
        Ack { acked, mss: 1000, now: Instant::ZERO, srtt: Duration::from_millis(10) }
    }

    #[test]
    fn halves_on_loss_and_restarts_on_timeout() {
        let mss = 1000;
        let mut c = NewReno::new(mss);
        assert_eq!(c.cwnd(), 10_000);
        c.on_ack(&ack(5000));
        assert_eq!(c.cwnd(), 11_000, "slow start grows by at most one MSS per ACK");
        c.on_loss(Instant::ZERO, 20_000, mss);
        assert_eq!((c.cwnd(), c.ssthresh()), (10_000, 10_000));
        for _ in 0..10 {
            c.on_ack(&ack(1000));
        }
        assert_eq!(c.cwnd(), 11_000, "congestion avoidance: one MSS per window");
        c.on_timeout(Instant::ZERO, 3000, mss);
        assert_eq!((c.cwnd(), c.ssthresh()), (1000, 2000));
    }
}
