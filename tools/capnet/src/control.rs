//! The control socket: length-prefixed rkyv messages between the CLI and a running
//! supervisor, validated on a private copy (capnet_ipc::control), callers checked
//! with `SO_PEERCRED`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use capnet_ipc::control::{decode, encode, MAX_CONTROL_LEN};
use rkyv::{Archive, Deserialize, Serialize};

/// Where a supervisor keeps its sockets, pid and log.
pub fn run_dir(netns: &str) -> PathBuf {
    Path::new("/run/capnet").join(netns)
}

/// The control socket of the stack in `netns`.
pub fn socket_path(netns: &str) -> PathBuf {
    run_dir(netns).join("control.sock")
}

/// What the CLI asks.
#[derive(Debug, Archive, Serialize, Deserialize, PartialEq)]
pub enum Request {
    /// The status object, as JSON.
    Status,
    /// Stop and clean up.
    Down,
    /// Copies of the driver's frames: answered `Ok`, then the reading end of a
    /// `SOCK_SEQPACKET` socket as a capability.
    Capture,
}

/// What the supervisor answers.
#[derive(Debug, Archive, Serialize, Deserialize, PartialEq)]
pub enum Reply {
    /// The status object, as JSON text.
    Status(String),
    /// Done.
    Ok,
    /// Refused, with the reason.
    Refused(String),
}

/// Sends one message.
pub fn send<T>(stream: &mut UnixStream, msg: &T) -> Result<()>
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rkyv::rancor::Error,
        >,
    >,
{
    let bytes = encode(msg)?;
    stream.write_all(&(bytes.len() as u32).to_le_bytes())?;
    stream.write_all(&bytes)?;
    Ok(())
}

/// Receives one message.
pub fn recv<T>(stream: &mut UnixStream) -> Result<T>
where
    T: Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_CONTROL_LEN {
        bail!("control message of {len} bytes is over the limit");
    }
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf)?;
    Ok(decode(&buf)?)
}

/// Asks the stack in `netns` one thing.
pub fn ask(netns: &str, req: &Request) -> Result<Reply> {
    ask_keep(netns, req).map(|(reply, _)| reply)
}

/// Asks the stack in `netns` one thing and keeps the connection (for what the
/// supervisor sends after its reply).
pub fn ask_keep(netns: &str, req: &Request) -> Result<(Reply, UnixStream)> {
    let path = socket_path(netns);
    let mut s = UnixStream::connect(&path).with_context(|| {
        format!("capnet is not up in namespace {netns} (no answer on {}): start it with `capnet up`", path.display())
    })?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    send(&mut s, req)?;
    let reply = recv(&mut s).map_err(|e| anyhow!("the supervisor did not answer: {e}"))?;
    Ok((reply, s))
}
