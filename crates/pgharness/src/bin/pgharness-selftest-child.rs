//! A stand-in for a test process, used by pgharness' own integration tests (it is not part
//! of the public tool set). `fail` takes a database, writes a marker row and panics, as a
//! failing test does; `hold` takes a database, prints its schema and waits to be killed;
//! `claim` takes a migrated database, prints its schema, waits for its standard input to
//! close (the caller's sync point) and passes; `broken-teardown` takes a database, renames its
//! role's ledger `finish` function away (run it as a role of its own) and passes, so that
//! its teardown fails; `prepared` takes a migrated database (a table `items (id int)`), runs
//! statements with parameters (prepared, then closed as they drop, as most tests query) and
//! passes, its process exiting as soon as its teardown is sent; `native` takes a database
//! without migrations and passes (run as another OS user, on the native backend). It
//! installs no tracing subscriber, as many projects do not.

use std::io::Write;

use pgharness::TestDb;

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let builder = TestDb::builder().test_name(format!("selftest_{mode}"));
        let builder = match mode.as_str() {
            "claim" | "prepared" => builder,
            _ => builder.without_migrations(),
        };
        let db = builder
            .build()
            .await
            .unwrap_or_else(|error| panic!("selftest child: {error}"));
        if mode == "broken-teardown" {
            db.client()
                .batch_execute(
                    "DO $$ DECLARE ns text := (SELECT n.nspname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                        WHERE p.proname = 'finish' AND n.nspowner = (SELECT oid FROM pg_roles WHERE rolname = current_user));
                     BEGIN EXECUTE format('ALTER FUNCTION %I.finish RENAME TO finish_gone', ns); END $$;",
                )
                .await
                .expect("the ledger's finish renamed");
            return;
        }
        if mode == "native" {
            println!("{}", db.schema());
            return;
        }
        if mode == "prepared" {
            for id in 0..3i32 {
                db.client()
                    .execute("INSERT INTO items (id) VALUES ($1)", &[&id])
                    .await
                    .expect("an insert with a parameter");
            }
            let statement = db
                .client()
                .prepare("SELECT count(*) FROM items WHERE id >= $1")
                .await
                .expect("a prepared statement");
            db.client()
                .query_one(&statement, &[&0i32])
                .await
                .expect("its answer");
            // The statement's Close goes out as it drops, just before the teardown.
            drop(statement);
            return;
        }
        if mode == "claim" {
            println!("{}", db.schema());
            std::io::stdout().flush().expect("stdout");
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest).expect("stdin");
            return;
        }
        db.client()
            .batch_execute("CREATE TABLE marker (note text); INSERT INTO marker VALUES ('kept');")
            .await
            .expect("marker table");
        match mode.as_str() {
            "fail" => panic!("selftest child: failing on purpose"),
            "hold" => {
                println!("{}", db.schema());
                std::io::stdout().flush().expect("stdout");
                tokio::time::sleep(std::time::Duration::from_secs(600)).await;
            }
            other => panic!("selftest child: unknown mode `{other}` (use fail or hold)"),
        }
    });
}
