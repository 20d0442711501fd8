//! The binary message every websocket frame of the data channel carries (ssm-protocol.md §3).
//!
//! ```text
//! 0   u32  HeaderLength (116)       64  16B MessageId (UUID, halves swapped)
//! 4   32B  MessageType (space pad)   80  32B SHA-256 of the payload
//! 36  u32  SchemaVersion            112  u32 PayloadType
//! 40  u64  CreatedDate (ms)         116  u32 PayloadLength
//! 48  i64  SequenceNumber           120  payload
//! 56  u64  Flags (1 SYN, 2 FIN)
//! ```
//! Integers are big-endian. Encoders append to the caller's buffer; decoding never panics.

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The header length every message carries.
pub const HEADER_LENGTH: u32 = 116;
const MESSAGE_TYPE_LEN: usize = 32;
const PAYLOAD_START: usize = HEADER_LENGTH as usize + 4;

/// `input_stream_data`: client → agent stream data.
pub const INPUT_STREAM_DATA: &str = "input_stream_data";
/// `output_stream_data`: agent → client stream data.
pub const OUTPUT_STREAM_DATA: &str = "output_stream_data";
/// `acknowledge`.
pub const ACKNOWLEDGE: &str = "acknowledge";
/// `channel_closed`: the session is over.
pub const CHANNEL_CLOSED: &str = "channel_closed";
/// `start_publication`.
pub const START_PUBLICATION: &str = "start_publication";
/// `pause_publication`.
pub const PAUSE_PUBLICATION: &str = "pause_publication";

/// Flag bit: first message of a direction.
pub const FLAG_SYN: u64 = 1;
/// Flag bit: last message.
pub const FLAG_FIN: u64 = 2;

/// What a payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PayloadType {
    /// 0: acknowledge and control messages.
    Undefined,
    /// 1: stream bytes (raw in basic mode, smux in mux mode).
    Output,
    /// 2.
    Error,
    /// 3: terminal size.
    Size,
    /// 4.
    Parameter,
    /// 5: the agent's handshake request.
    HandshakeRequest,
    /// 6: the client's handshake response.
    HandshakeResponse,
    /// 7: the agent's handshake complete.
    HandshakeComplete,
    /// 8.
    EncChallengeRequest,
    /// 9.
    EncChallengeResponse,
    /// 10: a 4-byte big-endian flag (see `Flag`).
    Flag,
    /// 11.
    StdErr,
    /// 12.
    ExitCode,
    /// Any other value, kept so that nothing is lost.
    Other(u32),
}

impl PayloadType {
    /// The wire value.
    pub fn to_u32(self) -> u32 {
        match self {
            PayloadType::Undefined => 0,
            PayloadType::Output => 1,
            PayloadType::Error => 2,
            PayloadType::Size => 3,
            PayloadType::Parameter => 4,
            PayloadType::HandshakeRequest => 5,
            PayloadType::HandshakeResponse => 6,
            PayloadType::HandshakeComplete => 7,
            PayloadType::EncChallengeRequest => 8,
            PayloadType::EncChallengeResponse => 9,
            PayloadType::Flag => 10,
            PayloadType::StdErr => 11,
            PayloadType::ExitCode => 12,
            PayloadType::Other(value) => value,
        }
    }

    /// From the wire value.
    pub fn from_u32(value: u32) -> PayloadType {
        match value {
            0 => PayloadType::Undefined,
            1 => PayloadType::Output,
            2 => PayloadType::Error,
            3 => PayloadType::Size,
            4 => PayloadType::Parameter,
            5 => PayloadType::HandshakeRequest,
            6 => PayloadType::HandshakeResponse,
            7 => PayloadType::HandshakeComplete,
            8 => PayloadType::EncChallengeRequest,
            9 => PayloadType::EncChallengeResponse,
            10 => PayloadType::Flag,
            11 => PayloadType::StdErr,
            12 => PayloadType::ExitCode,
            other => PayloadType::Other(other),
        }
    }
}

