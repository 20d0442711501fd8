//! 500 tests that query as most tests do, with parameters (prepared statements, closed as
//! they drop just before the teardown), each in its own schema of the example's migrations
//! (`sql/`). `scripts/teardown-soak.sh` runs them again and again under plain `cargo nextest
//! run` and under `cargo pgharness test`, and counts teardowns lost and schemas left.

use pgharness::TestDb;

seq_macro::seq!(N in 0..500 {
    #[tokio::test]
    #[ignore = "run by scripts/teardown-soak.sh"]
    async fn soak_~N() {
        let db = TestDb::new().await.unwrap();
        let email = format!("soak{}@example.com", N);
        db.client()
            .execute(
                "INSERT INTO users (email, name) VALUES ($1, $2)",
                &[&email, &"soak"],
            )
            .await
            .unwrap();
        let found: i64 = db
            .client()
            .query_one("SELECT count(*) FROM users WHERE email = $1", &[&email])
            .await
            .unwrap()
            .get(0);
        assert_eq!(found, 1);
    }
});
