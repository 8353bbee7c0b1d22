//! The hostile-peer property as a coverage-guided fuzz target: the input is a script
//! of peer scribbles and our operations on one channel end. Nothing may panic, hang
//! or read out of bounds. Run: `cd ipc/fuzz && cargo +nightly fuzz run ring_consumer`.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use capnet_ipc::channel::{area_len, init_area};
use capnet_ipc::notify::{LinuxFutex, SpinPolicy, SpinTokens};
use capnet_ipc::shm::{HeapWords, ShmWrite};
use capnet_ipc::{ChannelEnd, ChannelParams, Descriptor, End, Interest, Ordering, Waiter};
use libfuzzer_sys::fuzz_target;

const CAP: u32 = 16;

fuzz_target!(|data: &[u8]| {
    let params = ChannelParams { capacity: CAP, epoch: 1 };
    let len = area_len::<Descriptor>(CAP);
    let (a, b) = (Arc::new(HeapWords::new(len)), Arc::new(HeapWords::new(len)));
    init_area::<_, Descriptor>(&*a, End::A, params).unwrap();
    init_area::<_, Descriptor>(&*b, End::B, params).unwrap();
    let Ok(mut peer) = ChannelEnd::<_, _, Descriptor, _>::attach(a.clone(), b.clone(), End::A, params, LinuxFutex)
    else {
        return;
    };
    let Ok(mut ours) = ChannelEnd::<_, _, Descriptor, _>::attach(b, a.clone(), End::B, params, LinuxFutex) else {
        return;
    };
    ours.interest = Interest::BOTH;
    let mut waiter = Waiter::new(SpinPolicy::NEVER);
    let mut out = Vec::new();
    for op in data.chunks(9) {
        let (kind, rest) = (op[0], &op[1..]);
        let word = |n: usize| rest.get(..n).map(|b| b.iter().rev().fold(0u64, |acc, x| acc << 8 | u64::from(*x)));
        match kind % 6 {
            0 => {
                let items = vec![Descriptor::default(); usize::from(kind / 6 % 20)];
                let _ = peer.send(&items);
            }
            1 => {
                if let (Some(at), Some(v)) = (rest.first(), word(8).map(|w| w >> 8)) {
                    a.store64((usize::from(*at) % (len / 8)) * 8, v, Ordering::Relaxed);
                }
            }
            2 => {
                if let (Some(at), Some(v)) = (rest.first(), word(5).map(|w| (w >> 8) as u32)) {
                    a.store32((usize::from(*at) % (len / 4)) * 4, v, Ordering::Relaxed);
                }
            }
            3 => {
                out.clear();
                let _ = ours.recv(&mut out, usize::from(kind / 6));
            }
            4 => {
                let _ = ours.send(&[Descriptor::default(); 3]);
            }
            _ => {
                let _ = waiter.wait(&mut [&mut ours], Some(Duration::from_micros(10)), None::<&SpinTokens<HeapWords>>);
            }
        }
    }
});
