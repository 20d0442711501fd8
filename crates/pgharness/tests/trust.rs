//! Trust between roles on one server (a shared dev cluster, a URL server several people use):
//! no role can make another role's pgharness drop, delete, alter or execute anything. Each
//! attack is run by a role with nothing but CONNECT and CREATE on the database, as an RDS
//! IAM user has, against another role's ledger.

mod common;

use std::time::Duration;

use common::{Role, admin, admin_ns, configured_server, own_migrations};
use pgharness::ledger::{self, Namespace, ReapScope};
use pgharness::{BackendKind, Teardown, TestDb};

fn denied(result: Result<u64, tokio_postgres::Error>) -> bool {
    matches!(result, Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE))
}

#[tokio::test]
async fn another_role_can_neither_write_the_ledger_nor_replace_its_functions() {
    let server = configured_server().await;
    let admin = admin(&server).await;
    // The admin's ledger exists (a test of its own).
    let dir = own_migrations("trust", "CREATE TABLE t (id int);");
    drop(
        TestDb::builder()
            .migrations(&dir)
            .build()
            .await
            .expect("the admin's test"),
    );
    let ns = admin_ns();
    let hostile = Role::create(&admin, "hostile", &server).await;
    let as_hostile = hostile.client().await;
    // F4: a forged row for a schema of someone else, for the admin's reaper to drop.
    assert!(denied(
        as_hostile
            .execute(
                &format!(
                    "INSERT INTO {ns}.ledger (schema_name, run_id, test_name, attempt, host, pid, lock_key, migrations_hash, status, created_at, ended_at)
                     VALUES ('public', 'x', 'x', 1, 'x', 1, 1, 'x', 'kept', now() - interval '2 hours', now() - interval '2 hours')"
                ),
                &[],
            )
            .await
    ));
    // F5: SQL of its own in a row the admin's recycle reads.
    assert!(denied(
        as_hostile
            .execute(&format!("UPDATE {ns}.ledger SET fresh = '{{}}'"), &[])
            .await
    ));
    assert!(denied(
        as_hostile
            .execute(&format!("DELETE FROM {ns}.acquires"), &[])
            .await
    ));
    // F6: a function of the admin's replaced by its own.
    let replaced = as_hostile
        .batch_execute(&format!(
            "CREATE OR REPLACE FUNCTION {ns}.ready_count(p_hash text) RETURNS bigint
             LANGUAGE sql AS 'SELECT 0'"
        ))
        .await;
    assert!(replaced.is_err(), "the hostile role replaced a function");
    // Reading is denied too: nothing is granted to PUBLIC.
    assert!(denied(
        as_hostile
            .execute(&format!("SELECT 1 FROM {ns}.ledger"), &[])
            .await
    ));
    drop(as_hostile);
    hostile.drop_all(&admin).await;
}

