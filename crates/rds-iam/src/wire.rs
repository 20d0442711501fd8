//! The server half of the Postgres wire protocol (v3) that the local auth proxy needs to
//! serve its clients: reading startup packets and typed client messages, writing errors and
//! auth requests. postgres-protocol has no server half; the client half (the proxy's own
//! login upstream) is postgres-protocol's (`connect.rs`). Frames are length-prefixed, so
//! reads are `read_exact` of a validated length; malformed input is an error, never a panic.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Protocol version 3.0 in a StartupMessage.
pub const PROTOCOL_3_0: u32 = 196_608;
/// SSLRequest's code.
pub const SSL_REQUEST: u32 = 80_877_103;
/// GSSENCRequest's code.
pub const GSSENC_REQUEST: u32 = 80_877_104;
/// CancelRequest's code.
pub const CANCEL_REQUEST: u32 = 80_877_102;

const MAX_STARTUP: usize = 10_000;
const MAX_MESSAGE: usize = 1 << 20;

/// What a malformed or truncated peer did.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The socket failed or closed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not valid protocol.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// The first packet of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Startup {
    /// SSLRequest: answer `S` and start TLS, or `N`.
    Ssl,
    /// GSSENCRequest: answer `N`.
    GssEnc,
    /// CancelRequest: the key of the backend whose query is to be cancelled.
    Cancel {
        /// BackendKeyData's process id.
        process_id: i32,
        /// BackendKeyData's secret key.
        secret_key: i32,
    },
    /// StartupMessage with its parameters in order.
    Startup(Vec<(String, String)>),
}

impl Startup {
    /// A parameter of a StartupMessage.
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            Startup::Startup(params) => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Reads the first packet of a connection.
pub async fn read_startup<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Startup, WireError> {
    let length = reader.read_u32().await? as usize;
    if !(8..=MAX_STARTUP).contains(&length) {
        return Err(WireError::Malformed(format!(
            "startup packet of {length} bytes"
        )));
    }
    let mut body = vec![0; length - 4];
    reader.read_exact(&mut body).await?;
    let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    match code {
        SSL_REQUEST => Ok(Startup::Ssl),
        GSSENC_REQUEST => Ok(Startup::GssEnc),
        CANCEL_REQUEST => match body[4..] {
            [p0, p1, p2, p3, s0, s1, s2, s3] => Ok(Startup::Cancel {
                process_id: i32::from_be_bytes([p0, p1, p2, p3]),
                secret_key: i32::from_be_bytes([s0, s1, s2, s3]),
            }),
            _ => Err(WireError::Malformed(format!(
                "cancel request of {length} bytes (16 expected)"
            ))),
        },
        PROTOCOL_3_0 => parse_params(&body[4..]).map(Startup::Startup),
        other => Err(WireError::Malformed(format!(
            "unsupported protocol version {}.{}",
            other >> 16,
            other & 0xffff
        ))),
    }
}

fn parse_params(rest: &[u8]) -> Result<Vec<(String, String)>, WireError> {
    pg_wire::startup::params(rest).map_err(|e| WireError::Malformed(e.to_string()))
}

/// Takes a NUL-terminated UTF-8 string off the front of `rest`.
pub fn take_cstring(rest: &mut &[u8]) -> Result<String, WireError> {
    pg_wire::frame::take_cstring(rest).map_err(|e| WireError::Malformed(e.to_string()))
}

/// Reads one typed message: its tag and body.
pub async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<(u8, Vec<u8>), WireError> {
    let tag = reader.read_u8().await?;
    let length = reader.read_u32().await? as usize;
    if !(4..=MAX_MESSAGE).contains(&length) {
        return Err(WireError::Malformed(format!(
            "message '{}' of {length} bytes",
            tag as char
        )));
    }
    let mut body = vec![0; length - 4];
    reader.read_exact(&mut body).await?;
    Ok((tag, body))
}

/// Encodes a typed message.
pub use pg_wire::frame::message;

/// An AuthenticationRequest: its code and data.
pub fn auth_request(code: u32, data: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(data);
    message(b'R', &body)
}

/// An ErrorResponse: severity, SQLSTATE and message.
pub use pg_wire::frame::error_response;

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use postgres_protocol::message::{backend, frontend};

    use super::*;

    #[tokio::test]
    async fn reads_what_postgres_protocol_writes() {
        let params = vec![
            ("user".to_owned(), "app".to_owned()),
            ("options".to_owned(), "-csearch_path=x".to_owned()),
        ];
        let mut packet = BytesMut::new();
        frontend::startup_message(
            params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            &mut packet,
        )
        .unwrap();
        let startup = read_startup(&mut &packet[..]).await.unwrap();
        assert_eq!(startup, Startup::Startup(params));
        assert_eq!(startup.param("user"), Some("app"));
        packet.clear();
        frontend::ssl_request(&mut packet);
        assert_eq!(read_startup(&mut &packet[..]).await.unwrap(), Startup::Ssl);
        packet.clear();
        frontend::password_message(b"secret", &mut packet).unwrap();
        let (tag, body) = read_message(&mut &packet[..]).await.unwrap();
        assert_eq!(
            (tag, take_cstring(&mut body.as_slice()).unwrap().as_str()),
            (b'p', "secret")
        );
    }

    #[tokio::test]
    async fn malformed_input_is_an_error_not_a_panic() {
        for bytes in [
            vec![0, 0, 0, 3],
            vec![0, 0, 0xff, 0xff, 0, 3, 0, 0],
            vec![0, 0, 0, 8, 0, 3, 0, 0],
            vec![0, 0, 0, 10, 0, 3, 0, 0, b'a', b'b'],
            vec![0, 0, 0, 9, 0, 9, 0, 0, 0],
            vec![],
        ] {
            assert!(
                read_startup(&mut bytes.as_slice()).await.is_err(),
                "{bytes:?}"
            );
        }
        assert!(
            read_message(&mut [b'R', 0, 0, 0, 2].as_slice())
                .await
                .is_err()
        );
        assert!(
            read_message(&mut [b'R', 0, 0, 0, 9, 1].as_slice())
                .await
                .is_err()
        );
    }

    /// (The ErrorResponse is pg-wire's, checked there against postgres-protocol.)
    #[test]
    fn postgres_protocol_reads_what_this_writes() {
        let mut request = BytesMut::from(&auth_request(3, &[])[..]);
        assert!(matches!(
            backend::Message::parse(&mut request).unwrap(),
            Some(backend::Message::AuthenticationCleartextPassword)
        ));
    }
}
