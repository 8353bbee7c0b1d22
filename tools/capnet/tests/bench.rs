//! `capnet bench --quick` runs on this machine and its JSON parses: every
//! workload measured on every composition it applies to (over the TAP and over
//! the in-memory wire), with the factored/monolithic ratio of each path. That it runs, not how fast: figures are never
//! asserted against a speed.

use serde_json::Value;

const CAPNET: &str = env!("CARGO_BIN_EXE_capnet");

#[test]
fn capnet_bench_quick_measures_every_workload_on_every_composition() {
    let out = std::process::Command::new(CAPNET).args(["bench", "--quick", "--json"]).output().expect("capnet bench");
    assert!(out.status.success(), "capnet bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).expect("the JSON parses");
    let mut comps: Vec<&str> =
        r["compositions"].as_array().expect("compositions").iter().filter_map(|c| c["key"].as_str()).collect();
    // smoltcp's column is there when `make smoltcp-examples` has built its peer.
    let smoltcp = comps.contains(&"smoltcp");
    comps.retain(|c| *c != "smoltcp");
    assert_eq!(
        comps,
        [
            "mono",
            "two-group",
            "three-group",
            "factored",
            "mono-wire",
            "two-group-wire",
            "three-group-wire",
            "factored-wire",
            "linux",
            "device"
        ]
    );
    // Runs in the design's shape: the composition and the path apart.
    let figures = r["runs"].as_array().expect("runs");
    let key = |f: &Value| match f["path"].as_str() {
        Some("wire") => format!("{}-wire", f["composition"].as_str().unwrap_or_default()),
        _ => f["composition"].as_str().unwrap_or_default().to_owned(),
    };
    let workloads: std::collections::BTreeSet<&str> = figures.iter().filter_map(|f| f["workload"].as_str()).collect();
    assert_eq!(workloads.len(), 11, "{workloads:?}");
    for w in &workloads {
        let on: Vec<String> = figures
            .iter()
            .filter(|f| f["workload"] == *w)
            .inspect(|f| {
                assert!(f["value"].as_f64().is_some_and(|m| m > 0.0), "{w}: a figure of nothing: {f}");
                assert_eq!(f["samples"].as_array().map(Vec::len), Some(1), "one round: {f}");
                assert!(f["unit"].is_string() && f["spread"].is_number(), "{f}");
            })
            .map(key)
            .collect();
        // The borrowing calls are capnet's: its eight compositions.
        let want = match w {
            _ if w.ends_with("borrowing calls") => 8,
            _ if w.starts_with("UDP") => 10 + usize::from(smoltcp),
            _ => 9 + usize::from(smoltcp),
        };
        assert_eq!(on.len(), want, "{w} ran on {on:?}");
        if w.ends_with("borrowing calls") {
            // Over the TAP the one copy of a byte is the device's: a copy
            // put back anywhere would make it 2 (a retransmission adds a
            // little; this is a count, not a speed).
            for f in figures.iter().filter(|f| f["workload"] == *w && f["path"] == "tap") {
                let c = f["copies_per_byte"].as_f64().expect("copies counted");
                assert!((0.9..1.5).contains(&c), "{w} on {}: {c} copies per byte", key(f));
            }
        }
        if w.contains("request/response") {
            let f = figures.iter().find(|f| f["workload"] == *w && key(f) == "factored").expect("factored");
            let l: Vec<f64> = f["latency_us"].as_array().expect("latency").iter().filter_map(Value::as_f64).collect();
            assert!(l.len() == 3 && l[0] <= l[1] && l[1] <= l[2], "p50 ≤ p99 ≤ p99.9: {l:?}");
        }
    }
    for path in ["tap", "wire"] {
        let ratios: Vec<&Value> =
            r["ratios"].as_array().expect("ratios").iter().filter(|x| x["path"] == path).collect();
        assert_eq!(ratios.len(), 11, "{path}");
        assert!(ratios.iter().all(|x| x["factored_over_mono"].as_f64().is_some_and(|v| v > 0.0)), "{path}: {ratios:?}");
    }
    assert!(r["wake_us"].as_f64().is_some_and(|w| w > 0.0), "the same-core wake cost: {}", r["wake_us"]);
    // The factored stack's costs were read from its status.
    let f = figures.iter().find(|f| key(f) == "factored").expect("a factored figure");
    assert!(f["cpu_s"].as_object().is_some_and(|c| c.len() == 5), "{f}");
}