/// One data-channel message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// `input_stream_data`, `acknowledge`, … (at most 32 bytes).
    pub message_type: String,
    /// 1.
    pub schema_version: u32,
    /// Milliseconds since the Unix epoch; never 0 on a valid message.
    pub created_date: u64,
    /// Per-direction sequence number of stream data; 0 on acknowledgements.
    pub sequence_number: i64,
    /// `FLAG_SYN`, `FLAG_FIN`.
    pub flags: u64,
    /// The message's id.
    pub message_id: Uuid,
    /// What the payload is.
    pub payload_type: PayloadType,
    /// The payload.
    pub payload: Vec<u8>,
}

/// Why bytes are not a valid message. The data channel drops such messages unacknowledged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than a header.
    #[error("a message needs at least {PAYLOAD_START} bytes, got {0}")]
    TooShort(usize),
    /// HeaderLength is 0, or larger than the frame.
    #[error("header length {0} does not fit the frame")]
    BadHeaderLength(u32),
    /// MessageType is empty or not ASCII.
    #[error("message type is empty or not text")]
    BadMessageType,
    /// CreatedDate is 0.
    #[error("created date is 0")]
    ZeroCreatedDate,
    /// PayloadDigest does not match the payload.
    #[error("payload digest mismatch")]
    DigestMismatch,
}

fn swap_halves(bytes: &[u8; 16]) -> [u8; 16] {
    let mut out = [0; 16];
    out[..8].copy_from_slice(&bytes[8..]);
    out[8..].copy_from_slice(&bytes[..8]);
    out
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(word)
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(word)
}

impl Message {
    /// A message with the given type, sequence number and payload; the caller sets
    /// `created_date` and `message_id`.
    pub fn new(
        message_type: &str,
        sequence_number: i64,
        payload_type: PayloadType,
        payload: Vec<u8>,
        created_date: u64,
        message_id: Uuid,
    ) -> Message {
        Message {
            message_type: message_type.to_owned(),
            schema_version: 1,
            created_date,
            sequence_number,
            flags: 0,
            message_id,
            payload_type,
            payload,
        }
    }

