//! Migration layouts of the tools teams use, read the way each tool reads them, and the
//! history table each tool keeps, filled in as the tool would have filled it, so that an app
//! that runs its migrator at start-up finds its schema up to date:
//! - `plain`: every `*.sql` file of the directory, in name order (pgharness's own);
//! - `sqlx`: `<version>_<description>.sql`, or `.up.sql` (`.down.sql` never applied), in
//!   version order; `_sqlx_migrations` with sqlx's SHA-384 checksums;
//! - `diesel`: `<version>_<name>/up.sql` directories (`down.sql` never applied), in name order;
//!   `__diesel_schema_migrations`.
//! - `refinery`: `V<version>__<name>.sql` (and unversioned `U<version>__<name>.sql`), in
//!   version order; `refinery_schema_history` with refinery's SipHash-1-3 checksums.
//!
//! `auto` picks `diesel` for a directory of migration directories, `refinery` when every
//! `.sql` file is named as refinery names them, `sqlx` when a file is reversible
//! (`.up.sql`/`.down.sql`) or when every `.sql` file is `<version>_<description>.sql` and a
//! version is a timestamp (14 digits or more, as `sqlx migrate add` names them), else
//! `plain`. A directory of `0001_users.sql` files reads as `plain`: sqlx's simple layout
//! with sequential versions and the plain one look alike, so `migrations_layout = "sqlx"`
//! says which it is.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sha2::{Digest, Sha384};

use crate::error::Error;
use crate::script::{SqlFile, quote_literal};

/// How a migrations directory is laid out (`migrations_layout`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Detected from the directory (see the module docs).
    #[default]
    Auto,
    /// Every `*.sql` file, in name order; no history table.
    Plain,
    /// sqlx's (`migrate!`, `sqlx migrate run`).
    Sqlx,
    /// diesel's (`diesel migration run`, `embed_migrations!`).
    Diesel,
    /// refinery's (`embed_migrations!`, `refinery migrate`).
    Refinery,
}

