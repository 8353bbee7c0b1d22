//! A hostile peer writes arbitrary bytes into every word it owns while our end runs.
//!
//! Whatever it writes — indices, slots, header, sleep and wake words — our end must
//! never panic, hang, or read out of bounds: it returns data, or a `RingError` that
//! stays sticky, and every descriptor it hands on is bounds-checked by the pool view.
//! The sequential property explores interleavings action by action; the concurrent
//! one lets a thread scribble on a real memfd mapping while the consumer loops.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

use capnet_ipc::channel::{area_len, init_area};
use capnet_ipc::notify::{LinuxFutex, SpinPolicy, SpinTokens};
use capnet_ipc::pool::{BufferPool, PoolLayout, PoolView};
use capnet_ipc::shm::{HeapWords, ShmWrite};
use capnet_ipc::shm_channel;
use capnet_ipc::{ChannelEnd, ChannelParams, Descriptor, End, Interest, Ordering, Waiter};
use proptest::prelude::*;

const CAP: u32 = 16;

#[derive(Debug, Clone)]
enum Act {
    /// The peer behaves: pushes `n` descriptors through its real producer.
    PeerSend(u8),
    /// The peer writes `value` into the 64-bit word at word index `at` of its area.
    Scribble64 { at: u16, value: u64 },
    /// The peer writes `value` into the 32-bit word at word index `at`.
    Scribble32 { at: u16, value: u32 },
    /// We pop up to `n`.
    Recv(u8),
    /// We push `n`.
    Send(u8),
    /// We wait (with a short timeout) for data or space.
    Wait,
}

fn act() -> impl Strategy<Value = Act> {
    let words = (area_len::<Descriptor>(CAP) / 4) as u16;
    prop_oneof![
        (0u8..20).prop_map(Act::PeerSend),
        (0..words / 2, any::<u64>()).prop_map(|(at, value)| Act::Scribble64 { at, value }),
        (0..words, any::<u32>()).prop_map(|(at, value)| Act::Scribble32 { at, value }),
        // Small values and off-by-capacity values hit the index checks hardest.
        (0..words, prop_oneof![0u32..40, Just(u32::MAX), (CAP - 1..CAP + 2)])
            .prop_map(|(at, value)| Act::Scribble32 { at, value }),
        (0u8..20).prop_map(Act::Recv),
        (0u8..20).prop_map(Act::Send),
        Just(Act::Wait),
    ]
}

type HeapEnd = ChannelEnd<Arc<HeapWords>, Arc<HeapWords>, Descriptor, LinuxFutex>;

fn heap_pair(params: ChannelParams) -> (Arc<HeapWords>, HeapEnd, HeapEnd) {
    let len = area_len::<Descriptor>(params.capacity);
    let (a, b) = (Arc::new(HeapWords::new(len)), Arc::new(HeapWords::new(len)));
    init_area::<_, Descriptor>(&*a, End::A, params).expect("init a");
    init_area::<_, Descriptor>(&*b, End::B, params).expect("init b");
    let peer = ChannelEnd::attach(a.clone(), b.clone(), End::A, params, LinuxFutex).expect("attach a");
    let ours = ChannelEnd::attach(b, a.clone(), End::B, params, LinuxFutex).expect("attach b");
    (a, peer, ours)
}

