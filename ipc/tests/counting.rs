//! What [`capnet_ipc::pool::bytes_copied`] counts of a message: the payload it
//! carries inline (the fields marked `PayloadBytes`), once per copy — into the
//! archive, into the channel's buffer, out of it, and out of the archive —
//! and nothing of the rest (calls, handles, the loans that name lent
//! buffers). Its own test binary: the counter is the process's.
#![cfg(not(loom))]

use capnet_ipc::control::{decode, encode_with, PayloadBytes};
use capnet_ipc::msg::{MsgEnd, MsgHalf};
use capnet_ipc::pool::bytes_copied;
use capnet_ipc::End;
use rkyv::{Archive, Deserialize, Serialize};

#[derive(Debug, PartialEq, Archive, Serialize, Deserialize)]
struct Call {
    handle: u64,
    /// Loan names, say: not payload.
    loans: Vec<u64>,
    #[rkyv(with = PayloadBytes)]
    data: Vec<u8>,
}

fn pair() -> (MsgEnd, MsgEnd) {
    let a = MsgHalf::new("t-count-a", End::A).expect("half a");
    let b = MsgHalf::new("t-count-b", End::B).expect("half b");
    let (ga, gb) = (a.grant().expect("grant a"), b.grant().expect("grant b"));
    (a.attach(End::A, gb).expect("attach a"), b.attach(End::B, ga).expect("attach b"))
}

/// Sends `call` from `a` to `b`: the bytes counted on each side.
fn carry(a: &mut MsgEnd, b: &mut MsgEnd, call: &Call) -> (u64, u64) {
    let before = bytes_copied();
    assert!(encode_with(call, |bytes| a.send(bytes).expect("send")).expect("encode"));
    let sent = bytes_copied() - before;
    let before = bytes_copied();
    let mut got = None;
    b.recv(|m| got = Some(decode::<Call>(m).expect("decode"))).expect("recv");
    assert_eq!(got.as_ref(), Some(call));
    (sent, bytes_copied() - before)
}

#[test]
fn a_message_counts_its_inline_payload_per_copy_and_nothing_else() {
    let (mut a, mut b) = pair();
    let payload = Call { handle: 7, loans: vec![1; 300], data: vec![0x5a; 1000] };
    let (sent, received) = carry(&mut a, &mut b, &payload);
    assert_eq!(sent, 2000, "encoded: into the archive and into the buffer");
    // Out of the buffer and out of the archive; once more if the archive had
    // to be copied to its alignment.
    assert!(received == 2000 || received == 3000, "decoded: {received}");
    let lent = Call { handle: 7, loans: vec![1; 300], data: Vec::new() };
    assert_eq!(carry(&mut a, &mut b, &lent), (0, 0), "a message of loans copies no payload");
}
