//! Settings: `pgharness.toml` at the workspace root, overridden by `PGHARNESS_*` variables.
//!
//! Every setting has one name in both places: `pool_size` in the file is
//! `PGHARNESS_POOL_SIZE` in the environment. Unknown keys and unknown `PGHARNESS_*`
//! variables are errors, so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::error::Error;
use crate::workspace;

/// Which kind of Postgres server the tests use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// `url`, then `container` if Docker answers, then `native`.
    Auto,
    /// One Docker container per workspace, shared by every test process.
    Container,
    /// `initdb` + `postgres` from the local Postgres binaries, data on tmpfs.
    Native,
    /// An existing server given by `PGHARNESS_URL`.
    Url,
    /// RDS/Aurora through the run's local auth proxy (started by `cargo pgharness up --backend rds`):
    /// IAM tokens, verify-full TLS, and an SSM tunnel when `[rds.ssm] target` is set.
    Rds,
}

impl BackendKind {
    /// The name used in settings and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::Container => "container",
            BackendKind::Native => "native",
            BackendKind::Url => "url",
            BackendKind::Rds => "rds",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendKind::Auto),
            "container" => Ok(BackendKind::Container),
            "native" => Ok(BackendKind::Native),
            "url" => Ok(BackendKind::Url),
            "rds" => Ok(BackendKind::Rds),
            other => Err(format!(
                "unknown backend `{other}`; use one of auto, container, native, url, rds"
            )),
        }
    }
}

/// When a test's schema survives the test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepPolicy {
    /// Keep the schema of a failing (panicking) test, drop the others. The default.
    OnFailure,
    /// Keep every schema (reaped after `reap_ttl`).
    Always,
    /// Drop every schema, even a failing test's.
    Never,
}

impl FromStr for KeepPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on-failure" => Ok(KeepPolicy::OnFailure),
            "always" => Ok(KeepPolicy::Always),
            "never" => Ok(KeepPolicy::Never),
            other => Err(format!(
                "unknown keep policy `{other}`; use on-failure, always or never"
            )),
        }
    }
}

/// How a passing test gives its schema back when its `TestDb` drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Teardown {
    /// The default: the test sends the reset of its schema on its connection and does not
    /// wait for it; the server resets (or drops) the schema after the test, even after its
    /// process has exited. A failure is recorded in the acquire log and named by the run
    /// summary.
    Detached,
    /// The test waits for the reset of its schema, and a failure is said on its stderr.
    Inline,
    /// The test marks its schema `passed`, without waiting; a janitor (run by `cargo
    /// pgharness test`) resets it.
    Deferred,
}

/// A URL that may hold a password: `Display` and `Debug` never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a connection URL.
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }

    /// The URL with its password, for handing to a driver. Never log this.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({self})")
    }
}

/// Replaces the password of a `postgres://user:password@host` URL (and any
/// `password=` parameter) with `***`.
pub fn redact_url(url: &str) -> String {
    if let Some(redacted) = redact_parsed(url) {
        return redacted;
    }
    // Not a URL the parser takes (`postgres://app:p/ss@db`, a libpq key=value string): hide
    // everything that could be a password.
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://")
        && let Some(at) = out[scheme_end + 3..].rfind('@')
    {
        out.replace_range(scheme_end + 3..scheme_end + 3 + at, "***");
    }
    if let Some(start) = out.find("password=") {
        let value_start = start + "password=".len();
        let value_end = out[value_start..]
            .find(['&', ' '])
            .map_or(out.len(), |i| value_start + i);
        out.replace_range(value_start..value_end, "***");
    }
    out
}

