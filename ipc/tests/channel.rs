//! Channels over real memfd regions: FIFO order, header checks on attach, and the
//! spin-then-block protocol across threads and across processes.
#![cfg(not(loom))]

use std::sync::Arc;
use std::time::Duration;

use capnet_ipc::channel::{area_len, init_area, AttachError};
use capnet_ipc::notify::SpinPolicy;
use capnet_ipc::shm::{HeapWords, ShmWrite};
use capnet_ipc::shm_channel::{self, ShmEnd};
use capnet_ipc::{ChannelEnd, ChannelParams, Descriptor, End, Interest, Ordering, WaitOutcome, Waiter};

fn d(i: u32) -> Descriptor {
    Descriptor { pool: 1, flags: 0, index: i, offset: 0, len: i }
}

#[test]
fn fifo_both_directions_with_wraparound() {
    let params = ChannelParams { capacity: 8, epoch: 3 };
    let (mut a, mut b) = shm_channel::pair::<Descriptor>("t-fifo", params).expect("pair");
    let mut next = 0u32;
    let mut expect = 0u32;
    let mut out = Vec::new();
    for round in 0..50 {
        let batch: Vec<_> = (next..next + 5).map(d).collect();
        let n = a.send(&batch).expect("send");
        next += n as u32;
        out.clear();
        b.recv(&mut out, 3 + round % 4).expect("recv");
        for got in &out {
            assert_eq!(*got, d(expect));
            expect += 1;
        }
        b.send(&out).expect("echo");
    }
    let mut back = Vec::new();
    a.recv(&mut back, usize::MAX).expect("recv back");
    assert!(!back.is_empty());
    assert!(a.space().expect("space") <= 8);
}

#[test]
fn attach_checks_every_header_field() {
    let params = ChannelParams { capacity: 16, epoch: 9 };
    let len = area_len::<Descriptor>(16);
    let mine = Arc::new(HeapWords::new(len));
    init_area::<_, Descriptor>(&*mine, End::A, params).expect("init");
    let attach = |peer: Arc<HeapWords>, p: ChannelParams| {
        ChannelEnd::<_, _, Descriptor, _>::attach(mine.clone(), peer, End::A, p, capnet_ipc::notify::LinuxFutex)
            .map(|_| ())
    };
    let fresh = |end: End, p: ChannelParams| {
        let w = Arc::new(HeapWords::new(area_len::<Descriptor>(64)));
        init_area::<_, Descriptor>(&*w, end, p).expect("init");
        w
    };
    assert!(attach(fresh(End::B, params), params).is_ok());
    assert!(matches!(attach(fresh(End::A, params), params), Err(AttachError::End { .. })), "same end twice");
    let stale = fresh(End::B, ChannelParams { epoch: 8, ..params });
    let err = attach(stale, params).expect_err("stale epoch");
    assert!(err.to_string().contains("epoch"), "{err}");
    let cap = fresh(End::B, ChannelParams { capacity: 32, ..params });
    assert!(matches!(attach(cap, params), Err(AttachError::Mismatch { field: "capacity", .. })));
    let garbage = fresh(End::B, params);
    garbage.store64(0, 0xdead_beef, Ordering::Relaxed);
    assert!(matches!(attach(garbage, params), Err(AttachError::Magic(0xdead_beef))));
    let version = fresh(End::B, params);
    version.store32(8, 99, Ordering::Relaxed);
    assert!(matches!(attach(version, params), Err(AttachError::Version { theirs: 99, .. })));
    assert!(matches!(
        init_area::<_, Descriptor>(&*mine, End::A, ChannelParams { capacity: 12, epoch: 1 }),
        Err(AttachError::Capacity(12))
    ));
}

