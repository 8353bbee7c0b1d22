//! Graph files: the built-in ones check, and each kind of bad graph is refused
//! by `capnet graph FILE` with the line it is on and the reason — before
//! anything starts.

use std::process::Command;

const CAPNET: &str = env!("CARGO_BIN_EXE_capnet");

/// Runs `capnet graph` on `text`; (success, stdout, stderr).
fn check(text: &str, tag: &str) -> (bool, String, String) {
    let path = std::env::temp_dir().join(format!("capt-{}-{tag}.toml", std::process::id()));
    std::fs::write(&path, text).expect("write graph");
    let out = Command::new(CAPNET).arg("graph").arg(&path).output().expect("run capnet graph");
    let _ = std::fs::remove_file(&path);
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn builtin(flag: &str) -> String {
    let out = Command::new(CAPNET).args(["graph", flag]).output().expect("capnet graph");
    assert!(out.status.success());
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The line (1-based) on which `needle` first occurs in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    let at = text.find(needle).unwrap_or_else(|| panic!("{needle:?} not in the graph"));
    text[..at].matches('\n').count() + 1
}

#[test]
fn the_built_in_graphs_check_and_say_how_they_run() {
    let (ok, out, err) = check(&builtin("--default"), "default");
    assert!(ok, "{err}");
    assert_eq!(out.matches("ipc channel").count(), 6, "{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("group ")).count(), 5, "{out}");
    let (ok, out, err) = check(&builtin("--mono"), "mono");
    assert!(ok, "{err}");
    assert_eq!(out.matches("direct calls").count(), 6, "{out}");
    assert!(out.contains("process of driver + ip + tcp + udp + sockets"), "{out}");
}

#[test]
fn bad_graphs_are_refused_with_the_line_and_the_reason() {
    let base = builtin("--default");
    // (what is broken, the text replaced, its replacement, where the error points, the reason)
    let cases: &[(&str, &str, &str, &str)] = &[
        ("unknown domain in a group", "domains = [\"tcp\"]", "domains = [\"tpc\"]", "group tcp: there is no domain \"tpc\""),
        ("a channel to nowhere", "ends = [\"ip\", \"udp\"]", "ends = [\"ip\", \"ufo\"]", "channel ip-udp leads to nowhere: there is no domain \"ufo\""),
        (
            "rights the grantor lacks",
            "{ cap = \"channel:tcp-sockets\", rights = [\"read\", \"map\"] },\n]\n\n[domains.udp]",
            "{ cap = \"channel:tcp-sockets\", rights = [\"read\", \"write\"] },\n]\n\n[domains.udp]",
            "domain tcp asks for write on channel:tcp-sockets, but sockets, which writes the other end and seals it, can grant only read, map, grant",
        ),
        ("a domain in two groups", "domains = [\"udp\"]", "domains = [\"udp\", \"ip\"]", "domain ip is in two groups: ip and udp"),
        ("a misspelt field", "binary = \"capnet-domain\"", "bianry = \"capnet-domain\"", "unknown field `bianry`"),
        ("an unknown kind", "kind = \"udp\"", "kind = \"sctp\"", "domain udp: unknown kind \"sctp\""),
        ("root", "uid = 61102", "uid = 0", "group tcp: uid 0 is root"),
        ("a shared uid", "uid = 61103", "uid = 61102", "group udp shares uid 61102 with group tcp"),
        ("a policy missing", "seccomp = [\"tcp\"]", "seccomp = [\"udp\"]", "group tcp runs the tcp domain but its seccomp list lacks the tcp policy"),
        ("an unknown policy", "seccomp = [\"udp\"]", "seccomp = [\"udp\", \"everything\"]", "there is no seccomp policy \"everything\""),
        ("a device for a non-driver", "{ cap = \"channel:ip-udp\", rights = [\"read\", \"map\"] },\n  { cap = \"channel:udp-sockets\"", "{ cap = \"device:tap\", rights = [\"read\"] },\n  { cap = \"channel:udp-sockets\"", "a udp domain has no use for device tap"),
        ("a channel without a protocol", "ends = [\"tcp\", \"sockets\"]", "ends = [\"tcp\", \"driver\"]", "channel tcp-sockets: driver and tcp have no protocol between them"),
        ("a channel grant to a stranger", "{ cap = \"region:routes\", rights = [\"read\", \"map\"] },", "{ cap = \"channel:driver-ip\", rights = [\"read\", \"map\"] },", "domain sockets: it is not an end of channel driver-ip"),
        ("a bad address", "addr = \"10.77.0.2/24\"", "addr = \"10.77.0.300/24\"", "addressing.addr: \"10.77.0.300\" is not an IPv4 address"),
    ];
    for (what, from, to, reason) in cases {
        assert!(base.contains(from), "{what}: {from:?} is not in the default graph");
        let bad = base.replacen(from, to, 1);
        let at =
            base.find(from).unwrap_or(0) + to.find(|c: char| c != from.chars().next().unwrap_or(' ')).map_or(0, |_| 0);
        let (ok, _, err) = check(&bad, "bad");
        assert!(!ok, "{what}: accepted");
        assert!(err.contains(reason), "{what}: {err}");
        // The line: where the replaced text sits, or a later line of it.
        let first = base[..at].matches('\n').count() + 1;
        let last = first + to.matches('\n').count();
        let line: usize = err
            .split("line ")
            .nth(1)
            .and_then(|r| r.split(':').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("{what}: no line in {err:?}"));
        assert!((first..=last).contains(&line), "{what}: line {line}, expected {first}..={last}: {err}");
    }
}

#[test]
fn a_graph_missing_a_channel_or_a_grant_is_refused_with_the_reason() {
    let base = builtin("--default");
    let no_channel =
        base.replacen("[channels.ip-sockets]\nends = [\"ip\", \"sockets\"]   # ICMP echo sockets\n", "", 1);
    let no_channel = no_channel.replace("  { cap = \"channel:ip-sockets\", rights = [\"read\", \"map\"] },\n", "");
    let (ok, _, err) = check(&no_channel, "nochan");
    assert!(!ok);
    assert!(
        err.contains("no channel joins the ip and sockets domains: ping (ICMP echo sockets) could not work"),
        "{err}"
    );

    let ungranted = base.replacen(
        "  { cap = \"channel:ip-tcp\", rights = [\"read\", \"map\"] },\n  { cap = \"channel:tcp-sockets\"",
        "  { cap = \"channel:tcp-sockets\"",
        1,
    );
    let (ok, _, err) = check(&ungranted, "nogrant");
    assert!(!ok);
    assert!(err.contains("channel ip-tcp: its end tcp is not granted it"), "{err}");
    assert_eq!(
        err.split("line ").nth(1).and_then(|r| r.split(':').next()),
        Some(line_of(&ungranted, "[channels.ip-tcp]").to_string().as_str()),
        "{err}"
    );

    let (ok, _, err) = check("[domains.x]\nkind = \"ip\"\nbinary = \"b\"\n", "tiny");
    assert!(!ok);
    assert!(err.contains("the graph has no driver domain"), "{err}");
    let (ok, _, err) = check("this is not toml", "garbage");
    assert!(!ok);
    assert!(err.contains("line 1"), "{err}");
}
