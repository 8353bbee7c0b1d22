//! Control messages: rkyv archives, validated only on a private copy.
//!
//! Socket calls, demux changes, statistics and supervisor commands are small rkyv
//! archives. The sender is untrusted, so the bytes are first copied out of shared
//! memory into a private, aligned buffer, and only then validated (bytecheck) and
//! deserialised: a peer can neither change them between check and use nor make the
//! receiver read outside them.
//!
//! Payload a message carries inline — the fields marked
//! `#[rkyv(with = PayloadBytes)]` — is counted as it is copied
//! ([`crate::pool::bytes_copied`]): twice when encoded (serialised into the
//! archive, and the archive into the channel's buffer or a socket), twice when
//! decoded (the copy that brought the archive out of shared memory or a
//! socket, and the deserialisation), three times if the archive had to be
//! copied again to its alignment. The rest of a message (calls, handles,
//! loans naming lent buffers) is not payload and is not counted.

use std::cell::{Cell, RefCell};

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor::Error as RancorError;
use rkyv::rancor::Fallible;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use rkyv::vec::ArchivedVec;
use rkyv::with::{ArchiveWith, DeserializeWith, SerializeWith};
use rkyv::{Archive, Deserialize, Place, Serialize};

thread_local! {
    /// Payload bytes the message this thread is encoding or decoding holds.
    static PAYLOAD: Cell<usize> = const { Cell::new(0) };
}

/// The rkyv wrapper for a message field holding payload bytes
/// (`#[rkyv(with = PayloadBytes)] data: Vec<u8>`): archived as a `Vec<u8>`
/// is, and counted by [`encode`] and [`decode`] (see the module docs).
#[derive(Debug)]
pub struct PayloadBytes;

impl ArchiveWith<Vec<u8>> for PayloadBytes {
    type Archived = ArchivedVec<u8>;
    type Resolver = <Vec<u8> as Archive>::Resolver;
    fn resolve_with(field: &Vec<u8>, resolver: Self::Resolver, out: Place<Self::Archived>) {
        field.resolve(resolver, out);
    }
}

impl<S: Fallible + ?Sized> SerializeWith<Vec<u8>, S> for PayloadBytes
where
    Vec<u8>: Serialize<S>,
{
    fn serialize_with(field: &Vec<u8>, s: &mut S) -> Result<Self::Resolver, S::Error> {
        PAYLOAD.set(PAYLOAD.get() + field.len());
        field.serialize(s)
    }
}

impl<D: Fallible + ?Sized> DeserializeWith<ArchivedVec<u8>, Vec<u8>, D> for PayloadBytes
where
    ArchivedVec<u8>: Deserialize<Vec<u8>, D>,
{
    fn deserialize_with(field: &ArchivedVec<u8>, d: &mut D) -> Result<Vec<u8>, D::Error> {
        PAYLOAD.set(PAYLOAD.get() + field.len());
        field.deserialize(d)
    }
}

/// Runs `f` (an encode or a decode) and counts `copies` copies of the payload
/// bytes it met.
fn counting<R>(copies: usize, f: impl FnOnce() -> R) -> R {
    PAYLOAD.set(0);
    let r = f();
    crate::pool::count_copy(copies * PAYLOAD.replace(0));
    r
}

/// The largest control message accepted.
pub const MAX_CONTROL_LEN: usize = 1024 * 1024;

/// Encoding or decoding a control message failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The message is larger than [`MAX_CONTROL_LEN`].
    #[error("control message of {0} bytes exceeds the {MAX_CONTROL_LEN}-byte limit")]
    TooLarge(usize),
    /// Serialisation failed.
    #[error("cannot encode control message: {0}")]
    Encode(String),
    /// The bytes are not a valid archive of the expected type.
    #[error("invalid control message from peer: {0}")]
    Invalid(String),
}

/// What [`encode`] and [`encode_with`] take: any rkyv-serialisable message (a
/// bound to name in generic code).
pub trait Encode: for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, RancorError>> {}
impl<T: for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, RancorError>>> Encode for T {}

/// What [`decode`] makes: any message whose archive can be validated and
/// deserialised (a bound to name in generic code).
pub trait Decode:
    Archive<
        Archived: for<'a> CheckBytes<HighValidator<'a, RancorError>> + Deserialize<Self, HighDeserializer<RancorError>>,
    > + Sized
{
}
impl<T> Decode for T
where
    T: Archive,
    T::Archived: for<'a> CheckBytes<HighValidator<'a, RancorError>> + Deserialize<T, HighDeserializer<RancorError>>,
{
}

