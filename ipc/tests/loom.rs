//! loom models of the ring and of the sleep/wake protocol, on heap storage.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p capnet-ipc --release --test loom`
//! (`make test` does, in its own target directory). The futex is modelled as one
//! atomic compare-and-sleep (`LoomFutex`) without timeouts, so a lost wakeup is a
//! deadlock loom reports.
#![cfg(loom)]

use std::sync::Arc;

use capnet_ipc::channel::{area_len, init_area};
use capnet_ipc::notify::{LoomFutex, SpinPolicy, SpinTokens};
use capnet_ipc::shm::HeapWords;
use capnet_ipc::{ChannelEnd, ChannelParams, Descriptor, End, Interest, Waiter};

type End_ = ChannelEnd<Arc<HeapWords>, Arc<HeapWords>, Descriptor, Arc<LoomFutex>>;

fn pair(capacity: u32) -> (End_, End_) {
    let params = ChannelParams { capacity, epoch: 1 };
    let len = area_len::<Descriptor>(capacity);
    let (a, b) = (Arc::new(HeapWords::new(len)), Arc::new(HeapWords::new(len)));
    init_area::<_, Descriptor>(&*a, End::A, params).unwrap();
    init_area::<_, Descriptor>(&*b, End::B, params).unwrap();
    let futex = Arc::new(LoomFutex::default());
    let ea = ChannelEnd::attach(a.clone(), b.clone(), End::A, params, futex.clone()).unwrap();
    let eb = ChannelEnd::attach(b, a, End::B, params, futex).unwrap();
    (ea, eb)
}

fn d(i: u32) -> Descriptor {
    Descriptor { index: i, len: i, ..Default::default() }
}

/// Every model explores all interleavings with up to 3 preemptions (loom's
/// recommended bound: bugs found in practice need few), which keeps `make test`
/// within minutes on two cores.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

/// Pops one at a time until `n` arrived, sleeping (never spinning) when empty.
fn recv_blocking(rx: &mut End_, n: usize) -> Vec<Descriptor> {
    let mut w = Waiter::new(SpinPolicy::NEVER);
    let mut got = Vec::new();
    while got.len() < n {
        if rx.recv(&mut got, 1).unwrap() == 0 {
            w.wait(&mut [&mut *rx], None, NO_TOKENS);
        }
    }
    got
}

const NO_TOKENS: Option<&SpinTokens<HeapWords>> = None;

/// Producer pushes 3 items through a 2-slot ring, yielding when full; the consumer
/// pops until it has all 3: FIFO, nothing lost, nothing duplicated.
#[test]
fn ring_fifo_no_loss_no_duplication() {
    model(|| {
        let (mut tx, mut rx) = pair(2);
        let h = loom::thread::spawn(move || {
            let mut i = 0;
            while i < 3 {
                if tx.send(&[d(i)]).unwrap() == 1 {
                    i += 1;
                } else {
                    loom::thread::yield_now();
                }
            }
        });
        let mut got = Vec::new();
        while got.len() < 3 {
            if rx.recv(&mut got, 2).unwrap() == 0 {
                loom::thread::yield_now();
            }
        }
        assert_eq!(got, vec![d(0), d(1), d(2)]);
        h.join().unwrap();
    });
}

/// Both sides block instead of yielding: the consumer sleeps when empty, the
/// producer sleeps when the 2-slot ring is full. A lost wakeup in either
/// direction leaves a thread asleep forever, which loom reports as a deadlock.
#[test]
fn sleep_wake_no_lost_wakeup() {
    model(|| {
        let (mut tx, mut rx) = pair(2);
        let h = loom::thread::spawn(move || {
            tx.interest = Interest::SPACE;
            let mut w = Waiter::new(SpinPolicy::NEVER);
            let mut i = 0;
            while i < 3 {
                if tx.send(&[d(i)]).unwrap() == 1 {
                    i += 1;
                } else {
                    w.wait(&mut [&mut tx], None, NO_TOKENS);
                }
            }
        });
        assert_eq!(recv_blocking(&mut rx, 3), vec![d(0), d(1), d(2)]);
        h.join().unwrap();
    });
}

/// Only the consumer sleeps; two separate pushes (the case loom found a lost wakeup
/// in when the wake sequence was read after the sleep announcement).
#[test]
fn consumer_sleeps_producer_yields() {
    model(|| {
        let (mut tx, mut rx) = pair(4);
        let h = loom::thread::spawn(move || {
            tx.send(&[d(0)]).unwrap();
            tx.send(&[d(1)]).unwrap();
        });
        assert_eq!(recv_blocking(&mut rx, 2), vec![d(0), d(1)]);
        h.join().unwrap();
    });
}

/// The one seqlock (`blob`): a writer publishes twice while a reader copies the
/// blob out; the reader sees nothing yet, the first, the second, or a busy
/// refusal — never a mix of the two.
#[test]
fn a_blob_is_read_whole_or_not_at_all() {
    use capnet_ipc::blob::{self, BlobError};
    model(|| {
        let region = Arc::new(HeapWords::new(blob::region_len(16)));
        let w = region.clone();
        let writer = loom::thread::spawn(move || {
            blob::publish(&*w, &[1u8; 16]);
            blob::publish(&*w, &[2u8; 9]);
        });
        match blob::read(&*region) {
            Ok(b) => assert!(b == [1u8; 16] || b == [2u8; 9], "a torn blob: {b:?}"),
            Err(BlobError::Magic | BlobError::Busy) => {}
            Err(e) => panic!("{e}"),
        }
        writer.join().unwrap();
        assert_eq!(blob::read(&*region), Ok(vec![2u8; 9]));
    });
}
