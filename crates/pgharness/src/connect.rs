//! Connecting with patience: a server that is starting up, a container whose port is not
//! yet forwarded, or a server whose connection slots are all taken is waited for, within a
//! deadline; anything else fails at once. Every connection is driven on pgharness' own
//! runtime (see `driver`), so it outlives the runtime of the test that opened it.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use crate::driver;
use crate::error::Error;
use crate::events::{Event, EventSink, emit};
use crate::parting::Parting;
use crate::settings::BackendKind;

/// What a connection attempt waits out.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Patience {
    /// A server still starting (refused, reset, 57P03) and full connection slots (53300).
    WhileStartingOrFull,
    /// A server still starting only: "too many clients" means it is up.
    WhileStarting,
    /// While the server's connection slots are full (53300) only: a refused connection
    /// fails at once (a server that is only believed to run, see `backend::known`).
    WhileFull,
    /// Nothing: the RDS proxy waits for sessions itself (within its budget, and never for a
    /// test that holds sessions while it waits: see rds-iam's `leases`), so its `53300` is
    /// final, and a retry here would be a test holding sessions while it waits for more.
    Never,
}

impl Patience {
    /// What a first connection to a server of `backend` waits out: nobody starts a `url`
    /// server, and the RDS proxy was found running before the test connected (a refusal
    /// means it is gone, see `backend::rds::proxy_gone`), so only full slots are waited out
    /// there; a local server may still be starting.
    pub(crate) fn for_backend(backend: BackendKind) -> Patience {
        match backend {
            BackendKind::Url => Patience::WhileFull,
            BackendKind::Rds => Patience::Never,
            _ => Patience::WhileStartingOrFull,
        }
    }

    /// What a test's later connections (its pool, `connect()`) wait out: the server was up
    /// when the test got its schema, so a refusal now means it went away, and nothing will
    /// bring the schema back; only full slots are worth waiting for.
    pub(crate) fn after_claim(backend: BackendKind) -> Patience {
        match backend {
            BackendKind::Rds => Patience::Never,
            _ => Patience::WhileFull,
        }
    }
}

/// Whether waiting could help after this failure.
fn transient(error: &tokio_postgres::Error, patience: Patience) -> bool {
    if patience == Patience::Never {
        return false;
    }
    match error.code() {
        Some(code) if code == &SqlState::TOO_MANY_CONNECTIONS => {
            patience != Patience::WhileStarting
        }
        Some(code) => {
            code == &SqlState::CANNOT_CONNECT_NOW
                && matches!(
                    patience,
                    Patience::WhileStarting | Patience::WhileStartingOrFull
                )
        }
        // No SQLSTATE: refused, reset, closed before the startup finished.
        None => patience == Patience::WhileStarting || patience == Patience::WhileStartingOrFull,
    }
}

/// A connection, the task that drives it, and (when asked for) what its test keeps of it.
type Connected = (Client, JoinHandle<()>, Kept);

/// What a test keeps of its control connection: a duplicate of its socket for the
/// teardown's parting, and the means to lend its session to sqlx (`lend`).
#[derive(Default)]
pub(crate) struct Kept {
    pub(crate) parting: Option<Parting>,
    pub(crate) lendable: Option<crate::lend::Lendable>,
}

async fn connect_once(
    config: tokio_postgres::Config,
    parting: bool,
) -> Result<Connected, tokio_postgres::Error> {
    driver::run(async move {
        // A server a user gave: its logins skip SCRAM's key stretching after the first
        // (`auth_relay`); a socket that does not open gets the driver's own error below.
        if crate::auth_relay::enabled()
            && config.get_password().is_some()
            && let Some(connected) = crate::auth_relay::connect(&config, parting).await
        {
            let (client, connection, parting) = connected?;
            let kept = Kept {
                parting,
                lendable: None,
            };
            return Ok((client, drive(connection), kept));
        }
        // The socket opened here (as tokio-postgres would: TCP without Nagle, or the Unix
        // socket of the directory) so that the control connection can keep a duplicate.
        match open(&config).await {
            Some(Socket::Tcp(stream)) => connect_over(&config, stream, false, parting).await,
            Some(Socket::Unix(stream)) => connect_over(&config, stream, true, parting).await,
            None => {
                let (client, connection) = config.connect(NoTls).await?;
                Ok((client, drive(connection), Kept::default()))
            }
        }
    })
    .await
}

