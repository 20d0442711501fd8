//! Logins to a server that asks for SCRAM with many iterations, without paying them on each
//! connection.
//!
//! A server a user points pgharness at (`url`) stores SCRAM verifiers with 4096 iterations of
//! PBKDF2; tokio-postgres derives the salted password afresh on every login, and in a
//! dependent crate's debug build (where sha2 is not optimised) that is ~100 ms per
//! connection: most of a test's acquire. So the client's login goes through this relay:
//! tokio-postgres talks to one end of an in-memory stream, the relay to the server. Every
//! message passes unchanged, except that when the server asks for SCRAM-SHA-256 the relay
//! answers it itself with a salted password it derived once per password, salt and
//! iteration count — kept in memory, and in a 0600 file of the state directory
//! (`scram-cache`) for the test processes that follow — and hands the client the server's
//! `AuthenticationOk`. Errors the server sends (a wrong password, too many clients, a server
//! starting) reach tokio-postgres as they are, so they read as they would without it.
//!
//! The salted password is password-equivalent for SCRAM: the file is the server password
//! file's kin, 0600 in the same directory, keyed by a hash of the password, salt and count.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::scram::{ClientFinal, ClientFirst, ServerFirst};

/// Where salted passwords are kept across processes (the state directory), once known.
static CACHE_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Whether this process's logins with a password go through the relay: to a server a user
/// gave (`url`); the servers pgharness starts store 16-iteration verifiers.
static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sends this process's logins with a password through the relay from now on.
pub(crate) fn enable() {
    ENABLED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether logins go through the relay.
pub(crate) fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Keeps salted passwords in `state_dir` from now on (the first caller in a process wins).
pub(crate) fn keep_in(state_dir: &std::path::Path) {
    let _ = CACHE_DIR.set(state_dir.to_path_buf());
}

/// The key of a salted password: a hash of the password, the salt and the count (the file
/// never holds the password).
fn cache_key(password: &str, salt: &[u8], iterations: u32) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update((password.len() as u64).to_be_bytes());
    hasher.update(password.as_bytes());
    hasher.update(salt);
    hasher.update(iterations.to_be_bytes());
    hex::encode(hasher.finalize())
}

fn memory() -> &'static Mutex<HashMap<String, [u8; 32]>> {
    static MEMORY: OnceLock<Mutex<HashMap<String, [u8; 32]>>> = OnceLock::new();
    MEMORY.get_or_init(|| Mutex::new(HashMap::new()))
}

/// How many salted passwords this process derived (the rest came from the caches).
#[cfg(test)]
fn derivations() -> u64 {
    DERIVED.load(std::sync::atomic::Ordering::Relaxed)
}

static DERIVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A check of a cached salted password: a hash of the password and the value, so that an
/// entry that was altered or corrupted (it would make every login fail with the server's
/// `28P01`) is found before it is used, dropped and derived again.
fn check_of(password: &str, salted: &[u8; 32]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(b"pgharness scram-cache check\0");
    hasher.update(password.as_bytes());
    hasher.update(salted);
    hex::encode(&hasher.finalize()[..16])
}

/// A salted password, and whether it came from a cache rather than being derived now.
#[derive(Clone, Copy)]
struct Salted {
    value: [u8; 32],
    cached: bool,
}

/// The salted password, from memory, the cache file (when its check holds), or derived (and
/// then kept in both; an entry whose check fails is replaced).
fn salted(password: &str, salt: &[u8], iterations: u32) -> Salted {
    let key = cache_key(password, salt, iterations);
    if let Some(value) = memory().lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Salted {
            value: *value,
            cached: true,
        };
    }
    let file = cache_file();
    let mut bad_entry = false;
    let from_file = file.as_ref().and_then(|file| {
        let text = std::fs::read_to_string(file).ok()?;
        text.lines().find_map(|line| {
            let mut fields = line.split(' ');
            (fields.next()? == key).then_some(())?;
            let value: Option<[u8; 32]> = hex::decode(fields.next()?).ok()?.try_into().ok();
            let valid = value.filter(|value| fields.next() == Some(&check_of(password, value)));
            bad_entry |= valid.is_none();
            valid
        })
    });
    let salted = match from_file {
        Some(value) => Salted {
            value,
            cached: true,
        },
        None => {
            DERIVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let value = crate::scram::salted_password(password, salt, iterations);
            if let Some(file) = &file {
                if bad_entry {
                    tracing::warn!(cache = %file.display(), "pgharness: a SCRAM cache entry failed its check; derived again");
                    forget_in(file, &key);
                }
                remember(file, &key, &value, &check_of(password, &value));
            }
            Salted {
                value,
                cached: false,
            }
        }
    };
    memory()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, salted.value);
    salted
}

