//! A message end trusts no length a peer writes (issue 18, finding 1): a
//! descriptor whose length is `0xffffffff`, or anything past the peer's buffer
//! size or [`MAX_MESSAGE`], is refused *before* anything is allocated for it.
//!
//! The test binary counts the largest allocation it is asked for: the old
//! receiver grew its scratch buffer to the descriptor's length first and checked
//! it after ("memory allocation of 4294967295 bytes failed" inside a sandbox's
//! address-space limit), which this asserts against.
#![cfg(not(loom))]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use capnet_ipc::msg::{MsgEnd, MsgError, MsgHalf, MAX_MESSAGE};
use capnet_ipc::{Descriptor, End};

/// The system allocator, remembering the largest request it saw.
struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn pair(tag: &str) -> (MsgEnd, MsgEnd) {
    let a = MsgHalf::new(&format!("t-len-{tag}-a"), End::A).expect("half a");
    let b = MsgHalf::new(&format!("t-len-{tag}-b"), End::B).expect("half b");
    let (ga, gb) = (a.grant().expect("grant a"), b.grant().expect("grant b"));
    (a.attach(End::A, gb).expect("attach a"), b.attach(End::B, ga).expect("attach b"))
}

#[test]
fn a_descriptor_of_any_length_is_checked_before_anything_grows() {
    // The peer's pool is id 1 (end A), 16 buffers of MAX_MESSAGE + 64 bytes.
    for len in [u32::MAX, u32::MAX - 63, 1 << 31, MAX_MESSAGE + 65, MAX_MESSAGE + 1] {
        let (mut a, mut b) = pair(&len.to_string());
        // A well-formed message first, so the scratch buffer exists.
        assert!(a.send(b"hello").expect("send"));
        let mut got = Vec::new();
        b.recv(|m| got.push(m.to_vec())).expect("recv");
        assert_eq!(got, [b"hello".to_vec()]);

        LARGEST.store(0, Ordering::Relaxed);
        let d = Descriptor { pool: 1, flags: Descriptor::CONTROL, index: 0, offset: 0, len };
        assert_eq!(a.channel().send(&[d]).expect("raw send"), 1);
        let mut handed = 0;
        let r = b.recv(|_| handed += 1);
        assert!(
            matches!(r, Err(MsgError::TooLarge(_) | MsgError::Pool(_))),
            "a {len}-byte descriptor is refused: {r:?}"
        );
        assert_eq!(handed, 0, "nothing of it reached the reader");
        let largest = LARGEST.load(Ordering::Relaxed);
        assert!(largest < 2 << 20, "a {len}-byte descriptor made the receiver ask for {largest} bytes");
    }
}

#[test]
fn a_message_pool_of_another_shape_is_refused_at_attach() {
    use capnet_ipc::msg::MsgGrant;
    use capnet_ipc::pool::{BufferPool, PoolLayout};
    let a = MsgHalf::new("t-len-shape-a", End::A).expect("half a");
    // The peer's pool claims 1 MiB buffers where a message pool has its own size.
    let big = BufferPool::create("t-len-shape-pool", 2, PoolLayout { buf_size: 1 << 20, count: 4, headroom: 0 })
        .expect("pool");
    let b = MsgHalf::new("t-len-shape-b", End::B).expect("half b");
    let gb = b.grant().expect("grant b");
    let forged = MsgGrant { area: gb.area, pool: big.region().fd().try_clone_to_owned().expect("dup") };
    let r = a.attach(End::A, forged);
    assert!(matches!(r, Err(MsgError::Pool(_))), "refused: {r:?}");
}
