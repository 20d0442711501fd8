//! smux version 1 (ssm-protocol.md §6): `ver u8 | cmd u8 | length u16 LE | stream id u32 LE
//! | data`. A byte stream of frames carried in Output payloads: one message may hold several
//! frames and one frame may span messages, so decoding is incremental.
//! Hand-written, sans IO by design: async_smux (the one Rust crate) owns its socket and
//! tasks, where this codec must be driven by the data channel's own state machine and a
//! simulated clock; the format is four commands and an 8-byte header.

/// The only version spoken.
pub const VERSION: u8 = 1;
/// The largest data a frame carries.
pub const MAX_FRAME_DATA: usize = 32_768;
const HEADER: usize = 8;

/// A frame's command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cmd {
    /// 0: open a stream.
    Syn,
    /// 1: close a stream (a full close; no half-close).
    Fin,
    /// 2: data.
    Psh,
    /// 3: keepalive, stream 0.
    Nop,
}

impl Cmd {
    fn to_u8(self) -> u8 {
        match self {
            Cmd::Syn => 0,
            Cmd::Fin => 1,
            Cmd::Psh => 2,
            Cmd::Nop => 3,
        }
    }

    fn from_u8(value: u8) -> Option<Cmd> {
        match value {
            0 => Some(Cmd::Syn),
            1 => Some(Cmd::Fin),
            2 => Some(Cmd::Psh),
            3 => Some(Cmd::Nop),
            _ => None,
        }
    }
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What it does.
    pub cmd: Cmd,
    /// The stream (client-opened ids are odd: 3, 5, 7, … in the official client).
    pub stream_id: u32,
    /// Data (`Psh` only; at most `MAX_FRAME_DATA`).
    pub data: Vec<u8>,
}

impl Frame {
    /// A frame without data.
    pub fn control(cmd: Cmd, stream_id: u32) -> Frame {
        Frame {
            cmd,
            stream_id,
            data: Vec::new(),
        }
    }

    /// Appends the encoded frame. Data over `MAX_FRAME_DATA` must be split by the caller
    /// (see `encode_data`).
    pub fn encode(&self, out: &mut Vec<u8>) {
        debug_assert!(self.data.len() <= MAX_FRAME_DATA);
        out.push(VERSION);
        out.push(self.cmd.to_u8());
        out.extend_from_slice(&(self.data.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.stream_id.to_le_bytes());
        out.extend_from_slice(&self.data);
    }
}

/// Appends `data` for `stream_id` as as many `Psh` frames as it takes.
pub fn encode_data(stream_id: u32, data: &[u8], out: &mut Vec<u8>) {
    for chunk in data.chunks(MAX_FRAME_DATA) {
        Frame {
            cmd: Cmd::Psh,
            stream_id,
            data: chunk.to_vec(),
        }
        .encode(out);
    }
}

/// Why the smux byte stream is broken. The session cannot continue after one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A version other than 1.
    #[error("smux version {0} (only 1 is spoken)")]
    Version(u8),
    /// An unknown command.
    #[error("unknown smux command {0}")]
    Command(u8),
}

/// Reassembles frames from a byte stream.
#[derive(Debug, Default)]
pub struct Decoder {
    buffer: Vec<u8>,
}

impl Decoder {
    /// Adds bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete frame: `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buffer.len() < HEADER {
            return Ok(None);
        }
        if self.buffer[0] != VERSION {
            return Err(FrameError::Version(self.buffer[0]));
        }
        let cmd = Cmd::from_u8(self.buffer[1]).ok_or(FrameError::Command(self.buffer[1]))?;
        let length = u16::from_le_bytes([self.buffer[2], self.buffer[3]]) as usize;
        if self.buffer.len() < HEADER + length {
            return Ok(None);
        }
        let stream_id = u32::from_le_bytes([
            self.buffer[4],
            self.buffer[5],
            self.buffer[6],
            self.buffer[7],
        ]);
        let data = self.buffer[HEADER..HEADER + length].to_vec();
        self.buffer.drain(..HEADER + length);
        Ok(Some(Frame {
            cmd,
            stream_id,
            data,
        }))
    }

    /// Bytes held that do not yet make a frame.
    pub fn pending(&self) -> usize {
        self.buffer.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_bytes() {
        let mut out = Vec::new();
        Frame {
            cmd: Cmd::Psh,
            stream_id: 3,
            data: b"hi".to_vec(),
        }
        .encode(&mut out);
        assert_eq!(out, [1, 2, 2, 0, 3, 0, 0, 0, b'h', b'i']);
        out.clear();
        Frame::control(Cmd::Syn, 5).encode(&mut out);
        assert_eq!(out, [1, 0, 0, 0, 5, 0, 0, 0]);
    }

    #[test]
    fn frames_split_and_joined_across_pushes() {
        let mut bytes = Vec::new();
        Frame::control(Cmd::Syn, 3).encode(&mut bytes);
        encode_data(3, &vec![7; MAX_FRAME_DATA + 10], &mut bytes);
        Frame::control(Cmd::Fin, 3).encode(&mut bytes);
        let mut decoder = Decoder::default();
        let mut frames = Vec::new();
        for chunk in bytes.chunks(1000) {
            decoder.push(chunk);
            while let Some(frame) = decoder.next_frame().unwrap() {
                frames.push(frame);
            }
        }
        let sizes: Vec<(Cmd, usize)> = frames.iter().map(|f| (f.cmd, f.data.len())).collect();
        assert_eq!(
            sizes,
            [
                (Cmd::Syn, 0),
                (Cmd::Psh, MAX_FRAME_DATA),
                (Cmd::Psh, 10),
                (Cmd::Fin, 0)
            ]
        );
        assert_eq!(decoder.pending(), 0);
    }

    #[test]
    fn bad_versions_and_commands_are_errors() {
        let mut decoder = Decoder::default();
        decoder.push(&[2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(decoder.next_frame(), Err(FrameError::Version(2)));
        let mut decoder = Decoder::default();
        decoder.push(&[1, 9, 0, 0, 0, 0, 0, 0]);
        assert_eq!(decoder.next_frame(), Err(FrameError::Command(9)));
    }
}
