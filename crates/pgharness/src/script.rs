//! SQL scripts assembled from files (migrations, fixtures) into one batch, and errors
//! mapped back to the file and line they came from.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::Error;
use crate::layout::Layout;

/// One SQL file's text and where it came from.
#[derive(Clone, Debug)]
pub(crate) struct SqlFile {
    pub(crate) path: PathBuf,
    pub(crate) text: String,
    /// A migration its tool runs outside any transaction (sqlx's `-- no-transaction`,
    /// refinery's `refinery:noTransaction`): applied as it is, on its own, between the
    /// transactions of the schema's creation (`pool::create`).
    pub(crate) outside_transaction: bool,
}

/// The migrations of a directory, read as its tool reads them (see `layout`).
#[derive(Clone, Debug)]
pub(crate) struct Migrations {
    /// The files to apply, in order, with their own transaction control blanked out.
    pub(crate) files: Vec<SqlFile>,
    /// Statements that fill the tool's history table after the files (sqlx, diesel).
    pub(crate) history: Option<String>,
    /// SHA-256 over the layout, every file's name and content, hex; identifies the
    /// migration set.
    pub(crate) hash: String,
    /// The directory they came from (the pool tells newer sets of the same source by it).
    pub(crate) source: String,
    /// Migrations written in code, run after `files` (which are then none).
    pub(crate) code: Option<crate::code_migrations::CodeMigrations>,
}

impl Migrations {
    /// Reads the migrations of `dir` in `layout`. A missing directory is an error naming it
    /// (a test without migrations says so with `without_migrations()`).
    pub(crate) fn load(dir: &Path, layout: Layout) -> Result<Migrations, Error> {
        if !dir.is_dir() {
            return Err(Error::Setting {
                name: "migrations".into(),
                origin: "PGHARNESS_MIGRATIONS, the `migrations` key, or TestDb::builder().migrations(..)".into(),
                problem: format!("the migrations directory {} does not exist", dir.display()),
                fix: "create it (`*.sql` files, applied in name order), point PGHARNESS_MIGRATIONS at yours, or use TestDb::builder().without_migrations()".into(),
            });
        }
        let read = crate::layout::read(dir, layout)?;
        Ok(Migrations::from_read(read, dir, dir.display().to_string()))
    }

    /// The migrations of an embedded sqlx `Migrator`; `source` names where it comes from
    /// (the pool tells newer sets of the same source by it).
    #[cfg(feature = "sqlx")]
    pub(crate) fn from_sqlx(migrator: &sqlx::migrate::Migrator, source: String) -> Migrations {
        let read = crate::layout::sqlx_migrator(migrator);
        Migrations::from_read(read, Path::new(""), source)
    }

    /// Migrations in code: no files, keyed by the code's source and key.
    pub(crate) fn from_code(code: crate::code_migrations::CodeMigrations) -> Migrations {
        let mut hasher = Sha256::new();
        hasher.update(b"code\0");
        hasher.update((code.source.len() as u64).to_be_bytes());
        hasher.update(code.source.as_bytes());
        hasher.update(code.key.as_bytes());
        Migrations {
            files: Vec::new(),
            history: None,
            hash: hex::encode(&hasher.finalize()[..8]),
            source: code.source.clone(),
            code: Some(code),
        }
    }

    /// The migrations of an embedded sqlx 0.9 `Migrator` (see `layout::sqlx09_migrator`).
    #[cfg(feature = "sqlx09")]
    pub(crate) fn from_sqlx09(
        migrator: &sqlx09::migrate::Migrator,
        source: String,
    ) -> Result<Migrations, String> {
        let read = crate::layout::sqlx09_migrator(migrator)?;
        Ok(Migrations::from_read(read, Path::new(""), source))
    }

    fn from_read(read: crate::layout::Read, dir: &Path, source: String) -> Migrations {
        let mut hasher = Sha256::new();
        hasher.update(read.layout.as_str().as_bytes());
        for file in &read.files {
            let name = file
                .path
                .strip_prefix(dir)
                .unwrap_or(&file.path)
                .to_string_lossy();
            hasher.update((name.len() as u64).to_be_bytes());
            hasher.update(name.as_bytes());
            hasher.update((file.text.len() as u64).to_be_bytes());
            hasher.update(file.text.as_bytes());
        }
        let files = read
            .files
            .into_iter()
            .map(|file| SqlFile {
                text: if file.outside_transaction {
                    file.text
                } else {
                    without_transaction_control(&file.text)
                },
                path: file.path,
                outside_transaction: file.outside_transaction,
            })
            .collect();
        Migrations {
            files,
            history: read.history,
            hash: hex::encode(&hasher.finalize()[..8]),
            source,
            code: None,
        }
    }
}

