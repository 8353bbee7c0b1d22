//! capnet: the supervisor and command-line tool.
//!
//! `capnet up` brings the stack up in a private network namespace holding a TAP,
//! with the Linux kernel on the other side as the peer; `capnet status` reports
//! every domain's counters; `capnet down` takes everything `up` made away again,
//! also after the stack crashed. The supervisor serves a control socket (mode 0600
//! in a directory only its owner can enter, callers checked with `SO_PEERCRED`).
#![forbid(unsafe_code)]

mod apps;
mod capture;
mod http;
mod logs;
mod status;

use capnet_bench as bench;
use capnet_supervisor::{self as supervisor, control, Target, UpArgs};

use std::net::Ipv4Addr;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// The supervisor runs the stack (the monolithic one whole): segments of up to
/// 64 KiB pass through freshly allocated buffers, which glibc's malloc returns to
/// the kernel and faults back in over and over; mimalloc keeps them
/// (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// capnet: a user-level TCP/IP stack split into sandboxed domains.
#[derive(Debug, Parser)]
#[command(name = "capnet", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the stack in a private network namespace (Ctrl-C on a foreground up is `down`).
    Up(UpArgs),
    /// Stop the stack and remove everything `up` made.
    Down(Target),
    /// Show mode, addresses and every domain's counters.
    Status(StatusArgs),
    /// Ping an address from the stack (an application attached to it).
    Ping(PingArgs),
    /// Echo UDP datagrams or TCP streams back to their senders (an application
    /// attached to the stack).
    EchoServe(EchoArgs),
    /// Serve the files of a directory over HTTP/1.1 (GET and HEAD, keep-alive).
    HttpServe(HttpServeArgs),
    /// Fetch an http:// URL (an IP literal) to a file or standard output.
    HttpGet(HttpGetArgs),
    /// Print a built-in domain graph, or check a graph file and show what it runs.
    Graph(GraphArgs),
    /// Write the driver's frames (in and out of the device) as pcap, for tcpdump.
    Capture(CaptureArgs),
    /// Show what the domains logged (all of them, or one).
    Logs(LogsArgs),
    /// Restart a domain now (its group), with fresh channels, as if it had died.
    Restart(RestartArgs),
    /// Replace a domain with another program while the rest keeps running (udp, tcp).
    Swap(SwapArgs),
    /// Run a command on the Linux side of the stack's TAP (its network
    /// namespace; unprivileged, through the supervisor's user namespace).
    Exec(ExecArgs),
    /// Measure every workload on every composition (mono, the groupings between,
    /// factored, Linux over veth) side by side, and print the ratios.
    Bench(bench::BenchArgs),
    /// The Linux side of `capnet bench`'s runs (run by it inside namespaces).
    #[command(hide = true)]
    BenchPeer {
        /// serve WORK PORT BULK SECS | client ADDR PORT MODE ARGS…
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Args)]
struct ExecArgs {
    #[command(flatten)]
    target: Target,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct SwapArgs {
    #[command(flatten)]
    target: Target,
    /// The domain to replace.
    domain: String,
    /// The new program (absolute path; not writable by others).
    #[arg(long = "with")]
    with: std::path::PathBuf,
}

#[derive(Debug, Args)]
struct RestartArgs {
    #[command(flatten)]
    target: Target,
    /// The domain (its whole group restarts).
    domain: String,
}

#[derive(Debug, Args)]
struct LogsArgs {
    #[command(flatten)]
    target: Target,
    /// Only this domain's log (or a group's, or `supervisor`).
    domain: Option<String>,
    /// Keep printing what is logged until Ctrl-C or `down`.
    #[arg(short = 'f', long)]
    follow: bool,
}

#[derive(Debug, Args)]
struct CaptureArgs {
    #[command(flatten)]
    target: Target,
    /// Write the pcap here (standard output when not a terminal otherwise).
    #[arg(short = 'w', long)]
    write: Option<std::path::PathBuf>,
    /// Stop after this many frames.
    #[arg(short = 'c', long)]
    count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    seconds: Option<f64>,
}

#[derive(Debug, Args)]
struct GraphArgs {
    /// A graph file to check: prints its groups, channels and grants, or the
    /// line and reason it is refused for.
    #[arg(conflicts_with_all = ["default", "mono", "two_group"])]
    file: Option<std::path::PathBuf>,
    /// Print the built-in graph (fully factored: every domain its own process).
    #[arg(long, conflicts_with_all = ["mono", "two_group"])]
    default: bool,
    /// Print the one-group graph.
    #[arg(long, conflicts_with = "two_group")]
    mono: bool,
    /// Print the two-group graph (driver | the rest).
    #[arg(long)]
    two_group: bool,
}

#[derive(Debug, Args)]
struct HttpServeArgs {
    #[command(flatten)]
    target: Target,
    /// The directory to serve.
    dir: std::path::PathBuf,
    /// The port to listen on.
    #[arg(long, default_value_t = 80)]
    port: u16,
}

#[derive(Debug, Args)]
struct HttpGetArgs {
    #[command(flatten)]
    target: Target,
    /// The URL, e.g. http://10.77.0.1:8000/file.
    url: String,
    /// Write the body here instead of standard output.
    #[arg(short = 'o', long)]
    output: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
struct PingArgs {
    #[command(flatten)]
    target: Target,
    /// The address to ping.
    addr: Ipv4Addr,
    /// How many echo requests.
    #[arg(short = 'c', long, default_value_t = 4)]
    count: u16,
    /// Seconds between requests.
    #[arg(short = 'i', long, default_value_t = 1.0)]
    interval: f64,
    /// Payload bytes per request.
    #[arg(short = 's', long, default_value_t = 56)]
    size: usize,
}

#[derive(Debug, Args)]
struct EchoArgs {
    #[command(flatten)]
    target: Target,
    /// Echo UDP datagrams.
    #[arg(long, required_unless_present = "tcp", conflicts_with = "tcp")]
    udp: bool,
    /// Echo TCP connections.
    #[arg(long)]
    tcp: bool,
    /// The port to serve.
    #[arg(long, default_value_t = 7)]
    port: u16,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    target: Target,
    /// Print one JSON object (the shape scripts rely on; it always holds the
    /// TCP connections).
    #[arg(long)]
    json: bool,
    /// List the TCP connections: state, cwnd, ssthresh, RTT, retransmits, SACK.
    #[arg(long)]
    sockets: bool,
}

/// `capnet restart DOMAIN`.
fn restart(netns: &str, domain: &str) -> anyhow::Result<()> {
    match control::ask(netns, &control::Request::Restart(domain.to_owned()))? {
        control::Reply::Ok => {
            println!("capnet restart: {domain} is being restarted (`capnet status` shows its new pid)");
            Ok(())
        }
        control::Reply::Refused(why) => anyhow::bail!("{why}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

/// `capnet swap DOMAIN --with BINARY`.
fn swap(netns: &str, domain: &str, binary: &std::path::Path) -> anyhow::Result<()> {
    let binary = std::path::absolute(binary)?.display().to_string();
    let req = control::Request::Swap { domain: domain.to_owned(), binary: binary.clone() };
    match control::ask(netns, &req)? {
        control::Reply::Ok => {
            println!("capnet swap: {domain} is being replaced by {binary} (`capnet status` shows its new pid)");
            Ok(())
        }
        control::Reply::Refused(why) => anyhow::bail!("{why}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

/// `capnet graph`.
fn graph(args: GraphArgs) -> anyhow::Result<()> {
    use capnet_supervisor::graph::{Graph, DEFAULT, MONO, TWO_GROUP};
    match args.file {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| anyhow::anyhow!("cannot read graph file {}: {e}", path.display()))?;
            let g = Graph::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            print!("{}", g.describe());
        }
        None if args.mono => print!("{MONO}"),
        None if args.two_group => print!("{TWO_GROUP}"),
        None => print!("{DEFAULT}"),
    }
    Ok(())
}

/// `capnet exec -- COMMAND…`: root enters the named namespace (as `ip netns
/// exec` does); an ordinary user the supervisor's user namespace and the network
/// namespace it owns (found by the supervisor's pid file), as their owner may.
fn exec(netns: &str, command: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let (program, args) = command.split_first().ok_or_else(|| anyhow::anyhow!("no command to run"))?;
    if capnet_kernel_shim::userns::privileged() {
        let path = capnet_kernel_shim::netns::path(netns)?;
        let ns = std::fs::File::open(&path)
            .map_err(|e| anyhow::anyhow!("capnet is not up in namespace {netns} ({}: {e})", path.display()))?;
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
    } else {
        let pid_file = control::run_dir(netns).join("pid");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("capnet is not up in namespace {netns} (no {})", pid_file.display()))?;
        capnet_kernel_shim::userns::join(pid)?;
    }
    let err = std::process::Command::new(program).args(args).exec();
    anyhow::bail!("cannot run {program}: {err}")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => supervisor::up(args),
        Command::Down(t) => supervisor::down(&t.netns),
        Command::Status(s) => status::show(&s.target.netns, s.json, s.sockets),
        Command::Ping(p) => apps::ping(&p.target.netns, p.addr, p.count, p.interval, p.size),
        Command::EchoServe(e) if e.tcp => apps::echo_serve_tcp(&e.target.netns, e.port),
        Command::EchoServe(e) => apps::echo_serve(&e.target.netns, e.port),
        Command::HttpServe(h) => http::serve(&h.target.netns, &h.dir, h.port),
        Command::HttpGet(h) => http::get(&h.target.netns, &h.url, h.output.as_deref()),
        Command::Graph(g) => graph(g),
        Command::Restart(r) => restart(&r.target.netns, &r.domain),
        Command::Swap(w) => swap(&w.target.netns, &w.domain, &w.with),
        Command::Exec(x) => exec(&x.target.netns, &x.command),
        Command::Bench(b) => bench::run(&b),
        Command::BenchPeer { args } => bench::peer(&args),
        Command::Logs(l) => logs::show(&l.target.netns, l.domain.as_deref(), l.follow),
        Command::Capture(c) => capture::capture(&c.target.netns, c.write.as_deref(), c.count, c.seconds),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capnet: {e:#}");
            ExitCode::FAILURE
        }
    }
}
