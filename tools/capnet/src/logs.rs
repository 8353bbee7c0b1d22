//! `capnet logs [DOMAIN] [-f]`: what the domains wrote.
//!
//! Each group's standard output and error go to `/run/capnet/NETNS/logs/GROUP.log`
//! (made by the supervisor, mode 0600 in an owner-only directory), whose first
//! line names the group's domains; the supervisor's own output (of a detached
//! `up`) is `/run/capnet/NETNS/log`. Lines start with an RFC 3339 UTC time, so
//! several logs merge in time order.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};

use capnet_supervisor::control::run_dir;
use capnet_supervisor::LOG_HEADER;

/// One log: who wrote it, and where it is.
struct Log {
    group: String,
    domains: Vec<String>,
    path: PathBuf,
}

fn logs(netns: &str) -> Result<Vec<Log>> {
    let dir = run_dir(netns).join("logs");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        bail!("capnet is not up in namespace {netns} (no {}): start it with `capnet up`", dir.display());
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let Some((group, domains)) =
            text.lines().next().and_then(|l| l.strip_prefix(LOG_HEADER)).and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        out.push(Log { group: group.into(), domains: domains.split_whitespace().map(String::from).collect(), path });
    }
    out.sort_by(|a, b| a.group.cmp(&b.group));
    let sup = run_dir(netns).join("log");
    if sup.exists() {
        out.push(Log { group: "supervisor".into(), domains: vec!["supervisor".into()], path: sup });
    }
    Ok(out)
}

/// Prints the logs of `domain` (every log if `None`); with `follow`, keeps
/// printing what is added until Ctrl-C or the stack goes down.
pub fn show(netns: &str, domain: Option<&str>, follow: bool) -> Result<()> {
    let all = logs(netns)?;
    let chosen: Vec<&Log> = match domain {
        None => all.iter().collect(),
        Some(d) => all.iter().filter(|l| l.domains.iter().any(|x| x == d) || l.group == d).collect(),
    };
    if chosen.is_empty() {
        let known: Vec<&str> = all.iter().flat_map(|l| l.domains.iter().map(String::as_str)).collect();
        bail!("no domain {:?} in namespace {netns}; there are: {}", domain.unwrap_or(""), known.join(", "));
    }
    let tag = |l: &Log| if l.domains.len() == 1 { l.domains[0].clone() } else { l.group.clone() };
    let mut offsets = vec![0u64; chosen.len()];
    let mut lines = Vec::new();
    for (i, l) in chosen.iter().enumerate() {
        let (text, end) = read_from(&l.path, 0);
        offsets[i] = end;
        lines.extend(text.lines().filter(|x| !x.starts_with(LOG_HEADER)).map(|x| (x.to_owned(), tag(l))));
    }
    // Times first on each line: a stable sort merges the logs in time order.
    lines.sort_by(|a, b| a.0.get(..27).cmp(&b.0.get(..27)));
    let mut out = std::io::stdout().lock();
    for (line, who) in &lines {
        writeln!(out, "{who:<8} {line}")?;
    }
    out.flush()?;
    if !follow {
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(200));
        for (i, l) in chosen.iter().enumerate() {
            if !l.path.exists() {
                return Ok(()); // the stack went down
            }
            let (text, end) = read_from(&l.path, offsets[i]);
            // Only whole lines; the rest is read next time.
            let whole = text.rfind('\n').map_or(0, |k| k + 1);
            for line in text[..whole].lines() {
                writeln!(out, "{:<8} {line}", tag(l))?;
            }
            offsets[i] = end - (text.len() - whole) as u64;
        }
        out.flush()?;
    }
    Ok(())
}

/// The text of `path` from byte `from` on, and where it ended.
fn read_from(path: &Path, from: u64) -> (String, u64) {
    let Ok(mut f) = std::fs::File::open(path) else { return (String::new(), from) };
    if f.seek(SeekFrom::Start(from)).is_err() {
        return (String::new(), from);
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let end = from + buf.len() as u64;
    (String::from_utf8_lossy(&buf).into_owned(), end)
}
