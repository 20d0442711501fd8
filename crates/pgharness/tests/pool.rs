//! The schema pool: a recycled schema is indistinguishable from a fresh one, or it is
//! dropped because its test changed it; concurrent claims never share a schema; a changed
//! migration set never gets an old schema, and the reaper removes the old set's pool.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    admin, child_binary, configured_server, ledger_status, own_migrations, schema_exists,
};
use pgharness::ledger::{self, ReapScope};
use pgharness::{Settings, Teardown, TestDb};
use tokio_postgres::Client;

const MIGRATION: &str = "
CREATE TABLE accounts (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, email text UNIQUE NOT NULL);
CREATE TABLE orders (id bigserial PRIMARY KEY,
                     account_id bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
                     total numeric NOT NULL DEFAULT 0);
CREATE TABLE order_lines (id bigserial PRIMARY KEY, order_id bigint NOT NULL REFERENCES orders (id),
                          sku text NOT NULL);
CREATE TABLE audit (id bigserial PRIMARY KEY, what text NOT NULL);
CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL);
INSERT INTO countries VALUES ('fr', 'France'), ('de', 'Germany');
ALTER TABLE accounts ADD COLUMN country text REFERENCES countries (code);
CREATE TABLE plans (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL,
                    label text GENERATED ALWAYS AS (upper(name)) STORED,
                    parent bigint REFERENCES plans (id));
INSERT INTO plans (name) VALUES ('free'), ('pro');
UPDATE plans SET parent = 1 WHERE name = 'pro';
CREATE FUNCTION log_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO audit (what) VALUES ('order ' || NEW.id); RETURN NEW; END $$;
CREATE TRIGGER orders_audit AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION log_order();
CREATE VIEW order_totals AS SELECT account_id, sum(total) AS total FROM orders GROUP BY account_id;
CREATE SEQUENCE invoice_no START 1000;
";

/// Operations a test may run: (SQL, whether it changes the structure, which makes the
/// schema dropped rather than recycled).
const OPS: &[(&str, bool)] = &[
    (
        "INSERT INTO accounts (email) VALUES ('a' || random() || '@x')",
        false,
    ),
    (
        "INSERT INTO orders (account_id, total) SELECT id, 10 FROM accounts LIMIT 1",
        false,
    ),
    (
        "INSERT INTO order_lines (order_id, sku) SELECT id, 's' FROM orders LIMIT 1",
        false,
    ),
    (
        "DELETE FROM accounts WHERE id IN (SELECT id FROM accounts LIMIT 1)",
        false,
    ),
    ("UPDATE orders SET total = total + 1", false),
    ("DELETE FROM order_lines", false),
    ("SELECT nextval('invoice_no')", false),
    ("SELECT setval('orders_id_seq', 500)", false),
    ("TRUNCATE order_lines, orders CASCADE", false),
    (
        "BEGIN; INSERT INTO audit (what) VALUES ('rolled back'); ROLLBACK",
        false,
    ),
    // Seed rows: put back as they were.
    ("UPDATE countries SET name = 'X' WHERE code = 'fr'", false),
    ("INSERT INTO countries VALUES ('it', 'Italy')", false),
    ("DELETE FROM countries WHERE code = 'de'", false),
    ("UPDATE accounts SET country = 'fr'", false),
    ("INSERT INTO plans (name, parent) VALUES ('team', 2)", false),
    ("UPDATE plans SET name = 'premium' WHERE id = 2", false),
    ("DELETE FROM plans WHERE id = 2", false),
    ("DELETE FROM plans", false),
    ("ALTER TABLE accounts ADD COLUMN nick text", true),
    ("CREATE INDEX ON orders (total)", true),
    (
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        true,
    ),
    (
        "CREATE OR REPLACE VIEW order_totals AS SELECT account_id, sum(total) AS total, count(*) AS n FROM orders GROUP BY account_id",
        true,
    ),
    ("CREATE TYPE mood AS ENUM ('ok')", true),
    ("DROP TABLE order_lines", true),
    ("GRANT SELECT ON accounts TO PUBLIC", true),
    ("ALTER TABLE orders DISABLE TRIGGER orders_audit", true),
    ("ALTER SEQUENCE invoice_no INCREMENT BY 5", true),
    ("COMMENT ON TABLE accounts IS 'changed'", true),
    (
        "ALTER TABLE accounts ALTER COLUMN email SET DEFAULT 'd@x'",
        true,
    ),
    (
        "CREATE OR REPLACE FUNCTION log_order() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
        true,
    ),
    (
        "ALTER TABLE countries ADD CONSTRAINT short_code CHECK (length(code) = 2)",
        true,
    ),
];

