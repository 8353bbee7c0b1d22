//! pcap capture of the driver's frames (what `capnet capture -w FILE` writes), in
//! the classic libpcap format with the Ethernet link type, readable by tcpdump.

use std::io::Write;
use std::time::Duration;

use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::DataLink;

/// Writing a capture failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the capture: {0}")]
pub struct CaptureError(#[from] pcap_file::PcapError);

/// A pcap file being written.
pub struct Capture<W: Write> {
    writer: PcapWriter<W>,
    snaplen: u32,
    frames: u64,
}

impl<W: Write> std::fmt::Debug for Capture<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture").field("snaplen", &self.snaplen).field("frames", &self.frames).finish()
    }
}

impl<W: Write> Capture<W> {
    /// Starts a capture into `out`, keeping at most `snaplen` bytes of each frame.
    pub fn new(out: W, snaplen: u32) -> Result<Self, CaptureError> {
        let header = PcapHeader { datalink: DataLink::ETHERNET, snaplen, ..PcapHeader::default() };
        Ok(Self { writer: PcapWriter::with_header(out, header)?, snaplen, frames: 0 })
    }

    /// Records one frame seen at `when` (wall-clock time since the Unix epoch).
    pub fn frame(&mut self, when: Duration, frame: &[u8]) -> Result<(), CaptureError> {
        let kept = &frame[..frame.len().min(self.snaplen as usize)];
        self.writer.write_packet(&PcapPacket::new(when, frame.len() as u32, kept))?;
        self.frames += 1;
        Ok(())
    }

    /// Frames written.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Finishes and returns the writer.
    pub fn into_inner(self) -> W {
        self.writer.into_writer()
    }
}
