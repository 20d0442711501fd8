//! The password of the servers pgharness starts (native and container): random per
//! workspace, kept in `target/pgharness/server-password` (mode 0600), with a
//! `target/pgharness/pgpass` (0600) that printed `psql` commands point `PGPASSFILE` at.
//! Without it any local user could log in as the superuser over 127.0.0.1 and run
//! programs as the server's user (`COPY … FROM PROGRAM`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::settings::Settings;

/// The user pgharness' local servers are administered as.
pub(crate) const ADMIN_USER: &str = "postgres";

/// Makes (or refreshes) the tests' login role on a server pgharness started, as its
/// administrator: [`crate::server::TESTS_ROLE`], LOGIN with the workspace's password (its
/// SCRAM verifier), CONNECT and CREATE on the database and nothing else — what an RDS IAM user
/// gets, so that local runs rehearse RDS privileges and no test can run programs on the host
/// (`COPY … TO PROGRAM`) or reach other clusters. The `extensions` setting's extensions are
/// created here too, since the tests' role can create only trusted ones. Safe to race.
pub(crate) async fn ensure_tests_role(
    server: &crate::server::Server,
    settings: &Settings,
) -> Result<(), Error> {
    let fail = |e| Error::postgres("failed to set up the tests' login role", e);
    let (admin, connection) = server
        .admin_config()
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(fail)?;
    let driver = tokio::spawn(connection);
    let password = server
        .config()
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let salt = *uuid::Uuid::new_v4().as_bytes();
    let verifier = scram_verifier(&password, SCRAM_ITERATIONS, &salt);
    let role = crate::server::TESTS_ROLE;
    let mut sql = format!(
        "BEGIN;
SELECT pg_advisory_xact_lock(1885825026, 1);
DO $r$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = '{role}') THEN
    CREATE ROLE {role} LOGIN;
  END IF;
END $r$;
ALTER ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD '{verifier}';
GRANT CONNECT, CREATE ON DATABASE postgres TO {role};
"
    );
    for extension in &settings.extensions {
        sql.push_str(&format!(
            "CREATE EXTENSION IF NOT EXISTS \"{extension}\";\n"
        ));
    }
    sql.push_str("COMMIT;");
    let result = admin.batch_execute(&sql).await.map_err(fail);
    drop(admin);
    let _ = driver.await;
    result
}

/// SCRAM iterations of the servers' passwords: the password is 244 random bits, so key
/// stretching buys nothing, and 4096 iterations cost every connection ~2 ms.
pub const SCRAM_ITERATIONS: u32 = 16;

pub(crate) fn password_path(settings: &Settings) -> PathBuf {
    settings.state_dir.join("server-password")
}

/// The file holding the local servers' password (created if missing), for tools that
/// hand it to another program without putting it on a command line.
pub fn password_file(settings: &Settings) -> Result<PathBuf, Error> {
    local_password(settings)?;
    Ok(password_path(settings))
}

/// A new random password (244 bits: two v4 uuids), the state directory made for its file.
fn new_password(settings: &Settings) -> Result<String, Error> {
    std::fs::create_dir_all(&settings.state_dir)
        .map_err(|e| Error::io("failed to create", &settings.state_dir, e))?;
    Ok(format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    ))
}

/// The passwords of this workspace's native servers, each beside its record
/// (`native-<key>.password`: `<port>:<password>`, 0600).
fn native_passwords(settings: &Settings) -> Vec<(u16, String)> {
    let Ok(entries) = std::fs::read_dir(&settings.state_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("native-") && name.ends_with(".password")
        })
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            let (port, password) = text.trim().split_once(':')?;
            Some((port.parse().ok()?, password.to_owned()))
        })
        .filter(|(_, password)| password.len() >= 32)
        .collect()
}

/// A new password for the native server about to start on `port`: each start has its own,
/// so a password a local user may have learned from an earlier server opens nothing now.
/// Kept 0600, and put in `pgpass` for that port ahead of the workspace's line.
pub(crate) fn renew_native_password(
    settings: &Settings,
    path: &Path,
    port: u16,
) -> Result<String, Error> {
    let password = new_password(settings)?;
    write_private(path, &format!("{port}:{password}\n"))?;
    write_pgpass(settings)?;
    Ok(password)
}

/// The password of the native server on `port`, if this workspace started it.
pub(crate) fn native_password(settings: &Settings, port: u16) -> Option<String> {
    native_passwords(settings)
        .into_iter()
        .find_map(|(recorded, password)| (recorded == port).then_some(password))
}

/// `pgpass`: the native server's port with its own password first, then the workspace's
/// password for every other local server (the container).
fn write_pgpass(settings: &Settings) -> Result<(), Error> {
    let mut pgpass = String::new();
    for (port, password) in native_passwords(settings) {
        pgpass.push_str(&format!(
            "127.0.0.1:{port}:*:*:{password}\nlocalhost:{port}:*:*:{password}\n"
        ));
    }
    if let Some(password) = existing_password(settings) {
        pgpass.push_str(&format!(
            "127.0.0.1:*:*:*:{password}\nlocalhost:*:*:*:{password}\n"
        ));
    }
    write_private(&pgpass_path(settings), &pgpass)
}

