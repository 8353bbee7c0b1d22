//! Lent payload: the one form payload bytes take between the edge that brings
//! them in and the edge that takes them out (DESIGN, "Payload is lent, never
//! copied, on every edge").
//!
//! A [`Lent`] is a read-only handle on a range of bytes: a buffer of a pool this
//! process owns ([`LoanPool`]), a buffer of another process's pool it was lent
//! ([`Views::borrow`]), or — for tests and the copy a quota forces — private
//! bytes. Handles are cheap to clone and slice; a buffer goes back to whoever
//! lent it when the last handle on it drops: to its [`LoanPool`] when it is
//! ours, to the link it came on ([`Returns`]) when it is borrowed. A [`Chain`]
//! is a sequence of handles read as one stream of bytes (a TCP queue, a frame
//! made of a header buffer and payload buffers).
//!
//! Across a process boundary a handle travels as a [`Loan`]: the pool, buffer
//! and range it names, and a ticket the lender's [`Ledger`] issued for it. The
//! lender keeps the handle until the ticket comes back, so a buffer is free
//! only when every borrower on every hop has returned it. A ticket returned
//! twice, or never issued, is refused.
//!
//! Reading: [`Lent::copy_to`] copies (and counts the copy: [`crate::pool::bytes_copied`]);
//! [`Lent::peek`] copies a bounded header out for parsing (counted apart, in
//! [`header_bytes`]); [`Lent::sum_into`] folds the Internet checksum by reading
//! the bytes through a 256-byte stack window — nothing keeps them, so it is no
//! copy. A peer's buffer is read only with atomic loads (it may rewrite what it
//! lent: that corrupts only the data it produced, never this process).

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};

use rkyv::{Archive, Deserialize, Serialize};

use crate::pool::{BufferPool, PoolError, PoolLayout, PoolView};
use crate::region::{Region, RegionRo};
use crate::shm::ShmRead;

/// Header bytes copied out of handles for parsing ([`Lent::peek`]).
static HEADER_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes this process copied out of handles to parse headers ([`Lent::peek`]):
/// not payload, but reported beside the payload copies so nothing is hidden.
pub fn header_bytes() -> u64 {
    HEADER_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// A pool as loans name it: its id (what its owner numbers it) and its
/// generation — the memfd's inode number ([`crate::region::inode`]), which
/// every holder reads from the fd itself, so a pool re-made after its owner
/// restarted is never taken for the one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Archive, Serialize, Deserialize)]
pub struct PoolKey {
    /// Which pool.
    pub id: u16,
    /// Which generation of it.
    pub gen: u32,
}

/// A handle crossing a process boundary: bytes `offset..offset + len` of
/// buffer `index` of pool `pool`, lent under `ticket`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Loan {
    /// What the borrower gives back when it is done.
    pub ticket: u64,
    /// The pool the buffer belongs to.
    pub pool: PoolKey,
    /// The buffer.
    pub index: u32,
    /// Where the bytes start in it.
    pub offset: u32,
    /// How many.
    pub len: u32,
}

/// One piece of a payload crossing a channel, in order with the others: a
/// loan, or bytes its sender could not lend (its own private bytes) carried
/// in the message between the loans.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum Piece {
    /// Lent: the borrower reads it where it lies and gives it back.
    Loan(Loan),
    /// Carried in the message (copied, and counted as payload).
    Bytes(#[rkyv(with = crate::control::PayloadBytes)] Vec<u8>),
}

impl Piece {
    /// How many bytes.
    pub fn len(&self) -> usize {
        match self {
            Piece::Loan(l) => l.len as usize,
            Piece::Bytes(b) => b.len(),
        }
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The loan, when it is one.
    pub fn loan(&self) -> Option<&Loan> {
        match self {
            Piece::Loan(l) => Some(l),
            Piece::Bytes(_) => None,
        }
    }
}

/// Tickets of loans given back, collected for their lender: a link's borrower
/// side pushes here as handles drop, and the link sends them on.
#[derive(Debug, Default)]
pub struct Returns {
    tickets: Mutex<Vec<u64>>,
}

impl Returns {
    /// A new, empty collection.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn push(&self, ticket: u64) {
        if let Ok(mut t) = self.tickets.lock() {
            t.push(ticket);
        }
    }

    /// Moves the tickets given back so far into `out`.
    pub fn take(&self, out: &mut Vec<u64>) {
        if let Ok(mut t) = self.tickets.lock() {
            out.append(&mut t);
        }
    }
}

#[derive(Debug)]
enum Mapping {
    Own(Arc<Region>),
    View(Arc<RegionRo>),
}

#[derive(Debug)]
enum Mem {
    Private(Box<[u8]>),
    Pool {
        map: Mapping,
        key: PoolKey,
        index: u32,
        /// Region offset of the handle's first byte (offset 0 of `Buf`).
        at: usize,
        /// Buffer offset of that byte.
        start: u32,
    },
}

#[derive(Debug)]
struct Buf {
    mem: Mem,
    /// Where the buffer goes when the last handle on it drops.
    home: Option<(Arc<Returns>, u64)>,
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some((returns, token)) = self.home.take() {
            returns.push(token);
        }
    }
}

impl Buf {
    /// Copies `dst.len()` bytes from offset `at` (inside `len`, checked by callers).
    fn read(&self, at: usize, dst: &mut [u8]) {
        match &self.mem {
            Mem::Private(b) => dst.copy_from_slice(&b[at..at + dst.len()]),
            Mem::Pool { map: Mapping::Own(r), at: base, .. } => r.copy_out(base + at, dst),
            Mem::Pool { map: Mapping::View(r), at: base, .. } => r.copy_out(base + at, dst),
        }
    }
}

/// A read-only handle on bytes lent (or owned); see the module docs.
#[derive(Clone)]
pub struct Lent {
    buf: Arc<Buf>,
    off: u32,
    len: u32,
}

impl std::fmt::Debug for Lent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = match &self.buf.mem {
            Mem::Private(_) => "private".to_owned(),
            Mem::Pool { key, index, start, .. } => {
                format!("pool {}.{} buffer {index} +{}", key.id, key.gen, start + self.off)
            }
        };
        write!(f, "Lent({} bytes, {at})", self.len)
    }
}

