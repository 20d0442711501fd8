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

/// SCRAM iterations for the servers' passwords where Postgres allows choosing (16+): the
/// password is 122 random bits, so key stretching buys nothing and would cost every
/// connection a few milliseconds.
pub(crate) const SCRAM_ITERATIONS: u32 = 16;

fn password_path(settings: &Settings) -> PathBuf {
    settings.state_dir.join("server-password")
}

/// The file holding the local servers' password (created if missing), for tools that
/// hand it to another program without putting it on a command line.
pub fn password_file(settings: &Settings) -> Result<PathBuf, Error> {
    local_password(settings)?;
    Ok(password_path(settings))
}

/// The `PGPASSFILE` for the local servers' password.
pub fn pgpass_path(settings: &Settings) -> PathBuf {
    settings.state_dir.join("pgpass")
}

/// The workspace's server password, created on first use. Safe to race: the first
/// writer wins and everybody reads its file.
pub(crate) fn local_password(settings: &Settings) -> Result<String, Error> {
    let path = password_path(settings);
    if let Ok(text) = std::fs::read_to_string(&path)
        && text.trim().len() >= 32
    {
        return Ok(text.trim().to_owned());
    }
    std::fs::create_dir_all(&settings.state_dir)
        .map_err(|e| Error::io("failed to create", &settings.state_dir, e))?;
    let password = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
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
    let pgpass = format!("127.0.0.1:*:*:*:{password}\nlocalhost:*:*:*:{password}\n");
    write_private(&pgpass_path(settings), &pgpass)?;
    Ok(password)
}

/// Writes a file only its owner may read (0600 from its creation on).
pub(crate) fn write_private(path: &Path, text: &str) -> Result<(), Error> {
    let mut file = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("failed to create", path, e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| Error::io("failed to write", path, e))
}

/// On a server just started, stores the admin password with [`SCRAM_ITERATIONS`] where
/// the server lets us choose (Postgres 16 and later); older servers keep 4096.
pub(crate) async fn lower_scram_cost(
    config: &tokio_postgres::Config,
    password: &str,
) -> Result<(), Error> {
    let config = config.clone();
    let password = password.to_owned();
    crate::driver::run(async move {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let version: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await?
            .get(0);
        if version >= 160000 {
            let literal = crate::script::quote_literal(&password);
            client
                .batch_execute(&format!(
                    "SET scram_iterations = {SCRAM_ITERATIONS};
                     ALTER ROLE {ADMIN_USER} PASSWORD {literal};"
                ))
                .await?;
        }
        Ok::<_, tokio_postgres::Error>(())
    })
    .await
    .map_err(|e| Error::postgres("failed to store the server's password", e))
}
