//! Congestion control behind a trait: the seam where other algorithms plug in.
//!
//! The sender owns loss detection and recovery bookkeeping (duplicate ACKs, the
//! SACK scoreboard, the recovery point, go-back-N after a timeout); an algorithm
//! only decides the window: how it grows on ACKs and where it lands after a loss.
//! Each algorithm is its own module; [`Algorithm`] names them for configuration
//! (per domain in [`crate::Config`], per socket through
//! [`crate::TcpCore::set_option`]).

use std::fmt::Debug;
use std::str::FromStr;

use smoltcp::time::{Duration, Instant};

pub mod cubic;
pub mod newreno;

pub use cubic::Cubic;
pub use newreno::NewReno;

/// An acknowledgment of new data, outside loss recovery.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    /// Bytes newly acknowledged.
    pub acked: usize,
    /// The sender's maximum segment size.
    pub mss: usize,
    /// When it arrived.
    pub now: Instant,
    /// The smoothed round-trip time (before the first sample: the initial RTO).
    pub srtt: Duration,
}

/// A congestion control algorithm, in bytes.
pub trait CongestionControl: Debug + Send {
    /// Its name, as `capnet status --sockets` shows it.
    fn name(&self) -> &'static str;
    /// The congestion window.
    fn cwnd(&self) -> usize;
    /// The slow-start threshold.
    fn ssthresh(&self) -> usize;
    /// New data was acknowledged outside loss recovery.
    fn on_ack(&mut self, ack: &Ack);
    /// A loss event detected by duplicate ACKs or SACK (fast retransmit):
    /// `flight` bytes were outstanding. Sets the window recovery runs with.
    fn on_loss(&mut self, now: Instant, flight: usize, mss: usize);
    /// Recovery ended (the recovery point was acknowledged) with `flight` bytes
    /// still outstanding.
    fn on_recovered(&mut self, flight: usize, mss: usize);
    /// The retransmission timer expired.
    fn on_timeout(&mut self, now: Instant, flight: usize, mss: usize);
}

/// RFC 6928: the initial window, 10 segments (capped at 14600 bytes).
pub fn initial_window(mss: usize) -> usize {
    (10 * mss).min(14600.max(2 * mss))
}

/// The algorithms the core ships, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// RFC 5681 + RFC 6582: the default.
    #[default]
    NewReno,
    /// RFC 9438.
    Cubic,
}

impl Algorithm {
    /// Every algorithm.
    pub const ALL: [Algorithm; 2] = [Algorithm::NewReno, Algorithm::Cubic];

    /// Its name (what [`FromStr`] reads).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::NewReno => "newreno",
            Algorithm::Cubic => "cubic",
        }
    }

    /// A fresh instance for a connection with `mss`.
    pub fn build(self, mss: usize) -> Box<dyn CongestionControl> {
        match self {
            Algorithm::NewReno => Box::new(NewReno::new(mss)),
            Algorithm::Cubic => Box::new(Cubic::new(mss)),
        }
    }

    /// An instance taking over a running connection's window and threshold.
    pub fn take_over(self, cwnd: usize, ssthresh: usize) -> Box<dyn CongestionControl> {
        match self {
            Algorithm::NewReno => Box::new(NewReno::with_window(cwnd, ssthresh)),
            Algorithm::Cubic => Box::new(Cubic::with_window(cwnd, ssthresh)),
        }
    }
}

impl FromStr for Algorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Algorithm::ALL.into_iter().find(|a| a.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Algorithm::ALL.iter().map(|a| a.name()).collect();
            format!("unknown congestion control {s:?} (known: {})", names.join(", "))
        })
    }
}