impl Lent {
    /// Private bytes as a handle (no copy: the vector is moved in).
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let len = bytes.len() as u32;
        Self { buf: Arc::new(Buf { mem: Mem::Private(bytes.into_boxed_slice()), home: None }), off: 0, len }
    }

    /// A private copy of `bytes` as a handle (counted as a copy).
    pub fn copy_of(bytes: &[u8]) -> Self {
        crate::pool::count_copy(bytes.len());
        Self::from_vec(bytes.to_vec())
    }

    /// Bytes in the handle.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pool it is on, if it is on one.
    pub fn pool_key(&self) -> Option<PoolKey> {
        self.place().map(|(k, _, _)| k)
    }

    /// Whether it is on a pool another process lent us (not one of ours).
    pub fn borrowed(&self) -> bool {
        matches!(self.buf.mem, Mem::Pool { map: Mapping::View(_), .. })
    }

    /// Whether it is on a pool (a loan to account for), not on private bytes.
    pub fn on_pool(&self) -> bool {
        matches!(self.buf.mem, Mem::Pool { .. })
    }

    /// The bytes `range` of this handle, as a handle on the same buffer.
    ///
    /// # Panics
    /// If the range is not inside the handle (a caller bug: lengths are ours).
    pub fn slice(&self, range: impl std::ops::RangeBounds<usize>) -> Self {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e + 1,
            Bound::Excluded(&e) => e,
            Bound::Unbounded => self.len(),
        };
        assert!(start <= end && end <= self.len(), "slice {start}..{end} of a {}-byte handle", self.len);
        Self { buf: self.buf.clone(), off: self.off + start as u32, len: (end - start) as u32 }
    }

    /// Copies bytes `at..at + dst.len()` into `dst`: a copy of payload, counted.
    ///
    /// # Panics
    /// If the range is not inside the handle.
    pub fn copy_to(&self, at: usize, dst: &mut [u8]) {
        self.read(at, dst);
        crate::pool::count_copy(dst.len());
    }

    /// Copies up to `dst.len()` bytes from `at` into `dst` to parse them (a
    /// header: counted in [`header_bytes`], not as payload); how many there were.
    pub fn peek(&self, at: usize, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.len().saturating_sub(at));
        self.read(at, &mut dst[..n]);
        HEADER_BYTES.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        n
    }

    /// The bytes as a private vector (a copy, counted).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len()];
        self.copy_to(0, &mut v);
        v
    }

    /// Where the handle's bytes are, for a system call that reads them (no
    /// Rust reference to shared memory is made of it).
    fn raw(&self) -> (*const u8, usize) {
        let base = match &self.buf.mem {
            Mem::Private(b) => b.as_ptr(),
            Mem::Pool { map: Mapping::Own(r), at, .. } => r.as_ptr().wrapping_add(*at),
            Mem::Pool { map: Mapping::View(r), at, .. } => r.as_ptr().wrapping_add(*at),
        };
        (base.wrapping_add(self.off as usize), self.len())
    }

    fn read(&self, at: usize, dst: &mut [u8]) {
        assert!(at + dst.len() <= self.len(), "read {at}+{} of a {}-byte handle", dst.len(), self.len);
        self.buf.read(self.off as usize + at, dst);
    }

    /// Folds these bytes into an Internet checksum, reading them through a
    /// stack window (no copy is kept).
    pub fn sum_into(&self, sum: &mut Checksum) {
        let mut window = [0u8; 256];
        let mut at = 0;
        while at < self.len() {
            let n = window.len().min(self.len() - at);
            self.read(at, &mut window[..n]);
            sum.add(&window[..n]);
            at += n;
        }
    }

    /// The pool, the buffer and the offset in it this handle's bytes start
    /// at, if it is on a pool (to name it in a descriptor).
    pub fn place(&self) -> Option<(PoolKey, u32, u32)> {
        match &self.buf.mem {
            Mem::Private(_) => None,
            Mem::Pool { key, index, start, .. } => Some((*key, *index, start + self.off)),
        }
    }
}

/// An Internet checksum (RFC 1071) folded over bytes that may arrive in
/// pieces of any length.
#[derive(Debug, Clone, Copy, Default)]
pub struct Checksum {
    acc: u64,
    odd: bool,
}

impl Checksum {
    /// Folds `bytes` in after what came before.
    pub fn add(&mut self, mut bytes: &[u8]) {
        if self.odd && !bytes.is_empty() {
            self.acc += u64::from(bytes[0]);
            bytes = &bytes[1..];
            self.odd = false;
        }
        let mut pairs = bytes.chunks_exact(2);
        for p in pairs.by_ref() {
            self.acc += u64::from(u16::from_be_bytes([p[0], p[1]]));
        }
        if let [last] = pairs.remainder() {
            self.acc += u64::from(*last) << 8;
            self.odd = true;
        }
    }

    /// The ones'-complement sum, folded to 16 bits (not yet inverted).
    pub fn fold(&self) -> u16 {
        let mut s = self.acc;
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }
}

/// A sequence of handles read as one stream of bytes.
#[derive(Debug, Clone, Default)]
pub struct Chain {
    parts: VecDeque<Lent>,
    len: usize,
    loans: usize,
}

impl Chain {
    /// An empty chain.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes in the chain.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Handles in it.
    pub fn pieces(&self) -> usize {
        self.parts.len()
    }

    /// Handles in it that are on a pool (loans to account for).
    pub fn loans(&self) -> usize {
        self.loans
    }