/// The URL with its password and any `password=` query parameter replaced, when the `url`
/// crate parses it.
fn redact_parsed(text: &str) -> Option<String> {
    let mut url = url::Url::parse(text).ok()?;
    if !text.contains("://") || url.cannot_be_a_base() {
        return None;
    }
    if url.password().is_some() {
        url.set_password(Some("***")).ok()?;
    }
    if url.query_pairs().any(|(key, _)| key == "password") {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(key, value)| {
                let value = if key == "password" {
                    "***".into()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    Some(url.to_string())
}

/// All settings, resolved. Build with [`Settings::load`].
#[derive(Clone, Debug)]
pub struct Settings {
    /// The workspace root (where `pgharness.toml`, `sql/` and `fixtures/` live).
    pub root: PathBuf,
    /// `target/pgharness`: locks, server state, generated nextest config.
    pub state_dir: PathBuf,
    /// `backend` / `PGHARNESS_BACKEND`.
    pub backend: BackendKind,
    /// `url` / `PGHARNESS_URL`.
    pub url: Option<SecretUrl>,
    /// `image` / `PGHARNESS_IMAGE`; `None` means `postgres:17`, or the locally built
    /// `pgharness/postgres:17-2` when the former is absent and cannot be pulled.
    pub image: Option<String>,
    /// `pg_bin` / `PGHARNESS_PG_BIN`: directory holding `initdb` and `postgres`.
    pub pg_bin: Option<PathBuf>,
    /// `migrations` / `PGHARNESS_MIGRATIONS`: the migrations directory.
    pub migrations: PathBuf,
    /// `migrations_layout` / `PGHARNESS_MIGRATIONS_LAYOUT`: how that directory is laid out
    /// (`auto`, `plain`, `sqlx`, `diesel`), and so which history table its schemas get.
    pub migrations_layout: crate::layout::Layout,
    /// `fixtures` / `PGHARNESS_FIXTURES`: directory of `<name>.sql` seed files.
    pub fixtures: PathBuf,
    /// `keep` / `PGHARNESS_KEEP`.
    pub keep: KeepPolicy,
    /// `pool_size` / `PGHARNESS_POOL_SIZE`: the most connections one test's pool opens.
    pub pool_size: usize,
    /// `extra_search_path` / `PGHARNESS_EXTRA_SEARCH_PATH`: schemas added after the test's
    /// own on its `search_path` (comma-separated plain names), e.g. where extensions live.
    /// `public` follows the test's schema by itself while it holds no tables.
    pub extra_search_path: Vec<String>,
    /// `extensions` / `PGHARNESS_EXTENSIONS`: extensions the administrator creates on the
    /// servers pgharness starts (comma-separated names), for migrations that need ones the
    /// tests' role may not create itself (untrusted extensions).
    pub extensions: Vec<String>,
    /// `max_connections` / `PGHARNESS_MAX_CONNECTIONS`: for servers pgharness starts.
    pub max_connections: u32,
    /// `reap_ttl` / `PGHARNESS_REAP_TTL`: how long kept and abandoned schemas live.
    pub reap_ttl: Duration,
    /// `acquire_timeout` / `PGHARNESS_ACQUIRE_TIMEOUT`: how long a test waits for a
    /// connection slot or a starting server.
    pub acquire_timeout: Duration,
    /// `native_idle` / `PGHARNESS_NATIVE_IDLE`: the native server stops after this long
    /// with no client connected.
    pub native_idle: Duration,
    /// `native_tcp` / `PGHARNESS_NATIVE_TCP`: the native server also listens on TCP
    /// 127.0.0.1 (password login), for a client that cannot use its Unix socket; off, it
    /// has no TCP listener at all and is reached only through the socket in its private
    /// directory.
    pub native_tcp: bool,
    /// `container_ttl` / `PGHARNESS_CONTAINER_TTL`: `cargo pgharness reap` removes the shared
    /// container once this long has passed since it was created.
    pub container_ttl: Duration,
    /// `PGHARNESS_RUN_ID` (set by `cargo pgharness test`), else `NEXTEST_RUN_ID`, else one per process.
    pub run_id: Option<String>,
    /// `teardown` / `PGHARNESS_TEARDOWN`: `detached` (default), `inline`, or `deferred` (set
    /// by `cargo pgharness test`, whose janitor resets the schemas).
    pub teardown: Teardown,
    /// `lend_session` / `PGHARNESS_LEND_SESSION` (default true): a test that takes an sqlx
    /// pool or connection and no `TestDb` gets its control session as its first sqlx
    /// connection (no second backend starts; each round trip on it is relayed).
    pub lend_session: bool,
    /// `[rds]` and `[rds.ssm]`.
    pub rds: RdsSettings,
    /// Environment variables that look like misspelt settings (`PGHARNES_POOL_SIZE`), with
    /// the name they were probably meant to be; not read. `load` logs them at WARN; tools
    /// show them.
    pub near_misses: Vec<(String, String)>,
}

/// A boolean setting's value.
fn boolean(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("`{v}` is not true or false")),
    }
}

/// Where a value came from, for error messages.
#[derive(Clone)]
struct Origin(String);

/// The name of every setting (`PGHARNESS_<NAME>` in the environment).
pub const SETTING_NAMES: &[&str] = &[
    "backend",
    "url",
    "image",
    "pg_bin",
    "migrations",
    "migrations_layout",
    "fixtures",
    "keep",
    "pool_size",
    "extra_search_path",
    "extensions",
    "max_connections",
    "reap_ttl",
    "acquire_timeout",
    "native_idle",
    "native_tcp",
    "container_ttl",
    "run_id",
    "teardown",
    "lend_session",
    "rds_host",
    "rds_port",
    "rds_region",
    "rds_database",
    "rds_user",
    "rds_ca_bundle",
    "rds_wake_deadline",
    "rds_idle",
    "rds_max_sessions",
    "rds_ssm_target",
];

/// The `[rds]` and `[rds.ssm]` settings (`PGHARNESS_RDS_*`), as given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RdsSettings {
    /// `[rds] host`: the cluster (or instance) endpoint.
    pub host: Option<String>,
    /// `[rds] port` (default 5432).
    pub port: u16,
    /// `[rds] region` (else parsed from the host name, else `AWS_REGION`).
    pub region: Option<String>,
    /// `[rds] database` (default `postgres`).
    pub database: String,
    /// `[rds] user`: the database user with the `rds_iam` role.
    pub user: Option<String>,
    /// `[rds] ca_bundle` (also `PGHARNESS_CA_BUNDLE`): the RDS CA bundle (PEM).
    pub ca_bundle: Option<PathBuf>,
    /// `[rds] wake_deadline`: how long to wait for a resuming Aurora cluster (default 60s).
    pub wake_deadline: Duration,
    /// `[rds] idle`: the background proxy exits after this long without clients (default 30m).
    pub idle: Duration,
    /// `[rds] max_sessions`: the most upstream sessions the proxies of every machine running
    /// against this cluster hold at once (one budget, kept on the server; default 64).
    pub max_sessions: u32,
    /// `[rds.ssm] target`: the jumphost's instance id; without it the host is dialed directly.
    pub ssm_target: Option<String>,
}

