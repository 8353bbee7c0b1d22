//! CUBIC (RFC 9438): the window follows a cubic function of the time since the
//! last congestion event, concave up to the window where the loss happened and
//! convex beyond it; never slower than Reno would be (the Reno-friendly region).
//! Slow start is Reno's (HyStart++ is not implemented).

use smoltcp::time::Instant;

use super::{initial_window, Ack, CongestionControl};

/// RFC 9438 §5: C = 0.4 (segments / s³).
pub const C: f64 = 0.4;
/// RFC 9438 §4.6: β_cubic = 0.7.
pub const BETA: f64 = 0.7;

/// RFC 9438 §4.1, eq. 1: W_cubic(t) = C·(t − K)³ + W_max, in segments.
pub fn w_cubic(t: f64, k: f64, w_max: f64) -> f64 {
    C * (t - k).powi(3) + w_max
}

/// RFC 9438 §4.2, eq. 2: K = ∛((W_max − cwnd_epoch) / C), in seconds.
pub fn k_for(w_max: f64, cwnd_epoch: f64) -> f64 {
    ((w_max - cwnd_epoch).max(0.0) / C).cbrt()
}

/// CUBIC's state; windows in segments where the RFC counts segments.
#[derive(Debug, Clone)]
pub struct Cubic {
    /// The congestion window in bytes, with its fraction.
    cwnd: f64,
    ssthresh: usize,
    /// W_max: the window just before the last reduction, segments.
    w_max: f64,
    /// K of the current epoch, seconds.
    k: f64,
    /// t_epoch: when the current congestion avoidance stage began.
    epoch: Option<Instant>,
    /// W_est: the Reno-friendly estimate, segments.
    w_est: f64,
}

impl Cubic {
    /// A connection's start: the initial window, an unbounded threshold.
    pub fn new(mss: usize) -> Self {
        Self::with_window(initial_window(mss), usize::MAX)
    }

    /// Taking over a running connection.
    pub fn with_window(cwnd: usize, ssthresh: usize) -> Self {
        Self { cwnd: cwnd as f64, ssthresh, w_max: 0.0, k: 0.0, epoch: None, w_est: 0.0 }
    }

    /// K and W_max of the current epoch (for tests and observability).
    pub fn epoch(&self) -> (f64, f64) {
        (self.k, self.w_max)
    }

    /// RFC 9438 §4.6 and §4.7: a congestion event.
    fn reduce(&mut self, flight: usize, mss: usize) {
        let seg = mss as f64;
        let cwnd_seg = self.cwnd / seg;
        // §4.7 fast convergence: a window below the last W_max releases bandwidth.
        self.w_max = if cwnd_seg < self.w_max { cwnd_seg * (1.0 + BETA) / 2.0 } else { cwnd_seg };
        // §4.6: ssthresh = flight_size · β_cubic, at least 2 segments.
        self.ssthresh = ((flight as f64 * BETA) as usize).max(2 * mss);
        self.epoch = None;
    }
}

impl CongestionControl for Cubic {
    fn name(&self) -> &'static str {
        "cubic"
    }

    fn cwnd(&self) -> usize {
        self.cwnd as usize
    }

    fn ssthresh(&self) -> usize {
        self.ssthresh
    }

    fn on_ack(&mut self, ack: &Ack) {
        let seg = ack.mss as f64;
        if (self.cwnd as usize) < self.ssthresh {
            // Slow start as Reno (RFC 9438 §4.10 allows HyStart++; not done).
            self.cwnd += ack.acked.min(ack.mss) as f64;
            return;
        }
        let cwnd_seg = self.cwnd / seg;
        let epoch = *self.epoch.get_or_insert_with(|| {
            // §4.2: a new congestion avoidance stage.
            if cwnd_seg < self.w_max {
                self.k = k_for(self.w_max, cwnd_seg);
            } else {
                self.k = 0.0;
                self.w_max = cwnd_seg;
            }
            self.w_est = cwnd_seg;
            ack.now
        });
        let t = (ack.now - epoch).total_micros() as f64 / 1e6;
        let rtt = ack.srtt.total_micros() as f64 / 1e6;
        let acked_seg = ack.acked as f64 / seg;
        // §4.3: the Reno-friendly estimate; α_cubic = 3(1 − β)/(1 + β) until W_est
        // reaches W_max, then 1.
        let alpha = if self.w_est >= self.w_max { 1.0 } else { 3.0 * (1.0 - BETA) / (1.0 + BETA) };
        self.w_est += alpha * acked_seg / cwnd_seg;
        if w_cubic(t, self.k, self.w_max) < self.w_est {
            self.cwnd = self.w_est * seg;
            return;
        }
        // §4.4–4.5: aim at W_cubic one RTT ahead, clamped to [cwnd, 1.5·cwnd], and
        // grow by (target − cwnd)/cwnd per acknowledged segment.
        let target = w_cubic(t + rtt, self.k, self.w_max).clamp(cwnd_seg, 1.5 * cwnd_seg);
        self.cwnd += (target - cwnd_seg) / cwnd_seg * acked_seg * seg;
    }

    fn on_loss(&mut self, _now: Instant, flight: usize, mss: usize) {
        self.reduce(flight, mss);
        self.cwnd = self.ssthresh as f64;
    }

    fn on_recovered(&mut self, flight: usize, mss: usize) {
        // As NewReno (RFC 6582 §3.2 (3) option 2): no burst when recovery ends.
        self.cwnd = (self.ssthresh.min(flight.max(mss) + mss)) as f64;
    }

    fn on_timeout(&mut self, _now: Instant, flight: usize, mss: usize) {
        // §4.8: as a congestion event for ssthresh and W_max, then one segment.
        self.reduce(flight, mss);
        self.cwnd = mss as f64;
    }
}

#[cfg(test)]
mod tests {
    use smoltcp::time::Duration;

    use super::*;

    #[test]
    fn loss_multiplies_by_beta_and_sets_k() {
        let mss = 1000;
        let mut c = Cubic::with_window(100 * mss, usize::MAX);
        c.on_loss(Instant::ZERO, 100 * mss, mss);
        assert_eq!(c.cwnd(), 70 * mss);
        let ack = Ack { acked: mss, mss, now: Instant::from_secs(1), srtt: Duration::from_millis(100) };
        c.on_ack(&ack);
        let (k, w_max) = c.epoch();
        assert_eq!(w_max, 100.0);
        // K = ∛(30 / 0.4) ≈ 4.217 s.
        assert!((k - (30.0f64 / 0.4).cbrt()).abs() < 1e-9);
    }

    #[test]
    fn fast_convergence_lowers_w_max() {
        let mss = 1000;
        let mut c = Cubic::with_window(100 * mss, usize::MAX);
        c.on_loss(Instant::ZERO, 100 * mss, mss);
        c.on_loss(Instant::ZERO, 70 * mss, mss);
        let ack = Ack { acked: mss, mss, now: Instant::from_secs(1), srtt: Duration::from_millis(100) };
        c.on_ack(&ack);
        assert!((c.epoch().1 - 70.0 * 1.7 / 2.0).abs() < 1e-9);
    }
}