    /// The handles, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &Lent> + DoubleEndedIterator {
        self.parts.iter()
    }

    /// Appends a handle (an empty one is dropped).
    pub fn push(&mut self, l: Lent) {
        if !l.is_empty() {
            self.len += l.len();
            self.loans += usize::from(l.on_pool());
            self.parts.push_back(l);
        }
    }

    fn push_front(&mut self, l: Lent) {
        self.len += l.len();
        self.loans += usize::from(l.on_pool());
        self.parts.push_front(l);
    }

    fn pop_front(&mut self) -> Option<Lent> {
        let l = self.parts.pop_front()?;
        self.len -= l.len();
        self.loans -= usize::from(l.on_pool());
        Some(l)
    }

    /// Appends every handle of `other`.
    pub fn append(&mut self, other: Chain) {
        for l in other.parts {
            self.push(l);
        }
    }

    /// Takes the first `n` bytes (at most all) off the front, as a chain.
    pub fn split_to(&mut self, n: usize) -> Chain {
        let mut out = Chain::new();
        let mut want = n.min(self.len);
        while want > 0 {
            let Some(front) = self.pop_front() else { break };
            if front.len() <= want {
                want -= front.len();
                out.push(front);
            } else {
                out.push(front.slice(..want));
                self.push_front(front.slice(want..));
                want = 0;
            }
        }
        out
    }

    /// Drops the first `n` bytes (at most all).
    pub fn advance(&mut self, n: usize) {
        drop(self.split_to(n));
    }

    /// Replaces every handle on a pool by a private copy (counted), so the
    /// buffers go back.
    pub fn privatize(&mut self) {
        if self.loans > 0 {
            let whole = self.to_vec();
            *self = Chain::from(Lent::from_vec(whole));
        }
    }

    /// The bytes `at..at + len` as a chain of handles on the same buffers.
    ///
    /// # Panics
    /// If the range is not inside the chain.
    pub fn range(&self, at: usize, len: usize) -> Chain {
        assert!(at + len <= self.len, "range {at}+{len} of a {}-byte chain", self.len);
        let mut out = Chain::new();
        let (mut skip, mut want) = (at, len);
        for l in &self.parts {
            if want == 0 {
                break;
            }
            if skip >= l.len() {
                skip -= l.len();
                continue;
            }
            let n = (l.len() - skip).min(want);
            out.push(l.slice(skip..skip + n));
            skip = 0;
            want -= n;
        }
        out
    }

    /// Copies up to `dst.len()` bytes from `at` into `dst` to parse them (a
    /// header: counted in [`header_bytes`], not as payload); how many there were.
    pub fn peek(&self, at: usize, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.len.saturating_sub(at));
        self.read_at(at, &mut dst[..n]);
        HEADER_BYTES.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        n
    }

    /// Copies the first `dst.len()` bytes (at most all) into `dst`, counted;
    /// how many.
    pub fn copy_to(&self, dst: &mut [u8]) -> usize {
        let mut done = 0;
        for l in &self.parts {
            if done == dst.len() {
                break;
            }
            let n = l.len().min(dst.len() - done);
            l.copy_to(0, &mut dst[done..done + n]);
            done += n;
        }
        done
    }

    /// The bytes as a private vector (a copy, counted).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len];
        self.copy_to(&mut v);
        v
    }

    /// Copies the chain's bytes into our region `dst` from byte `at` on (a
    /// frame into the frame channel's pool): a copy, counted.
    ///
    /// # Panics
    /// If the bytes do not fit the region (a caller bug: offsets are ours).
    pub(crate) fn copy_into(&self, dst: &Region, at: usize) {
        assert!(at.checked_add(self.len).is_some_and(|end| end <= dst.len()), "copy_into out of bounds");
        let mut to = at;
        for l in &self.parts {
            let (p, n) = l.raw();
            // A handle holds its buffer mapped (a private box, or an Arc of the
            // pool's mapping, bounds-checked when it was made); a peer rewriting
            // its lent bytes under the copy tears only its own data (Distrust).
            // SAFETY: `p..p + n` is mapped while `l` is borrowed; `to..to + n` is
            // inside our writable mapping (asserted), written here by its holder only.
            unsafe { std::ptr::copy_nonoverlapping(p, dst.as_ptr().cast_mut().add(to), n) };
            to += n;
        }
        crate::pool::count_copy(self.len);
    }

    /// Folds every byte into an Internet checksum (see [`Lent::sum_into`]).
    pub fn sum_into(&self, sum: &mut Checksum) {
        for l in &self.parts {
            l.sum_into(sum);
        }
    }
}

/// Chains are equal when they hold the same bytes, however cut (read through
/// stack windows, as a checksum is: nothing is kept).
impl PartialEq for Chain {
    fn eq(&self, other: &Self) -> bool {
        if self.len != other.len {
            return false;
        }
        let (mut a, mut b) = ([0u8; 256], [0u8; 256]);
        let mut at = 0;
        while at < self.len {
            let n = a.len().min(self.len - at);
            self.read_at(at, &mut a[..n]);
            other.read_at(at, &mut b[..n]);
            if a[..n] != b[..n] {
                return false;
            }
            at += n;
        }
        true
    }
}

impl Eq for Chain {}

impl Chain {
    /// Reads `dst.len()` bytes from `at` (uncounted: for comparisons).
    fn read_at(&self, at: usize, dst: &mut [u8]) {
        let (mut skip, mut done) = (at, 0);
        for l in &self.parts {
            if done == dst.len() {
                break;
            }
            if skip >= l.len() {
                skip -= l.len();
                continue;
            }
            let n = (l.len() - skip).min(dst.len() - done);
            l.read(skip, &mut dst[done..done + n]);
            skip = 0;
            done += n;
        }
    }
}

impl From<&[u8]> for Chain {
    /// A private copy of `bytes` (counted).
    fn from(bytes: &[u8]) -> Self {
        Chain::from(Lent::copy_of(bytes))
    }
}

impl<const N: usize> From<&[u8; N]> for Chain {
    /// A private copy of `bytes` (counted).
    fn from(bytes: &[u8; N]) -> Self {
        Chain::from(&bytes[..])
    }
}

impl From<&Vec<u8>> for Chain {
    /// A private copy of `bytes` (counted).
    fn from(bytes: &Vec<u8>) -> Self {
        Chain::from(&bytes[..])
    }
}

impl From<Vec<u8>> for Chain {
    /// Private bytes as a chain (moved in, not copied).
    fn from(bytes: Vec<u8>) -> Self {
        Chain::from(Lent::from_vec(bytes))
    }
}

