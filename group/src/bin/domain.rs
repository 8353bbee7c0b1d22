//! capnet-domain: one group of the domain graph as a sandboxed process.
//!
//! Spawned by the supervisor (kernel-shim `spawn`: namespaces, uid and limits of
//! its group, no capabilities) with its supervisor socket as granted fd 3; see
//! `capnet_group` for what it does with it.
#![forbid(unsafe_code)]

/// Segments of up to 64 KiB pass through freshly allocated buffers; glibc's
/// malloc returns that memory to the kernel and faults it back in over and over,
/// where mimalloc keeps it (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if let Err(e) = capnet_group::main() {
        eprintln!("capnet-domain: {e:#}");
        std::process::exit(1);
    }
}
