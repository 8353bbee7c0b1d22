//! capnet-tcp-cubic: an experimental tcp domain — the worked example of a domain
//! of your own (docs/writing-a-domain.md), to swap in with
//! `capnet swap tcp --with $(pwd)/target/release/capnet-tcp-cubic`.
//!
//! It is `capnet-domain` with the tcp core's defaults changed: CUBIC (RFC 9438)
//! for every new connection whatever the graph says, 4 MiB send and receive
//! buffers (a window scale of 7 instead of 5), a 100 ms floor under the RTO and
//! acknowledgments delayed at most 10 ms. Everything else — the channels, the
//! sandbox, the protocol to ip and sockets — is the stock runtime's.
#![forbid(unsafe_code)]

/// As `capnet-domain`: mimalloc keeps the 64 KiB segment buffers mapped.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn experimental(cfg: &mut capnet_tcp::Config) {
    cfg.congestion_control = capnet_tcp::cc::Algorithm::Cubic;
    cfg.send_buffer = 4 << 20;
    cfg.recv_buffer = 4 << 20;
    cfg.min_rto = capnet_tcp::Duration::from_millis(100);
    cfg.delayed_ack = capnet_tcp::Duration::from_millis(10);
}

fn main() {
    if let Err(e) = capnet_group::main_with(experimental) {
        eprintln!("capnet-tcp-cubic: {e:#}");
        std::process::exit(1);
    }
}
