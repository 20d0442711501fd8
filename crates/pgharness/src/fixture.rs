//! The rstest fixture.

use rstest::fixture;

use crate::testdb::TestDb;

/// An rstest fixture giving the test its own migrated schema.
///
/// ```ignore
/// use pgharness::{TestDb, test_db};
/// use rstest::rstest;
///
/// #[rstest]
/// #[tokio::test]
/// async fn counts_users(#[future] test_db: TestDb) {
///     let db = test_db.await;
///     let row = db.client().query_one("SELECT count(*) FROM users", &[]).await.unwrap();
///     assert_eq!(row.get::<_, i64>(0), 0);
/// }
/// ```
///
/// It panics with the reason and the fix when no database can be had: a test cannot run
/// without one. For options (fixtures, keep policy), use [`TestDb::builder`].
#[fixture]
pub async fn test_db() -> TestDb {
    match TestDb::new().await {
        Ok(db) => db,
        Err(error) => panic!("pgharness: failed to set up the test database: {error}"),
    }
}
