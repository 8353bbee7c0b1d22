//! docs/sandboxing.md lists every role's seccomp policy with its reasons. The table
//! is rendered from the policy files, so it cannot drift: this test fails when they
//! disagree. `CAPNET_UPDATE_DOCS=1 cargo test -p capnet-kernel-shim --test
//! policy_doc` rewrites it.

use capnet_kernel_shim::sandbox::Policy;

fn render() -> String {
    let mut out = String::new();
    let base = Policy::for_role("base").expect("base");
    out.push_str("### base (every domain)\n\n| syscall | restriction | reason |\n|---|---|---|\n");
    for a in &base.allow {
        let restriction = a.arg.as_ref().map_or(String::new(), |r| format!("arg {} ∈ {:?}", r.index, r.values));
        out.push_str(&format!("| `{}` | {} | {} |\n", a.syscall, restriction, a.reason));
    }
    for r in &base.refuse {
        let only = r.arg.as_ref().map_or(String::new(), |a| {
            let hex: Vec<String> = a.values.iter().map(|v| format!("{v:#x}")).collect();
            format!(" when arg {} ∈ [{}]", a.index, hex.join(", "))
        });
        out.push_str(&format!("| `{}` | refused: errno {}{only} | {} |\n", r.syscall, r.errno, r.reason));
    }
    for role in Policy::roles().filter(|r| *r != "base") {
        let p = Policy::for_role(role).expect("role");
        let extra: Vec<_> = p.allow.iter().filter(|a| !base.allow.contains(a)).collect();
        out.push_str(&format!("\n### {role}\n\n"));
        if extra.is_empty() {
            out.push_str("The base list, nothing more.\n");
        } else {
            out.push_str("The base list, plus:\n\n| syscall | restriction | reason |\n|---|---|---|\n");
            for a in extra {
                let restriction = a.arg.as_ref().map_or(String::new(), |r| format!("arg {} ∈ {:?}", r.index, r.values));
                out.push_str(&format!("| `{}` | {} | {} |\n", a.syscall, restriction, a.reason));
            }
        }
    }
    out
}

#[test]
fn sandboxing_doc_lists_every_policy() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/sandboxing.md");
    let doc = std::fs::read_to_string(path).expect("docs/sandboxing.md");
    let (start, end) = ("<!-- policies:start -->\n", "<!-- policies:end -->");
    let s = doc.find(start).expect("start marker") + start.len();
    let e = doc.find(end).expect("end marker");
    let table = render();
    if std::env::var_os("CAPNET_UPDATE_DOCS").is_some() {
        std::fs::write(path, format!("{}{}{}", &doc[..s], table, &doc[e..])).expect("write");
        return;
    }
    assert!(doc[s..e] == table, "docs/sandboxing.md is out of date: run CAPNET_UPDATE_DOCS=1 cargo test -p capnet-kernel-shim --test policy_doc");
}
