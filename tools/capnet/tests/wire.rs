//! The in-memory wire: two capnet instances joined with no device between them
//! (`capnet up --wire`, `capnet up --wire-to`) — a factored one and a one-group
//! one, so both ends of the code run: ping and byte-exact transfers each way, a
//! driver restarted and joined again, a hostile peer scribbling over its side of
//! the wire (refused, nothing else lost), and the wrong arguments refused.

use capnet_testkit::{Scratch, Up};

const CAPNET: &str = env!("CARGO_BIN_EXE_capnet");

/// `capnet status --json` of `up`.
fn status(up: &Up) -> serde_json::Value {
    let out = up.capnet(&["status", "--json"]);
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

/// Fetches `url` from `up`'s stack into `dir/name`, retrying while the wire
/// (re)joins; the bytes fetched.
fn fetch(up: &Up, url: &str, dir: &Scratch, name: &str) -> Vec<u8> {
    let out_path = dir.path(name);
    for _ in 0..40 {
        let out = up.capnet(&["http-get", url, "-o", &out_path]);
        if out.status.success() {
            return std::fs::read(&out_path).expect("fetched file");
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    panic!("{url} could not be fetched through the wire");
}

fn pids(up: &Up) -> Vec<(String, i64)> {
    let s = status(up);
    s["domains"]
        .as_array()
        .expect("domains")
        .iter()
        .map(|d| (d["name"].as_str().expect("name").to_owned(), d["pid"].as_i64().expect("pid")))
        .collect()
}

#[test]
fn two_instances_talk_over_the_wire_and_a_restarted_driver_joins_again() {
    let a = Up::start(CAPNET, "wire-a", &["--wire"]);
    let name_a = a.name().to_owned();
    let b = Up::start(CAPNET, "wire-b", &["--mono", "--wire-to", &name_a]);
    let (sa, sb) = (status(&a), status(&b));
    assert_eq!(sa["tap"], "wire");
    assert_eq!(sa["addr"], "10.77.0.2/24");
    assert_eq!(sb["addr"], "10.77.0.1/24", "the joining instance takes the other address");

    let out = b.capnet(&["ping", "10.77.0.2", "-c", "3", "-i", "0.2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("3 received"), "ping over the wire: {text}");

    // Byte-exact each way, larger than any window.
    let dir = Scratch::new("wire-www");
    let data = dir.file("f", 5_000_000);
    let _serve_a = a.spawn_capnet(&["http-serve", &dir.path(""), "--port", "8080"]);
    let _serve_b = b.spawn_capnet(&["http-serve", &dir.path(""), "--port", "8081"]);
    let got = Scratch::new("wire-got");
    assert!(fetch(&b, "http://10.77.0.2:8080/f", &got, "ab") == data, "a → b is byte-exact");
    assert!(fetch(&a, "http://10.77.0.1:8081/f", &got, "ba") == data, "b → a is byte-exact");
    // The driver's report (every 100 ms) counts the bytes it copied: both files.
    let carried = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        a.counter("driver", "bytes_copied") >= 2 * data.len() as u64
    });
    assert!(carried, "a's driver carried the frames: {} bytes", a.counter("driver", "bytes_copied"));
    // Six at once into the factored instance: its driver lends the peer's
    // chains on to ip as fast as they come, within its quota, and stays up.
    std::thread::scope(|scope| {
        for i in 0..6 {
            let (a, got, data) = (&a, &got, &data);
            scope.spawn(move || {
                let name = format!("many{i}");
                assert!(fetch(a, "http://10.77.0.1:8081/f", got, &name) == *data, "b → a, {name}");
            });
        }
    });
    let s = status(&a);
    let driver = s["domains"].as_array().expect("domains").iter().find(|d| d["name"] == "driver").cloned();
    assert_eq!(driver.expect("driver")["restarts"], 0, "a's driver kept running");

    // A's driver restarts: both instances give the new one fresh sides.
    let before = pids(&a);
    let out = a.capnet(&["restart", "driver"]);
    assert!(out.status.success(), "restart: {}", String::from_utf8_lossy(&out.stderr));
    assert!(fetch(&b, "http://10.77.0.2:8080/f", &got, "again") == data, "the wire works after a restart");
    let after = pids(&a);
    for ((n, p0), (_, p1)) in before.iter().zip(&after) {
        assert_eq!(n == "driver", p0 != p1, "{n}: only the driver is a new process ({p0} → {p1})");
    }
}

#[test]
fn a_peer_scribbling_over_the_wire_is_refused_and_loses_nothing_else() {
    let a = Up::start(CAPNET, "wire-c", &["--wire"]);
    let name_a = a.name().to_owned();
    // The joining instance's driver writes garbage over the ring indices it
    // owns on the wire, 1.5 s after it starts (the `hostile` feature).
    std::env::set_var("CAPNET_HOSTILE", "driver:wire:1500");
    let b = Up::start(CAPNET, "wire-d", &["--wire-to", &name_a]);
    std::env::remove_var("CAPNET_HOSTILE");
    let before = (pids(&a), pids(&b));
    let mut refused = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        // b's driver leaves its scribbled side as it is; a's finds it.
        refused = a.counter("driver", "wire_refused");
        if refused > 0 {
            break;
        }
        // Traffic makes each side look at the other's rings.
        let _ = b.capnet(&["ping", "10.77.0.2", "-c", "1"]);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let logs = |up: &Up| String::from_utf8_lossy(&up.capnet(&["logs", "driver"]).stdout).into_owned();
    assert!(refused > 0, "a's driver refused the scribbled wire:\n{}\n{}", logs(&a), logs(&b));
    // Both supervisors give the wire fresh sides (b connects, asked by a), no
    // process restarts, and traffic flows again.
    let mut back = false;
    for _ in 0..40 {
        let out = b.capnet(&["ping", "10.77.0.2", "-c", "1"]);
        if String::from_utf8_lossy(&out.stdout).contains("1 received") {
            back = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert!(back, "the wire works again once it was joined afresh");
    assert_eq!(before, (pids(&a), pids(&b)), "no process restarted, on either side");
}

#[test]
fn wrong_wire_arguments_are_refused_clearly() {
    let run = |args: &[&str]| std::process::Command::new(CAPNET).args(args).output().expect("run capnet");
    let ns = format!("capt-{}-wire-x", std::process::id());
    let out = run(&["up", "--netns", &ns, "--wire-to", "capt-nobody-here"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no capnet instance is up in namespace capt-nobody-here"), "{err}");
    let out = run(&["up", "--netns", &ns, "--wire-to", &ns]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot join its own wire"));
    let out = run(&["up", "--netns", &ns, "--wire", "--tap", "x0"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
    // An instance on a TAP has no wire to join.
    let tap = Up::new(CAPNET, "wire-t", &[]);
    let out = run(&["up", "--netns", &ns, "--wire-to", tap.name()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("runs on a TAP"), "{err}");
    assert!(!std::path::Path::new(&format!("/run/capnet/{ns}")).exists(), "the failed instance left nothing");
}