/// Logs in over an open socket; when `parting` (a test's control connection), keeps a
/// duplicate of it and holds its client's stream at a gate, so that its session can be lent.
async fn connect_over<S>(
    config: &tokio_postgres::Config,
    stream: S,
    unix: bool,
    parting: bool,
) -> Result<Connected, tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + std::os::fd::AsFd + Unpin + Send + 'static,
{
    if !parting {
        let (client, connection) = config.connect_raw(stream, NoTls).await?;
        return Ok((client, drive(connection), Kept::default()));
    }
    let gate = std::sync::Arc::<crate::lend::Gate>::default();
    let parting = keep(true, &stream, &gate, true, unix);
    let lendable = match stream.as_fd().try_clone_to_owned() {
        Ok(socket) => Some(crate::lend::Lendable {
            socket,
            unix,
            gate: gate.clone(),
            reported: Vec::new(),
        }),
        Err(error) => {
            tracing::debug!(%error, "pgharness: no duplicate of the socket; the session will not be lent");
            None
        }
    };
    let (client, connection) = config
        .connect_raw(crate::lend::Gated::new(stream, gate), NoTls)
        .await?;
    let lendable = lendable.map(|mut lendable| {
        lendable.reported = crate::lend::REPORTED
            .iter()
            .filter_map(|name| Some((name.to_string(), connection.parameter(name)?.to_owned())))
            .collect();
        lendable
    });
    let kept = Kept { parting, lendable };
    Ok((client, drive(connection), kept))
}

/// Drives a connection on the current (driver) runtime until it ends.
fn drive<S, T>(connection: tokio_postgres::Connection<S, T>) -> JoinHandle<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "pgharness connection ended with an error");
        }
    })
}

/// A duplicate of `socket` for the teardown's parting, when `wanted`, with the `gate` its
/// client's stream is held at (`direct`: that stream is this socket; `unix`: a Unix
/// socket). A failure is logged: the teardown then waits, as `teardown = inline` does.
pub(crate) fn keep(
    wanted: bool,
    socket: &impl std::os::fd::AsFd,
    gate: &std::sync::Arc<crate::lend::Gate>,
    direct: bool,
    unix: bool,
) -> Option<Parting> {
    if !wanted {
        return None;
    }
    Parting::of(socket, gate.clone(), direct, unix)
        .inspect_err(|error| tracing::debug!(%error, "pgharness: no duplicate of the socket; the teardown will wait"))
        .ok()
}

/// A connected socket to a server.
pub(crate) enum Socket {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Opens the socket of `config`'s first host, as tokio-postgres would (TCP without Nagle,
/// or `<dir>/.s.PGSQL.<port>`); `None` when it does not open (the caller connects through
/// tokio-postgres then, for its own error).
pub(crate) async fn open(config: &tokio_postgres::Config) -> Option<Socket> {
    use tokio_postgres::config::Host;
    let port = config.get_ports().first().copied().unwrap_or(5432);
    match config.get_hosts().first()? {
        Host::Tcp(host) => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .ok()?;
            let _ = stream.set_nodelay(true);
            Some(Socket::Tcp(stream))
        }
        Host::Unix(dir) => tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}")))
            .await
            .ok()
            .map(Socket::Unix),
    }
}