impl RdsSettings {
    /// Host, user and CA bundle, which the rds backend cannot do without, or an error naming
    /// the missing one.
    pub fn require(&self) -> Result<(String, String, PathBuf), Error> {
        let missing = |name: &str, env: &str, example: &str| Error::Setting {
            name: format!("rds.{name}"),
            origin: "pgharness.toml [rds] or the environment".into(),
            problem: "it is not set".into(),
            fix: format!(
                "set `{name} = \"{example}\"` under [rds] in pgharness.toml, or {env}={example}"
            ),
        };
        let host = self.host.clone().ok_or_else(|| {
            missing(
                "host",
                "PGHARNESS_RDS_HOST",
                "db.cluster-abc.eu-west-2.rds.amazonaws.com",
            )
        })?;
        let user = self
            .user
            .clone()
            .ok_or_else(|| missing("user", "PGHARNESS_RDS_USER", "app_iam"))?;
        let bundle = self.ca_bundle.clone().ok_or_else(|| {
            missing(
                "ca_bundle",
                "PGHARNESS_RDS_CA_BUNDLE",
                "certs/global-bundle.pem",
            )
        })?;
        Ok((host, user, bundle))
    }
}

impl Settings {
    /// Loads settings for the workspace that contains the current test or command.
    pub fn load() -> Result<Settings, Error> {
        let root = workspace::find_root()?;
        let settings = Settings::load_from(&root, std::env::vars())?;
        for (name, meant) in &settings.near_misses {
            tracing::warn!(
                "{name} is not a pgharness setting and is ignored: did you mean {meant}?"
            );
        }
        Ok(settings)
    }