impl Layout {
    /// Its name, as the setting spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Auto => "auto",
            Layout::Plain => "plain",
            Layout::Sqlx => "sqlx",
            Layout::Diesel => "diesel",
            Layout::Refinery => "refinery",
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Layout {
    type Err = String;

    fn from_str(text: &str) -> Result<Layout, String> {
        match text {
            "auto" => Ok(Layout::Auto),
            "plain" => Ok(Layout::Plain),
            "sqlx" => Ok(Layout::Sqlx),
            "diesel" => Ok(Layout::Diesel),
            "refinery" => Ok(Layout::Refinery),
            other => Err(format!(
                "unknown migrations layout `{other}`; use auto, plain, sqlx, diesel or refinery"
            )),
        }
    }
}

/// A directory's migrations as its tool reads them: the files to apply, in order, and the
/// statements that fill the tool's history table after them.
pub(crate) struct Read {
    pub(crate) layout: Layout,
    pub(crate) files: Vec<SqlFile>,
    pub(crate) history: Option<String>,
}

fn layout_error(dir: &Path, problem: String, fix: &str) -> Error {
    Error::Setting {
        name: "migrations".into(),
        origin: format!("the migrations in {}", dir.display()),
        problem,
        fix: fix.into(),
    }
}

/// Versions in order must not repeat.
fn unique_versions(dir: &Path, versions: impl Iterator<Item = i64>) -> Result<(), Error> {
    let mut last = None;
    for version in versions {
        if last == Some(version) {
            return Err(layout_error(
                dir,
                format!("two migrations have version {version}"),
                "give each migration its own version",
            ));
        }
        last = Some(version);
    }
    Ok(())
}

/// Whether the `.sql` files among `names` are all named `<version>_<description>.sql` and one
/// version is a timestamp (`sqlx migrate add`'s `20240101120000_users.sql`).
fn sqlx_timestamped(names: impl Iterator<Item = String>) -> bool {
    let mut timestamped = false;
    for name in names.filter(|name| name.ends_with(".sql")) {
        let Some((version, _)) = name.split_once('_') else {
            return false;
        };
        if version.is_empty() || !version.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        timestamped |= version.len() >= 14;
    }
    timestamped
}

/// Reads `dir` in `layout` (resolving `auto`).
pub(crate) fn read(dir: &Path, layout: Layout) -> Result<Read, Error> {
    let mut entries: Vec<(PathBuf, bool)> = std::fs::read_dir(dir)
        .map_err(|e| Error::io("failed to list migrations in", dir, e))?
        .filter_map(|entry| entry.ok())
        .map(|entry| (entry.path(), entry.path().is_dir()))
        .collect();
    entries.sort();
    let name = |path: &Path| {
        path.file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    let layout = match layout {
        Layout::Auto
            if entries
                .iter()
                .any(|(p, is_dir)| *is_dir && p.join("up.sql").is_file()) =>
        {
            Layout::Diesel
        }
        Layout::Auto
            if entries
                .iter()
                .any(|(p, is_dir)| !is_dir && name(p).ends_with(".sql"))
                && entries
                    .iter()
                    .filter(|(p, is_dir)| !is_dir && name(p).ends_with(".sql"))
                    .all(|(p, _)| refinery_name(&name(p)).is_some()) =>
        {
            Layout::Refinery
        }
        Layout::Auto
            if entries
                .iter()
                .any(|(p, _)| name(p).ends_with(".up.sql") || name(p).ends_with(".down.sql")) =>
        {
            Layout::Sqlx
        }
        Layout::Auto
            if sqlx_timestamped(
                entries
                    .iter()
                    .filter(|(_, is_dir)| !is_dir)
                    .map(|(p, _)| name(p)),
            ) =>
        {
            Layout::Sqlx
        }
        Layout::Auto => Layout::Plain,
        other => other,
    };
    let read_file = |path: PathBuf| -> Result<SqlFile, Error> {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::io("failed to read migration", &path, e))?;
        Ok(SqlFile {
            path,
            text,
            outside_transaction: false,
        })
    };
    match layout {
        Layout::Plain | Layout::Auto => {
            let files = entries
                .into_iter()
                .filter(|(p, is_dir)| !is_dir && p.extension().is_some_and(|e| e == "sql"))
                .map(|(p, _)| read_file(p))
                .collect::<Result<_, _>>()?;
            Ok(Read {
                layout: Layout::Plain,
                files,
                history: None,
            })
        }
        Layout::Sqlx => {
            // As sqlx's `resolve_blocking`: `<i64>_<description>.sql`, other files ignored.
            let mut migrations = Vec::new();
            for (path, is_dir) in entries {
                let file_name = name(&path);
                let Some((version, rest)) = file_name.split_once('_') else {
                    continue;
                };
                if is_dir || !rest.ends_with(".sql") || rest.ends_with(".down.sql") {
                    continue;
                }
                let version: i64 = version.parse().map_err(|_| {
                    layout_error(
                        dir,
                        format!("`{file_name}` has no integer version before its first `_`"),
                        "name sqlx migrations `<version>_<description>.sql` (e.g. `20240101000000_users.sql`)",
                    )
                })?;
                let suffix = if rest.ends_with(".up.sql") {
                    ".up.sql"
                } else {
                    ".sql"
                };
                let description = rest.trim_end_matches(suffix).replace('_', " ");
                let mut file = read_file(path)?;
                // As sqlx reads it: the file's first line.
                file.outside_transaction = file.text.starts_with("-- no-transaction");
                migrations.push((version, description, file));
            }
            migrations.sort_by_key(|(version, _, _)| *version);
            unique_versions(dir, migrations.iter().map(|(version, _, _)| *version))?;
            let history = sqlx_history(
                "_sqlx_migrations",
                migrations.iter().map(|(version, description, file)| {
                    (
                        *version,
                        description.as_str(),
                        Sha384::digest(file.text.as_bytes()).to_vec(),
                    )
                }),
            );
            Ok(Read {
                layout,
                files: migrations.into_iter().map(|(_, _, file)| file).collect(),
                history: Some(history),
            })
        }
        Layout::Refinery => {
            // As refinery's `find_migration_files` and `Migration::unapplied`.
            let mut migrations = Vec::new();
            for (path, is_dir) in entries {
                let file_name = name(&path);
                if is_dir || !(file_name.ends_with(".sql") || file_name.ends_with(".rs")) {
                    continue;
                }
                let Some((version, migration_name)) = refinery_name(&file_name) else {
                    return Err(layout_error(
                        dir,
                        format!("`{file_name}` is not named as refinery names migrations"),
                        "name them `V<version>__<name>.sql` (e.g. `V1__create_users.sql`)",
                    ));
                };
                if file_name.ends_with(".rs") {
                    return Err(layout_error(
                        dir,
                        format!(
                            "`{file_name}` is a migration written in Rust, which pgharness cannot run"
                        ),
                        "write it as SQL, or build the schema in the test (`migrations = false`)",
                    ));
                }
                let mut file = read_file(path)?;
                // As refinery reads it: the directive anywhere in the file.
                file.outside_transaction = file.text.contains("refinery:noTransaction");
                migrations.push((version, migration_name, file));
            }
            migrations.sort_by_key(|(version, _, _)| *version);
            unique_versions(
                dir,
                migrations.iter().map(|(version, _, _)| i64::from(*version)),
            )?;
            let mut history = String::from(
                "CREATE TABLE refinery_schema_history (version INT4 PRIMARY KEY, name VARCHAR(255), applied_on VARCHAR(255), checksum VARCHAR(255));\n",
            );
            if !migrations.is_empty() {
                let rows: Vec<String> = migrations
                    .iter()
                    .map(|(version, migration_name, file)| {
                        format!(
                            "({version}, {}, to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), '{}')",
                            quote_literal(migration_name),
                            refinery_checksum(migration_name, *version, &file.text)
                        )
                    })
                    .collect();
                history.push_str(&format!(
                    "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) VALUES {};\n",
                    rows.join(", ")
                ));
            }
            Ok(Read {
                layout,
                files: migrations.into_iter().map(|(_, _, file)| file).collect(),
                history: Some(history),
            })
        }
        Layout::Diesel => {
            // As diesel_migrations: each directory with an `up.sql` is a migration, its
            // version the directory name's part before the first `_`, dashes removed.
            let mut files = Vec::new();
            let mut versions = Vec::new();
            for (path, is_dir) in entries {
                let up = path.join("up.sql");
                if !is_dir || !up.is_file() {
                    continue;
                }
                let dir_name = name(&path);
                let version = dir_name
                    .split('_')
                    .next()
                    .unwrap_or_default()
                    .replace('-', "");
                if version.is_empty() || version.len() > 50 {
                    return Err(layout_error(
                        dir,
                        format!("`{dir_name}` has no version before its first `_`"),
                        "name diesel migrations `<version>_<name>/up.sql` (e.g. `2024-01-01-000000_create_users`)",
                    ));
                }
                versions.push(version);
                files.push(read_file(up)?);
            }
            let mut history = String::from(
                "CREATE TABLE __diesel_schema_migrations (version VARCHAR(50) PRIMARY KEY NOT NULL, run_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP);\n",
            );
            if !versions.is_empty() {
                let rows: Vec<String> = versions
                    .iter()
                    .map(|v| format!("({})", quote_literal(v)))
                    .collect();
                history.push_str(&format!(
                    "INSERT INTO __diesel_schema_migrations (version) VALUES {};\n",
                    rows.join(", ")
                ));
            }
            Ok(Read {
                layout,
                files,
                history: Some(history),
            })
        }
    }
}

/// `_sqlx_migrations` as sqlx creates it, with a row per applied migration `(version,
/// description, checksum)` as sqlx's migrator writes it.
pub(crate) fn sqlx_history<'a>(
    table: &str,
    rows: impl Iterator<Item = (i64, &'a str, Vec<u8>)>,
) -> String {
    let mut history = format!(
        "CREATE TABLE {table} (version BIGINT PRIMARY KEY, description TEXT NOT NULL, installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), success BOOLEAN NOT NULL, checksum BYTEA NOT NULL, execution_time BIGINT NOT NULL);\n",
    );
    let rows: Vec<String> = rows
        .map(|(version, description, checksum)| {
            format!(
                "({version}, {}, true, '\\x{}'::bytea, 0)",
                quote_literal(description),
                hex::encode(checksum)
            )
        })
        .collect();
    if !rows.is_empty() {
        history.push_str(&format!(
            "INSERT INTO {table} (version, description, success, checksum, execution_time) VALUES {};\n",
            rows.join(", ")
        ));
    }
    history
}

/// One up migration of an embedded sqlx `Migrator`, whichever sqlx version made it.
#[cfg(any(feature = "sqlx", feature = "sqlx09"))]
struct Embedded<'a> {
    version: i64,
    description: &'a str,
    sql: &'a str,
    checksum: &'a [u8],
    no_tx: bool,
}

