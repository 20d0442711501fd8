//! Feeds arbitrary bytes to every ssm-proto decoder: the binary message, smux frames split
//! at arbitrary points, and a data channel in both roles. None may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssm_proto::channel::{DataChannel, Role};
use ssm_proto::message::Message;
use ssm_proto::mux::Mux;
use ssm_proto::smux::Decoder;

fuzz_target!(|data: &[u8]| {
    let _ = Message::decode(data);

    let split = data.first().copied().unwrap_or(1).max(1) as usize;
    let mut decoder = Decoder::default();
    for chunk in data.chunks(split) {
        decoder.push(chunk);
        while let Ok(Some(_)) = decoder.next_frame() {}
    }
    let mut mux = Mux::default();
    let _ = mux.handle_input(data);

    let now = std::time::Instant::now();
    for role in [Role::Client, Role::Agent] {
        let mut channel = DataChannel::new(role, now, 1, 0, 16);
        channel.handle_frame(now, data);
        while channel.poll_event().is_some() {}
        while channel.poll_transmit().is_some() {}
        channel.handle_timeout(now + std::time::Duration::from_secs(1));
    }
});