/// Reads `dir/<name>.sql` for each fixture name.
pub(crate) fn load_fixtures(dir: &Path, names: &[String]) -> Result<Vec<SqlFile>, Error> {
    names
        .iter()
        .map(|name| {
            if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
                return Err(Error::Setting {
                    name: "fixture".into(),
                    origin: "TestDb::builder().fixtures(..)".into(),
                    problem: format!("`{name}` is not a fixture name"),
                    fix: format!("name a file in {} without its .sql ending", dir.display()),
                });
            }
            let path = dir.join(format!("{name}.sql"));
            let text = std::fs::read_to_string(&path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Error::Setting {
                        name: "fixture".into(),
                        origin: "TestDb::builder().fixtures(..)".into(),
                        problem: format!(
                            "there is no fixture `{name}` ({} does not exist)",
                            path.display()
                        ),
                        fix: format!("create it, or use one of the files in {}", dir.display()),
                    }
                } else {
                    Error::io("failed to read fixture", &path, e)
                }
            })?;
            Ok(SqlFile {
                path,
                text,
                outside_transaction: false,
            })
        })
        .collect()
}

/// A batch of SQL sent as one simple query, remembering which characters came from which
/// file so that a server error position can be named as `file:line`.
#[derive(Default)]
pub(crate) struct Batch {
    text: String,
    chars: usize,
    spans: Vec<Span>,
}

struct Span {
    start_char: usize,
    end_char: usize,
    kind: &'static str,
    path: PathBuf,
    text_start: usize,
}

impl Batch {
    /// Appends harness SQL (not from a file).
    pub(crate) fn push(&mut self, sql: &str) {
        self.text.push_str(sql);
        self.text.push('\n');
        self.chars += sql.chars().count() + 1;
    }

    /// Appends a file's SQL, remembering where it stands.
    pub(crate) fn push_file(&mut self, kind: &'static str, file: &SqlFile) {
        let start_char = self.chars;
        let text_start = self.text.len();
        self.push(&file.text);
        // A file without a trailing `;` must not swallow what follows.
        self.push(";");
        self.spans.push(Span {
            start_char,
            end_char: start_char + file.text.chars().count(),
            kind,
            path: file.path.clone(),
            text_start,
        });
    }

    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// Turns a driver error into an error naming the file and line, when the server gave a
    /// position inside one of the files; otherwise into a plain Postgres error.
    pub(crate) fn explain(&self, action: &str, error: tokio_postgres::Error) -> Error {
        if let Some(location) = self.naming_foreign_schema(&error) {
            return Error::Sql {
                kind: "migration",
                location,
                error,
            };
        }
        let position = match error.as_db_error().and_then(|db| db.position()) {
            Some(tokio_postgres::error::ErrorPosition::Original(position)) => *position as usize,
            _ => return self.explain_by_statement(action, error),
        };
        let index = position.saturating_sub(1); // 1-based characters
        for span in &self.spans {
            if (span.start_char..=span.end_char).contains(&index) {
                let offset = index - span.start_char;
                let text = &self.text[span.text_start..];
                let line = 1 + text.chars().take(offset).filter(|&c| c == '\n').count();
                return Error::Sql {
                    kind: span.kind,
                    location: format!("{}:{line}", span.path.display()),
                    error,
                };
            }
        }
        Error::postgres(action, error)
    }

    /// For migrations refused for writing outside the test's schema (`PH002`, the foreign
    /// schemas in its detail): `path:line` of the first line of a file that names one.
    fn naming_foreign_schema(&self, error: &tokio_postgres::Error) -> Option<String> {
        let db = error.as_db_error()?;
        if db.code().code() != FOREIGN_OBJECTS_SQLSTATE {
            return None;
        }
        let schemas: Vec<String> = db
            .detail()?
            .split_whitespace()
            .map(str::to_lowercase)
            .collect();
        self.spans.iter().find_map(|span| {
            let text: String = self.text[span.text_start..]
                .chars()
                .take(span.end_char - span.start_char)
                .collect();
            text.lines().enumerate().find_map(|(i, line)| {
                let line = line.to_lowercase();
                schemas
                    .iter()
                    .any(|schema| names_schema(&line, schema))
                    .then(|| format!("{}:{}", span.path.display(), i + 1))
            })
        })
    }

