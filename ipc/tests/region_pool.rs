//! Regions and pools: the kernel enforces the single-writer rule, and the pool owner
//! refuses every loan protocol violation.
#![cfg(not(loom))]

use std::os::fd::{AsFd, OwnedFd};

use capnet_ipc::pool::{BufferPool, Keep, LoanLedger, PoolError, PoolLayout, PoolView};
use capnet_ipc::region::{Region, RegionError, RegionRo};
use capnet_ipc::shm::{ShmRead, ShmWrite};
use capnet_ipc::{Descriptor, Ordering};
use memmap2::MmapOptions;

fn dup(fd: impl AsFd) -> OwnedFd {
    fd.as_fd().try_clone_to_owned().expect("dup")
}

#[test]
fn reader_cannot_map_a_sealed_region_writable() {
    let r = Region::create("t-seal", 4096).expect("create");
    r.store32(0, 0xfeed, Ordering::Relaxed);
    let file = std::fs::File::from(dup(r.fd()));
    // SAFETY: if the kernel wrongly allowed the mapping, nobody truncates the memfd
    // (it is sealed against shrinking) and the mapping is dropped unused.
    let res = unsafe { MmapOptions::new().len(4096).map_mut(&file) };
    let err = res.expect_err("a shared writable map of a sealed region must fail");
    assert_eq!(err.raw_os_error(), Some(rustix::io::Errno::PERM.raw_os_error()));
    // Read-only attach works and sees the owner's data.
    let ro = RegionRo::attach(dup(r.fd()), 4096).expect("attach");
    assert_eq!(ro.load32(0, Ordering::Relaxed), 0xfeed);
    // The owner's own mapping, made before the seal, still writes.
    r.store32(0, 7, Ordering::Relaxed);
    assert_eq!(ro.load32(0, Ordering::Relaxed), 7);
}

#[test]
fn region_without_shrink_seal_is_refused() {
    let mfd = memfd::MemfdOptions::new().allow_sealing(true).create("t-noseal").expect("memfd");
    mfd.as_file().set_len(4096).expect("len");
    mfd.add_seals(&[memfd::FileSeal::SealFutureWrite, memfd::FileSeal::SealGrow, memfd::FileSeal::SealSeal])
        .expect("seal");
    let err = RegionRo::attach(mfd.into_file().into(), 4096).expect_err("must refuse");
    assert!(matches!(err, RegionError::NotSealed { missing: memfd::FileSeal::SealShrink }), "{err}");
    assert!(err.to_string().contains("SealShrink"), "{err}");
}

#[test]
fn non_memfd_and_short_regions_are_refused() {
    let file = std::fs::File::open("/proc/self/status").expect("open");
    assert!(matches!(RegionRo::attach(file.into(), 1), Err(RegionError::NotMemfd)));
    let r = Region::create("t-short", 4096).expect("create");
    assert!(matches!(RegionRo::attach(dup(r.fd()), 8192), Err(RegionError::Size { .. })));
}

fn pool(count: u32) -> (BufferPool, PoolView) {
    let p = BufferPool::create("t-pool", 3, PoolLayout::with_count(count)).expect("pool");
    let v = PoolView::attach(dup(p.region().fd()), 3).expect("view");
    (p, v)
}

#[test]
fn loans_round_trip_and_violations_are_refused() {
    let (mut p, v) = pool(8);
    let r1 = p.add_reader(2);
    let r2 = p.add_reader(2);
    let d = p.fill(b"hello").expect("fill").expect("buffer");
    p.lend(r1, &d).expect("lend");
    let mut out = Vec::new();
    v.read_into(&d, &mut out).expect("read");
    assert_eq!(out, b"hello");
    assert!(matches!(p.give_back(r2, &d), Err(PoolError::NotLent { .. })), "foreign reader");
    p.give_back(r1, &d).expect("return");
    assert!(matches!(p.give_back(r1, &d), Err(PoolError::NotLent { .. })), "double return");
    let foreign = Descriptor { index: 99, ..d };
    assert!(matches!(p.give_back(r1, &foreign), Err(PoolError::Index { .. })));
    let other_pool = Descriptor { pool: 4, ..d };
    assert!(matches!(p.give_back(r1, &other_pool), Err(PoolError::WrongPool { .. })));
    assert_eq!(p.free_count(), 8);
}

#[test]
fn quota_caps_each_reader() {
    let (mut p, _v) = pool(8);
    let r = p.add_reader(2);
    let ds: Vec<_> = (0..3).map(|i| p.fill(&[i]).expect("fill").expect("buf")).collect();
    p.lend(r, &ds[0]).expect("1");
    p.lend(r, &ds[1]).expect("2");
    assert!(matches!(p.lend(r, &ds[2]), Err(PoolError::Quota { held: 2 })));
    p.reclaim(r);
    assert_eq!(p.held_by(r), 0);
    let mut ledger = LoanLedger::new(1);
    assert_eq!(ledger.arrive(), Keep::Loan);
    assert_eq!(ledger.arrive(), Keep::CopyAndReturn);
    ledger.returned();
    assert_eq!(ledger.arrive(), Keep::Loan);
}

