//! Buffer pools: fixed-size buffers with headroom, one writer, read-only loans.
//!
//! DESIGN ("Buffer pool", "Who may write what"): the owning domain is the only writer
//! of its pool. Other domains receive [`Descriptor`]s — read-only loans — and give
//! them back on the return ring. The owner tracks the state of every buffer, so a
//! double return or a foreign index is detected and refused, and caps the loans each
//! reader may hold ([`BufferPool::lend`]); a reader that needs to keep more copies
//! into its own pool ([`LoanLedger`]), so no domain can starve another's pool.
//!
//! A segment larger than one buffer (up to 64 KiB plus the 12-byte virtio-net
//! header) is a chain of descriptors linked by [`Descriptor::MORE`], or one buffer of
//! a pool created with a large buffer size: both are expressible.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::descriptor::Descriptor;
use crate::region::{Region, RegionError, RegionRo};
use crate::shm::{ShmRead, ShmWrite};
use crate::sync::Ordering;

/// "CAPNETPL", little-endian.
const MAGIC: u64 = u64::from_le_bytes(*b"CAPNETPL");
const VERSION: u32 = 1;
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_BUF_SIZE: usize = 12;
const H_COUNT: usize = 16;
const H_HEADROOM: usize = 20;
/// Buffers start one page in, so each is cache-line aligned.
const DATA: usize = 4096;