/// Retries transient failures until `deadline`; calls `waiting` about once a second.
async fn connect_patiently(
    config: &tokio_postgres::Config,
    deadline: Instant,
    patience: Patience,
    parting: bool,
    mut waiting: impl FnMut(&tokio_postgres::Error, Duration),
) -> Result<Connected, tokio_postgres::Error> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(20);
    let mut last_report = started;
    loop {
        let error = match connect_once(config.clone(), parting).await {
            Ok(connected) => return Ok(connected),
            Err(error) => error,
        };
        let now = Instant::now();
        if !transient(&error, patience) || now + delay > deadline {
            return Err(error);
        }
        if now.duration_since(last_report) >= Duration::from_secs(1) {
            last_report = now;
            waiting(&error, now - started);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// Opens one connection, waiting out transient failures until `deadline`.
pub(crate) async fn connect(
    config: &tokio_postgres::Config,
    deadline: Instant,
    patience: Patience,
    sink: EventSink<'_>,
    what: &str,
) -> Result<Client, Error> {
    connect_keeping(config, deadline, patience, sink, what, false)
        .await
        .map(|(client, _)| client)
}

/// [`connect`], keeping a duplicate of the socket when `parting` (a test's control
/// connection: its teardown is written on it, see `parting`).
pub(crate) async fn connect_keeping(
    config: &tokio_postgres::Config,
    deadline: Instant,
    patience: Patience,
    sink: EventSink<'_>,
    what: &str,
    parting: bool,
) -> Result<(Client, Kept), Error> {
    let started = Instant::now();
    let result = connect_patiently(config, deadline, patience, parting, |error, waited| {
        let reason = crate::error::pg_message(error);
        emit(sink, Event::WaitingForServer { reason, waited });
    })
    .await;
    match result {
        Ok((client, _handle, kept)) => Ok((client, kept)),
        // A wait for a starting server that ran out (with `Full` nothing waited for it).
        Err(error)
            if matches!(patience, Patience::WhileStarting | Patience::WhileStartingOrFull)
                && transient(&error, Patience::WhileStarting) =>
        {
            Err(Error::Timeout {
                what: format!(
                    "waiting to connect to {what} (last error: {})",
                    Error::postgres("connect", error)
                ),
                waited: started.elapsed(),
                fix: "check that the server is running (`cargo pgharness up`), or raise PGHARNESS_ACQUIRE_TIMEOUT".into(),
            })
        }
        Err(error) => Err(Error::postgres(format!("failed to connect to {what}"), error)),
    }
}

/// Connects and runs `SELECT 1`: the readiness check for servers pgharness starts. A
/// server that answers "too many clients" is up, so that counts as ready too.
pub(crate) async fn wait_ready(
    config: &tokio_postgres::Config,
    timeout: Duration,
    sink: EventSink<'_>,
    what: &str,
) -> Result<(), Error> {
    let started = Instant::now();
    match connect(
        config,
        started + timeout,
        Patience::WhileStarting,
        sink,
        what,
    )
    .await
    {
        Ok(client) => {
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| Error::postgres(format!("failed to run SELECT 1 on {what}"), e))?;
        }
        Err(error) if error.is_too_many_clients() => {}
        Err(error) => return Err(error),
    }
    emit(
        sink,
        Event::ServerReady {
            after: started.elapsed(),
        },
    );
    Ok(())
}

/// deadpool's connector for test pools: patient about full connection slots, and driving
/// connections on pgharness' runtime.
pub(crate) struct PatientConnect {
    pub(crate) timeout: Duration,
    pub(crate) patience: Patience,
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl deadpool_postgres::Connect for PatientConnect {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> BoxFuture<'_, Result<(Client, JoinHandle<()>), tokio_postgres::Error>> {
        let config = pg_config.clone();
        let deadline = Instant::now() + self.timeout;
        Box::pin(async move {
            connect_patiently(&config, deadline, self.patience, false, |error, waited| {
                tracing::info!(%error, ?waited, "pgharness pool: waiting for a connection slot");
            })
            .await
            .map(|(client, handle, _)| (client, handle))
        })
    }
}
