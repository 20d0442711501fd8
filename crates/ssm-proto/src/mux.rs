//! smux streams over the data channel (ssm-protocol.md §6), sans IO. The client opens
//! streams (ids 3, 5, 7, … as the official client does); the agent never does. FIN is a
//! full close. A dial failure on the agent is a `ConnectToPortError` flag followed by a FIN.

use std::collections::HashMap;

use crate::smux::{self, Cmd, Decoder, Frame, FrameError};

/// What the other side did to a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MuxEvent {
    /// The client opened a stream (agent side only).
    Opened(u32),
    /// Bytes for a stream.
    Data(u32, Vec<u8>),
    /// The stream is closed.
    Closed(u32),
    /// The agent could not reach the remote port for this stream (client side).
    Refused(u32),
    /// A keepalive.
    Nop,
}

#[derive(Debug, Default)]
struct StreamState {
    received_data: bool,
}

/// One side's smux state.
#[derive(Debug)]
pub struct Mux {
    next_id: u32,
    decoder: Decoder,
    streams: HashMap<u32, StreamState>,
    refusal_pending: bool,
    output: Vec<u8>,
}

impl Default for Mux {
    fn default() -> Mux {
        Mux {
            next_id: 3,
            decoder: Decoder::default(),
            streams: HashMap::new(),
            refusal_pending: false,
            output: Vec::new(),
        }
    }
}

impl Mux {
    /// Opens a stream (client side): queues its SYN and returns its id.
    pub fn open(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(2);
        self.streams.insert(id, StreamState::default());
        Frame::control(Cmd::Syn, id).encode(&mut self.output);
        id
    }

    /// Queues bytes for a stream.
    pub fn write(&mut self, id: u32, data: &[u8]) {
        smux::encode_data(id, data, &mut self.output);
    }

    /// Closes a stream, if it is open.
    pub fn close(&mut self, id: u32) {
        if self.streams.remove(&id).is_some() {
            Frame::control(Cmd::Fin, id).encode(&mut self.output);
        }
    }

    /// Queues a keepalive (NOP on stream 0).
    pub fn keepalive(&mut self) {
        Frame::control(Cmd::Nop, 0).encode(&mut self.output);
    }

    /// Bytes to send as Output payloads.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// The agent reported `ConnectToPortError`: the next stream it closes without having
    /// sent data is the one refused.
    pub fn connect_error(&mut self) {
        self.refusal_pending = true;
    }

    /// Takes in Output bytes from the peer.
    pub fn handle_input(&mut self, bytes: &[u8]) -> Result<Vec<MuxEvent>, FrameError> {
        self.decoder.push(bytes);
        let mut events = Vec::new();
        while let Some(frame) = self.decoder.next_frame()? {
            match frame.cmd {
                Cmd::Nop => events.push(MuxEvent::Nop),
                Cmd::Syn => {
                    self.streams.insert(frame.stream_id, StreamState::default());
                    events.push(MuxEvent::Opened(frame.stream_id));
                }
                Cmd::Psh => {
                    if let Some(stream) = self.streams.get_mut(&frame.stream_id) {
                        stream.received_data = true;
                        events.push(MuxEvent::Data(frame.stream_id, frame.data));
                    }
                }
                Cmd::Fin => {
                    if let Some(stream) = self.streams.remove(&frame.stream_id) {
                        if self.refusal_pending && !stream.received_data {
                            self.refusal_pending = false;
                            events.push(MuxEvent::Refused(frame.stream_id));
                        } else {
                            events.push(MuxEvent::Closed(frame.stream_id));
                        }
                    }
                }
            }
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_opens_carries_data_both_ways_and_closes() {
        let (mut client, mut agent) = (Mux::default(), Mux::default());
        let id = client.open();
        assert_eq!(id, 3);
        client.write(id, b"ping");
        let events = agent.handle_input(&client.take_output()).unwrap();
        assert_eq!(
            events,
            [MuxEvent::Opened(3), MuxEvent::Data(3, b"ping".to_vec())]
        );
        agent.write(3, b"pong");
        agent.close(3);
        let events = client.handle_input(&agent.take_output()).unwrap();
        assert_eq!(
            events,
            [MuxEvent::Data(3, b"pong".to_vec()), MuxEvent::Closed(3)]
        );
        assert_eq!(client.open_streams(), 0);
        assert_eq!(client.open(), 5);
    }

    #[test]
    fn a_connect_error_refuses_only_the_stream_it_concerns() {
        let (mut client, mut agent) = (Mux::default(), Mux::default());
        let (a, b) = (client.open(), client.open());
        agent.handle_input(&client.take_output()).unwrap();
        agent.write(a, b"hello");
        let events = client.handle_input(&agent.take_output()).unwrap();
        assert_eq!(events, [MuxEvent::Data(a, b"hello".to_vec())]);
        // The dial for b failed: flag, then FIN b.
        client.connect_error();
        agent.close(b);
        assert_eq!(
            client.handle_input(&agent.take_output()).unwrap(),
            [MuxEvent::Refused(b)]
        );
        agent.close(a);
        assert_eq!(
            client.handle_input(&agent.take_output()).unwrap(),
            [MuxEvent::Closed(a)]
        );
    }
}