impl From<Lent> for Chain {
    fn from(l: Lent) -> Self {
        let mut c = Chain::new();
        c.push(l);
        c
    }
}

impl FromIterator<Lent> for Chain {
    fn from_iter<I: IntoIterator<Item = Lent>>(iter: I) -> Self {
        let mut c = Chain::new();
        for l in iter {
            c.push(l);
        }
        c
    }
}

/// The most pieces one [`write_chain`] writes (Linux's `IOV_MAX`).
pub const MAX_IOV: usize = 1024;

/// Writes `head` and then every handle of `chain` to `fd` with one `writev`;
/// the bytes written. The kernel reads the buffers where they are.
pub fn write_chain(fd: BorrowedFd<'_>, head: &[u8], chain: &Chain) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut iov: Vec<nix::libc::iovec> = Vec::with_capacity(1 + chain.pieces());
    if !head.is_empty() {
        iov.push(nix::libc::iovec { iov_base: head.as_ptr().cast_mut().cast(), iov_len: head.len() });
    }
    for l in chain.iter().filter(|l| !l.is_empty()) {
        let (p, n) = l.raw();
        iov.push(nix::libc::iovec { iov_base: p.cast_mut().cast(), iov_len: n });
    }
    if iov.len() > MAX_IOV {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "a frame of more than 1024 pieces"));
    }
    // Each handle holds its buffer (a private box, or an Arc of the pool's
    // mapping, bounds-checked when the handle was made); the kernel only reads.
    // SAFETY: every iovec names memory mapped for the call (`head` and `chain`
    // are borrowed); no Rust reference to shared memory is made.
    let n = unsafe { nix::libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// What [`LoanPool::fill_with`]'s writer reports: the range of the buffer it
/// filled and a value to hand back with the handle, or nothing.
pub type Filled<T> = Option<(std::ops::Range<usize>, T)>;

/// A pool this process owns and lends handles on: buffers are written once
/// (filled, or read into from a device) and are free again when the last
/// handle on them drops.
#[derive(Debug)]
pub struct LoanPool {
    pool: BufferPool,
    key: PoolKey,
    returns: Arc<Returns>,
    reaped: Vec<u64>,
}

impl LoanPool {
    /// Creates and seals pool `id`.
    pub fn create(name: &str, id: u16, layout: PoolLayout) -> Result<Self, PoolError> {
        Self::over(BufferPool::create(name, id, layout)?)
    }

    /// Adopts a blank region (made by the supervisor) as pool `id`.
    pub fn adopt(fd: std::os::fd::OwnedFd, id: u16, layout: PoolLayout) -> Result<Self, PoolError> {
        Self::over(BufferPool::adopt(fd, id, layout)?)
    }

    fn over(pool: BufferPool) -> Result<Self, PoolError> {
        let key = PoolKey { id: pool.id(), gen: crate::region::inode(pool.region().fd())? };
        Ok(Self { pool, key, returns: Returns::new(), reaped: Vec::new() })
    }

    /// The pool's key.
    pub fn key(&self) -> PoolKey {
        self.key
    }

    /// Its shape.
    pub fn layout(&self) -> PoolLayout {
        self.pool.layout()
    }

    /// The region, to grant read-only to borrowers.
    pub fn region(&self) -> &Region {
        self.pool.region()
    }

    /// Writes `byte` over every buffer, lent or not: what an owner may do to
    /// its own pool while borrowers read it (the hostile mode of a test).
    #[cfg(feature = "hostile")]
    #[doc(hidden)]
    pub fn hostile_scribble(&self, byte: u8) {
        let l = self.pool.layout();
        let junk = vec![byte; l.buf_size as usize];
        for i in 0..l.count {
            self.pool.region().copy_in(l.buf_offset(i), &junk);
        }
    }

    /// Bytes a buffer holds after its headroom.
    pub fn room(&self) -> usize {
        let l = self.pool.layout();
        (l.buf_size - l.headroom) as usize
    }

    /// Buffers out: held by a handle here, or lent.
    pub fn in_use(&mut self) -> usize {
        self.reap();
        self.pool.layout().count as usize - self.pool.free_count()
    }

    /// Buffers out as of the last reap (no reap: for a `&self` look).
    pub fn out(&self) -> usize {
        self.pool.layout().count as usize - self.pool.free_count()
    }

    /// Buffers free now.
    pub fn free(&mut self) -> usize {
        self.reap();
        self.pool.free_count()
    }

    /// Takes back every buffer whose last handle dropped; how many.
    pub fn reap(&mut self) -> usize {
        self.returns.take(&mut self.reaped);
        let n = self.reaped.len();
        for index in self.reaped.drain(..) {
            // Tokens are the indices this pool issued: a release cannot fail.
            let _ = self.pool.release(index as u32);
        }
        n
    }

    /// A handle on a fresh buffer holding `bytes` (at most [`LoanPool::room`]),
    /// a copy, counted; `None` when every buffer is out.
    pub fn fill(&mut self, bytes: &[u8]) -> Option<Lent> {
        if bytes.len() > self.room() {
            return None;
        }
        let filled = self.fill_with(|buf| {
            buf[..bytes.len()].copy_from_slice(bytes);
            crate::pool::count_copy(bytes.len());
            Ok::<_, std::convert::Infallible>(Some((0..bytes.len(), ())))
        });
        filled.ok().flatten().map(|(l, ())| l)
    }

    /// Copies `bytes` into as many fresh buffers as they need, appended to
    /// `chain`; all or nothing (`false`: too few buffers free).
    pub fn fill_chain(&mut self, bytes: &[u8], chain: &mut Chain) -> bool {
        self.fill_chain_with(bytes.len(), chain, |at, buf| {
            buf.copy_from_slice(&bytes[at..at + buf.len()]);
            crate::pool::count_copy(buf.len());
        })
    }

    /// Lets `write` fill `len` bytes in place in as many fresh buffers as they
    /// need (called once per buffer with the offset of its piece in the
    /// `len`, and the piece), appended to `chain`; all or nothing (`false`:
    /// too few buffers free, `write` is not called).
    pub fn fill_chain_with(&mut self, len: usize, chain: &mut Chain, mut write: impl FnMut(usize, &mut [u8])) -> bool {
        let room = self.room();
        if len.div_ceil(room) > self.free() {
            return false;
        }
        let mut at = 0;
        while at < len {
            let n = room.min(len - at);
            let filled = self.fill_with(|buf| {
                write(at, &mut buf[..n]);
                Ok::<_, std::convert::Infallible>(Some((0..n, ())))
            });
            match filled {
                Ok(Some((l, ()))) => chain.push(l),
                _ => return false,
            }
            at += n;
        }
        true
    }

    /// Lets `write` fill a fresh buffer's room in place (a device read, say):
    /// it says which range of the room holds the bytes, and a value to return
    /// with the handle on them; `Ok(None)` from it (nothing to read), an
    /// error, or no buffer free (`write` is not called) gives `Ok(None)` or the
    /// error, and the buffer stays free.
    pub fn fill_with<T, E>(
        &mut self,
        write: impl FnOnce(&mut [u8]) -> Result<Filled<T>, E>,
    ) -> Result<Option<(Lent, T)>, E> {
        self.reap();
        let Some(index) = self.pool.alloc() else { return Ok(None) };
        let layout = self.pool.layout();
        let base = self.pool.buf_offset(index) + layout.headroom as usize;
        let room = self.room();
        let region = self.pool.region_arc();
        assert!(base + room <= region.len(), "buffer {index} outside its pool's region");
        // Buffer `index` was just taken off the free list: no handle here refers
        // to it, no process holds a loan of it, and this process is the region's
        // one writer (sealed); others may read it, which leaves our access sound.
        // SAFETY: [base, base + room) is inside our writable mapping (checked,
        // kept mapped by the Arc) and nothing else writes it while `buf` lives.
        let buf = unsafe { std::slice::from_raw_parts_mut(region.as_ptr().cast_mut().add(base), room) };
        let (range, value) = match write(buf) {
            Ok(Some((r, v))) if r.start <= r.end && r.end <= room => (r, v),
            Ok(_) => {
                let _ = self.pool.release(index);
                return Ok(None);
            }
            Err(e) => {
                let _ = self.pool.release(index);
                return Err(e);
            }
        };
        let start = layout.headroom + range.start as u32;
        let at = base + range.start;
        let mem = Mem::Pool { map: Mapping::Own(region), key: self.key, index, at, start };
        let home = Some((self.returns.clone(), u64::from(index)));
        let len = range.len() as u32;
        Ok(Some((Lent { buf: Arc::new(Buf { mem, home }), off: 0, len }, value)))
    }
}

/// The lender's side of a link: the handles lent across it, by ticket, kept
/// until the borrower gives the ticket back.
#[derive(Debug)]
pub struct Ledger {
    slots: Vec<(u32, Option<Lent>)>,
    free: Vec<u32>,
    out: usize,
    quota: usize,
    /// Tickets are the lent buffers' indices (each lent whole, at most once):
    /// for a descriptor channel, whose returns name the buffer.
    by_buffer: bool,
}

/// Why a handle could not be lent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LendError {
    /// The handle is on private bytes, not on a pool: copy it into one first.
    #[error("private bytes cannot be lent: copy them into a pool first")]
    Private,
    /// The borrower holds its quota of loans.
    #[error("the borrower holds {0} loans, its quota")]
    Quota(usize),
    /// A ledger by buffer lends each buffer once at a time.
    #[error("buffer {0} is lent already")]
    Twice(u32),
    /// A ledger by buffer was handed a buffer of a larger pool than its own.
    #[error("buffer {0} is outside the pool this ledger lends from")]
    Foreign(u32),
}

