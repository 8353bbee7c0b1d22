//! capnet: the client library applications link to use a running capnet stack
//! ([`net`], mirroring `std::net`), and the attach handshake that gives an
//! application its own channel to the sockets domain ([`attach`]; the supervisor
//! serves the other side of it).
//!
//! It depends on ipc (the channel), the application protocol (`capnet-proto`)
//! and kernel-shim's capability passing only: an application compiles no core,
//! no supervisor, no sandbox and no CLI.
#![forbid(unsafe_code)]

pub mod attach;
pub mod net;