    /// Loads settings from `root/pgharness.toml` and the given environment.
    pub fn load_from(
        root: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, Error> {
        let mut values: BTreeMap<String, (String, Origin)> = BTreeMap::new();
        let file = root.join("pgharness.toml");
        if file.exists() {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| Error::io("failed to read", &file, e))?;
            let table: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Setting {
                name: "pgharness.toml".into(),
                origin: file.display().to_string(),
                problem: e.message().to_owned(),
                fix: "fix the TOML syntax".into(),
            })?;
            for (key, value) in flatten(table) {
                if !SETTING_NAMES.contains(&key.as_str()) {
                    return Err(unknown_key(&key, &format!("{}", file.display())));
                }
                let text = match value {
                    toml::Value::String(s) => s,
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    other => {
                        return Err(Error::Setting {
                            name: key,
                            origin: file.display().to_string(),
                            problem: format!(
                                "expected a string or a number, found {}",
                                other.type_str()
                            ),
                            fix: "write it as `key = \"value\"`".into(),
                        });
                    }
                };
                values.insert(key, (text, Origin(file.display().to_string())));
            }
        }
        let mut nextest_run_id = None;
        let mut near_misses = Vec::new();
        for (name, value) in env {
            if name == "NEXTEST_RUN_ID" {
                nextest_run_id = Some(value);
                continue;
            }
            let Some(key) = name.strip_prefix("PGHARNESS_") else {
                if let Some(meant) = near_miss(&name) {
                    near_misses.push((name, meant));
                }
                continue;
            };
            let mut key = key.to_ascii_lowercase();
            if key == "ca_bundle" {
                key = "rds_ca_bundle".into(); // PGHARNESS_CA_BUNDLE, as rds-iam names it
            }
            if !SETTING_NAMES.contains(&key.as_str()) {
                return Err(unknown_key(&key, &name));
            }
            values.insert(key, (value, Origin(name)));
        }