#[test]
fn bad_descriptors_are_refused_by_readers() {
    let (mut p, v) = pool(4);
    let d = p.fill(&[1; 100]).expect("fill").expect("buf");
    let bs = v.layout().buf_size;
    for bad in [
        Descriptor { index: 4, ..d },
        Descriptor { offset: bs, len: 1, ..d },
        Descriptor { offset: u32::MAX, len: u32::MAX, ..d },
        Descriptor { flags: 0x8000, ..d },
        Descriptor { pool: 0, ..d },
    ] {
        assert!(v.read_into(&bad, &mut Vec::new()).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn a_64k_segment_with_device_header_is_a_chain() {
    let (mut p, v) = pool(64);
    let frame: Vec<u8> = (0..65536 + 12).map(|i| (i * 7 % 251) as u8).collect();
    let room = (v.layout().buf_size - v.layout().headroom) as usize;
    let mut chain: Vec<Descriptor> = frame.chunks(room).map(|c| p.fill(c).expect("fill").expect("buf")).collect();
    let n = chain.len();
    for d in &mut chain[..n - 1] {
        d.flags |= Descriptor::MORE;
    }
    let mut out = Vec::new();
    v.gather(&chain, &mut out).expect("gather");
    assert_eq!(out, frame);
    chain[n - 1].flags |= Descriptor::MORE;
    assert!(v.gather(&chain, &mut Vec::new()).is_err(), "unterminated chain");
    // The large-buffer class: one buffer holds the whole segment.
    let big = BufferPool::create("t-big", 9, PoolLayout { buf_size: 65536 + 128 + 64, count: 2, headroom: 128 });
    let mut big = big.expect("big pool");
    let d = big.fill(&frame).expect("fill").expect("buf");
    let bv = PoolView::attach(dup(big.region().fd()), 9).expect("view");
    let mut out = Vec::new();
    bv.read_into(&d, &mut out).expect("read");
    assert_eq!(out, frame);
}

#[test]
fn an_adopted_blank_region_has_one_writer_and_is_sealed_like_a_created_one() {
    let blank = Region::blank("t-blank", 5000).expect("blank");
    let keep = dup(&blank);
    let r = Region::adopt(blank, 5000).expect("adopt");
    r.store32(8, 0xbeef, Ordering::Relaxed);
    // The maker kept an fd: it can no longer map it writable, only read it.
    let file = std::fs::File::from(dup(&keep));
    // SAFETY: a shared writable mapping is expected to fail; were it made, it would
    // be dropped unused and the memfd cannot shrink under it.
    let writable = unsafe { MmapOptions::new().len(4096).map_mut(&file) };
    assert!(writable.is_err(), "FUTURE_WRITE must forbid a writable mapping after adoption");
    let ro = RegionRo::attach(keep, 8192).expect("readers attach it like a created region");
    assert_eq!(ro.load32(8, Ordering::Relaxed), 0xbeef);
}

#[test]
fn only_an_unsealed_blank_of_the_right_size_can_be_adopted() {
    let sealed = Region::create("t-owned", 4096).expect("create");
    assert!(matches!(Region::adopt(dup(sealed.fd()), 4096), Err(RegionError::AlreadySealed { .. })));
    let blank = Region::blank("t-small", 4096).expect("blank");
    assert!(matches!(Region::adopt(blank, 8192), Err(RegionError::Size { .. })));
    let big = Region::blank("t-big", 3 * 4096).expect("blank");
    assert!(matches!(Region::adopt(big, 4096), Err(RegionError::Size { .. })));
    let file = std::fs::File::open("/dev/null").expect("open");
    assert!(matches!(Region::adopt(file.into(), 4096), Err(RegionError::NotMemfd)));
}

#[test]
fn a_message_end_in_adopted_regions_talks_to_a_created_one() {
    use capnet_ipc::msg::MsgHalf;
    use capnet_ipc::End;
    let a = MsgHalf::adopt(MsgHalf::blank("t-msg-a").expect("blank"), End::A).expect("adopt");
    let b = MsgHalf::new("t-msg-b", End::B).expect("new");
    let (ga, gb) = (a.grant().expect("grant a"), b.grant().expect("grant b"));
    let mut a = a.attach(End::A, gb).expect("attach a");
    let mut b = b.attach(End::B, ga).expect("attach b");
    assert!(a.send(b"over adopted memory").expect("send"));
    let mut got = Vec::new();
    b.recv(|m| got.push(m.to_vec())).expect("recv");
    assert_eq!(got, vec![b"over adopted memory".to_vec()]);
    assert!(b.send(b"and back").expect("send"));
    let mut back = Vec::new();
    a.recv(|m| back.push(m.to_vec())).expect("recv");
    assert_eq!(back, vec![b"and back".to_vec()]);
}
