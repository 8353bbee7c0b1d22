//! The `capnet` command against the real kernel: up (detached and foreground, in
//! the mono, two-group and fully factored graphs), ping from the Linux side,
//! status in its JSON shape, down — and clean-up after Ctrl-C and after `kill -9`
//! (no domain process, namespace, TAP, run directory or capnet memfd left); bad
//! arguments and an existing namespace are one-line errors that leave nothing
//! behind.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

const CAPNET: &str = env!("CARGO_BIN_EXE_capnet");

fn capnet(args: &[&str]) -> Output {
    Command::new(CAPNET).args(args).output().expect("run capnet")
}

/// A namespace name for this test; `capnet down` runs on drop, whatever happened.
struct Up(String);

impl Up {
    fn name(tag: &str) -> Self {
        Self(format!("capt-{}-{tag}", std::process::id()))
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = capnet(&["down", "--netns", &self.0]);
    }
}

fn in_ns(ns: &str, cmd: &[&str]) -> Output {
    Command::new("ip").args(["netns", "exec", ns]).args(cmd).output().expect("ip netns exec")
}

fn gone(ns: &str) -> bool {
    !std::path::Path::new(&format!("/run/netns/{ns}")).exists()
        && !std::path::Path::new(&format!("/run/capnet/{ns}")).exists()
}