impl Ledger {
    /// A ledger letting the borrower hold at most `quota` loans at once.
    pub fn new(quota: usize) -> Self {
        Self { slots: Vec::new(), free: Vec::new(), out: 0, quota, by_buffer: false }
    }

    /// A ledger whose tickets are buffer indices (of a pool of `count`): each
    /// buffer is lent at most once at a time, and a return names it.
    pub fn by_buffer(count: u32, quota: usize) -> Self {
        Self { slots: vec![(0, None); count as usize], free: Vec::new(), out: 0, quota, by_buffer: true }
    }

    /// Loans out now.
    pub fn out(&self) -> usize {
        self.out
    }

    /// Room for this many more loans.
    pub fn room(&self) -> usize {
        self.quota.saturating_sub(self.out)
    }

    /// Lends `l`: keeps it, and names it for the wire.
    pub fn lend(&mut self, l: &Lent) -> Result<Loan, LendError> {
        let (pool, index, offset) = l.place().ok_or(LendError::Private)?;
        if self.out >= self.quota {
            return Err(LendError::Quota(self.out));
        }
        if self.by_buffer {
            let held = self.slots.get_mut(index as usize).ok_or(LendError::Foreign(index))?;
            if held.1.is_some() {
                return Err(LendError::Twice(index));
            }
            held.1 = Some(l.clone());
            self.out += 1;
            return Ok(Loan { ticket: u64::from(index), pool, index, offset, len: l.len() as u32 });
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push((0, None));
                (self.slots.len() - 1) as u32
            }
        };
        let entry = &mut self.slots[slot as usize];
        entry.0 = entry.0.wrapping_add(1);
        entry.1 = Some(l.clone());
        self.out += 1;
        let ticket = (u64::from(entry.0) << 32) | u64::from(slot);
        Ok(Loan { ticket, pool, index, offset, len: l.len() as u32 })
    }

    /// `data` as pieces for the wire: every handle `lendable` says may be
    /// lent is, the others are copied (counted) into the pieces between the
    /// loans. All or nothing: `None` when none may be lent, or the quota has
    /// no room for them all.
    pub fn lend_chain(&mut self, data: &Chain, lendable: impl Fn(&Lent) -> bool) -> Option<Vec<Piece>> {
        let n = data.iter().filter(|l| lendable(l)).count();
        if n == 0 || n > self.room() {
            return None;
        }
        let mut pieces: Vec<Piece> = Vec::with_capacity(data.pieces());
        for l in data.iter() {
            if !lendable(l) {
                if !matches!(pieces.last(), Some(Piece::Bytes(_))) {
                    pieces.push(Piece::Bytes(Vec::new()));
                }
                if let Some(Piece::Bytes(b)) = pieces.last_mut() {
                    let from = b.len();
                    b.resize(from + l.len(), 0);
                    l.copy_to(0, &mut b[from..]);
                }
                continue;
            }
            match self.lend(l) {
                Ok(loan) => pieces.push(Piece::Loan(loan)),
                Err(_) => {
                    for loan in pieces.iter().filter_map(Piece::loan) {
                        let _ = self.returned(loan.ticket);
                    }
                    return None;
                }
            }
        }
        Some(pieces)
    }

    /// The borrower gave `ticket` back: the handle goes. A ticket never issued,
    /// or given back twice, is refused (a protocol violation of the borrower).
    pub fn returned(&mut self, ticket: u64) -> Result<(), PoolError> {
        let (gen, slot) = ((ticket >> 32) as u32, ticket as u32);
        match self.slots.get_mut(slot as usize) {
            Some((g, held @ Some(_))) if *g == gen => {
                *held = None;
                if !self.by_buffer {
                    self.free.push(slot);
                }
                self.out -= 1;
                Ok(())
            }
            _ => Err(PoolError::NotLent { index: slot, state: "not lent under that ticket" }),
        }
    }

    /// The borrower is gone: every handle lent to it drops here.
    pub fn clear(&mut self) {
        for (slot, (_, held)) in self.slots.iter_mut().enumerate() {
            if held.take().is_some() && !self.by_buffer {
                self.free.push(slot as u32);
            }
        }
        self.out = 0;
    }
}