/// Embedded migrations as files to apply in version order, with `table` (the migrator's
/// history table) holding the checksums the migrator computed; `-- no-transaction` ones run
/// outside the schema's transaction, as in the directory layout.
#[cfg(any(feature = "sqlx", feature = "sqlx09"))]
fn embedded(table: &str, mut migrations: Vec<Embedded<'_>>) -> Read {
    migrations.sort_by_key(|m| m.version);
    let history = sqlx_history(
        table,
        migrations
            .iter()
            .map(|m| (m.version, m.description, m.checksum.to_vec())),
    );
    Read {
        layout: Layout::Sqlx,
        files: migrations
            .iter()
            .map(|m| SqlFile {
                path: PathBuf::from(format!(
                    "{}_{}.sql",
                    m.version,
                    m.description.replace(' ', "_")
                )),
                text: m.sql.to_owned(),
                outside_transaction: m.no_tx,
            })
            .collect(),
        history: Some(history),
    }
}

/// The up migrations of an embedded sqlx 0.8 `Migrator` (`sqlx::migrate!()`, or built at
/// run time), as [`embedded`] reads them, its history in `_sqlx_migrations`.
#[cfg(feature = "sqlx")]
pub(crate) fn sqlx_migrator(migrator: &sqlx::migrate::Migrator) -> Read {
    let migrations = migrator
        .migrations
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| Embedded {
            version: m.version,
            description: m.description.as_ref(),
            sql: m.sql.as_ref(),
            checksum: m.checksum.as_ref(),
            no_tx: m.no_tx,
        })
        .collect();
    embedded("_sqlx_migrations", migrations)
}

