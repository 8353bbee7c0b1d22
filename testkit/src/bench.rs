//! What the benchmarks share: the median and spread of repeated runs, and the
//! section of docs/results.md each one rewrites with its table.

/// The median of `v` and its spread, (max − min) / median in percent.
pub fn median(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v[v.len() / 2];
    let spread = if m == 0.0 { 0.0 } else { (v[v.len() - 1] - v[0]) / m * 100.0 };
    (m, spread)
}

/// The machine, as a results section names it: CPU model and count.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cpu}, {n} CPUs")
}

/// Replaces the section between `<!-- NAME:start -->` and `<!-- NAME:end -->` of
/// docs/results.md (found from `manifest_dir`, a crate directory of this
/// workspace) with `table`, headed by the date, the machine and `command`.
pub fn write_section(manifest_dir: &str, name: &str, command: &str, table: &str) {
    let root = std::path::Path::new(manifest_dir).ancestors().find(|p| p.join("docs/results.md").exists());
    let Some(path) = root.map(|r| r.join("docs/results.md")) else {
        eprintln!("docs/results.md not found; table printed only");
        return;
    };
    let Ok(doc) = std::fs::read_to_string(&path) else { return };
    let (start, end) = (format!("<!-- {name}:start -->"), format!("<!-- {name}:end -->"));
    let (Some(s), Some(e)) = (doc.find(&start), doc.find(&end)) else {
        eprintln!("docs/results.md has no {name} markers; table printed only");
        return;
    };
    let when = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let body = format!("{start}\nMeasured {when} on {}, with `{command}`.\n\n{table}{end}", machine());
    let new = format!("{}{}{}", &doc[..s], body, &doc[e + end.len()..]);
    if std::fs::write(&path, new).is_ok() {
        eprintln!("wrote {}", path.display());
    }
}
