//! Property tests: decoding arbitrary bytes never panics, and whatever encodes decodes back.

use proptest::prelude::*;
use ssm_proto::message::{Message, PayloadType};
use ssm_proto::smux::{Cmd, Decoder, Frame};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn message_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = Message::decode(&bytes);
    }

    #[test]
    fn mutated_valid_messages_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..64), at in 0usize..200, byte in any::<u8>()) {
        let message = Message::new("output_stream_data", 3, PayloadType::Output, payload, 1_700_000_000_000, uuid::Uuid::nil());
        let mut bytes = message.to_bytes();
        let at = at % bytes.len();
        bytes[at] = byte;
        let _ = Message::decode(&bytes);
    }

    #[test]
    fn messages_round_trip(
        kind in prop::sample::select(vec!["input_stream_data", "output_stream_data", "acknowledge", "channel_closed"]),
        seq in any::<i64>(), flags in 0u64..4, payload_type in 0u32..20, created in 1u64..u64::MAX,
        id in any::<u128>(), payload in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut message = Message::new(kind, seq, PayloadType::from_u32(payload_type), payload, created, uuid::Uuid::from_u128(id));
        message.flags = flags;
        prop_assert_eq!(Message::decode(&message.to_bytes()).unwrap(), message);
    }

    #[test]
    fn smux_decode_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..20)) {
        let mut decoder = Decoder::default();
        for chunk in chunks {
            decoder.push(&chunk);
            while let Ok(Some(_)) = decoder.next_frame() {}
        }
    }

    #[test]
    fn smux_frames_survive_any_split(
        frames in proptest::collection::vec((0u8..4, any::<u32>(), proptest::collection::vec(any::<u8>(), 0..300)), 1..20),
        split in 1usize..97,
    ) {
        let frames: Vec<Frame> = frames.into_iter().map(|(cmd, id, data)| {
            let cmd = [Cmd::Syn, Cmd::Fin, Cmd::Psh, Cmd::Nop][cmd as usize];
            Frame { cmd, stream_id: id, data: if cmd == Cmd::Psh { data } else { Vec::new() } }
        }).collect();
        let mut bytes = Vec::new();
        for frame in &frames { frame.encode(&mut bytes); }
        let mut decoder = Decoder::default();
        let mut out = Vec::new();
        for chunk in bytes.chunks(split) {
            decoder.push(chunk);
            while let Some(frame) = decoder.next_frame().unwrap() { out.push(frame); }
        }
        prop_assert_eq!(out, frames);
    }
}