/// The `PGPASSFILE` for the local servers' password.
pub fn pgpass_path(settings: &Settings) -> PathBuf {
    settings.state_dir.join("pgpass")
}

/// The workspace's server password if it has one (never creates it).
pub(crate) fn existing_password(settings: &Settings) -> Option<String> {
    let text = std::fs::read_to_string(password_path(settings)).ok()?;
    (text.trim().len() >= 32).then(|| text.trim().to_owned())
}

/// The workspace's server password, created on first use. Safe to race: the first
/// writer wins and everybody reads its file.
pub(crate) fn local_password(settings: &Settings) -> Result<String, Error> {
    let path = password_path(settings);
    if let Some(password) = existing_password(settings) {
        return Ok(password);
    }
    let password = new_password(settings)?;
    let tmp = path.with_extension(format!("{}", std::process::id()));
    write_private(&tmp, &format!("{password}\n"))?;
    // Link, not rename: a password another process already wrote stays.
    match std::fs::hard_link(&tmp, &path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(Error::io("failed to write", &path, error)),
    }
    let _ = std::fs::remove_file(&tmp);
    let password = std::fs::read_to_string(&path)
        .map_err(|e| Error::io("failed to read", &path, e))?
        .trim()
        .to_owned();
    write_pgpass(settings)?;
    Ok(password)
}

/// A new workspace password, for a new container: each container has its own, so a
/// password a local user may have learned from an earlier one opens nothing now. Replaces
/// the file whole (a reader sees the old password or the new one); the caller holds the
/// container lock.
#[cfg(feature = "container")]
pub(crate) fn renew_local_password(settings: &Settings) -> Result<String, Error> {
    let path = password_path(settings);
    let password = new_password(settings)?;
    let tmp = path.with_extension(format!("{}", std::process::id()));
    write_private(&tmp, &format!("{password}\n"))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io("failed to write", &path, e))?;
    write_pgpass(settings)?;
    Ok(password)
}

/// Writes a file only its owner may read (0600 from its creation on).
pub(crate) fn write_private(path: &Path, text: &str) -> Result<(), Error> {
    create_private(path)?
        .write_all(text.as_bytes())
        .map_err(|e| Error::io("failed to write", path, e))
}

/// Creates (or empties) a file only its owner may read or write: 0600 from its creation
/// on, and set again on a file that existed with another mode. For secrets, and for logs of
/// processes that handle them.
pub fn create_private(path: &Path) -> Result<std::fs::File, Error> {
    use std::os::unix::fs::PermissionsExt;
    let file = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("failed to create", path, e))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("failed to restrict", path, e))?;
    Ok(file)
}

/// A SCRAM-SHA-256 verifier for `password` (RFC 5802/7677, as Postgres stores it): what
/// `ALTER ROLE … PASSWORD` is given, so that the password itself never travels in SQL,
/// where a client's debug log or the server's error log could keep it. Hand-written because
/// postgres-protocol's `password::scram_sha_256` fixes the cost at 4096 iterations, and
/// every test's connection pays it: a random 128-bit password needs no key stretching.
pub fn scram_verifier(password: &str, iterations: u32, salt: &[u8]) -> String {
    crate::scram::verifier(password, iterations, salt)
}

/// The advisory lock that serialises `lower_scram_cost` across processes.
const SCRAM_LOCK: i64 = 0x7067_6861_7273_6372;

/// On a server just started, stores the admin password's verifier with
/// [`SCRAM_ITERATIONS`] (initdb and the image's entrypoint store 4096; a verifier carries
/// its iteration count, so every version accepts one made here). Logging is off while it
/// runs (the client logs statements at DEBUG).
pub(crate) async fn lower_scram_cost(
    config: &tokio_postgres::Config,
    password: &str,
) -> Result<(), Error> {
    use tracing::instrument::WithSubscriber;
    let config = config.clone();
    let salt = *uuid::Uuid::new_v4().as_bytes();
    let literal = crate::script::quote_literal(&scram_verifier(password, SCRAM_ITERATIONS, &salt));
    crate::driver::run(
        async move {
            let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            // Processes that start together may all do this: one at a time, or Postgres
            // refuses the second catalog update ("tuple concurrently updated").
            client
                .batch_execute(&format!(
                    "BEGIN; SELECT pg_advisory_xact_lock({SCRAM_LOCK}); \
                     ALTER ROLE {ADMIN_USER} PASSWORD {literal}; COMMIT"
                ))
                .await
        }
        .with_subscriber(tracing::subscriber::NoSubscriber::default()),
    )
    .await
    .map_err(|e| Error::postgres("failed to store the server's password", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verifier_matches_rfc_7677s_example_construction() {
        // RFC 7677's example password and salt at 4096 iterations. That Postgres accepts
        // verifiers made here is proven by every login to a container (Postgres 17).
        use base64::Engine;
        let salt = base64::engine::general_purpose::STANDARD
            .decode("W22ZaJ0SNY7soEsUEjb6gQ==")
            .unwrap();
        let verifier = scram_verifier("pencil", 4096, &salt);
        assert_eq!(
            verifier,
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
        );
    }
}
