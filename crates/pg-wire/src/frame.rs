//! Typed messages (a tag, a length that counts itself, a body): how long the one at the
//! front of a buffer is, and the few a relay writes itself.

/// What was wrong with the bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A length outside what the protocol allows, or above the reader's cap.
    #[error("a message '{tag}' of {length} bytes")]
    Length {
        /// The message's tag, as a character.
        tag: char,
        /// The length it claims.
        length: usize,
    },
    /// A string without its terminating NUL, or not UTF-8.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// The length of the whole message (tag, length, body) at the front of `buffer`: `Some`
/// when all of it is there, `None` when more bytes are needed, an error when its length is
/// below 4 or above `cap`.
pub fn length(buffer: &[u8], cap: usize) -> Result<Option<usize>, FrameError> {
    if buffer.len() < 5 {
        return Ok(None);
    }
    let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    if !(4..=cap).contains(&length) {
        return Err(FrameError::Length {
            tag: buffer[0] as char,
            length,
        });
    }
    Ok((buffer.len() > length).then_some(length + 1))
}

/// A typed message with `body`.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(tag);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// An ErrorResponse: severity (`FATAL`, `ERROR`), SQLSTATE and message.
pub fn error_response(severity: &str, code: &str, text: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', text),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    message(b'E', &body)
}

/// Takes a NUL-terminated UTF-8 string off the front of `rest`.
pub fn take_cstring(rest: &mut &[u8]) -> Result<String, FrameError> {
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or(FrameError::Malformed(
            "a string without its terminating NUL",
        ))?;
    let text = std::str::from_utf8(&rest[..end])
        .map_err(|_| FrameError::Malformed("a string that is not UTF-8"))?
        .to_owned();
    *rest = &rest[end + 1..];
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_whole_needs_more_or_is_malformed() {
        let query = message(b'Q', b"SELECT 1\0");
        assert_eq!(length(&query[..4], 1 << 20), Ok(None));
        assert_eq!(length(&query[..query.len() - 1], 1 << 20), Ok(None));
        assert_eq!(length(&query, 1 << 20), Ok(Some(query.len())));
        assert!(
            length(&[b'Q', 0, 0, 0, 2], 1 << 20).is_err(),
            "below its own length"
        );
        assert_eq!(
            length(&query, 8),
            Err(FrameError::Length {
                tag: 'Q',
                length: 13
            }),
            "above the cap"
        );
    }

    #[test]
    fn an_error_response_reads_back_with_postgres_protocol() {
        use fallible_iterator::FallibleIterator;
        use postgres_protocol::message::backend::Message;
        let mut bytes = bytes::BytesMut::from(&error_response("FATAL", "28P01", "no")[..]);
        let Ok(Some(Message::ErrorResponse(body))) = Message::parse(&mut bytes) else {
            panic!("not an ErrorResponse");
        };
        let fields: Vec<(u8, String)> = body
            .fields()
            .map(|f| {
                Ok((
                    f.type_(),
                    String::from_utf8_lossy(f.value_bytes()).into_owned(),
                ))
            })
            .collect()
            .unwrap();
        assert!(fields.contains(&(b'C', "28P01".to_owned())));
        assert!(fields.contains(&(b'M', "no".to_owned())));
        assert!(bytes.is_empty());
    }

    #[test]
    fn strings_are_taken_up_to_their_nul() {
        let mut rest: &[u8] = b"user\0app\0";
        assert_eq!(take_cstring(&mut rest).unwrap(), "user");
        assert_eq!(take_cstring(&mut rest).unwrap(), "app");
        assert!(take_cstring(&mut &b"no end"[..]).is_err());
    }
}
