//! A reachable Postgres server: where it is, how tests log in, and (for the servers pgharness
//! starts) how the runner logs in as its administrator.

use std::fmt;
use std::str::FromStr;

use tokio_postgres::config::Host;

use crate::error::Error;
use crate::settings::{BackendKind, SecretUrl};

/// A server the harness can create schemas on.
///
/// `Debug` and `Display` never show the password.
#[derive(Clone)]
pub struct Server {
    backend: BackendKind,
    url: SecretUrl,
    config: tokio_postgres::Config,
    /// The administrator's login, when it is not the tests' (servers pgharness starts).
    admin: Option<tokio_postgres::Config>,
}

/// The login role of tests on the servers pgharness starts: LOGIN, CONNECT and CREATE on
/// the database, and nothing else, as an RDS IAM user has. The administrator (`postgres`)
/// stays with the runner, for bootstrap.
pub const TESTS_ROLE: &str = "pgharness_tests";

impl Server {
    /// A server given by URL (`postgres://user:password@host:port/database`).
    pub fn from_url(backend: BackendKind, url: SecretUrl) -> Result<Server, Error> {
        let problem = |problem: String| Error::Setting {
            name: "url".into(),
            origin: "PGHARNESS_URL or the `url` key".into(),
            problem,
            fix: "write it as postgres://user:password@host:port/database".into(),
        };
        let text = url.expose();
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
            return Err(problem(format!("`{url}` is not a postgres:// URL")));
        }
        let config = tokio_postgres::Config::from_str(text)
            .map_err(|e| problem(format!("`{url}` does not parse: {e}")))?;
        if config.get_options().is_some() {
            return Err(problem(
                "it sets `options`, which pgharness needs for each test's search_path".into(),
            ));
        }
        if config.get_user().is_none() {
            return Err(problem(format!("`{url}` names no user")));
        }
        Ok(Server {
            backend,
            url,
            config,
            admin: None,
        })
    }

    /// A server that pgharness started on 127.0.0.1 (the container, a native server with
    /// `native_tcp`): tests log in as [`TESTS_ROLE`], the runner as `postgres`, both with
    /// the server's password (see `target/pgharness/pgpass`).
    pub fn local(backend: BackendKind, port: u16, password: &str) -> Server {
        Server::started(backend, Host::Tcp("127.0.0.1".into()), port, password)
    }

    /// A server that pgharness started with a Unix socket `.s.PGSQL.<port>` in `dir` (a
    /// native server): the URL names the directory as its host, percent-encoded, as libpq,
    /// sqlx, diesel and tokio-postgres all read it.
    pub fn local_socket(
        backend: BackendKind,
        dir: &std::path::Path,
        port: u16,
        password: &str,
    ) -> Server {
        Server::started(backend, Host::Unix(dir.to_path_buf()), port, password)
    }

    /// [`local_socket`](Self::local_socket) when it has a socket directory, else
    /// [`local`](Self::local): how a record of a started server names where it is.
    pub fn local_at(
        backend: BackendKind,
        socket_dir: Option<&std::path::Path>,
        port: u16,
        password: &str,
    ) -> Server {
        match socket_dir {
            Some(dir) => Server::local_socket(backend, dir, port, password),
            None => Server::local(backend, port, password),
        }
    }

    fn started(backend: BackendKind, host: Host, port: u16, password: &str) -> Server {
        let login = |user: &str| {
            let mut config = tokio_postgres::Config::new();
            match &host {
                Host::Tcp(name) => config.host(name),
                Host::Unix(dir) => config.host_path(dir),
            };
            config
                .port(port)
                .user(user)
                .password(password)
                .dbname("postgres");
            config
        };
        let config = login(TESTS_ROLE);
        Server {
            backend,
            url: SecretUrl::new(login_url(&config, TESTS_ROLE, password)),
            admin: Some(login("postgres")),
            config,
        }
    }

    /// This server with its administrator reached through the Unix socket `.s.PGSQL.<port>`
    /// in `dir` (a native server that also listens on TCP, where the administrator is
    /// refused: its password opens nothing over TCP).
    pub(crate) fn with_admin_socket(mut self, dir: &std::path::Path, port: u16) -> Server {
        if let Some(admin) = self.admin.as_mut() {
            let mut config = tokio_postgres::Config::new();
            config
                .host_path(dir)
                .port(port)
                .user("postgres")
                .dbname("postgres");
            if let Some(password) = admin.get_password() {
                config.password(password);
            }
            *admin = config;
        }
        self
    }

    /// The URL of this server's database for another login role (a test that checks what
    /// a role of the application may do).
    pub fn url_as(&self, user: &str, password: &str) -> SecretUrl {
        SecretUrl::new(login_url(&self.config, user, password))
    }

    /// The administrator's connection configuration: `postgres` on the servers pgharness
    /// starts, the given login elsewhere (a URL server, the RDS proxy).
    pub fn admin_config(&self) -> tokio_postgres::Config {
        let mut config = self.admin.clone().unwrap_or_else(|| self.config.clone());
        config.application_name("pgharness");
        config
    }

    /// Which backend provides it.
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// The tests' connection configuration (with password, if any).
    pub fn config(&self) -> tokio_postgres::Config {
        let mut config = self.config.clone();
        config.application_name("pgharness");
        config
    }

    /// The server's URL; `Display` redacts it, `expose()` does not.
    pub fn url(&self) -> &SecretUrl {
        &self.url
    }

    /// Whether the URL carries a password (then a printed psql command must not).
    pub fn has_password(&self) -> bool {
        self.config.get_password().is_some()
    }

    /// The URL with `options=-csearch_path=<schema>,public` added, so that any client
    /// lands in the schema.
    pub fn url_for_schema(&self, schema: &str) -> String {
        self.url_with_search_path(&format!("{schema},public"))
    }

    /// The URL with `options=-csearch_path=<path>` added (`path` comma-separated plain
    /// names, as a test's `search_path` is).
    pub fn url_with_search_path(&self, path: &str) -> String {
        with_search_path(self.url.expose(), path)
    }

    /// The URL for a schema, password redacted; safe to print.
    pub fn redacted_url_for_schema(&self, schema: &str) -> String {
        with_search_path(&self.url.to_string(), &format!("{schema},public"))
    }

    /// A shell command that opens `psql` in a schema of this server, as printed for a kept
    /// schema: it works as printed and never contains a password. `state_dir` is the
    /// workspace's `target/pgharness` (the rds backend's env file is there).
    pub fn psql_command(&self, schema: &str, state_dir: &std::path::Path) -> String {
        let options = format!("PGOPTIONS='-csearch_path={schema},public'");
        if self.backend == BackendKind::Rds {
            // The run's RDS proxy (left up while a kept schema is inspected) writes its URL,
            // with the per-run password, into a 0600 libpq service file: no password on
            // psql's command line, where every local user could read it.
            return format!(
                "{options} PGSERVICEFILE='{}' PGSERVICE=pgharness psql",
                state_dir.join("pg_service.conf").display()
            );
        }
        if matches!(self.backend, BackendKind::Container | BackendKind::Native) {
            // The password stays in the 0600 pgpass file pgharness keeps beside the server.
            let mut url = url::Url::parse(self.url.expose()).ok();
            if let Some(url) = url.as_mut() {
                let _ = url.set_password(None);
            }
            let bare = url.map_or_else(|| self.url.to_string(), |u| u.to_string());
            return format!(
                "PGPASSFILE='{}' psql '{}'",
                state_dir.join("pgpass").display(),
                with_search_path(&bare, &format!("{schema},public"))
            );
        }
        if self.has_password() {
            // Never print the password: reuse the variable the user set it in.
            return format!("{options} psql \"$PGHARNESS_URL\"");
        }
        format!("psql '{}'", self.url_for_schema(schema))
    }

    /// `user@host:port/database`, for messages.
    pub fn describe(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            #[cfg(unix)]
            Some(Host::Unix(path)) => path.display().to_string(),
            None => "localhost".into(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!(
            "{}@{host}:{port}/{}",
            self.config.get_user().unwrap_or("?"),
            self.config.get_dbname().unwrap_or("postgres"),
        )
    }
}