    /// Errors without a position (e.g. a missing table at run time) name the files only
    /// when there is exactly one.
    fn explain_by_statement(&self, action: &str, error: tokio_postgres::Error) -> Error {
        if let [span] = self.spans.as_slice() {
            return Error::Sql {
                kind: span.kind,
                location: span.path.display().to_string(),
                error,
            };
        }
        let files: Vec<String> = self
            .spans
            .iter()
            .map(|s| s.path.display().to_string())
            .collect();
        if files.is_empty() {
            Error::postgres(action, error)
        } else {
            Error::postgres(format!("{action} (running {})", files.join(", ")), error)
        }
    }
}

/// The SQLSTATE of `refuse_written_elsewhere` (ledger.sql).
const FOREIGN_OBJECTS_SQLSTATE: &str = "PH002";

/// Whether a (lowercased) line names `schema` as a word: `apalis.jobs`, `schema apalis`.
fn names_schema(line: &str, schema: &str) -> bool {
    line.match_indices(schema).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = line[at + schema.len()..].chars().next();
        let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        !word(before) && !word(after)
    })
}

/// `sql` with its top-level transaction control (`BEGIN`, `START TRANSACTION`, `COMMIT`,
/// `END`) blanked out: a migration that wraps itself in a transaction, as sqlx and diesel
/// accept, runs inside pgharness's own (which makes a schema, migrates and records it in one
/// transaction), where its `COMMIT` would end that transaction half-way. Blanked with spaces,
/// lines kept, so that an error position still points at the file's line. Strings, quoted
/// identifiers, dollar-quoted bodies (a function's `BEGIN … END`) and comments are skipped.
pub(crate) fn without_transaction_control(sql: &str) -> String {
    let chars: Vec<char> = sql.chars().collect();
    let mut out = chars.clone();
    // The words of the current statement outside comments, and where it started.
    let mut words = String::new();
    let mut start = 0;
    let mut i = 0;
    let blank = |out: &mut Vec<char>, words: &str, start: usize, end: usize| {
        let mut parts = words.split_whitespace();
        let first = parts.next().unwrap_or_default().to_ascii_lowercase();
        let second = parts.next().unwrap_or_default().to_ascii_lowercase();
        let control = matches!(first.as_str(), "begin" | "commit" | "end")
            || (first == "start" && second == "transaction");
        if control {
            for c in &mut out[start..end] {
                if *c != '\n' {
                    *c = ' ';
                }
            }
        }
    };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            ';' => {
                blank(&mut out, &words, start, i);
                words.clear();
                start = i + 1;
                i += 1;
            }
            '-' if next == Some('-') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                words.push(' ');
            }
            '/' if next == Some('*') => {
                let mut depth = 0;
                while i < chars.len() {
                    if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                words.push(' ');
            }
            '\'' => {
                // E'…' strings take backslash escapes.
                let escapes = i > 0
                    && matches!(chars[i - 1], 'e' | 'E')
                    && (i < 2 || !(chars[i - 2].is_alphanumeric() || chars[i - 2] == '_'));
                i = after_quoted(&chars, i, '\'', escapes);
                words.push_str(" ' ");
            }
            '"' => {
                i = after_quoted(&chars, i, '"', false);
                words.push_str(" \" ");
            }
            '$' if !words.ends_with(|c: char| c.is_alphanumeric() || c == '_') => {
                // A dollar-quote tag: `$$` or `$tag$` (a `$1` parameter is not one).
                let tag_end = chars[i + 1..]
                    .iter()
                    .position(|c| !(c.is_alphanumeric() || *c == '_'))
                    .map(|n| i + 1 + n);
                match tag_end {
                    Some(end)
                        if chars[end] == '$'
                            && !chars.get(i + 1).is_some_and(|c| c.is_ascii_digit()) =>
                    {
                        let tag: String = chars[i..=end].iter().collect();
                        let body_start = end + 1;
                        let rest: String = chars[body_start..].iter().collect();
                        match rest.find(&tag) {
                            Some(offset) => {
                                i = body_start
                                    + rest[..offset].chars().count()
                                    + tag.chars().count();
                            }
                            None => i = chars.len(),
                        }
                        words.push_str(" $ ");
                    }
                    _ => {
                        words.push(c);
                        i += 1;
                    }
                }
            }
            _ => {
                words.push(c);
                i += 1;
            }
        }
    }
    blank(&mut out, &words, start, chars.len());
    out.into_iter().collect()
}