        let state_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .map(|dir| {
                if dir.is_absolute() {
                    dir
                } else {
                    root.join(dir)
                }
            })
            .unwrap_or_else(|| root.join("target"))
            .join("pgharness");
        let get = |key: &str| values.get(key).map(|(v, o)| (v.as_str(), o.clone()));
        let settings = Settings {
            root: root.to_path_buf(),
            state_dir,
            backend: parse(get("backend"), "backend", BackendKind::Auto, str::parse)?,
            url: get("url").map(|(v, _)| SecretUrl::new(v)),
            image: get("image").map(|(v, _)| v.to_owned()),
            pg_bin: get("pg_bin").map(|(v, _)| PathBuf::from(v)),
            migrations: parse(get("migrations"), "migrations", root.join("sql"), |v| {
                Ok(root.join(v))
            })?,
            migrations_layout: parse(
                get("migrations_layout"),
                "migrations_layout",
                crate::layout::Layout::Auto,
                str::parse,
            )?,
            fixtures: parse(get("fixtures"), "fixtures", root.join("fixtures"), |v| {
                Ok(root.join(v))
            })?,
            keep: parse(get("keep"), "keep", KeepPolicy::OnFailure, str::parse)?,
            pool_size: parse(get("pool_size"), "pool_size", 2, |v| {
                match v.parse::<usize>() {
                    Ok(n) if (1..=64).contains(&n) => Ok(n),
                    _ => Err(format!("`{v}` is not a whole number from 1 to 64")),
                }
            })?,
            extra_search_path: parse(
                get("extra_search_path"),
                "extra_search_path",
                Vec::new(),
                parse_schema_list,
            )?,
            extensions: parse(get("extensions"), "extensions", Vec::new(), |v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|name| !name.is_empty())
                    .map(|name| {
                        let plain = name.len() <= 63
                            && name.bytes().all(|b| {
                                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                            });
                        plain.then(|| name.to_owned()).ok_or_else(|| {
                            format!("`{name}` is not an extension name (lowercase letters, digits, _ and -)")
                        })
                    })
                    .collect()
            })?,
            max_connections: parse(get("max_connections"), "max_connections", 100, |v| match v
                .parse::<u32>()
            {
                Ok(n) if (10..=MAX_CONNECTIONS).contains(&n) => Ok(n),
                _ => Err(format!(
                    "`{v}` is not a whole number from 10 to {MAX_CONNECTIONS} (each connection slot costs the server memory up front; a test server needs a few hundred at most)"
                )),
            })?,
            reap_ttl: parse(
                get("reap_ttl"),
                "reap_ttl",
                Duration::from_secs(3600),
                duration,
            )?,
            acquire_timeout: parse(
                get("acquire_timeout"),
                "acquire_timeout",
                Duration::from_secs(60),
                duration,
            )?,
            native_idle: parse(
                get("native_idle"),
                "native_idle",
                Duration::from_secs(600),
                duration,
            )?,
            native_tcp: parse(get("native_tcp"), "native_tcp", false, boolean)?,
            container_ttl: parse(
                get("container_ttl"),
                "container_ttl",
                Duration::from_secs(8 * 3600),
                duration,
            )?,
            run_id: get("run_id").map(|(v, _)| v.to_owned()).or(nextest_run_id),
            teardown: parse(
                get("teardown"),
                "teardown",
                Teardown::Detached,
                |v| match v {
                    "detached" => Ok(Teardown::Detached),
                    "inline" => Ok(Teardown::Inline),
                    "deferred" => Ok(Teardown::Deferred),
                    other => Err(format!(
                        "unknown teardown `{other}`; use detached, inline or deferred"
                    )),
                },
            )?,
            lend_session: parse(get("lend_session"), "lend_session", true, boolean)?,
            rds: RdsSettings::default(),
            near_misses,
        };
        let mut settings = settings;
        settings.rds = RdsSettings {
            host: get("rds_host").map(|(v, _)| v.to_owned()),
            port: parse(get("rds_port"), "rds.port", 5432, |v| {
                v.parse().map_err(|_| format!("`{v}` is not a port"))
            })?,
            region: get("rds_region").map(|(v, _)| v.to_owned()),
            database: get("rds_database")
                .map_or_else(|| "postgres".to_owned(), |(v, _)| v.to_owned()),
            user: get("rds_user").map(|(v, _)| v.to_owned()),
            ca_bundle: get("rds_ca_bundle").map(|(v, _)| root.join(v)),
            wake_deadline: parse(
                get("rds_wake_deadline"),
                "rds.wake_deadline",
                Duration::from_secs(60),
                duration,
            )?,
            idle: parse(
                get("rds_idle"),
                "rds.idle",
                Duration::from_secs(30 * 60),
                duration,
            )?,
            max_sessions: parse(get("rds_max_sessions"), "rds.max_sessions", 64, |v| match v
                .parse::<u32>()
            {
                Ok(n) if (8..=10_000).contains(&n) => Ok(n),
                _ => Err(format!(
                    "`{v}` is not a whole number from 8 to 10000 (pgharness keeps 6 for itself)"
                )),
            })?,
            ssm_target: get("rds_ssm_target").map(|(v, _)| v.to_owned()),
        };
        if settings.backend == BackendKind::Url && settings.url.is_none() {
            return Err(Error::Setting {
                name: "backend".into(),
                origin: get("backend").map_or("default".into(), |(_, o)| o.0),
                problem: "the url backend needs a server URL".into(),
                fix: "set PGHARNESS_URL=postgres://user:password@host:port/database".into(),
            });
        }
        Ok(settings)
    }
}