/// Generations of one pool a [`Views`] reads loans of: the current and the one
/// before it.
pub const GENERATIONS: usize = 2;

/// The pools this process may be lent buffers of, read-only, by key.
#[derive(Debug, Default)]
pub struct Views {
    views: Vec<(PoolKey, Arc<RegionRo>, PoolLayout)>,
    /// The keys added with [`Views::add_beside`]: each current while viewed.
    beside: Vec<PoolKey>,
    /// Keys retired ([`Views::retire`]): read still, lent on no more.
    retired: Vec<PoolKey>,
}

impl Views {
    /// No views yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the view of pool `id` granted as `fd`, checking its header, as
    /// its current generation; the one before stays, so that loans a lender
    /// made of it before it learnt of the new one are still read, and older
    /// ones go (handles on them keep their mapping until they drop). Its key
    /// (the generation read from the fd).
    pub fn add(&mut self, id: u16, fd: std::os::fd::OwnedFd) -> Result<PoolKey, PoolError> {
        let (key, region, layout) = Self::view(id, fd)?;
        let mut kept = 0;
        for i in (0..self.views.len()).rev() {
            if self.views[i].0.id == id && !self.beside.contains(&self.views[i].0) {
                kept += 1;
                if kept >= GENERATIONS {
                    self.views.remove(i);
                }
            }
        }
        self.views.push((key, region, layout));
        Ok(key)
    }

    /// Adds the view of one more pool that goes by `id` (every application's
    /// send pool is the same pool id, each its own memfd, so its own key),
    /// keeping every other: it goes only with [`Views::remove`]. Its key.
    pub fn add_beside(&mut self, id: u16, fd: std::os::fd::OwnedFd) -> Result<PoolKey, PoolError> {
        let (key, region, layout) = Self::view(id, fd)?;
        if !self.views.iter().any(|(k, _, _)| *k == key) {
            self.views.push((key, region, layout));
            self.beside.push(key);
        }
        Ok(key)
    }

    fn view(id: u16, fd: std::os::fd::OwnedFd) -> Result<(PoolKey, Arc<RegionRo>, PoolLayout), PoolError> {
        let key = PoolKey { id, gen: crate::region::inode(std::os::fd::AsFd::as_fd(&fd))? };
        let view = PoolView::attach(fd, id)?;
        let layout = view.layout();
        Ok((key, Arc::new(view.into_region()), layout))
    }

    /// Whether `key` is the current generation of its pool: only those are
    /// lent on (a borrower viewing the pools as we do may have let an older
    /// one go).
    pub fn is_current(&self, key: PoolKey) -> bool {
        !self.retired.contains(&key)
            && (self.beside.contains(&key)
                || self.views.iter().rev().find(|(k, _, _)| k.id == key.id).is_some_and(|(k, _, _)| *k == key))
    }

