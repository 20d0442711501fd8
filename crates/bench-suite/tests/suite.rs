//! 40 trivial tests that each take a pgharness schema (migrated with the benchmark's
//! migration set, `PGHARNESS_MIGRATIONS`), and the same 40 on a plain connection to the
//! same server (`BENCH_PLAIN_URL`) with no isolation. `cargo xtask bench` runs each half
//! under `cargo nextest run --test-threads 2` and divides the difference by 40.

use pgharness::{TestDb, test_db};
use rstest::rstest;

macro_rules! isolated {
    ($($name:ident),* $(,)?) => {$(
        #[rstest]
        #[tokio::test]
        #[ignore = "run by cargo xtask bench"]
        async fn $name(#[future] test_db: TestDb) {
            let db = test_db.await;
            let rows: i64 = db
                .client()
                .query_one("SELECT count(*) FROM t04_tasks", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(rows, 0, "a fresh schema has no tasks");
        }
    )*};
}

macro_rules! plain {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        #[ignore = "run by cargo xtask bench"]
        async fn $name() {
            let url = std::env::var("BENCH_PLAIN_URL").expect("BENCH_PLAIN_URL");
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(connection);
            let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
            assert_eq!(one, 1);
        }
    )*};
}

mod isolated {
    use super::*;
    isolated!(
        i00, i01, i02, i03, i04, i05, i06, i07, i08, i09, i10, i11, i12, i13, i14, i15, i16, i17,
        i18, i19, i20, i21, i22, i23, i24, i25, i26, i27, i28, i29, i30, i31, i32, i33, i34, i35,
        i36, i37, i38, i39,
    );
}

mod plain {
    plain!(
        p00, p01, p02, p03, p04, p05, p06, p07, p08, p09, p10, p11, p12, p13, p14, p15, p16, p17,
        p18, p19, p20, p21, p22, p23, p24, p25, p26, p27, p28, p29, p30, p31, p32, p33, p34, p35,
        p36, p37, p38, p39,
    );
}

/// A test that fails on purpose after writing a row, for `cargo xtask ci`'s check that the
/// kept schema's printed psql line works after the run has ended.
mod keeps {
    use pgharness::{TestDb, test_db};
    use rstest::rstest;

    #[rstest]
    #[tokio::test]
    #[ignore = "run by cargo xtask ci's kept-schema check"]
    async fn fails_on_purpose_keeping_its_schema(#[future] test_db: TestDb) {
        let db = test_db.await;
        db.client()
            .batch_execute("CREATE TABLE marker (note text); INSERT INTO marker VALUES ('kept')")
            .await
            .unwrap();
        panic!("failing on purpose: the schema is kept");
    }
}
