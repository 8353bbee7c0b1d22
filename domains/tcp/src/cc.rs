//! Congestion control behind a trait: the seam where other algorithms plug in.
//!
//! The sender owns loss detection and recovery bookkeeping (duplicate ACKs, the
//! NewReno recovery point, go-back-N after a timeout); an algorithm only decides the
//! window: how it grows on ACKs and where it lands after a loss.

use std::fmt::Debug;

/// A congestion control algorithm, in bytes.
pub trait CongestionControl: Debug + Send {
    /// Its name, as `capnet status --sockets` shows it.
    fn name(&self) -> &'static str;
    /// The congestion window.
    fn cwnd(&self) -> usize;
    /// The slow-start threshold.
    fn ssthresh(&self) -> usize;
    /// `acked` new bytes were acknowledged outside loss recovery.
    fn on_ack(&mut self, acked: usize, mss: usize);
    /// Loss detected by duplicate ACKs (fast retransmit): `flight` bytes were
    /// outstanding. Sets the window recovery starts from.
    fn on_loss(&mut self, flight: usize, mss: usize);
    /// Recovery ended (the recovery point was acknowledged).
    fn on_recovered(&mut self, flight: usize, mss: usize);
    /// The retransmission timer expired.
    fn on_timeout(&mut self, flight: usize, mss: usize);
}

/// RFC 6928: the initial window, 10 segments (capped at 14600 bytes).
pub fn initial_window(mss: usize) -> usize {
    (10 * mss).min(14600.max(2 * mss))
}

/// NewReno's window rules (RFC 5681 §3.1; recovery per RFC 6582 lives in the
/// sender).
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
        Self { cwnd: initial_window(mss), ssthresh: usize::MAX, avoid_acked: 0 }
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

    fn on_ack(&mut self, acked: usize, mss: usize) {
        if self.cwnd < self.ssthresh {
            // RFC 5681 §3.1 (with RFC 3465's L = 1 SMSS): cwnd += min(N, SMSS).
            self.cwnd += acked.min(mss);
        } else {
            // RFC 5681 §3.1, congestion avoidance by byte counting: one SMSS per
            // cwnd's worth of acknowledged bytes.
            self.avoid_acked += acked;
            if self.avoid_acked >= self.cwnd {
                self.avoid_acked -= self.cwnd;
                self.cwnd += mss;
            }
        }
    }

    fn on_loss(&mut self, flight: usize, mss: usize) {
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

    fn on_timeout(&mut self, flight: usize, mss: usize) {
        // RFC 5681 §3.1 (4) and the loss window LW = 1 SMSS.
        self.ssthresh = (flight / 2).max(2 * mss);
        self.cwnd = mss;
        self.avoid_acked = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newreno_halves_on_loss_and_restarts_on_timeout() {
        let mss = 1000;
        let mut c = NewReno::new(mss);
        assert_eq!(c.cwnd(), 10_000);
        c.on_ack(5000, mss);
        assert_eq!(c.cwnd(), 11_000, "slow start grows by at most one MSS per ACK");
        c.on_loss(20_000, mss);
        assert_eq!((c.cwnd(), c.ssthresh()), (10_000, 10_000));
        for _ in 0..10 {
            c.on_ack(1000, mss);
        }
        assert_eq!(c.cwnd(), 11_000, "congestion avoidance: one MSS per window");
        c.on_timeout(3000, mss);
        assert_eq!((c.cwnd(), c.ssthresh()), (1000, 2000));
    }
}