/// The index after a run quoted by `quote` that starts at `start` (a doubled quote stands
/// for itself; with `escapes`, as in `E'…'`, so does a backslash and what follows it).
fn after_quoted(chars: &[char], start: usize, quote: char, escapes: bool) -> usize {
    let mut i = start + 1;
    while i < chars.len() {
        if escapes && chars[i] == '\\' {
            i += 2;
        } else if chars[i] == quote {
            if chars.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return i + 1;
            }
        } else {
            i += 1;
        }
    }
    i
}

/// SQL quoting, by the protocol crate tokio-postgres is built on: an identifier always in
/// double quotes, a literal in single quotes (as ` E'…'` when it holds a backslash, so it
/// means the same whatever `standard_conforming_strings` says).
pub(crate) use postgres_protocol::escape::{
    escape_identifier as quote_ident, escape_literal as quote_literal,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pgharness-script-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn migrations_apply_in_name_order_and_hash_their_content() {
        let dir = temp_dir(&[("0002_b.sql", "B"), ("0001_a.sql", "A"), ("notes.txt", "x")]);
        let migrations = Migrations::load(&dir, Layout::Auto).unwrap();
        let names: Vec<_> = migrations.files.iter().map(|f| f.text.as_str()).collect();
        assert_eq!(names, ["A", "B"]);
        let before = migrations.hash.clone();
        std::fs::write(dir.join("0002_b.sql"), "B2").unwrap();
        assert_ne!(Migrations::load(&dir, Layout::Auto).unwrap().hash, before);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_migration_directory_is_an_error_naming_it_and_the_fixes() {
        let error = Migrations::load(Path::new("/nonexistent/pgharness"), Layout::Auto)
            .unwrap_err()
            .to_string();
        assert!(error.contains("/nonexistent/pgharness"), "{error}");
        assert!(
            error.contains("PGHARNESS_MIGRATIONS") && error.contains("without_migrations"),
            "{error}"
        );
    }

    #[test]
    fn missing_fixture_names_the_file_and_the_directory() {
        let dir = temp_dir(&[("users.sql", "select 1")]);
        let error = load_fixtures(&dir, &["nope".into()])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("no fixture `nope`") && error.contains("nope.sql"),
            "{error}"
        );
        let error = load_fixtures(&dir, &["../etc/passwd".into()])
            .unwrap_err()
            .to_string();
        assert!(error.contains("not a fixture name"), "{error}");
        assert_eq!(
            load_fixtures(&dir, &["users".into()]).unwrap()[0].text,
            "select 1"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_file_s_own_transaction_control_is_blanked_and_nothing_else() {
        let sql = "BEGIN;\nCREATE TABLE a (b text DEFAULT 'commit;');\n-- COMMIT; in a comment\n\
                   CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$\nBEGIN\n  RETURN 1;\nEND\n$body$;\n\
                   /* nested /* END; */ */ start  TRANSACTION ISOLATION LEVEL SERIALIZABLE;\n\
                   INSERT INTO a VALUES (E'it''s \\' ; end'), ($$;COMMIT;$$);\nCOMMIT";
        let out = without_transaction_control(sql);
        assert_eq!(out.chars().count(), sql.chars().count());
        assert_eq!(out.lines().count(), sql.lines().count());
        assert_eq!(out.lines().next().unwrap().trim(), ";");
        assert!(out.contains("DEFAULT 'commit;'"), "{out}");
        assert!(out.contains("BEGIN\n  RETURN 1;\nEND"), "{out}");
        assert!(!out.contains("TRANSACTION ISOLATION"), "{out}");
        assert!(out.contains("($$;COMMIT;$$)"), "{out}");
        assert!(!out.trim_end().ends_with("COMMIT"), "{out}");
        // Nothing else is touched.
        let plain = "CREATE TABLE ends (id int); SELECT $1::int; SELECT 'x'";
        assert_eq!(without_transaction_control(plain), plain);
    }
}
