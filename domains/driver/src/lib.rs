//! capnet-driver: the driver domain's device-independent parts.
//!
//! - [`impair`]: a seeded impairment stage — loss, duplication, reordering, delay
//!   and corruption per direction — because this kernel has no netem and tests
//!   still need a bad network;
//! - [`wire`]: the in-memory wire joining two stack instances with no system calls
//!   (the benchmark's pure-stack-cost path);
//! - [`capture`]: a pcap writer for the frames the driver moves.
//!
//! Like the protocol cores they take `now` as an argument and never read a clock.

#![forbid(unsafe_code)]

pub mod capture;
pub mod impair;
pub mod vnet;
pub mod wire;
