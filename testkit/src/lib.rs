//! capnet-testkit: the test hosts network tests build (DESIGN, "Testing against the
//! real world").
//!
//! A [`Netns`] is a network namespace named `capt-PID-TAG` — unique per test
//! process and tag, and matched by `make test`'s clean-up of leftovers from a
//! killed run — that is deleted when dropped, also when the test fails. Deleting
//! it destroys every TAP and veth inside. Traffic stays inside it: it has no route
//! out.

#![forbid(unsafe_code)]

pub mod bench;

use std::path::PathBuf;
use std::process::{Command, Output};

/// The prefix every test namespace carries.
pub const PREFIX: &str = "capt-";

/// A network namespace that lives as long as this value.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `capt-PID-TAG` (removing a leftover of the same name first).
    pub fn new(tag: &str) -> Self {
        let name = format!("{PREFIX}{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out =
            Command::new("ip").args(["netns", "add", &name]).output().expect("run ip (make deps installs iproute2)");
        assert!(out.status.success(), "ip netns add {name}: {}", String::from_utf8_lossy(&out.stderr));
        Self { name }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its file, for `setns` (what kernel-shim's devices take).
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs a command inside it.
    pub fn run(&self, cmd: &[&str]) -> Output {
        Command::new("ip").args(["netns", "exec", &self.name]).args(cmd).output().expect("run in netns")
    }

    /// Runs a command inside it and panics with its stderr if it fails.
    pub fn run_ok(&self, cmd: &[&str]) -> Output {
        let out = self.run(cmd);
        assert!(out.status.success(), "{cmd:?} in {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
        out
    }

    /// Whether interface `dev` exists inside it.
    pub fn link_exists(&self, dev: &str) -> bool {
        Command::new("ip").args(["-n", &self.name, "link", "show", dev]).output().is_ok_and(|o| o.status.success())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// How many replies `ping` reports in its summary ("N packets transmitted, M
/// received, …"); panics with the output if there is no summary.
pub fn ping_received(out: &Output) -> u32 {
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(", ")
        .find_map(|part| part.strip_suffix(" received").and_then(|n| n.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no ping summary in: {text}"))
}

/// A stack `capnet up` started in a namespace of this test (`capt-PID-TAG`, TAP
/// `capt9`); `capnet down` on drop, also when the test fails.
#[derive(Debug)]
pub struct Up {
    bin: PathBuf,
    name: String,
}

impl Up {
    /// Runs `BIN up -d --netns capt-PID-TAG --tap capt9 EXTRA…` and waits for it.
    pub fn new(bin: &str, tag: &str, extra: &[&str]) -> Self {
        Self::start(bin, tag, &[&["--tap", "capt9"], extra].concat())
    }

    /// Runs `BIN up -d --netns capt-PID-TAG EXTRA…` (no TAP named: an in-memory
    /// wire's instance) and waits for it.
    pub fn start(bin: &str, tag: &str, extra: &[&str]) -> Self {
        let name = format!("{PREFIX}{}-{tag}", std::process::id());
        let mut args = vec!["up", "-d", "--netns", name.as_str()];
        args.extend_from_slice(extra);
        let out = Command::new(bin).args(&args).output().expect("run capnet");
        assert!(out.status.success(), "up: {}", String::from_utf8_lossy(&out.stderr));
        Self { bin: PathBuf::from(bin), name }
    }

    /// The namespace.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `cmd` inside the namespace (the Linux side of the TAP).
    pub fn in_ns(&self, cmd: &[&str]) -> Output {
        Command::new("ip").args(["netns", "exec", &self.name]).args(cmd).output().expect("ip netns exec")
    }

    /// Starts `cmd` inside the namespace; it is stopped when the value drops.
    pub fn spawn_in_ns(&self, cmd: &[&str]) -> Killed {
        Killed(Command::new("ip").args(["netns", "exec", &self.name]).args(cmd).spawn().expect("ip netns exec"))
    }

    /// Runs `capnet ARGS… --netns NAME`.
    pub fn capnet(&self, args: &[&str]) -> Output {
        Command::new(&self.bin).args(args).args(["--netns", &self.name]).output().expect("run capnet")
    }

    /// Starts `capnet ARGS… --netns NAME` (an application); stopped on drop.
    pub fn spawn_capnet(&self, args: &[&str]) -> Killed {
        Killed(Command::new(&self.bin).args(args).args(["--netns", &self.name]).spawn().expect("run capnet"))
    }

    /// One counter of one domain from `capnet status --json`.
    pub fn counter(&self, domain: &str, name: &str) -> u64 {
        let out = self.capnet(&["status", "--json"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let key = format!("\"{name}\":");
        // The domain's object, then the counter inside it.
        text.split("\"name\":")
            .find(|d| d.starts_with(&format!("\"{domain}\"")))
            .and_then(|d| d.split(&key).nth(1))
            .and_then(|v| v.split([',', '}']).next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin).args(["down", "--netns", &self.name]).output();
    }
}

/// A scratch directory (`$TMPDIR/capt-PID-TAG`) removed on drop.
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A fresh, empty directory for this test.
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("{PREFIX}{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Self(p)
    }

    /// Writes `len` seeded bytes (incompressible enough to catch misplaced
    /// bytes) to `name` and returns them.
    pub fn file(&self, name: &str, len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ len as u64;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(self.0.join(name), &data).expect("write file");
        data
    }

    /// The path of `name` inside it, as a string.
    pub fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A TCP echo server on the Linux side (`10.77.0.1:PORT`): one Python process,
/// a thread per connection, stopped (children and all) on drop.
pub fn tcp_echo_server(up: &Up, port: u16) -> Killed {
    let script = format!(
        "
import socketserver
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            d = self.request.recv(65536)
            if not d:
                return
            self.request.sendall(d)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(('10.77.0.1', {port}), Echo).serve_forever()
"
    );
    let server = up.spawn_in_ns(&["python3", "-c", &script]);
    wait_bound(up.name(), false, port);
    server
}

/// Waits (hang guard 5 s) until a socket in namespace `ns` listens on TCP
/// `port` (`udp`: is bound to UDP `port`), so a test does not send before a
/// Linux-side service it started is there.
pub fn wait_bound(ns: &str, udp: bool, port: u16) {
    let flags = if udp { "-Huln" } else { "-Htln" };
    for _ in 0..100 {
        let out = Command::new("ip").args(["netns", "exec", ns, "ss", flags, &format!("sport = :{port}")]).output();
        if out.is_ok_and(|o| !o.stdout.is_empty()) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A child process that gets SIGTERM (then is waited for) when dropped.
#[derive(Debug)]
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).output();
        let _ = self.0.wait();
    }
}