/// Everything a test could observe of its schema, as text, independent of the schema's
/// name: relations, columns, types, defaults, constraints, indexes, triggers (and whether
/// they are enabled), functions, views, comments, sequences with their state, ACLs,
/// owners, and each table's rows.
async fn observe(client: &Client) -> String {
    let schema: String = client
        .query_one("SELECT current_schema()", &[])
        .await
        .unwrap()
        .get(0);
    let catalog = "
      WITH s AS (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
      SELECT line FROM (
        SELECT 'schema owner=' || pg_get_userbyid(nspowner) || ' acl=' || coalesce(nspacl::text, '') AS line
          FROM pg_namespace WHERE oid = (SELECT oid FROM s)
        UNION ALL
        SELECT 'rel ' || relname || ' ' || relkind::text || ' owner=' || pg_get_userbyid(relowner)
               || ' acl=' || coalesce(relacl::text, '') || ' opts=' || coalesce(reloptions::text, '')
               || ' rls=' || relrowsecurity || ' comment=' || coalesce(obj_description(oid, 'pg_class'), '')
          FROM pg_class WHERE relnamespace = (SELECT oid FROM s)
        UNION ALL
        SELECT 'col ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
               || ' notnull=' || a.attnotnull || ' identity=' || a.attidentity::text
               || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '') || ' acl=' || coalesce(a.attacl::text, '')
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE c.relnamespace = (SELECT oid FROM s) AND a.attnum > 0 AND NOT a.attisdropped
        UNION ALL
        SELECT 'constraint ' || c.relname || ' ' || k.conname || ' ' || pg_get_constraintdef(k.oid)
          FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid WHERE c.relnamespace = (SELECT oid FROM s)
        UNION ALL
        SELECT 'index ' || pg_get_indexdef(i.indexrelid)
          FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid WHERE c.relnamespace = (SELECT oid FROM s)
        UNION ALL
        SELECT 'trigger ' || pg_get_triggerdef(t.oid) || ' enabled=' || t.tgenabled::text
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = (SELECT oid FROM s) AND NOT t.tgisinternal
        UNION ALL
        SELECT 'function ' || pg_get_functiondef(p.oid) || ' acl=' || coalesce(p.proacl::text, '')
          FROM pg_proc p WHERE p.pronamespace = (SELECT oid FROM s)
        UNION ALL
        SELECT 'view ' || c.relname || ' ' || pg_get_viewdef(c.oid)
          FROM pg_class c WHERE c.relnamespace = (SELECT oid FROM s) AND c.relkind = 'v'
        UNION ALL
        SELECT 'type ' || t.typname || ' ' || t.typtype::text
          FROM pg_type t WHERE t.typnamespace = (SELECT oid FROM s)
        UNION ALL
        SELECT 'sequence ' || c.relname || ' ' || q.seqstart || ' ' || q.seqincrement || ' ' || q.seqcache
          FROM pg_sequence q JOIN pg_class c ON c.oid = q.seqrelid WHERE c.relnamespace = (SELECT oid FROM s)
      ) lines ORDER BY line";
    let mut out: Vec<String> = client
        .query(catalog, &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let relations = client
        .query(
            "SELECT relname, relkind::text FROM pg_class
              WHERE relnamespace = current_schema()::regnamespace AND relkind IN ('r', 'S')
              ORDER BY relname",
            &[],
        )
        .await
        .unwrap();
    for row in relations {
        let (name, kind): (String, String) = (row.get(0), row.get(1));
        let sql = if kind == "S" {
            format!("SELECT last_value || ' ' || is_called FROM \"{name}\"")
        } else {
            format!(
                "SELECT count(*) || ' ' || coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '') FROM \"{name}\" t"
            )
        };
        let state: String = client.query_one(&sql, &[]).await.unwrap().get(0);
        out.push(format!("state {name} {state}"));
    }
    out.join("\n").replace(&schema, "<schema>")
}

fn inline_settings() -> Settings {
    let mut settings = Settings::load().unwrap();
    settings.teardown = Teardown::Inline;
    settings
}

async fn acquire(dir: &Path) -> TestDb {
    TestDb::builder()
        .settings(inline_settings())
        .migrations(dir)
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_schema_pooled_by_another_role_is_not_claimed() {
    let server = configured_server().await;
    let admin = admin(&server).await;
    let dir = own_migrations("owner", "CREATE TABLE t (id int);");
    // The admin's schema goes back to the pool.
    let db = acquire(&dir).await;
    let admins = db.schema().to_owned();
    drop(db);
    assert_eq!(
        ledger_status(&admin, &admins).await.as_deref(),
        Some("ready")
    );
    // Another role with the same migrations gets a schema of its own, and can use it.
    let role = common::Role::create(&admin, "other", &server).await;
    let settings = role.settings();
    let theirs = TestDb::builder()
        .settings(settings)
        .migrations(&dir)
        .build()
        .await
        .expect("the other role acquires");
    assert_ne!(theirs.schema(), admins, "claimed the admin's schema");
    theirs
        .client()
        .execute("INSERT INTO t VALUES (1)", &[])
        .await
        .expect("its own table");
    drop(theirs);
    assert_eq!(
        ledger_status(&admin, &admins).await.as_deref(),
        Some("ready")
    );
    // Theirs went back to their own pool (renamed by its recycle, or about to be).
    let theirs: i64 = admin
        .query_one(
            r"SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'p\_%'
                AND nspowner = (SELECT oid FROM pg_roles WHERE rolname = $1)",
            &[&role.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(theirs, 1);
    role.drop_all(&admin).await;
}

#[tokio::test]
async fn created_and_claimed_schemas_set_the_same_search_path_as_a_new_connection() {
    let dir = own_migrations("search-path", "CREATE TABLE t (id int);");
    // Its own migration set: the first acquire creates; the second claims the first's
    // schema if it is back in the pool by then, else creates too.
    for path in ["first", "second"] {
        let db = acquire(&dir).await;
        let expected = format!("{},public", db.schema());
        let on_acquire: String = db
            .client()
            .query_one("SHOW search_path", &[])
            .await
            .unwrap()
            .get(0);
        let fresh: String = db
            .connect()
            .await
            .unwrap()
            .query_one("SHOW search_path", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!([on_acquire, fresh], [expected.clone(), expected], "{path}");
    }
}

#[tokio::test]
async fn a_recycled_schema_is_as_fresh_or_was_dropped_because_it_changed() {
    let server = configured_server().await;
    let admin = admin(&server).await;
    // Its own migration set: the only schema of its pool is the one this test recycles.
    let dir = own_migrations("prop", MIGRATION);
    let db = acquire(&dir).await;
    let fresh = observe(db.client()).await;
    let mut schema = db.schema().to_owned();
    drop(db);
    let (mut recycled, mut dropped, mut seed_put_back) = (0, 0, 0);
    for case in 0..40u64 {
        let seed = 0x9e37_79b9_7f4a_7c15 ^ (case + 1);
        let mut rng = common::Rng(seed);
        // A recycled schema comes back under a new name: none of the last test's
        // sessions can reach it by the old one.
        let renamed = common::current_name(&admin, &schema).await.unwrap();
        assert_ne!(
            renamed, schema,
            "case {case}: a recycled schema keeps its name"
        );
        assert!(!schema_exists(&admin, &schema).await);
        schema = renamed;
        let db = acquire(&dir).await;
        assert_eq!(
            db.schema(),
            schema,
            "case {case}: the pool's one schema is claimed"
        );
        assert_eq!(
            observe(db.client()).await,
            fresh,
            "case {case} (seed {seed:#x}): the claimed schema is not as fresh"
        );
        let mut changed = false;
        let mut applied = Vec::new();
        for _ in 0..1 + rng.below(6) {
            let (sql, ddl) = OPS[rng.below(OPS.len())];
            if db.client().batch_execute(sql).await.is_ok() {
                changed |= ddl;
                applied.push(sql);
            }
        }
        drop(db);
        match ledger_status(&admin, &schema).await.as_deref() {
            Some("ready") => {
                assert!(
                    !changed,
                    "case {case} (seed {seed:#x}): recycled after {applied:#?}"
                );
                recycled += 1;
                if applied
                    .iter()
                    .any(|sql| sql.contains("countries") || sql.contains("plans"))
                {
                    seed_put_back += 1;
                }
            }
            Some("dropped") => {
                assert!(
                    changed,
                    "case {case} (seed {seed:#x}): dropped after only {applied:#?}"
                );
                assert!(!schema_exists(&admin, &schema).await);
                dropped += 1;
                // The next claimant finds none ready and creates one: fresh by construction.
                let db = acquire(&dir).await;
                assert_eq!(
                    observe(db.client()).await,
                    fresh,
                    "case {case}: a created schema differs"
                );
                schema = db.schema().to_owned();
            }
            other => panic!("case {case}: unexpected status {other:?}"),
        }
    }
    // The generator must exercise both outcomes, or the property says little.
    assert!(
        recycled >= 5 && dropped >= 5 && seed_put_back >= 3,
        "recycled {recycled} ({seed_put_back} with seed rows put back), dropped {dropped}"
    );
}

/// The ready schemas of the pool of a migrations directory.
async fn ready_schemas(admin: &Client, dir: &Path) -> Vec<String> {
    admin
        .query(
            &format!(
                "SELECT schema_name FROM {}.ledger WHERE status = 'ready' AND source = $1",
                common::admin_ns()
            ),
            &[&dir.display().to_string()],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Starts `n` test processes that each claim a schema of `dir` and hold it; returns them
/// with the schemas they printed.
fn claimants(dir: &Path, n: usize) -> Vec<(std::process::Child, String)> {
    let mut children: Vec<std::process::Child> = (0..n)
        .map(|_| {
            Command::new(child_binary())
                .arg("claim")
                .env("PGHARNESS_MIGRATIONS", dir)
                .env("PGHARNESS_TEARDOWN", "inline")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("the child runs")
        })
        .collect();
    children
        .iter_mut()
        .map(|child| {
            let mut line = String::new();
            BufReader::new(child.stdout.as_mut().unwrap())
                .read_line(&mut line)
                .unwrap();
            line.trim().to_owned()
        })
        .collect::<Vec<_>>()
        .into_iter()
        .zip(children)
        .map(|(schema, child)| (child, schema))
        .collect()
}

#[tokio::test]
async fn concurrent_claims_from_many_processes_never_share_a_schema() {
    let server = configured_server().await;
    let admin = common::runner(&server).await;
    let dir = own_migrations("race", MIGRATION);
    let warmed = pgharness::pool::warm(
        &admin,
        &common::admin_ns(),
        &dir,
        pgharness::Layout::Auto,
        4,
        4,
    )
    .await
    .unwrap();
    assert_eq!(warmed.created, 4);
    for round in 0..3 {
        // Recycled schemas come back under new names: the ready ones as of this round.
        let ready: HashSet<String> = ready_schemas(&admin, &dir).await.into_iter().collect();
        assert!(ready.len() >= 4, "round {round}: {ready:?}");
        let held = claimants(&dir, 8);
        let schemas: Vec<&String> = held.iter().map(|(_, schema)| schema).collect();
        let distinct: HashSet<&String> = schemas.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            8,
            "round {round}: a schema was handed out twice: {schemas:?}"
        );
        assert!(
            schemas.iter().all(|s| !s.is_empty()),
            "round {round}: {schemas:?}"
        );
        let hits = schemas.iter().filter(|s| ready.contains(**s)).count();
        assert!(
            hits >= 4,
            "round {round}: only {hits} of the 4 ready schemas were claimed"
        );
        for (mut child, _) in held {
            drop(child.stdin.take()); // the sync point: every claim is held until now
            assert!(child.wait().unwrap().success());
        }
    }
}

#[tokio::test]
async fn a_changed_migration_set_never_gets_an_old_schema_and_its_old_pool_is_reaped() {
    let server = configured_server().await;
    let admin = common::runner(&server).await;
    let dir = own_migrations("hash", "CREATE TABLE v1 (id int);");
    pgharness::pool::warm(
        &admin,
        &common::admin_ns(),
        &dir,
        pgharness::Layout::Auto,
        2,
        2,
    )
    .await
    .unwrap();
    let old = ready_schemas(&admin, &dir).await;
    assert_eq!(old.len(), 2);
    let v1 = std::fs::read_to_string(dir.join("0001_app.sql")).unwrap();
    std::fs::write(dir.join("0001_app.sql"), v1.replace("v1", "v2")).unwrap();
    let db = acquire(&dir).await;
    assert!(
        !old.contains(&db.schema().to_owned()),
        "an old schema was handed out"
    );
    db.client().query("SELECT * FROM v2", &[]).await.unwrap();
    drop(db);
    let report = ledger::reap(
        &admin,
        &common::admin_ns(),
        &ReapScope::Stale {
            ttl: Duration::from_secs(3600),
            run_grace: Duration::from_secs(3600),
        },
    )
    .await
    .unwrap();
    for schema in &old {
        assert!(
            report.dropped.contains(schema),
            "{schema} not reaped: {report:?}"
        );
        assert!(!schema_exists(&admin, schema).await);
    }
}
