//! One module per domain: what its runtime keeps beside its core (its links to
//! domains of other groups, what waits on them) and how it serves the
//! messages of each edge it ends. [`crate::Cores`] holds those of one group and
//! moves outputs between them; [`driver`] is the driver domain's device threads.
pub mod driver;
pub mod ip;
pub mod sockets;
pub mod tcp;
pub mod udp;
