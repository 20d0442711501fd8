//! The front's own login to the backend Postgres, after a client passed the IAM check: the
//! backend's SCRAM (or cleartext, or md5) exchange is answered here with the IAM users'
//! backend password, and only its final `AuthenticationOk` reaches the client, as RDS
//! authenticates behind its IAM front. Messages are parsed and built with
//! `postgres-protocol`.

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl;
use postgres_protocol::message::{backend::Message, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How the login ended.
pub(crate) enum Login {
    /// Logged in: `AuthenticationOk` and whatever the backend sent after it, for the client.
    Ok(Vec<u8>),
    /// Refused: an `ErrorResponse` for the client.
    Refused(Vec<u8>),
}

/// Reads the backend's answers to the startup message already sent, and logs in.
pub(crate) async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    backend: &mut S,
    password: Option<&str>,
) -> anyhow::Result<Login> {
    let mut buffer = BytesMut::new();
    let mut scram: Option<sasl::ScramSha256> = None;
    loop {
        let frame = next_frame(backend, &mut buffer).await?;
        let message = Message::parse(&mut BytesMut::from(&frame[..]))?
            .ok_or_else(|| anyhow::anyhow!("a truncated message from the backend"))?;
        let mut reply = BytesMut::new();
        match message {
            Message::AuthenticationOk => {
                let mut out = frame.to_vec();
                out.extend_from_slice(&buffer);
                return Ok(Login::Ok(out));
            }
            Message::ErrorResponse(_) => return Ok(Login::Refused(frame.to_vec())),
            Message::AuthenticationCleartextPassword => {
                frontend::password_message(need(password)?.as_bytes(), &mut reply)?;
            }
            Message::AuthenticationMd5Password(_) => {
                anyhow::bail!("the backend asks for md5 authentication; use scram-sha-256");
            }
            Message::AuthenticationSasl(body) => {
                let mechanisms: Vec<String> =
                    body.mechanisms().map(|m| Ok(m.to_owned())).collect()?;
                if !mechanisms.iter().any(|m| m == sasl::SCRAM_SHA_256) {
                    anyhow::bail!("the backend offers none of SCRAM-SHA-256: {mechanisms:?}");
                }
                let exchange = sasl::ScramSha256::new(
                    need(password)?.as_bytes(),
                    sasl::ChannelBinding::unsupported(),
                );
                frontend::sasl_initial_response(
                    sasl::SCRAM_SHA_256,
                    exchange.message(),
                    &mut reply,
                )?;
                scram = Some(exchange);
            }
            Message::AuthenticationSaslContinue(body) => {
                let exchange = scram
                    .as_mut()
                    .ok_or_else(|| anyhow::anyhow!("SASL continue before SASL"))?;
                exchange.update(body.data())?;
                frontend::sasl_response(exchange.message(), &mut reply)?;
            }
            Message::AuthenticationSaslFinal(body) => {
                scram
                    .take()
                    .ok_or_else(|| anyhow::anyhow!("SASL final before SASL"))?
                    .finish(body.data())?;
                continue;
            }
            _ => anyhow::bail!("an unexpected message from the backend during its login"),
        }
        backend.write_all(&reply).await?;
    }
}

fn need(password: Option<&str>) -> anyhow::Result<&str> {
    password.ok_or_else(|| {
        anyhow::anyhow!(
            "the backend Postgres asks for a password: give fake-aws the IAM users' backend password (--backend-password-file)"
        )
    })
}

/// One whole message: its type byte, length and body.
async fn next_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buffer: &mut BytesMut,
) -> anyhow::Result<BytesMut> {
    loop {
        if buffer.len() >= 5 {
            let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
            anyhow::ensure!(
                (4..1 << 24).contains(&length),
                "a message of {length} bytes from the backend"
            );
            if buffer.len() > length {
                return Ok(buffer.split_to(length + 1));
            }
        }
        if stream.read_buf(buffer).await? == 0 {
            anyhow::bail!("the backend closed the connection during its login");
        }
    }
}