/// `[rds] host = …` and `[rds.ssm] target = …` become `rds_host` and `rds_ssm_target`.
fn flatten(table: toml::Table) -> Vec<(String, toml::Value)> {
    let mut out = Vec::new();
    for (key, value) in table {
        match value {
            toml::Value::Table(inner) => {
                out.extend(
                    flatten(inner)
                        .into_iter()
                        .map(|(k, v)| (format!("{key}_{k}"), v)),
                );
            }
            other => out.push((key, other)),
        }
    }
    out
}

/// The `PGHARNESS_*` name an environment variable was probably meant to be: within two
/// edits of one (`PGHARNES_POOL_SIZE`, `PG_HARNESS_URL`, `PGHARNESS-KEEP`).
fn near_miss(name: &str) -> Option<String> {
    let upper = name.to_ascii_uppercase();
    if !upper.starts_with("PG") && !upper.starts_with("GH") {
        return None; // cheap: the edits we catch keep the start
    }
    SETTING_NAMES
        .iter()
        .chain(&["ca_bundle"])
        .map(|key| format!("PGHARNESS_{}", key.to_ascii_uppercase()))
        .find(|meant| *meant != name && edit_distance(&upper, meant) <= 2)
}

/// Levenshtein distance between two ASCII strings.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len().abs_diff(b.len()) > 2 {
        return 3;
    }
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut current = vec![i + 1];
        for (j, &cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != cb);
            current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

fn unknown_key(key: &str, origin: &str) -> Error {
    Error::Setting {
        name: key.to_owned(),
        origin: origin.to_owned(),
        problem: "no such setting".into(),
        fix: format!("use one of: {}", SETTING_NAMES.join(", ")),
    }
}

fn parse<T>(
    value: Option<(&str, Origin)>,
    name: &str,
    default: T,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<T, Error> {
    match value {
        None => Ok(default),
        Some((text, origin)) => parse(text.trim()).map_err(|problem| Error::Setting {
            name: name.to_owned(),
            origin: origin.0,
            fix: "set it to a valid value (see the settings table in README.md)".to_owned(),
            problem,
        }),
    }
}

/// A comma-separated list of plain schema names (lowercase letters, digits, `_`).
fn parse_schema_list(text: &str) -> Result<Vec<String>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| {
            let plain = name.len() <= 63
                && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if plain {
                Ok(name.to_owned())
            } else {
                Err(format!(
                    "`{name}` is not a plain schema name (lowercase letters, digits and _)"
                ))
            }
        })
        .collect()
}

/// The most `max_connections` a server pgharness starts may have.
pub(crate) const MAX_CONNECTIONS: u32 = 10_000;

/// The longest duration a setting may have: long enough for any wait, short enough that
/// adding it to a clock never overflows.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// A duration pgharness does not accept, and why (for a setting, or a command-line flag).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidDuration(String);

/// Parses a duration as humantime reads it (`500ms`, `90s`, `15m`, `2h`, `1h 30m`, `7d`) or
/// a bare number of seconds; at most 366 days.
pub fn parse_duration(text: &str) -> Result<Duration, InvalidDuration> {
    let text = text.trim();
    let duration = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| InvalidDuration(format!("`{text}` seconds is out of range")))?
    } else {
        humantime::parse_duration(text).map_err(|e| {
            InvalidDuration(format!(
                "`{text}` is not a duration like 500ms, 90s, 15m or 2h ({e})"
            ))
        })?
    };
    if duration > MAX_DURATION {
        return Err(InvalidDuration(format!(
            "`{text}` is longer than the most allowed, 366 days"
        )));
    }
    Ok(duration)
}