/// The pids of the stack's domain processes, from its status.
fn domain_pids(ns: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = status(ns)["domains"]
        .as_array()
        .expect("domains")
        .iter()
        .filter_map(|d| d["pid"].as_i64().and_then(|p| i32::try_from(p).ok()))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Whether process `pid` still runs (a zombie waiting for its reaper does not).
fn running(pid: i32) -> bool {
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
    state.as_deref().and_then(|s| s.rsplit_once(") ")).is_some_and(|(_, rest)| !rest.starts_with('Z'))
}

/// What a stack left behind, waiting up to 3 s for its processes to go: domain
/// processes among `pids` still running, and capnet memfds any process holds.
fn leftovers(pids: &[i32]) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut left: Vec<String> = pids.iter().filter(|p| running(**p)).map(|p| format!("process {p}")).collect();
        for proc_dir in std::fs::read_dir("/proc").expect("/proc").flatten() {
            let Ok(pid) = proc_dir.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fd")) else { continue };
            for fd in fds.flatten() {
                let target = std::fs::read_link(fd.path()).map(|t| t.display().to_string()).unwrap_or_default();
                if target.starts_with("/memfd:capnet-") && running(pid) {
                    left.push(format!("process {pid} holds {target}"));
                }
            }
        }
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn status(ns: &str) -> Value {
    let out = capnet(&["status", "--netns", ns, "--json"]);
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

fn counter(s: &Value, domain: &str, name: &str) -> u64 {
    s["domains"].as_array().expect("domains").iter().find(|d| d["name"] == domain).expect("domain")["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("{domain}.{name} missing"))
}

#[test]
fn up_detached_ping_status_down_in_every_composition() {
    // (tag, graph flag, mode, processes)
    for (tag, flag, mode, processes) in
        [("cli-mono", "--mono", "mono", 1), ("cli-two", "--two-group", "factored", 2), ("cli-fact", "", "factored", 5)]
    {
        let up = Up::name(tag);
        let mut args = vec!["up", "-d", "--netns", &up.0, "--tap", "capt0"];
        if !flag.is_empty() {
            args.push(flag);
        }
        let out = capnet(&args);
        assert!(out.status.success(), "up: {}", String::from_utf8_lossy(&out.stderr));
        let ping = in_ns(&up.0, &["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.77.0.2"]);
        assert!(
            String::from_utf8_lossy(&ping.stdout).contains("3 received"),
            "{mode}: {}",
            String::from_utf8_lossy(&ping.stdout)
        );
        std::thread::sleep(Duration::from_millis(400)); // the status snapshot is refreshed every 200 ms
        let s = status(&up.0);
        assert_eq!(s["mode"], mode);
        assert_eq!(s["netns"], up.0.as_str());
        assert_eq!(s["tap"], "capt0");
        assert_eq!(s["host_addr"], "10.77.0.1/24");
        assert_eq!(s["addr"], "10.77.0.2/24");
        for d in s["domains"].as_array().expect("domains") {
            for key in ["name", "pid", "state", "restarts", "uptime_s", "cpu_s", "rss_bytes", "counters", "last_error"]
            {
                assert!(d.get(key).is_some(), "{mode}: domain field {key} missing in {d}");
            }
        }
        let domains = s["domains"].as_array().expect("domains");
        let names: Vec<&str> = domains.iter().filter_map(|d| d["name"].as_str()).collect();
        assert_eq!(names.len(), 5, "{tag}: every domain is listed: {names:?}");
        let mut pids: Vec<i64> = domains.iter().filter_map(|d| d["pid"].as_i64()).collect();
        pids.sort_unstable();
        pids.dedup();
        assert_eq!(pids.len(), processes, "{tag}: one process per group: {s}");
        assert!(counter(&s, "ip", "echo_replies") >= 3, "{mode}: {s}");
        let routes = s["routes"].as_array().expect("routes, as ip publishes them");
        assert!(routes.iter().any(|r| r["dest"] == "10.77.0.0/24" && r["via"].is_null()), "{mode}: connected route");
        assert!(routes.iter().any(|r| r["dest"] == "0.0.0.0/0" && r["via"] == "10.77.0.1"), "{mode}: default route");
        assert!(counter(&s, "driver", "frames_in") >= 4);
        assert_eq!(counter(&s, "ip", "drop_ip_bad_checksum"), 0);
        let pids = domain_pids(&up.0);
        let out = capnet(&["down", "--netns", &up.0]);
        assert!(out.status.success(), "down: {}", String::from_utf8_lossy(&out.stderr));
        assert!(gone(&up.0), "{mode}: down left something behind");
        assert_eq!(leftovers(&pids), Vec::<String>::new(), "{tag}: down left these");
    }
}

#[test]
fn ctrl_c_on_a_foreground_up_is_down() {
    let up = Up::name("cli-fg");
    let mut child = Command::new(CAPNET).args(["up", "--netns", &up.0, "--tap", "capt1"]).spawn().expect("up");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !capnet(&["status", "--netns", &up.0]).status.success() {
        assert!(Instant::now() < deadline, "never came up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pids = domain_pids(&up.0);
    assert_eq!(pids.len(), 5, "the default graph: five domain processes");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT)
        .expect("SIGINT");
    let st = child.wait().expect("wait");
    assert!(st.success(), "{st}");
    assert!(gone(&up.0), "Ctrl-C left something behind");
    assert_eq!(leftovers(&pids), Vec::<String>::new(), "Ctrl-C left these");
}

#[test]
fn down_cleans_up_after_kill_9() {
    let up = Up::name("cli-k9");
    assert!(capnet(&["up", "-d", "--netns", &up.0, "--tap", "capt2"]).status.success());
    let pids = domain_pids(&up.0);
    let pid: i32 =
        std::fs::read_to_string(format!("/run/capnet/{}/pid", up.0)).expect("pid file").trim().parse().expect("pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill -9");
    std::thread::sleep(Duration::from_millis(200));
    let st = capnet(&["status", "--netns", &up.0]);
    assert!(!st.status.success(), "a dead supervisor does not answer");
    let out = capnet(&["down", "--netns", &up.0]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("was gone"));
    assert!(gone(&up.0));
    // Gone, or a zombie waiting for whoever adopted the detached supervisor; its
    // domains do not outlive it.
    assert!(!running(pid), "no supervisor process left running");
    assert_eq!(leftovers(&pids), Vec::<String>::new(), "kill -9 and down left these");
}

#[test]
fn bad_arguments_and_an_existing_namespace_are_one_line_errors() {
    let up = Up::name("cli-bad");
    for args in [
        vec!["up", "--netns", up.0.as_str(), "--addr", "10.77.0.1/24"],
        vec!["up", "--netns", up.0.as_str(), "--addr", "10.78.0.2/24"],
        vec!["up", "--netns", up.0.as_str(), "--addr", "300.1.1.1/24"],
        vec!["up", "--netns", up.0.as_str(), "--loss", "2"],
        vec!["up", "--netns", "../etc"],
        vec!["up", "--netns", up.0.as_str(), "--mono", "--two-group"],
    ] {
        let out = capnet(&args);
        assert!(!out.status.success(), "{args:?} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.trim().is_empty(), "{args:?}: says why");
        assert!(gone(&up.0), "{args:?} left something behind");
    }
    // A namespace that is not ours is refused and left alone.
    let ns = capnet_testkit::Netns::new("cli-exists");
    let out = capnet(&["up", "--netns", ns.name()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exists already"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::path::Path::new(&format!("/run/netns/{}", ns.name())).exists(), "someone else's namespace survives");
    let out = capnet(&["status", "--netns", &up.0]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not up"));
}

#[test]
fn without_root_or_a_tun_node_of_its_own_up_says_what_to_do_and_leaves_nothing() {
    // An ordinary user gets unprivileged mode (tests/unprivileged.rs), but the
    // host's /dev/net/tun is root's here: the first thing it cannot do is open it.
    use std::os::unix::fs::PermissionsExt;
    if std::fs::metadata("/dev/net/tun").is_ok_and(|m| m.permissions().mode() & 0o006 == 0o006) {
        eprintln!("this host's /dev/net/tun is open to everyone: an ordinary user's up would work");
        return;
    }
    let up = Up::name("cli-user");
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", CAPNET, "up", "--netns", &up.0])
        .output()
        .expect("setpriv");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/dev/net/tun") && err.contains("ermission"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(gone(&up.0));
    assert!(!std::path::Path::new(&format!("/tmp/capnet-65534/{}", up.0)).exists(), "no run directory left");
}

#[test]
fn ten_percent_loss_and_status_counters_that_match_it() {
    let up = Up::name("cli-loss");
    assert!(capnet(&["up", "-d", "--netns", &up.0, "--tap", "capt3", "--loss", "0.1", "--seed", "3"]).status.success());
    let out = in_ns(&up.0, &["ping", "-q", "-c", "500", "-i", "0.01", "-W", "1", "10.77.0.2"]);
    let received = capnet_testkit::ping_received(&out);
    assert!((350..=450).contains(&received), "{received}/500 replies at 10% loss each way");
    std::thread::sleep(Duration::from_millis(400));
    let s = status(&up.0);
    let (read, dropped_in) = (counter(&s, "driver", "frames_in"), counter(&s, "driver", "impair_in_dropped"));
    let (sent_by_ip, dropped_out) = (counter(&s, "ip", "frames_out"), counter(&s, "driver", "impair_out_dropped"));
    assert!(dropped_in > 20 && dropped_out > 20, "{s}");
    assert_eq!(counter(&s, "ip", "frames_in"), read - dropped_in, "every frame not dropped reached ip");
    assert_eq!(counter(&s, "driver", "frames_out"), sent_by_ip - dropped_out, "every frame not dropped was written");
    // Linux saw at most the replies that were sent and not dropped.
    assert!(u64::from(received) <= counter(&s, "ip", "echo_replies"), "{s}");
}

#[test]
fn the_driver_runs_as_its_own_sandboxed_process() {
    let up = Up::name("cli-sbx");
    assert!(capnet(&["up", "-d", "--netns", &up.0, "--tap", "capt4"]).status.success());
    let s = status(&up.0);
    let pid_of = |name: &str| {
        s["domains"].as_array().expect("domains").iter().find(|d| d["name"] == name).expect("domain")["pid"]
            .as_i64()
            .expect("pid") as i32
    };
    let (driver, ip) = (pid_of("driver"), pid_of("ip"));
    assert_ne!(driver, ip, "the driver is a process of its own");
    for t in std::fs::read_dir(format!("/proc/{driver}/task")).expect("tasks") {
        let st = std::fs::read_to_string(t.expect("task").path().join("status")).expect("status");
        let field = |f: &str| st.lines().find_map(|l| l.strip_prefix(f)).map(str::trim).unwrap_or("").to_owned();
        assert_eq!(field("Seccomp:"), "2", "{st}");
        for cap in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(u64::from_str_radix(&field(cap), 16), Ok(0), "{cap} {st}");
        }
        assert!(field("Uid:").split_whitespace().all(|u| u == "61100"), "{st}");
    }
    let nspid = std::fs::read_to_string(format!("/proc/{driver}/status")).expect("status");
    assert!(
        nspid.lines().any(|l| l.starts_with("NSpid:") && l.trim_end().ends_with("\t1")),
        "pid 1 in its own namespace"
    );
    let ping = in_ns(&up.0, &["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.77.0.2"]);
    assert!(String::from_utf8_lossy(&ping.stdout).contains("2 received"));
    std::thread::sleep(Duration::from_millis(400));
    assert!(counter(&status(&up.0), "driver", "frames_in") >= 2, "the driver publishes its counters");
}

#[test]
fn without_dev_net_tun_up_says_what_to_do_and_leaves_nothing() {
    let up = Up::name("cli-notun");
    let script = format!("mount -t tmpfs none /dev/net && exec {CAPNET} up --netns {}", up.0);
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/dev/net/tun"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(gone(&up.0), "nothing left behind");
}

/// What an application links stays small: the client library's dependency
/// closure holds no CLI, chart, sandbox, packet parser, core or supervisor
/// (issue 19; net/Cargo.toml says why).
#[test]
fn the_client_library_links_no_cli_sandbox_core_or_supervisor() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--offline", "-p", "capnet", "-e", "normal", "--prefix", "none", "--format", "{p}"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(names.contains(&"capnet-ipc") && names.contains(&"capnet-proto"), "unexpected tree:\n{tree}");
    for banned in [
        "clap",
        "plotters",
        "seccompiler",
        "caps",
        "smoltcp",
        "capnet-tcp",
        "capnet-udp",
        "capnet-ip",
        "capnet-sockets",
        "capnet-runtime",
        "capnet-supervisor",
        "capnet-group",
        "mimalloc",
        "tracing-subscriber",
    ] {
        assert!(!names.contains(&banned), "capnet (the client library) depends on {banned}:\n{tree}");
    }
}

/// The test-only hostile mode is a cargo feature the programs as released do
/// not have: resolved without dev-dependencies (what `cargo build --release -p
/// capnet-cli -p capnet-group` builds), no crate has `hostile` on; with them
/// (what the tests build), the groups and the library do.
#[test]
fn release_programs_lack_the_hostile_feature_that_tests_build() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let tree = |edges: &str| {
        let out = Command::new(&cargo)
            .args(["tree", "--offline", "-p", "capnet-cli", "-p", "capnet-group", "-e", edges])
            .args(["--prefix", "none", "--format", "{p} [{f}]"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo tree");
        assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let released = tree("normal");
    assert!(released.contains("capnet-group v"), "unexpected tree:\n{released}");
    assert!(!released.contains("hostile"), "a released program has the hostile feature:\n{released}");
    let tested = tree("normal,dev");
    for krate in ["capnet-group v", "capnet v", "capnet-ipc v"] {
        assert!(
            tested.lines().any(|l| l.starts_with(krate) && l.contains("hostile")),
            "the tests' build lacks {krate}'s hostile feature:\n{tested}"
        );
    }
}
