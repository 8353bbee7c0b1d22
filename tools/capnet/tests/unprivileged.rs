//! Unprivileged mode: `capnet up` as uid 65534 (nobody), not root and not in a
//! user namespace made for it: it makes its own user namespace owning the network
//! namespace of its TAP, and its domains run sandboxed in namespaces of theirs.
//! `/dev/net/tun` is reachable because this test makes a 0666 node for it in a
//! private mount namespace (the host's node is never touched, and is checked).
//! The Linux side is reached with `capnet exec`, also as nobody. The programs run
//! from a copy in a scratch directory nobody may read (the checkout may not be).

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use capnet_testkit::{Killed, Scratch, PREFIX};
use serde_json::Value;

const CAPNET: &str = env!("CARGO_BIN_EXE_capnet");
const NOBODY: &str = "65534";

/// `capnet` and `capnet-domain`, copied where nobody may run them.
fn programs() -> Scratch {
    let dir = Scratch::new("unp-bin");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let from = std::path::Path::new(CAPNET);
    for p in ["capnet", "capnet-domain"] {
        std::fs::copy(from.with_file_name(p), dir.0.join(p)).expect("copy");
        std::fs::set_permissions(dir.0.join(p), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    dir
}

/// `capnet ARGS` as nobody, from `bin`.
fn as_nobody(bin: &Scratch, args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", &bin.path("capnet")]).args(args);
    c
}

fn run(mut c: Command) -> Output {
    c.output().expect("run as nobody")
}

/// What `/proc/PID/status` says for `key` (its first field).
fn proc_status(pid: i64, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = text.lines().find(|l| l.starts_with(&format!("{key}:"))).expect("key").to_owned();
    line.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
}

/// The supervisor, started as nobody in a private mount namespace with a 0666
/// tun node; stopped (SIGTERM: `down`) and its run directory removed on drop.
struct Unprivileged<'a> {
    name: String,
    bin: &'a Scratch,
    _sup: Killed,
}

impl Drop for Unprivileged<'_> {
    fn drop(&mut self) {
        let _ = run(as_nobody(self.bin, &["down", "--netns", &self.name]));
        let _ = std::fs::remove_dir_all(format!("/tmp/capnet-{NOBODY}/{}", self.name));
    }
}