/// Streams `n` descriptors from a producer thread that blocks when the ring is full,
/// to a consumer that blocks when it is empty; returns (consumer, producer) ends.
fn stream(n: u32, capacity: u32, policy: SpinPolicy) -> (ShmEnd, ShmEnd, Waiter) {
    let params = ChannelParams { capacity, epoch: 1 };
    let (mut tx, mut rx) = shm_channel::pair::<Descriptor>("t-stream", params).expect("pair");
    let producer = std::thread::spawn(move || {
        let mut w = Waiter::new(policy);
        tx.interest = Interest::SPACE;
        let mut sent = 0;
        while sent < n {
            let batch: Vec<_> = (sent..(sent + 32).min(n)).map(d).collect();
            let k = tx.send(&batch).expect("send");
            sent += k as u32;
            if k == 0 {
                w.wait(
                    &mut [&mut tx],
                    Some(Duration::from_secs(5)),
                    None::<&capnet_ipc::notify::SpinTokens<HeapWords>>,
                );
            }
        }
        tx
    });
    let mut w = Waiter::new(policy);
    let mut got = 0;
    let mut out = Vec::with_capacity(64);
    while got < n {
        out.clear();
        let k = rx.recv(&mut out, 64).expect("recv");
        for (i, x) in out.iter().enumerate() {
            assert_eq!(*x, d(got + i as u32), "order");
        }
        got += k as u32;
        if k == 0 {
            let r = w.wait(
                &mut [&mut rx],
                Some(Duration::from_secs(5)),
                None::<&capnet_ipc::notify::SpinTokens<HeapWords>>,
            );
            assert!(r == WaitOutcome::Ready || r == WaitOutcome::Idle);
        }
    }
    (rx, producer.join().expect("producer"), w)
}

#[test]
fn blocking_stream_loses_nothing_without_spinning() {
    let (rx, tx, w) = stream(200_000, 64, SpinPolicy::NEVER);
    assert_eq!(rx.stats.received, 200_000);
    assert_eq!(tx.stats.sent, 200_000);
    assert!(w.stats.sleeps > 0, "with no spinning and a small ring the consumer must have slept");
}

#[test]
fn deep_window_streams_with_few_wakes() {
    let (rx, tx, _) = stream(500_000, 1024, SpinPolicy::DEFAULT);
    assert_eq!(rx.stats.received, 500_000);
    // Not a speed claim: with drain-to-empty and a 1024-slot window, wakes are per
    // sleep, never per message.
    assert!(tx.stats.wakes + rx.stats.wakes < 500_000 / 4, "wakes: {} + {}", tx.stats.wakes, rx.stats.wakes);
}

#[test]
fn wait_any_wakes_on_the_channel_that_gets_data() {
    let p = ChannelParams { capacity: 16, epoch: 1 };
    let (a1, mut b1) = shm_channel::pair::<Descriptor>("t-any1", p).expect("pair");
    let (mut a2, mut b2) = shm_channel::pair::<Descriptor>("t-any2", p).expect("pair");
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        a2.send(&[d(42)]).expect("send");
        (a1.stats, a2)
    });
    let mut w = Waiter::new(SpinPolicy::NEVER);
    let mut out = Vec::new();
    for _ in 0..100 {
        if w.wait(
            &mut [&mut b1, &mut b2],
            Some(Duration::from_secs(5)),
            None::<&capnet_ipc::notify::SpinTokens<HeapWords>>,
        ) == WaitOutcome::Ready
        {
            break;
        }
    }
    b2.recv(&mut out, 8).expect("recv");
    assert_eq!(out, vec![d(42)]);
    assert_eq!(b1.recv(&mut out, 8).expect("recv"), 0);
    let (_, a2) = sender.join().expect("sender");
    assert_eq!(a2.stats.wakes, 1, "exactly one wake for one sleep");
    assert!(w.stats.sleeps >= 1);
}

#[test]
fn timeout_returns_idle() {
    let (_a, mut b) = shm_channel::pair::<Descriptor>("t-idle", ChannelParams::default()).expect("pair");
    let mut w = Waiter::new(SpinPolicy::DEFAULT);
    let tokens = shm_channel::spin_tokens(1).expect("tokens");
    let r = w.wait(&mut [&mut b], Some(Duration::from_millis(20)), Some(&tokens));
    assert_eq!(r, WaitOutcome::Idle);
    assert_eq!(tokens.outstanding(), 0, "the spin token was given back");
}