#[tokio::test]
async fn a_namespace_another_role_made_first_is_refused_by_name_and_nothing_in_it_runs() {
    let server = configured_server().await;
    let admin = admin(&server).await;
    let victim = Role::create(&admin, "victim", &server).await;
    let hostile = Role::create(&admin, "hostile", &server).await;
    let as_hostile = hostile.client().await;
    // The hostile role makes the victim's namespace before the victim ever ran a test, with
    // a ledger and a version function that records who called it.
    let ns = Namespace::for_user(&victim.name);
    as_hostile
        .batch_execute(&format!(
            "CREATE SCHEMA {ns};
             CREATE TABLE {ns}.called (by text);
             GRANT USAGE ON SCHEMA {ns} TO PUBLIC;
             GRANT INSERT, SELECT ON {ns}.called TO PUBLIC;
             CREATE FUNCTION {ns}.{version}() RETURNS integer LANGUAGE sql VOLATILE
               AS $$ INSERT INTO {ns}.called VALUES (current_user) RETURNING 9 $$;
             GRANT EXECUTE ON FUNCTION {ns}.{version}() TO PUBLIC;
             CREATE TABLE {ns}.ledger (schema_name text, status text, migrations_hash text);
             GRANT ALL ON {ns}.ledger TO PUBLIC;",
            version = pgharness::ledger::VERSION_FUNCTION,
        ))
        .await
        .unwrap();
    let dir = own_migrations("trust-victim", "CREATE TABLE t (id int);");
    let error = TestDb::builder()
        .settings(victim.settings())
        .migrations(&dir)
        .build()
        .await
        .expect_err("the victim's test must not use a namespace someone else made");
    let text = error.to_string();
    assert!(text.contains(ns.as_str()), "{text}");
    assert!(text.contains("made by another role"), "{text}");
    let called: i64 = as_hostile
        .query_one(&format!("SELECT count(*) FROM {ns}.called"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(called, 0, "the hostile role's function ran as the victim");
    drop(as_hostile);
    hostile.drop_all(&admin).await;
    victim.drop_all(&admin).await;
}

#[tokio::test]
async fn a_reap_acts_only_on_its_own_role_s_schemas() {
    let server = configured_server().await;
    let admin = admin(&server).await;
    let other = Role::create(&admin, "other", &server).await;
    // The other role's pool: a ready schema, recorded in its own ledger.
    let dir = own_migrations("trust-reap", "CREATE TABLE t (id int);");
    let mut settings = other.settings();
    settings.teardown = pgharness::Teardown::Inline;
    let db = TestDb::builder()
        .settings(settings)
        .migrations(&dir)
        .build()
        .await
        .expect("the other role's test");
    let first_name = db.schema().to_owned();
    db.client()
        .execute("INSERT INTO t VALUES (1)", &[])
        .await
        .unwrap();
    drop(db);
    // Recycled into their pool under a new name.
    let theirs: String = other
        .client()
        .await
        .query_one(
            &format!(
                "SELECT schema_name FROM {}.ledger WHERE previous_name = $1",
                Namespace::for_user(&other.name)
            ),
            &[&first_name],
        )
        .await
        .unwrap()
        .get(0);
    // Unused for a day, as a pool of last week's work.
    other
        .client()
        .await
        .execute(
            &format!(
                "UPDATE {}.ledger SET ended_at = now() - interval '25 hours', created_at = now() - interval '25 hours'",
                Namespace::for_user(&other.name)
            ),
            &[],
        )
        .await
        .unwrap();
    // F7: the tests' role's reaper, with every TTL at zero, neither fails on it nor
    // touches it.
    let reaper = common::runner(&server).await;
    let report = ledger::reap(
        &reaper,
        &admin_ns(),
        &ReapScope::Stale {
            ttl: Duration::ZERO,
            run_grace: Duration::ZERO,
        },
    )
    .await
    .expect("the reap does not abort on another role's schemas");
    assert!(!report.dropped.contains(&theirs), "{report:?}");
    assert!(common::schema_exists(&admin, &theirs).await);
    other.drop_all(&admin).await;
}

#[tokio::test]
async fn a_table_name_never_resolves_outside_the_test_s_schema() {
    // A server of this test's own: a table in its public schema changes every test's path.
    let mut settings = common::isolated_settings(BackendKind::Native, "search-path");
    settings.teardown = Teardown::Inline;
    let server = pgharness::backend::ensure(&settings, &pgharness::events::log_only)
        .await
        .expect("native starts");
    let admin = admin(&server).await;
    // An extension-like function in public, which tests may call unqualified.
    admin
        .batch_execute(
            "CREATE FUNCTION public.ext_answer() RETURNS int LANGUAGE sql AS 'SELECT 42'",
        )
        .await
        .unwrap();
    let dir = own_migrations("search-path", "CREATE TABLE items (id int);");
    let db = TestDb::builder()
        .settings(settings.clone())
        .migrations(&dir)
        .build()
        .await
        .unwrap();
    let answer: i32 = db
        .client()
        .query_one("SELECT ext_answer()", &[])
        .await
        .expect("public holds no table: it is on the path")
        .get(0);
    assert_eq!(answer, 42);
    drop(db);
    // F2: someone's table in public, of a name the test's schema lacks.
    admin
        .batch_execute(
            "CREATE TABLE public.orders (id int); INSERT INTO public.orders VALUES (1);
             GRANT SELECT, INSERT ON public.orders TO PUBLIC;",
        )
        .await
        .unwrap();
    let db = TestDb::builder()
        .settings(settings.clone())
        .migrations(&dir)
        .build()
        .await
        .unwrap();
    let error = db
        .client()
        .execute("INSERT INTO orders VALUES (2)", &[])
        .await
        .expect_err("orders is not the test's table");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE),
        "{error}"
    );
    // Every connection of the test has that path: the pool's and connection_string()'s.
    let pooled = db.pool().get().await.unwrap();
    assert!(
        pooled
            .execute("INSERT INTO orders VALUES (3)", &[])
            .await
            .is_err()
    );
    let other = common::connect(db.connection_string().parse().unwrap()).await;
    assert!(
        other
            .execute("INSERT INTO orders VALUES (4)", &[])
            .await
            .is_err()
    );
    // A setting puts a schema on the path explicitly.
    drop((pooled, other, db));
    let mut with_public = settings.clone();
    with_public.extra_search_path = vec!["public".into()];
    let db = TestDb::builder()
        .settings(with_public)
        .migrations(&dir)
        .build()
        .await
        .unwrap();
    db.client()
        .execute("INSERT INTO orders VALUES (5)", &[])
        .await
        .expect("public is on the path when the settings say so");
    drop(db);
    let rows: i64 = admin
        .query_one("SELECT count(*) FROM public.orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 2, "only the test that asked for public wrote to it");
    drop(admin);
    pgharness::backend::stop(&settings, BackendKind::Native)
        .await
        .unwrap();
}

#[tokio::test]
async fn tests_are_not_superusers_and_extensions_come_from_a_setting() {
    // A server of this test's own, with an untrusted extension asked for by the settings.
    let mut settings = common::isolated_settings(BackendKind::Native, "not-superuser");
    settings.teardown = Teardown::Inline;
    settings.extensions = vec!["pg_stat_statements".into()];
    let server = pgharness::backend::ensure(&settings, &pgharness::events::log_only)
        .await
        .expect("native starts");
    // Trusted extensions a migration creates itself; the untrusted one exists already.
    let dir = own_migrations(
        "not-superuser",
        "CREATE EXTENSION IF NOT EXISTS pgcrypto;
         CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
         CREATE TABLE t (id int);",
    );
    let db = TestDb::builder()
        .settings(settings.clone())
        .migrations(&dir)
        .build()
        .await
        .expect("the migrations run as the tests' role");
    let row = db
        .client()
        .query_one(
            "SELECT current_user::text, rolsuper, rolcreaterole, rolcreatedb
               FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), pgharness::TESTS_ROLE);
    assert!(!row.get::<_, bool>(1) && !row.get::<_, bool>(2) && !row.get::<_, bool>(3));
    // A5: no program runs on the host from a test.
    let error = db
        .client()
        .batch_execute("COPY (SELECT 1) TO PROGRAM 'id'")
        .await
        .expect_err("a test runs programs as the server's user");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{error}"
    );
    // connection_string() logs in as the same role.
    let other = common::connect(db.connection_string().parse().unwrap()).await;
    let user: String = other
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, pgharness::TESTS_ROLE);
    drop((other, db));
    // Without the setting, the untrusted extension is refused to the tests' role.
    let admin = admin(&server).await;
    admin
        .batch_execute("DROP EXTENSION pg_stat_statements")
        .await
        .unwrap();
    let mut bare = settings.clone();
    bare.extensions = Vec::new();
    let refused = TestDb::builder()
        .settings(bare)
        .migrations(own_migrations(
            "not-superuser-2",
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;",
        ))
        .build()
        .await
        .expect_err("an untrusted extension is the administrator's");
    assert!(
        refused.to_string().contains("permission denied"),
        "{refused}"
    );
    drop(admin);
    pgharness::backend::stop(&settings, BackendKind::Native)
        .await
        .unwrap();
}
