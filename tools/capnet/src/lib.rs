//! capnet: the client library applications link to use a running capnet stack
//! ([`net`], mirroring `std::net`), and the attach handshake they share with the
//! supervisor ([`attach`]). The `capnet` binary (CLI and supervisor) is built from
//! the same package.
#![forbid(unsafe_code)]

pub mod attach;
pub mod graph;
pub mod group;
pub mod net;
pub mod report;
