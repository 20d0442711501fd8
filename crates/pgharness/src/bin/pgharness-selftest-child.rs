//! A stand-in for a test process, used by pgharness' own integration tests (it is not part
//! of the public tool set). `fail` takes a database, writes a marker row and panics, as a
//! failing test does; `hold` takes a database, prints its schema and waits to be killed.

use std::io::Write;

use pgharness::TestDb;

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let db = TestDb::builder()
            .without_migrations()
            .test_name(format!("selftest_{mode}"))
            .build()
            .await
            .unwrap_or_else(|error| panic!("selftest child: {error}"));
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