/// Bytes this process copied into pool buffers and out of pools it views.
static COPIED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Payload bytes this process has copied: into its pools' buffers and out of
/// the pools it views ([`BufferPool::write`], [`PoolView::read_into`]), the
/// payload a message carries inline as it is encoded and decoded
/// ([`crate::control`]), and every other copy counted with [`count_copy`].
pub fn bytes_copied() -> u64 {
    COPIED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Counts `n` bytes of payload copied (every copy of payload bytes in this
/// process goes through here or through a function that calls it).
pub fn count_copy(n: usize) {
    COPIED.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
}

/// Default buffer size (DESIGN: 2 KiB).
pub const DEFAULT_BUF_SIZE: u32 = 2048;
/// Default headroom: room for Ethernet + IPv4 + TCP headers with options, and the
/// virtio-net header, prepended without copying.
pub const DEFAULT_HEADROOM: u32 = 128;
/// Largest buffer size a pool may declare (a large-buffer class for 64 KiB segments).
pub const MAX_BUF_SIZE: u32 = 1 << 20;

/// The shape of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLayout {
    /// Bytes per buffer.
    pub buf_size: u32,
    /// Number of buffers.
    pub count: u32,
    /// Bytes reserved at the front of each buffer for headers.
    pub headroom: u32,
}

impl PoolLayout {
    /// `count` buffers of the default size and headroom.
    pub fn with_count(count: u32) -> Self {
        Self { buf_size: DEFAULT_BUF_SIZE, count, headroom: DEFAULT_HEADROOM }
    }

    /// Bytes of region needed.
    pub fn region_len(&self) -> usize {
        DATA + self.buf_size as usize * self.count as usize
    }

    fn check(&self) -> Result<(), PoolError> {
        let ok = self.buf_size >= 64
            && self.buf_size <= MAX_BUF_SIZE
            && self.buf_size % 64 == 0
            && self.headroom < self.buf_size
            && self.count > 0
            && self.count <= (1 << 24);
        if ok {
            Ok(())
        } else {
            Err(PoolError::Layout(*self))
        }
    }

    pub(crate) fn buf_offset(&self, index: u32) -> usize {
        DATA + index as usize * self.buf_size as usize
    }
}

/// Identifies a reader of a pool (one per channel the pool's buffers are lent on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReaderId(u16);

/// Pool errors, for the owner and for readers.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The layout is not usable.
    #[error("pool layout {0:?} is invalid: buffers must be 64..=1 MiB, a multiple of 64, larger than the headroom, 1..=16M of them")]
    Layout(PoolLayout),
    /// The header of a granted pool is not a capnet pool header.
    #[error("granted pool has a bad header ({0}); refusing it")]
    Header(&'static str),
    /// A write or descriptor does not fit its buffer.
    #[error("{len} bytes at offset {offset} do not fit a {buf_size}-byte buffer")]
    OutOfBounds {
        /// Offset inside the buffer.
        offset: u64,
        /// Length.
        len: u64,
        /// Buffer size.
        buf_size: u32,
    },
    /// The buffer index does not exist.
    #[error("buffer index {index} is outside the pool of {count}")]
    Index {
        /// The index.
        index: u32,
        /// Buffers in the pool.
        count: u32,
    },
    /// The descriptor names another pool.
    #[error("descriptor names pool {found}, this is pool {expected}")]
    WrongPool {
        /// This pool's id.
        expected: u16,
        /// The id found.
        found: u16,
    },
    /// The descriptor carries flags this version does not know.
    #[error("descriptor has unknown flags {0:#06x}")]
    Flags(u16),
    /// A buffer was returned that is not on loan to that reader (double return or
    /// a foreign index).
    #[error("buffer {index} was returned by a reader it is not lent to ({state})")]
    NotLent {
        /// The index.
        index: u32,
        /// What the buffer was.
        state: &'static str,
    },
    /// The operation needs a buffer the owner holds, and this one is not.
    #[error("buffer {index} is not held by the owner ({state})")]
    NotOwned {
        /// The index.
        index: u32,
        /// What the buffer was.
        state: &'static str,
    },
    /// The reader already holds its quota of loans.
    #[error("reader holds {held} loans, its quota; it must return or copy some first")]
    Quota {
        /// Loans held.
        held: u32,
    },
    /// No such reader.
    #[error("unknown pool reader")]
    Reader,
    /// Mapping the pool failed.
    #[error(transparent)]
    Region(#[from] RegionError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BufState {
    Free,
    Owned,
    Lent(ReaderId),
}

impl BufState {
    fn name(self) -> &'static str {
        match self {
            BufState::Free => "free",
            BufState::Owned => "held by the owner",
            BufState::Lent(_) => "lent to another reader",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Reader {
    held: u32,
    quota: u32,
}

/// A pool owned (and written) by this domain.
#[derive(Debug)]
pub struct BufferPool {
    id: u16,
    region: Arc<Region>,
    layout: PoolLayout,
    free: Vec<u32>,
    state: Vec<BufState>,
    readers: Vec<Reader>,
}

impl BufferPool {
    /// Creates, maps and seals a pool with id `id`.
    pub fn create(name: &str, id: u16, layout: PoolLayout) -> Result<Self, PoolError> {
        layout.check()?;
        Self::init(Region::create(name, layout.region_len())?, id, layout)
    }

    /// Adopts a blank region (`Region::blank` of `layout.region_len()` bytes, made
    /// by the supervisor) as pool `id`: maps it, seals it and lays it out.
    pub fn adopt(fd: std::os::fd::OwnedFd, id: u16, layout: PoolLayout) -> Result<Self, PoolError> {
        layout.check()?;
        Self::init(Region::adopt(fd, layout.region_len())?, id, layout)
    }

    fn init(region: Region, id: u16, layout: PoolLayout) -> Result<Self, PoolError> {
        region.store64(H_MAGIC, MAGIC, Ordering::Relaxed);
        region.store32(H_VERSION, VERSION, Ordering::Relaxed);
        region.store32(H_BUF_SIZE, layout.buf_size, Ordering::Relaxed);
        region.store32(H_COUNT, layout.count, Ordering::Relaxed);
        region.store32(H_HEADROOM, layout.headroom, Ordering::Relaxed);
        Ok(Self {
            id,
            region: Arc::new(region),
            layout,
            free: (0..layout.count).rev().collect(),
            state: vec![BufState::Free; layout.count as usize],
            readers: Vec::new(),
        })
    }

    /// This pool's id, as descriptors name it.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Its shape.
    pub fn layout(&self) -> PoolLayout {
        self.layout
    }

    /// The region, to grant to readers.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The region, shared (handles on its buffers keep it mapped).
    pub(crate) fn region_arc(&self) -> Arc<Region> {
        self.region.clone()
    }

    /// Region offset of buffer `index`.
    pub(crate) fn buf_offset(&self, index: u32) -> usize {
        self.layout.buf_offset(index)
    }

    /// Buffers not in use.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Registers a reader that may hold at most `quota` loans at once.
    pub fn add_reader(&mut self, quota: u32) -> ReaderId {
        self.readers.push(Reader { held: 0, quota });
        ReaderId((self.readers.len() - 1) as u16)
    }

    /// Loans currently held by `reader`.
    pub fn held_by(&self, reader: ReaderId) -> u32 {
        self.readers.get(reader.0 as usize).map_or(0, |r| r.held)
    }

    /// Takes a free buffer; `None` when the pool is exhausted.
    pub fn alloc(&mut self) -> Option<u32> {
        let index = self.free.pop()?;
        self.state[index as usize] = BufState::Owned;
        Some(index)
    }

    /// Releases a buffer the owner holds.
    pub fn release(&mut self, index: u32) -> Result<(), PoolError> {
        self.expect_owned(index)?;
        self.state[index as usize] = BufState::Free;
        self.free.push(index);
        Ok(())
    }

    fn expect_owned(&self, index: u32) -> Result<(), PoolError> {
        match self.state.get(index as usize) {
            None => Err(PoolError::Index { index, count: self.layout.count }),
            Some(BufState::Owned) => Ok(()),
            Some(s) => Err(PoolError::NotOwned { index, state: s.name() }),
        }
    }

    fn check_range(&self, offset: u32, len: usize) -> Result<(), PoolError> {
        if u64::from(offset) + len as u64 > u64::from(self.layout.buf_size) {
            return Err(PoolError::OutOfBounds {
                offset: offset.into(),
                len: len as u64,
                buf_size: self.layout.buf_size,
            });
        }
        Ok(())
    }

    /// Copies `bytes` into buffer `index` at `offset` (the buffer must be held).
    pub fn write(&self, index: u32, offset: u32, bytes: &[u8]) -> Result<(), PoolError> {
        self.expect_owned(index)?;
        self.check_range(offset, bytes.len())?;
        self.region.copy_in(self.layout.buf_offset(index) + offset as usize, bytes);
        COPIED.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Copies bytes back out of a buffer the owner holds.
    pub fn read(&self, index: u32, offset: u32, dst: &mut [u8]) -> Result<(), PoolError> {
        self.expect_owned(index)?;
        self.check_range(offset, dst.len())?;
        self.region.copy_out(self.layout.buf_offset(index) + offset as usize, dst);
        Ok(())
    }

    /// Allocates a buffer, writes `payload` after the headroom and returns its
    /// descriptor (still held by the owner). `None` when the pool is exhausted.
    pub fn fill(&mut self, payload: &[u8]) -> Result<Option<Descriptor>, PoolError> {
        let d = self.fill_message(payload)?;
        if d.is_some() {
            COPIED.fetch_add(payload.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(d)
    }

    /// [`BufferPool::fill`] for an encoded message: the copy is not counted
    /// here, since the encode counted the payload the message holds (and the
    /// rest of it is not payload; see [`crate::control`]).
    pub fn fill_message(&mut self, bytes: &[u8]) -> Result<Option<Descriptor>, PoolError> {
        self.check_range(self.layout.headroom, bytes.len())?;
        let Some(index) = self.alloc() else { return Ok(None) };
        self.expect_owned(index)?;
        self.region.copy_in(self.layout.buf_offset(index) + self.layout.headroom as usize, bytes);
        Ok(Some(Descriptor { pool: self.id, flags: 0, index, offset: self.layout.headroom, len: bytes.len() as u32 }))
    }

    /// Like [`BufferPool::fill`], the bytes copied from the handles of
    /// `chain` (at most one buffer's room): `None` when every buffer is out.
    pub fn fill_from(&mut self, chain: &crate::lent::Chain) -> Result<Option<Descriptor>, PoolError> {
        self.check_range(self.layout.headroom, chain.len())?;
        let Some(index) = self.alloc() else { return Ok(None) };
        chain.copy_into(&self.region, self.layout.buf_offset(index) + self.layout.headroom as usize);
        Ok(Some(Descriptor { pool: self.id, flags: 0, index, offset: self.layout.headroom, len: chain.len() as u32 }))
    }

    /// Lends the buffer `d` names to `reader`: from now on only that reader may give
    /// it back. Refused if the reader is at its quota.
    pub fn lend(&mut self, reader: ReaderId, d: &Descriptor) -> Result<(), PoolError> {
        self.expect_owned(d.index)?;
        let r = self.readers.get_mut(reader.0 as usize).ok_or(PoolError::Reader)?;
        if r.held >= r.quota {
            return Err(PoolError::Quota { held: r.held });
        }
        r.held += 1;
        self.state[d.index as usize] = BufState::Lent(reader);
        Ok(())
    }

    /// Takes back a loan `reader` returns. A double return, a foreign index, or a
    /// buffer lent to someone else is refused and changes nothing.
    pub fn give_back(&mut self, reader: ReaderId, d: &Descriptor) -> Result<(), PoolError> {
        if d.pool != self.id {
            return Err(PoolError::WrongPool { expected: self.id, found: d.pool });
        }
        match self.state.get(d.index as usize) {
            None => Err(PoolError::Index { index: d.index, count: self.layout.count }),
            Some(BufState::Lent(r)) if *r == reader => {
                self.state[d.index as usize] = BufState::Free;
                self.free.push(d.index);
                if let Some(r) = self.readers.get_mut(reader.0 as usize) {
                    r.held -= 1;
                }
                Ok(())
            }
            Some(s) => Err(PoolError::NotLent { index: d.index, state: s.name() }),
        }
    }

    /// Takes back every loan of a reader that is gone (crashed or cut off).
    pub fn reclaim(&mut self, reader: ReaderId) {
        for (i, s) in self.state.iter_mut().enumerate() {
            if *s == BufState::Lent(reader) {
                *s = BufState::Free;
                self.free.push(i as u32);
            }
        }
        if let Some(r) = self.readers.get_mut(reader.0 as usize) {
            r.held = 0;
        }
    }
}

/// A pool granted to this domain: read-only, every descriptor checked before use.
#[derive(Debug)]
pub struct PoolView {
    id: u16,
    region: RegionRo,
    layout: PoolLayout,
}

impl PoolView {
    /// Checks the region fd (seals, size) and the pool header it holds.
    pub fn attach(fd: OwnedFd, id: u16) -> Result<Self, PoolError> {
        let region = RegionRo::attach(fd, DATA)?;
        if region.load64(H_MAGIC, Ordering::Relaxed) != MAGIC {
            return Err(PoolError::Header("magic"));
        }
        if region.load32(H_VERSION, Ordering::Relaxed) != VERSION {
            return Err(PoolError::Header("version"));
        }
        let layout = PoolLayout {
            buf_size: region.load32(H_BUF_SIZE, Ordering::Relaxed),
            count: region.load32(H_COUNT, Ordering::Relaxed),
            headroom: region.load32(H_HEADROOM, Ordering::Relaxed),
        };
        layout.check().map_err(|_| PoolError::Header("layout"))?;
        if region.len() < layout.region_len() {
            return Err(PoolError::Header("region shorter than its layout"));
        }
        Ok(Self { id, region, layout })
    }

    /// The pool's shape, as its header says (checked sane at attach).
    pub fn layout(&self) -> PoolLayout {
        self.layout
    }

    /// The mapping, for handles on its buffers ([`crate::lent::Views`]).
    pub(crate) fn into_region(self) -> RegionRo {
        self.region
    }

    /// Bounds-checks a descriptor from a peer against this pool.
    pub fn check(&self, d: &Descriptor) -> Result<(), PoolError> {
        if d.pool != self.id {
            return Err(PoolError::WrongPool { expected: self.id, found: d.pool });
        }
        if d.flags & !Descriptor::KNOWN_FLAGS != 0 {
            return Err(PoolError::Flags(d.flags));
        }
        if d.index >= self.layout.count {
            return Err(PoolError::Index { index: d.index, count: self.layout.count });
        }
        if u64::from(d.offset) + u64::from(d.len) > u64::from(self.layout.buf_size) {
            return Err(PoolError::OutOfBounds {
                offset: d.offset.into(),
                len: d.len.into(),
                buf_size: self.layout.buf_size,
            });
        }
        Ok(())
    }

    /// Checks `d` and appends its bytes to `out`.
    pub fn read_into(&self, d: &Descriptor, out: &mut Vec<u8>) -> Result<(), PoolError> {
        self.check(d)?; // before the buffer grows by a peer's length
        let start = out.len();
        out.resize(start + d.len as usize, 0);
        self.copy_checked(d, &mut out[start..]);
        COPIED.fetch_add(u64::from(d.len), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Checks `d`, then copies its bytes into `scratch` (a buffer reused from
    /// message to message, grown only after the check and never zeroed again)
    /// and returns them. The length is the peer's word: it is bounded by this
    /// pool's buffer size before a byte is allocated. Not counted: this is how
    /// a message comes out, and its decode counts the payload it holds.
    pub fn read_reusing<'s>(&self, d: &Descriptor, scratch: &'s mut Vec<u8>) -> Result<&'s [u8], PoolError> {
        self.check(d)?; // before the scratch grows by a peer's length
        let len = d.len as usize;
        if scratch.len() < len {
            scratch.resize(len, 0);
        }
        self.copy_checked(d, &mut scratch[..len]);
        Ok(&scratch[..len])
    }

    /// Copies a checked descriptor's bytes into `dst` (its length).
    fn copy_checked(&self, d: &Descriptor, dst: &mut [u8]) {
        self.region.copy_out(self.layout.buf_offset(d.index) + d.offset as usize, dst);
    }

    /// Gathers a chain (every descriptor but the last has [`Descriptor::MORE`]) into
    /// `out`. A chain that ends early or runs on is refused.
    pub fn gather(&self, chain: &[Descriptor], out: &mut Vec<u8>) -> Result<(), PoolError> {
        for (i, d) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            if d.has(Descriptor::MORE) == last {
                return Err(PoolError::Header("descriptor chain is not terminated where it ends"));
            }
            self.read_into(d, out)?;
        }
        Ok(())
    }
}

/// Reader-side accounting of loans held from one pool.
#[derive(Debug, Clone, Copy)]
pub struct LoanLedger {
    held: u32,
    quota: u32,
}

/// What to do with an arriving loan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Keep the loan (and return it later).
    Loan,
    /// At the quota: copy the bytes into your own pool and return the loan now.
    CopyAndReturn,
}

impl LoanLedger {
    /// A ledger for a quota of `quota` loans.
    pub fn new(quota: u32) -> Self {
        Self { held: 0, quota }
    }

    /// Accounts an arriving loan.
    pub fn arrive(&mut self) -> Keep {
        if self.held < self.quota {
            self.held += 1;
            Keep::Loan
        } else {
            Keep::CopyAndReturn
        }
    }

    /// Accounts a kept loan given back.
    pub fn returned(&mut self) {
        self.held = self.held.saturating_sub(1);
    }

    /// Loans held.
    pub fn held(&self) -> u32 {
        self.held
    }
}