fn pool_view() -> (BufferPool, PoolView) {
    let p = BufferPool::create("t-hostile", 1, PoolLayout::with_count(8)).expect("pool");
    let v = PoolView::attach(p.region().fd().try_clone_to_owned().expect("dup"), 1).expect("view");
    (p, v)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn hostile_peer_words_never_break_our_end(acts in proptest::collection::vec(act(), 1..60)) {
        let params = ChannelParams { capacity: CAP, epoch: 1 };
        let (peer_area, mut peer, mut ours) = heap_pair(params);
        let (_pool, view) = pool_view();
        ours.interest = Interest::BOTH;
        let mut waiter = Waiter::new(SpinPolicy::NEVER);
        let mut broken = None;
        let mut out = Vec::new();
        let mut violations = 0u32;
        for a in acts {
            match a {
                Act::PeerSend(n) => {
                    let items: Vec<_> = (0..u32::from(n)).map(|i| Descriptor { pool: 1, index: i % 8, len: 10, ..Default::default() }).collect();
                    let _ = peer.send(&items); // the peer's own view may be broken by its own scribbles
                }
                Act::Scribble64 { at, value } => peer_area.store64(usize::from(at) * 8, value, Ordering::Relaxed),
                Act::Scribble32 { at, value } => peer_area.store32(usize::from(at) * 4, value, Ordering::Relaxed),
                Act::Recv(n) => {
                    out.clear();
                    match ours.recv(&mut out, usize::from(n)) {
                        Ok(k) => {
                            prop_assert!(broken.is_none(), "a broken ring must stay broken");
                            prop_assert!(k <= usize::from(n) && k <= CAP as usize);
                            for d in &out {
                                let mut bytes = Vec::new();
                                if view.read_into(d, &mut bytes).is_err() {
                                    violations += 1;
                                } else {
                                    prop_assert_eq!(bytes.len(), d.len as usize);
                                }
                            }
                        }
                        Err(e) => {
                            if let Some(prev) = broken { prop_assert_eq!(prev, e); }
                            broken = Some(e);
                            prop_assert!(ours.is_broken(), "a violation is counted on the end");
                        }
                    }
                }
                Act::Send(n) => {
                    let items = vec![Descriptor::default(); usize::from(n)];
                    match ours.send(&items) {
                        Ok(k) => prop_assert!(k <= usize::from(n)),
                        Err(_) => violations += 1,
                    }
                }
                Act::Wait => {
                    let _ = waiter.wait(&mut [&mut ours], Some(Duration::from_micros(200)), None::<&SpinTokens<HeapWords>>);
                }
            }
        }
        let _ = violations;
        prop_assert!(ours.stats.violations <= 1, "a broken end counts its violation once");
    }
}

/// A thread scribbles random values over the peer's whole area (a real memfd, seen
/// by our end through its own read-only mapping) while our end loops.
#[test]
fn concurrent_scribbler_on_a_real_mapping() {
    use rand_like::XorShift;
    let params = ChannelParams { capacity: 64, epoch: 1 };
    let (_pool, view) = pool_view();
    for seed in 1..=40u64 {
        let a = shm_channel::create_area::<Descriptor>("t-scribble.a", End::A, params).expect("a");
        let b = shm_channel::create_area::<Descriptor>("t-scribble.b", End::B, params).expect("b");
        let a_fd = a.fd().try_clone_to_owned().expect("dup");
        let a = Arc::new(a);
        let mut ours = shm_channel::attach::<Descriptor>(b, a_fd, End::B, params).expect("attach");
        ours.interest = Interest::BOTH;
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let scribbler = {
            let (a, stop, writes) = (a.clone(), stop.clone(), writes.clone());
            std::thread::spawn(move || {
                let mut rng = XorShift(seed);
                let words = area_len::<Descriptor>(64) / 8;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let at = (rng.next() as usize % words) * 8;
                    let v = match rng.next() % 4 {
                        0 => rng.next(),
                        1 => rng.next() % 200,
                        2 => u64::MAX,
                        _ => 64 + rng.next() % 3,
                    };
                    a.store64(at, v, Ordering::Relaxed);
                    writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        };
        let mut waiter = Waiter::new(SpinPolicy::NEVER);
        let mut out = Vec::new();
        let mut bytes = Vec::new();
        for _ in 0..5_000 {
            out.clear();
            if ours.recv(&mut out, 32).is_err() {
                break;
            }
            for d in &out {
                bytes.clear();
                let _ = view.read_into(d, &mut bytes);
            }
            let _ = ours.send(&[Descriptor::default()]);
            let _ = waiter.wait(&mut [&mut ours], Some(Duration::from_micros(50)), None::<&SpinTokens<HeapWords>>);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        scribbler.join().expect("scribbler");
        assert!(writes.load(std::sync::atomic::Ordering::Relaxed) > 0);
    }
}

mod rand_like {
    /// A tiny seeded generator, so the scribbles repeat run to run.
    pub struct XorShift(pub u64);
    impl XorShift {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }
}