/// [`sqlx_migrator`] for sqlx 0.9's `Migrator` (the `sqlx09` feature): its history table is
/// the one it names (`table_name`, `_sqlx_migrations` by default), and a migrator that runs
/// outside transactions (`no_tx`) runs every file so. A history table or schemas of its own
/// outside the test's schema (a qualified `table_name`, `create_schemas`) would be shared by
/// every test: refused, naming them.
#[cfg(feature = "sqlx09")]
pub(crate) fn sqlx09_migrator(migrator: &sqlx09::migrate::Migrator) -> Result<Read, String> {
    let table = migrator.table_name.as_ref();
    if table.contains('.') || !migrator.create_schemas.is_empty() {
        return Err(format!(
            "its history table `{table}` or schemas {:?} are outside the test's schema, where every test would share them",
            migrator.create_schemas
        ));
    }
    let migrations = migrator
        .migrations
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| Embedded {
            version: m.version,
            description: m.description.as_ref(),
            sql: m.sql.as_str(),
            checksum: m.checksum.as_ref(),
            no_tx: m.no_tx || migrator.no_tx,
        })
        .collect();
    Ok(embedded(table, migrations))
}

/// A refinery migration's version and name from its file name: `V<i32>__<word chars>` (or
/// `U…`, unversioned, which a fresh schema applies in the same order), then `.sql` or `.rs`.
fn refinery_name(file_name: &str) -> Option<(i32, String)> {
    let stem = file_name
        .strip_suffix(".sql")
        .or_else(|| file_name.strip_suffix(".rs"))?;
    let rest = stem.strip_prefix('V').or_else(|| stem.strip_prefix('U'))?;
    let (version, name) = rest.split_once("__")?;
    let version: i32 = version.parse().ok()?;
    let word = |c: char| c.is_alphanumeric() || c == '_';
    (!name.is_empty() && name.chars().all(word)).then(|| (version, name.to_owned()))
}

/// refinery's checksum of a migration: SipHash-1-3 (keys 0) over its name, version and SQL
/// as Rust's `Hash` feeds them (a `str` is its bytes and `0xff`; an `i32` its native-endian
/// bytes), printed as a `u64`.
fn refinery_checksum(name: &str, version: i32, sql: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = siphasher::sip::SipHasher13::new();
    name.hash(&mut hasher);
    version.hash(&mut hasher);
    sql.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod detection {
    use super::*;

    fn detected(files: &[&str]) -> Layout {
        let dir = std::env::temp_dir().join(format!("pgharness-layout-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        for file in files {
            std::fs::write(dir.join(file), "SELECT 1;").unwrap();
        }
        let layout = read(&dir, Layout::Auto).unwrap().layout;
        std::fs::remove_dir_all(&dir).unwrap();
        layout
    }

    #[test]
    fn auto_reads_timestamped_migrations_as_sqlx_does_and_numbered_ones_as_plain() {
        assert_eq!(
            detected(&[
                "20200823135036_create_subscriptions.sql",
                "20210307181858_add_status.sql"
            ]),
            Layout::Sqlx
        );
        assert_eq!(
            detected(&["0001_users.sql", "0002_todos.sql"]),
            Layout::Plain
        );
        assert_eq!(
            detected(&["20200823135036_a.sql", "notes.sql"]),
            Layout::Plain
        );
        assert_eq!(detected(&["1_a.up.sql", "1_a.down.sql"]), Layout::Sqlx);
        assert_eq!(detected(&["V1__a.sql"]), Layout::Refinery);
    }
}