/// `postgres://user:password@host:port/database` for a configuration's first host; a socket
/// directory is the host, percent-encoded (`%2Fdev%2Fshm%2F…`).
fn login_url(config: &tokio_postgres::Config, user: &str, password: &str) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(name)) => name.clone(),
        #[cfg(unix)]
        Some(Host::Unix(dir)) => percent_encode(&dir.to_string_lossy()),
        None => "localhost".into(),
    };
    format!(
        "postgres://{}:{}@{host}:{}/{}",
        percent_encode(user),
        percent_encode(password),
        config.get_ports().first().copied().unwrap_or(5432),
        config.get_dbname().unwrap_or("postgres"),
    )
}

/// Percent-encodes all but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(text, RESERVED).to_string()
}

fn with_search_path(url: &str, path: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!(
        "{url}{separator}options=-csearch_path%3D{}",
        path.replace(',', "%2C")
    )
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("backend", &self.backend)
            .field("url", &self.url)
            .finish()
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} backend)", self.describe(), self.backend)
    }
}

/// A `postgres://` URL as libpq environment variables (see `TestDb::libpq_env`); an
/// unparsable URL gives none.
pub fn libpq_env(url: &str) -> Vec<(&'static str, String)> {
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return Vec::new();
    };
    let mut env = Vec::new();
    if let Some(host) = config.get_hosts().first() {
        let host = match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        };
        env.push(("PGHOST", host));
    }
    if let Some(port) = config.get_ports().first() {
        env.push(("PGPORT", port.to_string()));
    }
    if let Some(user) = config.get_user() {
        env.push(("PGUSER", user.to_owned()));
    }
    if let Some(password) = config.get_password() {
        env.push(("PGPASSWORD", String::from_utf8_lossy(password).into_owned()));
    }
    if let Some(database) = config.get_dbname() {
        env.push(("PGDATABASE", database.to_owned()));
    }
    if let Some(options) = config.get_options() {
        env.push(("PGOPTIONS", options.to_owned()));
    }
    if let Some(name) = config.get_application_name() {
        env.push(("PGAPPNAME", name.to_owned()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_with_password_is_usable_but_never_shown() {
        let server = Server::from_url(
            BackendKind::Url,
            SecretUrl::new("postgres://app:s3cret@db.internal:6543/appdb?sslmode=disable"),
        )
        .unwrap();
        assert!(server.has_password());
        assert_eq!(server.describe(), "app@db.internal:6543/appdb");
        assert!(!format!("{server:?} {server}").contains("s3cret"));
        assert!(server.url_for_schema("t_x").contains("s3cret"));
        assert_eq!(
            server.redacted_url_for_schema("t_x"),
            "postgres://app:***@db.internal:6543/appdb?sslmode=disable&options=-csearch_path%3Dt_x%2Cpublic"
        );
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, expected) in [
            ("host=db user=x", "not a postgres:// URL"),
            ("postgres://db/app", "names no user"),
            ("postgres://u@db/app?options=-cfoo%3Dbar", "sets `options`"),
            ("postgres://u@db:notaport/app", "does not parse"),
        ] {
            let error = Server::from_url(BackendKind::Url, SecretUrl::new(url))
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{url}: {error}");
        }
    }

    #[test]
    fn psql_commands_never_carry_the_password() {
        let state = std::path::Path::new("/w/target/pgharness");
        let url = Server::from_url(
            BackendKind::Url,
            SecretUrl::new("postgres://app:s3cret@db:5432/app"),
        )
        .unwrap();
        assert_eq!(
            url.psql_command("t_a", state),
            "PGOPTIONS='-csearch_path=t_a,public' psql \"$PGHARNESS_URL\""
        );
        let rds = Server::from_url(
            BackendKind::Rds,
            SecretUrl::new("postgres://app_iam:p3r-run@127.0.0.1:6000/app"),
        )
        .unwrap();
        let command = rds.psql_command("t_a", state);
        assert!(
            !command.contains("p3r-run") && !command.contains("PGHARNESS_URL"),
            "{command}"
        );
        assert_eq!(
            command,
            "PGOPTIONS='-csearch_path=t_a,public' PGSERVICEFILE='/w/target/pgharness/pg_service.conf' PGSERVICE=pgharness psql"
        );
    }

    #[test]
    fn a_url_becomes_libpq_environment_variables() {
        assert_eq!(
            super::libpq_env(
                "postgres://app:s%40cret@127.0.0.1:6000/app?options=-csearch_path%3Dt_a%2Cpublic"
            ),
            vec![
                ("PGHOST", "127.0.0.1".to_owned()),
                ("PGPORT", "6000".to_owned()),
                ("PGUSER", "app".to_owned()),
                ("PGPASSWORD", "s@cret".to_owned()),
                ("PGDATABASE", "app".to_owned()),
                ("PGOPTIONS", "-csearch_path=t_a,public".to_owned()),
            ]
        );
    }

    #[test]
    fn local_servers_log_in_with_the_workspace_password_and_never_print_it() {
        let server = Server::local(BackendKind::Native, 5499, "0123abcd");
        assert!(server.has_password());
        assert_eq!(
            server.url_for_schema("t_a"),
            "postgres://pgharness_tests:0123abcd@127.0.0.1:5499/postgres?options=-csearch_path%3Dt_a%2Cpublic"
        );
        assert_eq!(server.config().get_user(), Some(TESTS_ROLE));
        assert_eq!(server.admin_config().get_user(), Some("postgres"));
        let command = server.psql_command("t_a", std::path::Path::new("/w/target/pgharness"));
        assert_eq!(
            command,
            "PGPASSFILE='/w/target/pgharness/pgpass' psql 'postgres://pgharness_tests@127.0.0.1:5499/postgres?options=-csearch_path%3Dt_a%2Cpublic'"
        );
        assert!(!format!("{server} {server:?} {command}").contains("0123abcd"));
    }

    #[test]
    fn a_socket_server_names_its_directory_as_the_url_host() {
        let dir = std::path::Path::new("/dev/shm/pgharness-ab 1/sock");
        let server = Server::local_socket(BackendKind::Native, dir, 5499, "0123abcd");
        let url = server.url_for_schema("t_a");
        assert_eq!(
            url,
            "postgres://pgharness_tests:0123abcd@%2Fdev%2Fshm%2Fpgharness-ab%201%2Fsock:5499/postgres?options=-csearch_path%3Dt_a%2Cpublic"
        );
        // tokio-postgres (as libpq, sqlx and diesel do) reads the directory back.
        let config: tokio_postgres::Config = url.parse().unwrap();
        assert_eq!(config.get_hosts(), [Host::Unix(dir.to_path_buf())]);
        assert_eq!(config.get_ports(), [5499]);
        assert_eq!(config.get_hosts(), server.config().get_hosts());
        assert_eq!(
            super::libpq_env(&url)[..2],
            [
                ("PGHOST", dir.display().to_string()),
                ("PGPORT", "5499".to_owned())
            ]
        );
        assert_eq!(
            server.describe(),
            "pgharness_tests@/dev/shm/pgharness-ab 1/sock:5499/postgres"
        );
        let command = server.psql_command("t_a", std::path::Path::new("/w/target/pgharness"));
        assert_eq!(
            command,
            "PGPASSFILE='/w/target/pgharness/pgpass' psql 'postgres://pgharness_tests@%2Fdev%2Fshm%2Fpgharness-ab%201%2Fsock:5499/postgres?options=-csearch_path%3Dt_a%2Cpublic'"
        );
        // Another role of the same server, e.g. the application's.
        assert_eq!(
            server.url_as("app", "p@ss").expose(),
            "postgres://app:p%40ss@%2Fdev%2Fshm%2Fpgharness-ab%201%2Fsock:5499/postgres"
        );
    }
}