/// Serialises `msg` into an archive.
pub fn encode<T>(msg: &T) -> Result<AlignedVec, ControlError>
where
    T: for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, RancorError>>,
{
    let bytes = counting(2, || rkyv::to_bytes::<RancorError>(msg)).map_err(|e| ControlError::Encode(e.to_string()))?;
    if bytes.len() > MAX_CONTROL_LEN {
        return Err(ControlError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// The alignment archives are written at (and [`decode`]'s copy is made at).
const ARCHIVE_ALIGN: usize = 16;

thread_local! {
    /// This thread's buffers for encoding and for the aligned private copy a
    /// decode validates: reused, so a stream of 64 KiB messages allocates nothing
    /// per message (freeing and re-faulting such buffers cost more than the copies).
    static ENCODE_BUF: RefCell<AlignedVec> = RefCell::new(AlignedVec::new());
    static DECODE_BUF: RefCell<AlignedVec<ARCHIVE_ALIGN>> = RefCell::new(AlignedVec::new());
}

/// Serialises `msg` into this thread's reused buffer and hands the archive to `f`.
pub fn encode_with<T, R>(msg: &T, f: impl FnOnce(&[u8]) -> R) -> Result<R, ControlError>
where
    T: for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, RancorError>>,
{
    // Taken out while `f` runs, so an `f` that encodes too gets a buffer of its own.
    let mut buf = ENCODE_BUF.with_borrow_mut(std::mem::take);
    buf.clear();
    let bytes = counting(2, || rkyv::api::high::to_bytes_in::<_, RancorError>(msg, buf))
        .map_err(|e| ControlError::Encode(e.to_string()))?;
    let r = if bytes.len() > MAX_CONTROL_LEN { Err(ControlError::TooLarge(bytes.len())) } else { Ok(f(&bytes)) };
    ENCODE_BUF.with_borrow_mut(|b| *b = bytes);
    r
}

/// Validates `bytes` (already out of shared memory) as an archive of `T` and
/// deserialises: in place when they lie at an archive's alignment (a message
/// end's private copy does), else from an aligned copy.
pub fn decode<T>(bytes: &[u8]) -> Result<T, ControlError>
where
    T: Archive,
    T::Archived: for<'a> CheckBytes<HighValidator<'a, RancorError>> + Deserialize<T, HighDeserializer<RancorError>>,
{
    if bytes.len() > MAX_CONTROL_LEN {
        return Err(ControlError::TooLarge(bytes.len()));
    }
    if bytes.as_ptr().align_offset(ARCHIVE_ALIGN) == 0 {
        return counting(2, || rkyv::from_bytes::<T, RancorError>(bytes))
            .map_err(|e| ControlError::Invalid(e.to_string()));
    }
    let mut private = DECODE_BUF.with_borrow_mut(std::mem::take);
    private.clear();
    private.extend_from_slice(bytes);
    let r =
        counting(3, || rkyv::from_bytes::<T, RancorError>(&private)).map_err(|e| ControlError::Invalid(e.to_string()));
    DECODE_BUF.with_borrow_mut(|b| *b = private);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
    #[rkyv(derive(Debug))]
    enum Msg {
        Bind { port: u16, addr: [u8; 4] },
        Close(u32),
        Name(String),
    }

    #[test]
    fn round_trip() {
        for m in [Msg::Bind { port: 7, addr: [10, 77, 0, 2] }, Msg::Close(3), Msg::Name("tcp".into())] {
            let bytes = encode(&m).expect("encode");
            assert_eq!(decode::<Msg>(&bytes).expect("decode"), m);
        }
    }

    #[test]
    fn truncated_and_corrupted_archives_are_refused() {
        let bytes = encode(&Msg::Name("a fairly long name".into())).expect("encode");
        assert!(decode::<Msg>(&bytes[..bytes.len() - 3]).is_err());
        let mut bad = bytes.to_vec();
        let n = bad.len();
        bad[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes()); // relative pointer
        assert!(decode::<Msg>(&bad).is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<Msg>(&bytes);
        }
    }
}
