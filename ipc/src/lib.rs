//! capnet-ipc: the zero-copy shared-memory channels every capnet domain talks over.
//!
//! Domains are separate processes that share nothing but memfd regions the
//! supervisor grants them. This crate is everything that touches that memory:
//!
//! - [`region`]: memfd regions, sealed by their one writer, mapped read-only by others;
//! - [`pool`]: fixed-size buffer pools with headroom, lent out as [`Descriptor`]s;
//! - [`lent`]: handles on lent payload ([`lent::Lent`], [`lent::Chain`]), returned when the last drops;
//! - [`ring`]: SPSC rings split over two single-writer areas, distrusting the peer;
//! - [`channel`]: two rings plus the competitive spin-then-block wake protocol;
//! - [`notify`]: futexes, adaptive spin budgets, spin tokens;
//! - [`control`]: rkyv control messages validated on a private copy.
//!
//! It is one of the two crates allowed `unsafe` (the other is `kernel-shim`): shared
//! memory is read and written only through atomic word access and the copies in
//! [`region`], never through a Rust reference to bytes another process may change.
//! Ring and wake-up code is generic over its storage ([`shm`]) so loom checks the
//! very code that runs over memfds (`RUSTFLAGS="--cfg loom" cargo test -p capnet-ipc
//! --test loom`).
#![deny(unsafe_op_in_unsafe_fn)]

pub mod blob;
pub mod channel;
#[cfg(not(loom))]
pub mod control;
pub mod descriptor;
pub mod notify;
#[cfg(not(loom))]
pub mod pool;
#[cfg(not(loom))]
pub mod region;
pub mod ring;
pub mod shm;
mod sync;

#[cfg(not(loom))]
pub mod lent;
#[cfg(not(loom))]
pub mod msg;
#[cfg(not(loom))]
pub mod shm_channel;

pub use channel::{ChannelEnd, ChannelParams, End, Interest, WaitOutcome, Waiter};
pub use descriptor::{Descriptor, ShmSafe};
pub use ring::RingError;
pub use sync::Ordering;