/// The cache file, once the state directory is known.
fn cache_file() -> Option<std::path::PathBuf> {
    CACHE_DIR.get().map(|dir| dir.join("scram-cache"))
}

/// Drops the salted password of `password`, `salt` and `iterations` from memory and from
/// the cache file: the server refused a login made with it, so the next one derives it again.
fn forget(password: &str, salt: &[u8], iterations: u32) {
    let key = cache_key(password, salt, iterations);
    memory()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&key);
    if let Some(file) = cache_file() {
        forget_in(&file, &key);
    }
}

/// Rewrites the cache file without the lines of `key` (a new 0600 file renamed over it).
fn forget_in(file: &std::path::Path, key: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(text) = std::fs::read_to_string(file) else {
        return;
    };
    let kept: String = text
        .lines()
        .filter(|line| line.split(' ').next() != Some(key))
        .map(|line| format!("{line}\n"))
        .collect();
    let temporary = file.with_extension(format!("new-{}", uuid::Uuid::new_v4().simple()));
    let written = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut new| new.write_all(kept.as_bytes()))
        .and_then(|()| std::fs::rename(&temporary, file));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temporary);
        tracing::debug!(%error, "pgharness: the SCRAM cache could not be rewritten");
    }
}

/// Appends a line to the 0600 cache file (a lost race costs one more derivation, never a
/// wrong answer: lines are whole, and a key maps to one value).
fn remember(file: &std::path::Path, key: &str, salted: &[u8; 32], check: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let opened = std::fs::File::options()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(file);
    match opened {
        Ok(mut opened) => {
            let _ = writeln!(opened, "{key} {} {check}", hex::encode(salted));
        }
        Err(error) => tracing::debug!(%error, "pgharness: the SCRAM cache is not writable"),
    }
}

/// The server's ErrorResponse `frame` with `note` added to its message (other fields kept).
fn with_note(frame: &Frame, note: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for field in frame.body().split(|b| *b == 0).filter(|f| !f.is_empty()) {
        body.extend_from_slice(field);
        if field[0] == b'M' {
            body.extend_from_slice(note.as_bytes());
        }
        body.push(0);
    }
    body.push(0);
    message(b'E', &body)
}

/// One message of the v3 protocol, whole: its tag, and the bytes as they came.
struct Frame {
    tag: u8,
    bytes: Vec<u8>,
}

impl Frame {
    fn body(&self) -> &[u8] {
        &self.bytes[5..]
    }

    /// An Authentication message's request code.
    fn auth_code(&self) -> Option<i32> {
        (self.tag == b'R' && self.body().len() >= 4).then(|| {
            i32::from_be_bytes([
                self.body()[0],
                self.body()[1],
                self.body()[2],
                self.body()[3],
            ])
        })
    }
}

/// The largest message the relay reads during the login (the rest is copied as bytes).
const MAX_LOGIN_MESSAGE: usize = 1 << 20;

/// Reads a packet whose last four bytes of `head` are its length (counting itself, at
/// least `min`), and the rest of it.
async fn read_packet<const N: usize>(
    stream: &mut (impl AsyncRead + Unpin),
    min: usize,
) -> std::io::Result<Vec<u8>> {
    let mut head = [0u8; N];
    stream.read_exact(&mut head).await?;
    let length = i32::from_be_bytes([head[N - 4], head[N - 3], head[N - 2], head[N - 1]]);
    let length = usize::try_from(length)
        .ok()
        .filter(|length| (min..=MAX_LOGIN_MESSAGE).contains(length))
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad packet length"))?;
    let mut bytes = head.to_vec();
    bytes.resize(N - 4 + length, 0);
    stream.read_exact(&mut bytes[N..]).await?;
    Ok(bytes)
}

/// A message: its tag, then its length.
async fn read_frame(stream: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Frame> {
    let bytes = read_packet::<5>(stream, 4).await?;
    Ok(Frame {
        tag: bytes[0],
        bytes,
    })
}

/// The startup packet (no tag): its length, then the protocol version and parameters.
async fn read_startup(stream: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    read_packet::<4>(stream, 8).await
}

use pg_wire::frame::message;

/// An ErrorResponse for the client, so that tokio-postgres reports the relay's own failures
/// (a server whose SCRAM answer is wrong) as a server error, with a SQLSTATE.
fn error_response(code: &str, text: &str) -> Vec<u8> {
    pg_wire::frame::error_response("FATAL", code, text)
}

/// Connects `config` through the relay: the server's socket (TCP or Unix), an in-memory
/// stream for tokio-postgres, and the relay between them on the current runtime; with
/// `parting`, a duplicate of the server's socket for the teardown (`parting`). A socket
/// that cannot be opened is `None` (the caller connects as usual, for the driver's own
/// error).
pub(crate) async fn connect(
    config: &tokio_postgres::Config,
    parting: bool,
) -> Option<
    Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<
                crate::lend::Gated<tokio::io::DuplexStream>,
                tokio_postgres::tls::NoTlsStream,
            >,
            Option<crate::parting::Parting>,
        ),
        tokio_postgres::Error,
    >,
