//! capnet-kernel-shim: the microkernel's part, on Linux.
//!
//! Everything that gives a domain its authority or takes it away lives here:
//! capability handles passed with `SCM_RIGHTS` ([`cap`]), network devices opened
//! inside a namespace ([`device`]), sandboxed spawning with `clone3` ([`spawn`]), the
//! seccomp policies and the sandbox a domain enters ([`sandbox`]). With `ipc`, it is
//! one of the two crates allowed `unsafe`: ioctls, `clone3`, and the raw system calls
//! a cloned child makes before `execve`.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod cap;
#[cfg(feature = "process")]
pub mod device;
#[cfg(feature = "process")]
pub mod netns;
#[cfg(feature = "process")]
pub mod sandbox;
#[cfg(feature = "process")]
pub mod spawn;
pub mod userns;
