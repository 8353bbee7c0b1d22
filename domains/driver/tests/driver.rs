//! The impairment stage, the in-memory wire and pcap capture.

use std::time::Duration;

use capnet_driver::capture::Capture;
use capnet_driver::impair::{Impairer, Impairment};
use capnet_driver::wire::{MemWire, Side};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn run(cfg: Impairment, n: u32) -> (Impairer, Vec<Vec<u8>>) {
    let mut s = Impairer::new(cfg).expect("valid");
    for i in 0..n {
        s.push(ms(u64::from(i)), i.to_be_bytes().to_vec());
    }
    let mut out = Vec::new();
    while let Some(f) = s.pop(ms(u64::from(n) + 10_000)) {
        out.push(f);
    }
    (s, out)
}

#[test]
fn loss_rate_matches_and_is_reproducible() {
    let (s, out) = run(Impairment::loss(0.10, 42), 20_000);
    let lost = 20_000 - out.len();
    assert!((1_700..=2_300).contains(&lost), "10% of 20000 ≈ 2000, got {lost}");
    assert_eq!(s.stats.dropped as usize, lost, "the counter agrees with what went missing");
    let (_, again) = run(Impairment::loss(0.10, 42), 20_000);
    assert_eq!(out, again, "same seed, same losses");
    let (_, other) = run(Impairment::loss(0.10, 43), 20_000);
    assert_ne!(out, other, "another seed, other losses");
}

#[test]
fn duplication_reordering_and_corruption() {
    let cfg = Impairment { duplicate: 0.05, reorder: 0.05, reorder_delay: ms(5), corrupt: 0.05, ..Impairment::NONE };
    let (s, out) = run(Impairment { seed: 7, ..cfg }, 10_000);
    assert_eq!(out.len() as u64, 10_000 + s.stats.duplicated, "nothing lost, duplicates added");
    assert!(s.stats.duplicated > 300 && s.stats.reordered > 300 && s.stats.corrupted > 300, "{:?}", s.stats);
    let in_order = out.windows(2).filter(|w| w[0] <= w[1]).count();
    assert!(in_order < out.len() - 1, "some frames overtook others");
    let flipped: u32 = (0..10_000u32).filter(|i| !out.contains(&i.to_be_bytes().to_vec())).count() as u32;
    assert!(flipped > 0 && u64::from(flipped) <= s.stats.corrupted, "corrupted frames differ from every original");
}

#[test]
fn delay_holds_frames_until_due() {
    let mut s = Impairer::new(Impairment { delay: ms(50), ..Impairment::NONE }).expect("valid");
    s.push(ms(0), vec![1]);
    s.push(ms(10), vec![2]);
    assert_eq!(s.pop(ms(49)), None);
    assert_eq!(s.poll_at(), Some(ms(50)));
    assert_eq!(s.pop(ms(50)), Some(vec![1]));
    assert_eq!(s.pop(ms(59)), None);
    assert_eq!(s.pop(ms(60)), Some(vec![2]));
}

#[test]
fn probabilities_outside_zero_to_one_are_refused() {
    let err = Impairer::new(Impairment { loss: 1.5, ..Impairment::NONE }).expect_err("bad");
    assert_eq!(err.name, "loss");
    assert!(err.to_string().contains("between 0 and 1"));
}

#[test]
fn the_memory_wire_carries_both_ways_with_per_direction_impairment() {
    let mut w = MemWire::new(Impairment::loss(1.0, 1), Impairment::NONE).expect("wire");
    w.send(Side::A, ms(0), vec![0xa]);
    w.send(Side::B, ms(0), vec![0xb]);
    assert_eq!(w.recv(Side::B, ms(1)), None, "A→B loses everything");
    assert_eq!(w.recv(Side::A, ms(1)), Some(vec![0xb]));
    assert_eq!(w.direction(Side::A).stats.dropped, 1);
    let mut p = MemWire::perfect();
    p.send(Side::A, ms(0), vec![1, 2, 3]);
    assert_eq!(p.recv(Side::A, ms(0)), None, "a frame does not come back to its sender");
    assert_eq!(p.recv(Side::B, ms(0)), Some(vec![1, 2, 3]));
}

#[test]
fn capture_is_a_pcap_that_tcpdump_reads() {
    let path = std::env::temp_dir().join(format!("capnet-capture-{}.pcap", std::process::id()));
    let file = std::fs::File::create(&path).expect("create");
    let mut cap = Capture::new(file, 65535).expect("capture");
    // An ARP request: who has 10.77.0.1? tell 10.77.0.2.
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 2, 0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 2, 10, 77, 0, 2]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[10, 77, 0, 1]);
    cap.frame(Duration::from_secs(1_700_000_000), &arp).expect("frame");
    assert_eq!(cap.frames(), 1);
    drop(cap.into_inner());
    let read = pcap_file::pcap::PcapReader::new(std::fs::File::open(&path).expect("open")).expect("reader");
    assert_eq!(read.header().datalink, pcap_file::DataLink::ETHERNET);
    let out = std::process::Command::new("tcpdump")
        .args(["-n", "-r"])
        .arg(&path)
        .output()
        .expect("tcpdump (make deps installs it)");
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("Request who-has 10.77.0.1 tell 10.77.0.2"), "tcpdump said: {text}");
}