#[test]
fn capnet_up_as_nobody_runs_the_factored_stack_in_user_namespaces_of_its_own() {
    let host_tun = std::fs::metadata("/dev/net/tun").map(|m| m.permissions().mode());
    let name = format!("{PREFIX}{}-unp", std::process::id());
    let bin = programs();
    let script = format!(
        "mount -t tmpfs capnet-test-dev /dev/net && mknod -m 0666 /dev/net/tun c 10 200 && \
         exec setpriv --reuid {NOBODY} --regid {NOBODY} --clear-groups {} up --netns {name}",
        bin.path("capnet")
    );
    let sup = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare");
    let sup_pid = i64::from(sup.id());
    let up = Unprivileged { name: name.clone(), bin: &bin, _sup: Killed(sup) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let out = run(as_nobody(&bin, &["status", "--json", "--netns", &name]));
        if out.status.success() {
            break serde_json::from_slice::<Value>(&out.stdout).expect("status JSON");
        }
        assert!(Instant::now() < deadline, "never came up: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(100));
    };
    // The supervisor is nobody on the host, in a user namespace it made.
    assert_eq!(proc_status(sup_pid, "Uid"), "65534 65534 65534 65534");
    let own = std::fs::read_link(format!("/proc/{sup_pid}/ns/user")).expect("its user namespace");
    assert_ne!(own, std::fs::read_link("/proc/self/ns/user").expect("ours"), "a user namespace of its own");
    // Five domains, each confined: nobody on the host, seccomp, no capabilities,
    // a pid namespace of its own.
    let domains = status["domains"].as_array().expect("domains");
    assert_eq!(domains.len(), 5, "{status}");
    for d in domains {
        let pid = d["pid"].as_i64().expect("pid");
        assert_eq!(d["state"], "running", "{d}");
        assert_eq!(proc_status(pid, "Uid"), "65534 65534 65534 65534", "{}", d["name"]);
        assert_eq!(proc_status(pid, "Seccomp"), "2", "{}", d["name"]);
        assert_eq!(proc_status(pid, "CapEff"), "0000000000000000", "{}", d["name"]);
        assert_eq!(proc_status(pid, "NSpid").split_whitespace().count(), 2, "{}", d["name"]);
    }
    // Root's run directory knows nothing of it: it lives in nobody's.
    assert!(!std::path::Path::new(&format!("/run/capnet/{name}")).exists());
    // The Linux side, entered as nobody: pings, then a TCP fetch from http-serve.
    let ping =
        run(as_nobody(&bin, &["exec", "--netns", &name, "--", "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.77.0.2"]));
    assert_eq!(capnet_testkit::ping_received(&ping), 3, "{}", String::from_utf8_lossy(&ping.stdout));
    let www = Scratch::new("unp-www");
    let data = www.file("f", 2_000_000);
    for p in [&www.0, &www.0.join("f")] {
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let _server = Killed(
        as_nobody(&bin, &["http-serve", "--netns", &name, www.0.to_str().expect("utf-8"), "--port", "80"])
            .stdout(Stdio::null())
            .spawn()
            .expect("http-serve"),
    );
    let mut fetched = Vec::new();
    for _ in 0..50 {
        let out = run(as_nobody(
            &bin,
            &["exec", "--netns", &name, "--", "curl", "-s", "--max-time", "10", "http://10.77.0.2/f"],
        ));
        fetched = out.stdout;
        if out.status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(fetched == data, "curl's copy differs ({} bytes of {})", fetched.len(), data.len());
    // Swap, as nobody: root's build is refused (root's files are nobody's to
    // this supervisor), nobody's own copy runs.
    let out = run(as_nobody(&bin, &["swap", "udp", "--with", &bin.path("capnet-domain"), "--netns", &name]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not the user's own file"), "{out:?}");
    let mine = bin.0.join("udp-next");
    std::fs::copy(bin.0.join("capnet-domain"), &mine).expect("copy");
    std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    nix::unistd::chown(&mine, Some(nix::unistd::Uid::from_raw(65534)), Some(nix::unistd::Gid::from_raw(65534)))
        .expect("chown");
    let out = run(as_nobody(&bin, &["swap", "udp", "--with", mine.to_str().expect("utf-8"), "--netns", &name]));
    assert!(out.status.success(), "swap: {}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st: Value = serde_json::from_slice(&run(as_nobody(&bin, &["status", "--json", "--netns", &name])).stdout)
            .unwrap_or(Value::Null);
        let udp = st["domains"].as_array().and_then(|d| d.iter().find(|d| d["name"] == "udp").cloned());
        if udp.as_ref().is_some_and(|u| u["restarts"] == 1 && u["state"] == "running") {
            break;
        }
        assert!(Instant::now() < deadline, "the swapped udp domain never ran: {udp:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The host's tun node is as it was.
    assert_eq!(std::fs::metadata("/dev/net/tun").map(|m| m.permissions().mode()).ok(), host_tun.ok());
    // Down, as nobody: the supervisor and its run directory go.
    let out = run(as_nobody(&bin, &["down", "--netns", &name]));
    assert!(out.status.success(), "down: {}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{sup_pid}/status")).exists()
        && !proc_status(sup_pid, "State").starts_with('Z')
    {
        assert!(Instant::now() < deadline, "the supervisor did not exit after down");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!std::path::Path::new(&format!("/tmp/capnet-{NOBODY}/{name}")).exists());
    drop(up);
}

/// Issue 18, finding 5: another local user who made `/tmp/capnet-UID/NETNS`
/// first, with sockets of their own in it, answered the victim's `capnet
/// http-get` and `capnet status`. Clients now check the directories (owner,
/// mode, no symlink) and the server's `SO_PEERCRED` before they send anything.
#[test]
fn another_user_cannot_impersonate_the_stack() {
    const OTHER: &str = "65533";
    let bin = programs();
    let name = format!("{PREFIX}{}-imp", std::process::id());
    let base = format!("/tmp/capnet-{NOBODY}");
    // The victim has no stack up: the other user got there first.
    let _ = std::fs::remove_dir_all(&base);
    let squatter = format!(
        "
import os, socket, sys, threading
base, name = '{base}', '{name}'
os.makedirs(base + '/' + name, 0o755)
os.chmod(base, 0o755)
got = [0, 0]
def serve(path):
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    os.chmod(path, 0o777)
    s.listen(8)
    while True:
        c, _ = s.accept()
        got[0] += 1
        c.settimeout(2)
        try:
            got[1] += len(c.recv(65536))
        except OSError:
            pass
        open(base + '/' + name + '/got', 'w').write('%d %d' % tuple(got))
        c.close()
for p in ('app.sock', 'control.sock'):
    threading.Thread(target=serve, args=(base + '/' + name + '/' + p,), daemon=True).start()
print('ready', flush=True)
threading.Event().wait()
"
    );
    let mut child = Command::new("setpriv")
        .args(["--reuid", OTHER, "--regid", OTHER, "--clear-groups", "/usr/bin/python3", "-c", &squatter])
        .stdout(Stdio::piped())
        .spawn()
        .expect("the other user's squatter");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().expect("stdout")), &mut line)
        .expect("ready");
    let squatter = Killed(child);
    assert_eq!(line.trim(), "ready");

    for args in [&["http-get", "--netns", &name, "http://10.77.0.1/"][..], &["status", "--netns", &name][..]] {
        let out = run(as_nobody(&bin, args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} refuses: {err}");
        assert!(
            err.contains("refusing to talk to") && err.contains(&format!("belongs to uid {OTHER}")),
            "{args:?} says why: {err}"
        );
    }
    drop(squatter);
    let got = std::fs::read_to_string(format!("{base}/{name}/got")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&base);
    assert_eq!(got, "", "nothing reached the other user's sockets");
}