    /// The fd of the view of `key` (to grant it on).
    pub fn fd(&self, key: PoolKey) -> Option<BorrowedFd<'_>> {
        self.views.iter().find(|(k, _, _)| *k == key).map(|(_, r, _)| r.fd())
    }

    /// The current generation of every pool viewed: its key and the fd of
    /// our view (to grant it on).
    pub fn pools(&self) -> impl Iterator<Item = (PoolKey, BorrowedFd<'_>)> {
        self.views.iter().filter(|(k, _, _)| self.is_current(*k)).map(|(k, r, _)| (*k, r.fd()))
    }

    /// Forgets the view of `key` (handles on it keep their mapping until they drop).
    pub fn remove(&mut self, key: PoolKey) {
        self.views.retain(|(k, _, _)| *k != key);
        self.beside.retain(|k| *k != key);
        self.retired.retain(|k| *k != key);
    }

    /// Lends on nothing of pool `key` from now on, while loans of it already
    /// made to us (in flight on a ring) are still read: its owner is gone, and
    /// those who lend us its buffers stop at about the same time. Removed
    /// later with [`Views::remove`].
    pub fn retire(&mut self, key: PoolKey) {
        if !self.retired.contains(&key) {
            self.retired.push(key);
        }
    }

    /// Handles on what `loans` name, in order (see [`Views::borrow`]).
    pub fn borrow_all(&self, pieces: Vec<Piece>, returns: &Arc<Returns>) -> Result<Chain, PoolError> {
        pieces
            .into_iter()
            .map(|p| match p {
                Piece::Loan(l) => self.borrow(&l, returns),
                Piece::Bytes(b) => Ok(Lent::from_vec(b)),
            })
            .collect()
    }

    /// A handle on what `loan` names, checked against its pool: it goes back
    /// to `returns` under the loan's ticket when its last clone drops. A loan of
    /// a pool we have no view of, or outside its buffer, is refused.
    pub fn borrow(&self, loan: &Loan, returns: &Arc<Returns>) -> Result<Lent, PoolError> {
        let (_, region, layout) = self
            .views
            .iter()
            .find(|(k, _, _)| *k == loan.pool)
            .ok_or(PoolError::WrongPool { expected: self.views.first().map_or(0, |v| v.0.id), found: loan.pool.id })?;
        if loan.index >= layout.count {
            return Err(PoolError::Index { index: loan.index, count: layout.count });
        }
        if u64::from(loan.offset) + u64::from(loan.len) > u64::from(layout.buf_size) {
            return Err(PoolError::OutOfBounds {
                offset: loan.offset.into(),
                len: loan.len.into(),
                buf_size: layout.buf_size,
            });
        }
        let at = layout.buf_offset(loan.index) + loan.offset as usize;
        let mem =
            Mem::Pool { map: Mapping::View(region.clone()), key: loan.pool, index: loan.index, at, start: loan.offset };
        let home = Some((returns.clone(), loan.ticket));
        Ok(Lent { buf: Arc::new(Buf { mem, home }), off: 0, len: loan.len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ID: u16 = 7;

    fn pool(count: u32) -> LoanPool {
        LoanPool::create("capnet-test-lent", ID, PoolLayout { buf_size: 256, count, headroom: 0 }).expect("pool")
    }

    #[test]
    fn a_buffer_is_free_when_its_last_handle_drops() {
        let mut p = pool(4);
        let a = p.fill(b"hello world").expect("buffer");
        let left = a.slice(..5);
        let right = a.slice(6..);
        drop(a);
        assert_eq!(p.in_use(), 1, "slices keep the buffer");
        assert_eq!(left.to_vec(), b"hello");
        drop(left);
        assert_eq!(p.in_use(), 1);
        assert_eq!(right.to_vec(), b"world");
        drop(right);
        assert_eq!(p.in_use(), 0);
    }

    #[test]
    fn an_exhausted_pool_fills_nothing_until_a_handle_drops() {
        let mut p = pool(2);
        let held: Vec<_> = (0..2).map(|i| p.fill(&[i]).expect("buffer")).collect();
        assert!(p.fill(b"x").is_none());
        let mut chain = Chain::new();
        assert!(!p.fill_chain(&[0; 300], &mut chain), "all or nothing");
        drop(held);
        assert!(p.fill_chain(&[0; 300], &mut chain));
        assert_eq!((chain.len(), chain.pieces()), (300, 2));
    }

    #[test]
    fn a_borrowed_handle_reads_the_lenders_bytes_and_goes_back_by_ticket() {
        let mut p = pool(4);
        let mut views = Views::new();
        let key = views.add(ID, p.region().fd().try_clone_to_owned().expect("dup")).expect("view");
        assert_eq!(key, p.key(), "owner and viewer name the pool alike");
        let mut ledger = Ledger::new(8);
        let a = p.fill(b"0123456789").expect("buffer");
        let loan = ledger.lend(&a.slice(2..6)).expect("lend");
        drop(a);
        let returns = Returns::new();
        let b = views.borrow(&loan, &returns).expect("borrow");
        assert_eq!(b.to_vec(), b"2345");
        drop(b);
        let mut back = Vec::new();
        returns.take(&mut back);
        assert_eq!(back, vec![loan.ticket]);
        assert_eq!(p.in_use(), 1, "the ledger holds it until the ticket is back");
        ledger.returned(loan.ticket).expect("return");
        assert_eq!(p.in_use(), 0);
        assert!(ledger.returned(loan.ticket).is_err(), "a second return is refused");
        assert!(ledger.returned(12345).is_err(), "a ticket never issued is refused");
    }

    #[test]
    fn loans_outside_the_pool_are_refused() {
        let p = pool(4);
        let mut views = Views::new();
        let key = views.add(ID, p.region().fd().try_clone_to_owned().expect("dup")).expect("view");
        assert_eq!(key, p.key(), "owner and viewer name the pool alike");
        let r = Returns::new();
        let ok = Loan { ticket: 1, pool: p.key(), index: 3, offset: 200, len: 56 };
        assert!(views.borrow(&ok, &r).is_ok());
        for bad in [
            Loan { index: 4, ..ok },
            Loan { offset: 201, ..ok },
            Loan { len: u32::MAX, ..ok },
            Loan { offset: u32::MAX, len: 2, ..ok },
            Loan { pool: PoolKey { id: 7, gen: p.key().gen + 1 }, ..ok },
            Loan { pool: PoolKey { id: 8, gen: p.key().gen }, ..ok },
        ] {
            assert!(views.borrow(&bad, &r).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_quota_bounds_the_loans_out_and_private_bytes_are_not_lent() {
        let mut p = pool(4);
        let mut ledger = Ledger::new(2);
        let a = p.fill(b"abc").expect("buffer");
        let t1 = ledger.lend(&a).expect("one");
        ledger.lend(&a.slice(1..)).expect("two");
        assert_eq!(ledger.lend(&a), Err(LendError::Quota(2)));
        ledger.returned(t1.ticket).expect("back");
        assert!(ledger.lend(&a).is_ok());
        assert_eq!(ledger.lend(&Lent::from_vec(vec![1])), Err(LendError::Private));
        let private: Chain = Lent::from_vec(vec![1]).into();
        let out = ledger.out();
        assert_eq!(ledger.lend_chain(&private, Lent::on_pool), None, "nothing to lend: nothing lent");
        let two: Chain = [a.slice(..1), a.slice(1..)].into_iter().collect();
        assert_eq!(ledger.lend_chain(&two, Lent::on_pool), None, "no room for both: nothing lent");
        assert_eq!(ledger.out(), out, "all or nothing");
        drop(two);
        ledger.clear();
        // Private bytes go between the loans, in order, runs of them as one.
        let mixed: Chain = [Lent::from_vec(vec![1]), Lent::from_vec(vec![2]), a.clone(), Lent::from_vec(vec![3])]
            .into_iter()
            .collect();
        let pieces = ledger.lend_chain(&mixed, Lent::on_pool).expect("lent");
        assert_eq!(pieces.len(), 3);
        assert_eq!(pieces[0], Piece::Bytes(vec![1, 2]));
        assert!(matches!(pieces[1], Piece::Loan(Loan { len: 3, .. })));
        assert_eq!(pieces[2], Piece::Bytes(vec![3]));
        assert_eq!(ledger.out(), 1, "one loan out");
        drop(mixed);
        ledger.clear();
        drop(a);
        assert_eq!(p.in_use(), 0, "a borrower gone gives every loan back");
    }

    #[test]
    fn a_ledger_by_buffer_names_loans_by_their_buffer() {
        let mut p = pool(4);
        let mut ledger = Ledger::by_buffer(4, 4);
        let a = p.fill(b"frame").expect("buffer");
        let loan = ledger.lend(&a).expect("lend");
        assert_eq!(loan.ticket, u64::from(loan.index));
        assert_eq!(ledger.lend(&a), Err(LendError::Twice(loan.index)));
        drop(a);
        assert_eq!(p.in_use(), 1);
        ledger.returned(loan.ticket).expect("back");
        assert!(ledger.returned(loan.ticket).is_err(), "twice");
        assert!(ledger.returned(99).is_err(), "no such buffer");
        assert_eq!(p.in_use(), 0);
    }

    #[test]
    fn a_pool_made_again_is_another_generation() {
        let (a, b) = (pool(2), pool(2));
        assert_eq!(a.key().id, b.key().id);
        assert_ne!(a.key(), b.key(), "two pools of one id are told apart by their memfds");
        let mut views = Views::new();
        views.add(ID, a.region().fd().try_clone_to_owned().expect("dup")).expect("view");
        let r = Returns::new();
        let loan = Loan { ticket: 1, pool: b.key(), index: 0, offset: 0, len: 8 };
        assert!(views.borrow(&loan, &r).is_err(), "a loan of the new pool is not read from the old one");
    }

    #[test]
    fn pools_of_one_id_viewed_beside_each_other_are_all_current_until_removed() {
        let (a, b, c) = (pool(2), pool(2), pool(2));
        let mut views = Views::new();
        let fd = |p: &LoanPool| p.region().fd().try_clone_to_owned().expect("dup");
        let (ka, kb) = (views.add_beside(ID, fd(&a)).expect("a"), views.add_beside(ID, fd(&b)).expect("b"));
        views.add_beside(ID, fd(&c)).expect("c");
        assert!(views.is_current(ka) && views.is_current(kb), "none evicts another");
        let r = Returns::new();
        let loan = |k| Loan { ticket: 1, pool: k, index: 0, offset: 0, len: 8 };
        assert!(views.borrow(&loan(ka), &r).is_ok(), "the first is read still");
        views.retire(ka);
        assert!(!views.is_current(ka) && views.borrow(&loan(ka), &r).is_ok(), "a retired one is read, not lent on");
        views.remove(ka);
        assert!(!views.is_current(ka) && views.borrow(&loan(ka), &r).is_err(), "a removed one is gone");
        assert!(views.is_current(kb));
    }

    /// A lender rewriting what it lent while the borrower reads: the reader
    /// sees some bytes (torn, perhaps), never a fault or a read outside the
    /// buffer, and the checksum and copies finish.
    #[test]
    fn a_lender_rewriting_a_loan_under_its_reader_corrupts_only_that_data() {
        let mut p = pool(2);
        let mut views = Views::new();
        views.add(ID, p.region().fd().try_clone_to_owned().expect("dup")).expect("view");
        let mine = p.fill(&[0u8; 256]).expect("buffer");
        let mut ledger = Ledger::new(4);
        let loan = ledger.lend(&mine).expect("lend");
        let theirs = views.borrow(&loan, &Returns::new()).expect("borrow");
        let (region, at) = match &mine.buf.mem {
            Mem::Pool { map: Mapping::Own(r), at, .. } => (r.clone(), *at),
            _ => unreachable!("a pool handle"),
        };
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u8;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = x.wrapping_add(1);
                    region.copy_in(at, &[x; 256]);
                }
            })
        };
        for _ in 0..2000 {
            let v = theirs.to_vec();
            assert_eq!(v.len(), 256);
            let mut sum = Checksum::default();
            theirs.sum_into(&mut sum);
            let _ = sum.fold();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().expect("writer");
    }

    proptest! {
        /// However a stream is cut into handles and split again, the bytes and
        /// their checksum are those of the stream.
        #[test]
        fn chains_split_and_sum_like_the_bytes(
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            cuts in proptest::collection::vec(1usize..300, 1..20),
            take in 0usize..2100,
            at in 0usize..2000,
        ) {
            let mut chain = Chain::new();
            let mut rest = &data[..];
            for c in cuts.iter().cycle() {
                if rest.is_empty() { break; }
                let n = (*c).min(rest.len());
                chain.push(Lent::from_vec(rest[..n].to_vec()));
                rest = &rest[n..];
            }
            prop_assert_eq!(chain.to_vec(), data.clone());
            let mut sum = Checksum::default();
            chain.sum_into(&mut sum);
            let mut whole = Checksum::default();
            whole.add(&data);
            prop_assert_eq!(sum.fold(), whole.fold());
            let at = at.min(data.len());
            let len = (data.len() - at).min(take);
            prop_assert_eq!(chain.range(at, len).to_vec(), data[at..at + len].to_vec());
            let front = chain.split_to(take);
            let n = take.min(data.len());
            prop_assert_eq!(front.to_vec(), data[..n].to_vec());
            prop_assert_eq!(chain.to_vec(), data[n..].to_vec());
        }
    }
}