> {
    use crate::connect::Socket;
    let password = config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    // The parting waits at this gate for the session to be at rest (`parting`).
    let gate = std::sync::Arc::<crate::lend::Gate>::default();
    let kept = match crate::connect::open(config).await? {
        Socket::Tcp(stream) => {
            let kept = crate::connect::keep(parting, &stream, &gate, false, false);
            tokio::spawn(relay(theirs, stream, password));
            kept
        }
        Socket::Unix(stream) => {
            let kept = crate::connect::keep(parting, &stream, &gate, false, true);
            tokio::spawn(relay(theirs, stream, password));
            kept
        }
    };
    Some(
        config
            .connect_raw(crate::lend::Gated::new(ours, gate), tokio_postgres::NoTls)
            .await
            .map(|(client, connection)| (client, connection, kept)),
    )
}

/// Relays a login between `client` (tokio-postgres) and `server`, answering the server's
/// SCRAM-SHA-256 itself with `password`; then copies bytes both ways until either side
/// closes.
pub(crate) async fn relay<C, S>(mut client: C, mut server: S, password: Option<String>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Err(error) = login(&mut client, &mut server, password.as_deref()).await {
        tracing::debug!(%error, "pgharness: the login relay stopped");
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

async fn login<C, S>(client: &mut C, server: &mut S, password: Option<&str>) -> std::io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let startup = read_startup(client).await?;
    server.write_all(&startup).await?;
    loop {
        let frame = read_frame(server).await?;
        match frame.auth_code() {
            // AuthenticationSASL offering SCRAM-SHA-256, and a password to answer with.
            Some(10) if password.is_some() && sasl_offers_scram(frame.body()) => {
                match scram(server, password.unwrap_or_default()).await? {
                    Scram::Done => {}
                    // The server's own error (a wrong password), as the client would get it.
                    Scram::Refused(frame) => {
                        client.write_all(&frame.bytes).await?;
                        return Err(std::io::Error::other("the server refused the login"));
                    }
                    Scram::Failed(text) => {
                        client.write_all(&error_response("28000", &text)).await?;
                        return Err(std::io::Error::other(text));
                    }
                }
            }
            // AuthenticationOk: the login is done; what follows is copied as it comes.
            Some(0) => {
                client.write_all(&frame.bytes).await?;
                return Ok(());
            }
            // Cleartext (3) or MD5 (5) password, or SASL without a password: the client
            // answers, through the relay.
            Some(3 | 5 | 10) => {
                client.write_all(&frame.bytes).await?;
                let answer = read_frame(client).await?;
                server.write_all(&answer.bytes).await?;
            }
            _ => {
                client.write_all(&frame.bytes).await?;
                if frame.tag == b'E' {
                    return Err(std::io::Error::other("the server refused the login"));
                }
            }
        }
    }
}

fn sasl_offers_scram(body: &[u8]) -> bool {
    body[4..]
        .split(|b| *b == 0)
        .any(|mechanism| mechanism == b"SCRAM-SHA-256")
}

/// How a SCRAM exchange ended.
enum Scram {
    /// The server accepted the proof and proved it knows the password.
    Done,
    /// The server sent an error (a wrong password).
    Refused(Frame),
    /// The exchange went wrong otherwise.
    Failed(String),
}

/// The SCRAM exchange with the server.
async fn scram<S>(server: &mut S, password: &str) -> std::io::Result<Scram>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let nonce = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(uuid::Uuid::new_v4().as_bytes())
    };
    let first = ClientFirst::new("", &nonce);
    let mut initial = b"SCRAM-SHA-256\0".to_vec();
    initial.extend_from_slice(&(first.message.len() as i32).to_be_bytes());
    initial.extend_from_slice(first.message.as_bytes());
    server.write_all(&message(b'p', &initial)).await?;
    let continue_frame = read_frame(server).await?;
    if continue_frame.tag == b'E' {
        return Ok(Scram::Refused(continue_frame));
    }
    if continue_frame.auth_code() != Some(11) {
        return Ok(Scram::Failed(format!(
            "the server answered SCRAM's first message with `{}`",
            continue_frame.tag as char
        )));
    }
    let server_first = String::from_utf8_lossy(&continue_frame.body()[4..]).into_owned();
    let server_first = match ServerFirst::parse(&first, &server_first) {
        Ok(parsed) => parsed,
        Err(error) => return Ok(Scram::Failed(error.0)),
    };
    let salted = salted(password, &server_first.salt, server_first.iterations);
    let last = ClientFinal::new(&first, &server_first, &salted.value);
    server
        .write_all(&message(b'p', last.message.as_bytes()))
        .await?;
    let final_frame = read_frame(server).await?;
    match final_frame.auth_code() {
        Some(12) => {
            let text = String::from_utf8_lossy(&final_frame.body()[4..]).into_owned();
            Ok(match last.verify(&text) {
                Ok(()) => Scram::Done,
                Err(error) => Scram::Failed(error.0),
            })
        }
        // Refused with a salted password from the cache: it is dropped, so that the next
        // login derives it again, and the error says where it came from.
        _ if final_frame.tag == b'E' && salted.cached => {
            forget(password, &server_first.salt, server_first.iterations);
            let cache = cache_file()
                .map(|file| file.display().to_string())
                .unwrap_or_else(|| "its memory".into());
            let note = format!(
                " (pgharness answered SCRAM with a salted password from its cache {cache}: dropped, the next login derives it again; if it fails too, the password is wrong)"
            );
            Ok(Scram::Refused(Frame {
                tag: b'E',
                bytes: with_note(&final_frame, &note),
            }))
        }
        _ if final_frame.tag == b'E' => Ok(Scram::Refused(final_frame)),
        _ => Ok(Scram::Failed(format!(
            "the server answered SCRAM's proof with `{}`",
            final_frame.tag as char
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_salted_password_is_derived_once_then_read_from_the_state_directory() {
        let dir = std::env::temp_dir().join(format!("pgharness-relay-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        keep_in(&dir);
        let salt = b"0123456789abcdef";
        // What another process left: read, not derived again (a marker value, so that a
        // derivation would show).
        let key = cache_key("other", salt, 4096);
        std::fs::write(
            dir.join("scram-cache"),
            format!(
                "{key} {} {}\n",
                "ab".repeat(32),
                check_of("other", &[0xab; 32])
            ),
        )
        .unwrap();
        assert_eq!(salted("other", salt, 4096).value, [0xab; 32]);
        assert_eq!(derivations(), 0);
        // New: derived once, kept, then served from memory.
        let first = salted("pencil", salt, 64);
        assert!(!first.cached);
        assert_eq!(
            first.value,
            crate::scram::salted_password("pencil", salt, 64)
        );
        assert!(salted("pencil", salt, 64).cached);
        assert_eq!(salted("pencil", salt, 64).value, first.value);
        assert_eq!(derivations(), 1);
        let text = std::fs::read_to_string(dir.join("scram-cache")).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");

        // An entry altered in the file (a wrong value, its check unchanged) is not used: it
        // is derived again and replaced.
        let key = cache_key("altered", salt, 32);
        let right = crate::scram::salted_password("altered", salt, 32);
        let text = std::fs::read_to_string(dir.join("scram-cache")).unwrap();
        std::fs::write(
            dir.join("scram-cache"),
            format!(
                "{text}{key} {} {}\n",
                "cd".repeat(32),
                check_of("altered", &right)
            ),
        )
        .unwrap();
        assert_eq!(salted("altered", salt, 32).value, right);
        assert_eq!(derivations(), 2);
        let text = std::fs::read_to_string(dir.join("scram-cache")).unwrap();
        assert!(!text.contains(&"cd".repeat(32)), "{text}");
        assert!(text.contains(&hex::encode(right)), "{text}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("scram-cache"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // One the server refused is forgotten: the next login derives it again.
        forget("pencil", salt, 64);
        assert!(!salted("pencil", salt, 64).cached);
        assert_eq!(derivations(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_refusal_keeps_the_server_s_fields_and_adds_a_note_to_its_message() {
        let server = error_response("28P01", "password authentication failed for user \"app\"");
        let frame = Frame {
            tag: b'E',
            bytes: server,
        };
        let noted = with_note(&frame, " (from the cache)");
        let fields: Vec<&[u8]> = noted[5..]
            .split(|b| *b == 0)
            .filter(|f| !f.is_empty())
            .collect();
        assert!(fields.contains(&&b"C28P01"[..]));
        assert!(
            fields.contains(
                &&b"Mpassword authentication failed for user \"app\" (from the cache)"[..]
            )
        );
        assert_eq!(
            u32::from_be_bytes([noted[1], noted[2], noted[3], noted[4]]) as usize,
            noted.len() - 1
        );
    }
}