    /// Appends the encoded message to `out`. Message types longer than 32 bytes are cut.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(PAYLOAD_START + self.payload.len());
        out.extend_from_slice(&HEADER_LENGTH.to_be_bytes());
        let mut message_type = [b' '; MESSAGE_TYPE_LEN];
        let name = self.message_type.as_bytes();
        let len = name.len().min(MESSAGE_TYPE_LEN);
        message_type[..len].copy_from_slice(&name[..len]);
        out.extend_from_slice(&message_type);
        out.extend_from_slice(&self.schema_version.to_be_bytes());
        out.extend_from_slice(&self.created_date.to_be_bytes());
        out.extend_from_slice(&self.sequence_number.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&swap_halves(self.message_id.as_bytes()));
        out.extend_from_slice(&Sha256::digest(&self.payload));
        out.extend_from_slice(&self.payload_type.to_u32().to_be_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.payload);
    }

    /// The encoded message.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decodes one websocket frame. Validation follows the official client: checks are
    /// skipped for start/pause_publication; the payload is everything after the header
    /// (PayloadLength only decides whether the digest is checked).
    pub fn decode(frame: &[u8]) -> Result<Message, DecodeError> {
        if frame.len() < PAYLOAD_START {
            return Err(DecodeError::TooShort(frame.len()));
        }
        let header_length = be_u32(frame, 0);
        let message_type: String = std::str::from_utf8(&frame[4..4 + MESSAGE_TYPE_LEN])
            .map_err(|_| DecodeError::BadMessageType)?
            .trim_end_matches([' ', '\0'])
            .to_owned();
        let schema_version = be_u32(frame, 36);
        let created_date = be_u64(frame, 40);
        let sequence_number = be_u64(frame, 48) as i64;
        let flags = be_u64(frame, 56);
        let mut id = [0; 16];
        id.copy_from_slice(&frame[64..80]);
        let message_id = Uuid::from_bytes(swap_halves(&id));
        let digest = &frame[80..112];
        let payload_type = PayloadType::from_u32(be_u32(frame, 112));
        let payload_length = be_u32(frame, 116);
        let payload_start = header_length as usize + 4;
        let skip_checks = message_type == START_PUBLICATION || message_type == PAUSE_PUBLICATION;
        if !skip_checks {
            if header_length == 0 || payload_start > frame.len() || payload_start < PAYLOAD_START {
                return Err(DecodeError::BadHeaderLength(header_length));
            }
            if message_type.is_empty() || !message_type.is_ascii() {
                return Err(DecodeError::BadMessageType);
            }
            if created_date == 0 {
                return Err(DecodeError::ZeroCreatedDate);
            }
        }
        let payload = frame
            .get(payload_start.max(PAYLOAD_START)..)
            .unwrap_or_default()
            .to_vec();
        if !skip_checks && payload_length != 0 && Sha256::digest(&payload).as_slice() != digest {
            return Err(DecodeError::DigestMismatch);
        }
        Ok(Message {
            message_type,
            schema_version,
            created_date,
            sequence_number,
            flags,
            message_id,
            payload_type,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VECTOR: &str = concat!(
        "00000074696e7075745f73747265616d5f64617461202020202020202020202020202020",
        "000000010000015e0baa788400000000000000050000000000000000a508b5f073f31b16",
        "dd01e56bff48483e433ebf5bc03dffa38536673207a21281612cef5faa9bc7a4d5b9be2f",
        "db12cf1a0000000a0000000400000002",
    );

    fn vector_message() -> Message {
        Message {
            message_type: INPUT_STREAM_DATA.into(),
            schema_version: 1,
            created_date: 1_503_434_274_948,
            sequence_number: 5,
            flags: 0,
            message_id: Uuid::parse_str("dd01e56b-ff48-483e-a508-b5f073f31b16").unwrap(),
            payload_type: PayloadType::Flag,
            payload: vec![0, 0, 0, 2],
        }
    }

    #[test]
    fn the_official_test_vector_round_trips_byte_for_byte() {
        let bytes = hex::decode(VECTOR).unwrap();
        assert_eq!(bytes.len(), 124);
        assert_eq!(vector_message().to_bytes(), bytes);
        assert_eq!(Message::decode(&bytes).unwrap(), vector_message());
    }

    #[test]
    fn message_types_padded_with_nuls_are_read() {
        let mut bytes = vector_message().to_bytes();
        for byte in &mut bytes[4 + INPUT_STREAM_DATA.len()..36] {
            *byte = 0;
        }
        assert_eq!(
            Message::decode(&bytes).unwrap().message_type,
            INPUT_STREAM_DATA
        );
    }

    #[test]
    fn invalid_messages_are_rejected() {
        let good = vector_message().to_bytes();
        assert_eq!(
            Message::decode(&good[..100]),
            Err(DecodeError::TooShort(100))
        );
        let mut digest = good.clone();
        digest[123] ^= 1;
        assert_eq!(Message::decode(&digest), Err(DecodeError::DigestMismatch));
        let mut date = good.clone();
        date[40..48].fill(0);
        assert_eq!(Message::decode(&date), Err(DecodeError::ZeroCreatedDate));
        let mut header = good.clone();
        header[0..4].fill(0);
        assert_eq!(
            Message::decode(&header),
            Err(DecodeError::BadHeaderLength(0))
        );
        let mut name = good.clone();
        name[4..36].fill(b' ');
        assert_eq!(Message::decode(&name), Err(DecodeError::BadMessageType));
    }

    #[test]
    fn publication_control_skips_the_checks() {
        let mut message = vector_message();
        message.message_type = PAUSE_PUBLICATION.into();
        message.created_date = 0;
        let mut bytes = message.to_bytes();
        bytes[80] ^= 1; // bad digest too
        assert_eq!(
            Message::decode(&bytes).unwrap().message_type,
            PAUSE_PUBLICATION
        );
    }

    #[test]
    fn payload_length_zero_means_no_digest_check() {
        let mut bytes = vector_message().to_bytes();
        bytes[116..120].fill(0);
        bytes[80] ^= 1;
        assert_eq!(Message::decode(&bytes).unwrap().payload, vec![0, 0, 0, 2]);
    }
}