/// [`parse_duration`] for a setting's parser.
fn duration(text: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|e| e.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file: Option<&str>, env: &[(&str, &str)]) -> Result<Settings, Error> {
        let dir = std::env::temp_dir().join(format!("pgharness-settings-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(text) = file {
            std::fs::write(dir.join("pgharness.toml"), text).unwrap();
        }
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let result = Settings::load_from(&dir, env);
        std::fs::remove_dir_all(&dir).unwrap();
        result
    }

    #[test]
    fn environment_wins_over_the_file() {
        let settings = load(
            Some("pool_size = 3\nkeep = \"always\""),
            &[("PGHARNESS_POOL_SIZE", "5")],
        )
        .unwrap();
        assert_eq!(settings.pool_size, 5);
        assert_eq!(settings.keep, KeepPolicy::Always);
    }

    #[test]
    fn unknown_environment_variable_is_named_with_the_fix() {
        let error = load(None, &[("PGHARNESS_BAKCEND", "native")])
            .unwrap_err()
            .to_string();
        assert!(error.contains("`bakcend`"), "{error}");
        assert!(error.contains("PGHARNESS_BAKCEND"), "{error}");
        assert!(error.contains("backend, url"), "{error}");
    }

    #[test]
    fn misspelt_prefixes_are_reported_as_near_misses() {
        let settings = load(
            None,
            &[
                ("PGHARNES_POOL_SIZE", "5"),
                ("PG_HARNESS_URL", "postgres://x@y/z"),
                ("PGHOST", "elsewhere"),
                ("PATH", "/bin"),
            ],
        )
        .unwrap();
        assert_eq!(settings.pool_size, 2, "a misspelt variable is not read");
        assert_eq!(
            settings.near_misses,
            [
                (
                    "PGHARNES_POOL_SIZE".to_owned(),
                    "PGHARNESS_POOL_SIZE".to_owned()
                ),
                ("PG_HARNESS_URL".to_owned(), "PGHARNESS_URL".to_owned()),
            ]
        );
    }

    #[test]
    fn unknown_file_key_is_rejected() {
        let error = load(Some("pool = 3"), &[]).unwrap_err().to_string();
        assert!(
            error.contains("`pool`") && error.contains("pgharness.toml"),
            "{error}"
        );
    }

    #[test]
    fn an_absurd_max_connections_is_refused_before_any_server_starts() {
        let error = load(None, &[("PGHARNESS_MAX_CONNECTIONS", "1000000")])
            .unwrap_err()
            .to_string();
        assert!(error.contains("setting `max_connections`"), "{error}");
        assert!(error.contains("from 10 to 10000"), "{error}");
        assert_eq!(
            load(None, &[("PGHARNESS_MAX_CONNECTIONS", "10000")])
                .unwrap()
                .max_connections,
            10000
        );
    }

    #[test]
    fn bad_value_names_setting_and_origin() {
        let error = load(None, &[("PGHARNESS_BACKEND", "docker")])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("setting `backend` (from PGHARNESS_BACKEND)"),
            "{error}"
        );
        assert!(error.contains("unknown backend `docker`"), "{error}");
        let error = load(None, &[("PGHARNESS_POOL_SIZE", "0")])
            .unwrap_err()
            .to_string();
        assert!(error.contains("pool_size"), "{error}");
    }

    #[test]
    fn url_backend_without_url_says_how_to_fix() {
        let error = load(None, &[("PGHARNESS_BACKEND", "url")])
            .unwrap_err()
            .to_string();
        assert!(error.contains("PGHARNESS_URL="), "{error}");
    }

    #[test]
    fn run_id_prefers_pgharness_over_nextest() {
        let settings = load(None, &[("NEXTEST_RUN_ID", "n"), ("PGHARNESS_RUN_ID", "p")]).unwrap();
        assert_eq!(settings.run_id.as_deref(), Some("p"));
        let settings = load(None, &[("NEXTEST_RUN_ID", "n")]).unwrap();
        assert_eq!(settings.run_id.as_deref(), Some("n"));
    }

    #[test]
    fn rds_settings_from_file_sections_and_environment() {
        let settings = load(
            Some("[rds]\nhost = \"db.cluster-x.eu-west-2.rds.amazonaws.com\"\nuser = \"app\"\n[rds.ssm]\ntarget = \"i-0abc\"\n"),
            &[("PGHARNESS_RDS_PORT", "6432"), ("PGHARNESS_CA_BUNDLE", "certs/b.pem")],
        )
        .unwrap();
        assert_eq!(
            settings.rds.host.as_deref(),
            Some("db.cluster-x.eu-west-2.rds.amazonaws.com")
        );
        assert_eq!(settings.rds.ssm_target.as_deref(), Some("i-0abc"));
        assert_eq!(settings.rds.port, 6432);
        assert!(
            settings
                .rds
                .ca_bundle
                .as_ref()
                .unwrap()
                .ends_with("certs/b.pem")
        );
        assert_eq!(settings.rds.database, "postgres");
        let error = load(Some("[rds]\nhost = \"h\"\n"), &[])
            .unwrap()
            .rds
            .require()
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("rds.user") && error.contains("PGHARNESS_RDS_USER"),
            "{error}"
        );
        let error = load(Some("[rds]\nhots = \"h\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(error.contains("`rds_hots`"), "{error}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_duration("5d"), Ok(Duration::from_secs(5 * 86400)));
        assert_eq!(parse_duration(" 45 "), Ok(Duration::from_secs(45)));
    }

    #[test]
    fn durations_that_would_overflow_are_errors_not_panics() {
        for text in [
            "9999999999999999h",
            "18446744073709551615",
            "99999999999999999999999",
            "400d",
        ] {
            let error = parse_duration(text).unwrap_err();
            assert!(error.to_string().contains(text.trim()), "{text}: {error}");
        }
        let error = load(
            None,
            &[("PGHARNESS_ACQUIRE_TIMEOUT", "18446744073709551615")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("acquire_timeout") && error.contains("PGHARNESS_ACQUIRE_TIMEOUT"),
            "{error}"
        );
        let error = load(None, &[("PGHARNESS_REAP_TTL", "9999999999999999h")])
            .unwrap_err()
            .to_string();
        assert!(error.contains("reap_ttl"), "{error}");
    }

    #[test]
    fn passwords_never_show() {
        let url = SecretUrl::new("postgres://app:hunter2@db:5432/app?sslmode=require");
        assert_eq!(
            url.to_string(),
            "postgres://app:***@db:5432/app?sslmode=require"
        );
        assert!(!format!("{url:?}").contains("hunter2"));
        assert_eq!(
            redact_url("host=db password=hunter2 user=x"),
            "host=db password=*** user=x"
        );
        assert_eq!(redact_url("postgres://app@db/app"), "postgres://app@db/app");
    }

    #[test]
    fn passwords_with_url_delimiters_never_show() {
        for (url, secret) in [
            ("postgres://app:p/ss@db/app", "p/ss"),
            ("postgres://app:p%2Fss@db/app", "p%2Fss"),
            ("postgres://app:p?ss@db:5432/app", "p?ss"),
            ("postgres://app:p#ss@db/app", "p#ss"),
            ("postgres://app:pa@ss@db/app", "pa@ss"),
            (
                "postgres://app@db/app?password=s3cr%26t&sslmode=require",
                "s3cr",
            ),
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains(secret), "{url} -> {shown}");
            assert!(shown.contains("db"), "{url} -> {shown}");
            assert!(!format!("{:?} {}", SecretUrl::new(url), SecretUrl::new(url)).contains(secret));
        }
    }
}
