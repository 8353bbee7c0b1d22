//! The retransmission timer's estimator (RFC 6298).

use smoltcp::time::Duration;

/// Smoothed RTT, its variation, and the timeout derived from them.
#[derive(Debug, Clone, Copy)]
pub struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    rto: Duration,
    min_rto: Duration,
    max_rto: Duration,
    /// Consecutive timeouts: the timer is `rto << backoff` (RFC 6298 §5.5).
    backoff: u32,
}

/// RFC 6298 §2: the clock granularity G; our clock counts microseconds, so 1 ms is
/// a conservative stand-in.
const GRANULARITY: Duration = Duration::from_millis(1);

impl RttEstimator {
    /// RFC 6298 §2.1: before any measurement, RTO = 1 s (`initial`), clamped.
    pub fn new(initial: Duration, min_rto: Duration, max_rto: Duration) -> Self {
        let rto = initial.max(min_rto).min(max_rto);
        Self { srtt: None, rttvar: Duration::ZERO, rto, min_rto, max_rto, backoff: 0 }
    }

    /// Takes one RTT measurement `r` (Karn: never from a retransmitted segment —
    /// the caller's job) and clears the backoff (RFC 6298 §5.7 is satisfied since a
    /// new sample exists).
    pub fn sample(&mut self, r: Duration) {
        match self.srtt {
            // RFC 6298 §2.2: SRTT <- R, RTTVAR <- R/2.
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            // RFC 6298 §2.3: RTTVAR <- 3/4 RTTVAR + 1/4 |SRTT - R'|,
            // SRTT <- 7/8 SRTT + 1/8 R'.
            Some(srtt) => {
                let delta = if srtt > r { srtt - r } else { r - srtt };
                self.rttvar = (self.rttvar * 3 + delta) / 4;
                self.srtt = Some((srtt * 7 + r) / 8);
            }
        }
        let srtt = self.srtt.unwrap_or(r);
        // RTO <- SRTT + max(G, K*RTTVAR), K = 4; §2.4 rounds up to the minimum.
        self.rto = (srtt + GRANULARITY.max(self.rttvar * 4)).max(self.min_rto).min(self.max_rto);
        self.backoff = 0;
    }

    /// RFC 6298 §5.5: the timer expired; back off.
    pub fn back_off(&mut self) {
        self.backoff = (self.backoff + 1).min(16);
    }

    /// The current timeout, backed off.
    pub fn rto(&self) -> Duration {
        let shifted = self.rto.total_micros().saturating_mul(1u64 << self.backoff);
        Duration::from_micros(shifted).min(self.max_rto)
    }

    /// The smoothed RTT (`None` before the first sample).
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The RTT variation.
    pub fn rttvar(&self) -> Duration {
        self.rttvar
    }

    /// How many times in a row the timer expired.
    pub fn backoff(&self) -> u32 {
        self.backoff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6298_first_and_later_samples() {
        let mut e = RttEstimator::new(Duration::from_secs(1), Duration::from_millis(200), Duration::from_secs(60));
        assert_eq!(e.rto(), Duration::from_secs(1));
        e.sample(Duration::from_millis(100));
        // SRTT 100, RTTVAR 50, RTO = 100 + 200 = 300 ms.
        assert_eq!(e.rto(), Duration::from_millis(300));
        e.sample(Duration::from_millis(100));
        // RTTVAR = 3/4*50 = 37.5, RTO = 100 + 150 = 250 ms.
        assert_eq!(e.rto(), Duration::from_millis(250));
        e.back_off();
        e.back_off();
        assert_eq!(e.rto(), Duration::from_millis(1000));
        for _ in 0..20 {
            e.back_off();
        }
        assert_eq!(e.rto(), Duration::from_secs(60), "bounded by the maximum");
        e.sample(Duration::from_micros(10));
        assert_eq!(e.backoff(), 0, "a new sample clears the backoff");
        for _ in 0..100 {
            e.sample(Duration::from_micros(10));
        }
        assert_eq!(e.rto(), Duration::from_millis(200), "bounded by the minimum");
    }
}
