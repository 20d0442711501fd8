//! The few server-side frames the fake RDS endpoint reads and writes, written here rather
//! than taken from `rds-iam`: fake-aws stands in for AWS in the tests of that crate, and a
//! framing mistake shared by both sides would pass unseen (as the SigV4 check is fake-aws's
//! own). Frames to the backend Postgres, where fake-aws is the client, are postgres-protocol's.

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
const PROTOCOL_3_0: u32 = 3 << 16;
/// Larger than any startup packet or password a real client sends.
const MAX_FRAME: usize = 64 * 1024;

/// A connection's first packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FirstPacket {
    Ssl,
    GssEnc,
    /// The whole CancelRequest, to forward as it came.
    Cancel(Vec<u8>),
    /// A StartupMessage's parameters, in order.
    Startup(Vec<(String, String)>),
}

impl FirstPacket {
    pub(crate) fn param(&self, name: &str) -> Option<&str> {
        let FirstPacket::Startup(params) = self else {
            return None;
        };
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn malformed(what: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.into())
}

/// Reads `length - 4` more bytes after a length word.
async fn body<R: AsyncRead + Unpin>(reader: &mut R, length: u32) -> std::io::Result<BytesMut> {
    let length = length as usize;
    if !(4..=MAX_FRAME).contains(&length) {
        return Err(malformed(format!("a frame of {length} bytes")));
    }
    let mut body = BytesMut::zeroed(length - 4);
    reader.read_exact(&mut body).await?;
    Ok(body)
}

/// Takes a NUL-terminated string.
fn cstring(body: &mut BytesMut) -> std::io::Result<String> {
    let end = body
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| malformed("a string without its NUL"))?;
    let text = String::from_utf8(body.split_to(end).to_vec())
        .map_err(|_| malformed("a string that is not UTF-8"))?;
    body.advance(1);
    Ok(text)
}

pub(crate) async fn read_startup<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> std::io::Result<FirstPacket> {
    let length = reader.read_u32().await?;
    let mut rest = body(reader, length).await?;
    if rest.len() < 4 {
        return Err(malformed("a startup packet without a code"));
    }
    match rest.get_u32() {
        SSL_REQUEST => Ok(FirstPacket::Ssl),
        GSSENC_REQUEST => Ok(FirstPacket::GssEnc),
        CANCEL_REQUEST => {
            let mut packet = length.to_be_bytes().to_vec();
            packet.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
            packet.extend_from_slice(&rest);
            Ok(FirstPacket::Cancel(packet))
        }
        PROTOCOL_3_0 => {
            let mut params = Vec::new();
            loop {
                let key = cstring(&mut rest)?;
                if key.is_empty() {
                    return Ok(FirstPacket::Startup(params));
                }
                params.push((key, cstring(&mut rest)?));
            }
        }
        code => Err(malformed(format!("startup code {code}"))),
    }
}

/// Reads the client's PasswordMessage; `None` for any other message.
pub(crate) async fn read_password<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> std::io::Result<Option<String>> {
    let tag = reader.read_u8().await?;
    let length = reader.read_u32().await?;
    let mut rest = body(reader, length).await?;
    if tag != b'p' {
        return Ok(None);
    }
    cstring(&mut rest).map(Some)
}

/// AuthenticationCleartextPassword.
pub(crate) fn ask_for_password() -> Vec<u8> {
    let mut frame = BytesMut::new();
    frame.put_u8(b'R');
    frame.put_u32(8);
    frame.put_u32(3);
    frame.to_vec()
}

/// An ErrorResponse as RDS sends it (FATAL, a SQLSTATE, a message).
pub(crate) fn fatal(code: &str, message: &str) -> Vec<u8> {
    let mut fields = BytesMut::new();
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
    ] {
        fields.put_u8(field);
        fields.put_slice(value.as_bytes());
        fields.put_u8(0);
    }
    fields.put_u8(0);
    let mut frame = BytesMut::new();
    frame.put_u8(b'E');
    frame.put_u32(fields.len() as u32 + 4);
    frame.put_slice(&fields);
    frame.to_vec()
}

#[cfg(test)]
mod tests {
    use postgres_protocol::message::{backend, frontend};

    use super::*;

    #[tokio::test]
    async fn reads_what_clients_write_and_clients_read_what_it_writes() {
        let mut packet = BytesMut::new();
        frontend::startup_message([("user", "iam_app"), ("database", "db")], &mut packet).unwrap();
        let startup = read_startup(&mut &packet[..]).await.unwrap();
        assert_eq!(
            (startup.param("user"), startup.param("database")),
            (Some("iam_app"), Some("db"))
        );
        packet.clear();
        frontend::password_message(b"token", &mut packet).unwrap();
        assert_eq!(
            read_password(&mut &packet[..]).await.unwrap().as_deref(),
            Some("token")
        );
        let mut frame = BytesMut::from(&ask_for_password()[..]);
        assert!(matches!(
            backend::Message::parse(&mut frame).unwrap(),
            Some(backend::Message::AuthenticationCleartextPassword)
        ));
        let mut frame = BytesMut::from(&fatal("28000", "no")[..]);
        assert!(matches!(
            backend::Message::parse(&mut frame).unwrap(),
            Some(backend::Message::ErrorResponse(_))
        ));
    }

    #[tokio::test]
    async fn garbage_is_an_error() {
        for bytes in [
            vec![0, 0, 0, 3],
            vec![0, 0, 0, 8, 0, 9, 0, 0],
            vec![0, 0, 0, 9, 0, 3, 0, 0, b'a'],
        ] {
            assert!(
                read_startup(&mut bytes.as_slice()).await.is_err(),
                "{bytes:?}"
            );
        }
    }
}
