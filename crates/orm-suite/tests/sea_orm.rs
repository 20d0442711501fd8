//! A sea-orm app's tests on `#[pgharness::test]`: its `DatabaseConnection` injected, in a
//! schema migrated from the same diesel-layout migrations.

use orm_suite::note;
use sea_orm::{ActiveModelTrait, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, Set};

#[pgharness::test(migrations = "migrations")]
async fn a_database_connection_reads_and_writes_in_the_test_s_schema(db: DatabaseConnection) {
    let seeded = note::Entity::find().all(&db).await.unwrap();
    assert_eq!(
        seeded.len(),
        1,
        "the seed migration's note, and no other test's"
    );
    let added = note::ActiveModel {
        body: Set("water the plants".to_owned()),
        ..Default::default()
    }
    .insert(&db)
    .await
    .unwrap();
    assert!(!added.done);
    let mut done: note::ActiveModel = added.into();
    done.done = Set(true);
    done.update(&db).await.unwrap();
    let open = note::Entity::find()
        .filter(note::Column::Done.eq(false))
        .all(&db)
        .await
        .unwrap();
    assert_eq!(
        open.iter().map(|n| n.body.as_str()).collect::<Vec<_>>(),
        ["welcome"]
    );
}

#[pgharness::test(migrations = "migrations")]
async fn a_constraint_of_the_migrations_is_enforced_through_sea_orm(
    db: DatabaseConnection,
) -> Result<(), sea_orm::DbErr> {
    let refused = note::ActiveModel {
        body: Set(String::new()),
        ..Default::default()
    }
    .insert(&db)
    .await;
    assert!(refused.is_err(), "an empty body violates the CHECK");
    note::Entity::delete_many().exec(&db).await?;
    assert_eq!(note::Entity::find().all(&db).await?.len(), 0);
    Ok(())
}

/// A schema built by the app's sea-orm migrator, in code: the table and its seed row are
/// there, `seaql_migrations` lists both migrations (sea-orm's own `up` finds nothing to do),
/// and the schema came from the pool keyed by that migrator.
#[pgharness::test(sea_orm_migrator = "orm_suite::migration::Migrator")]
async fn a_sea_orm_migrator_builds_the_schema_once_and_finds_it_up_to_date(
    test_db: pgharness::TestDb,
    db: DatabaseConnection,
) {
    use orm_suite::migration::Migrator;
    use orm_suite::tag;
    use sea_orm_migration::MigratorTrait;
    let tags = tag::Entity::find().all(&db).await.unwrap();
    assert_eq!(
        tags.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["inbox"]
    );
    assert!(
        Migrator::get_pending_migrations(&db)
            .await
            .unwrap()
            .is_empty()
    );
    Migrator::up(&db, None).await.expect("nothing to apply");
    let applied: i64 = test_db
        .client()
        .query_one("SELECT count(*) FROM seaql_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, 2);
    tag::ActiveModel {
        name: Set("work".to_owned()),
        ..Default::default()
    }
    .insert(&db)
    .await
    .unwrap();
    let ns = pgharness::ledger::Namespace::of(test_db.pg_config());
    let source: String = test_db
        .client()
        .query_one(
            &format!("SELECT source FROM {ns}.ledger WHERE schema_name = $1"),
            &[&test_db.schema()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(source, "sea-orm migrator orm_suite::migration::Migrator");
}

/// A migrator that fails names itself and leaves no schema behind.
#[tokio::test]
async fn a_failing_migration_in_code_is_named_and_leaves_nothing_behind() {
    let key = format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let table = format!("half_done_{key}");
    let create = format!("CREATE TABLE {table} (id int)");
    let error = pgharness::TestDb::builder()
        .migrate_with("the broken migrator", key, move |url: String| {
            let create = create.clone();
            async move {
                let (client, connection) =
                    pgharness::tokio_postgres::connect(&url, pgharness::tokio_postgres::NoTls)
                        .await
                        .map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                client
                    .batch_execute(&create)
                    .await
                    .map_err(|e| e.to_string())?;
                Err::<(), String>("the second step failed".to_owned())
            }
        })
        .build()
        .await
        .expect_err("the migrations fail");
    let text = error.to_string();
    assert!(
        text.contains("the broken migrator") && text.contains("the second step failed"),
        "{text}"
    );
    // The schema the first step made is gone, with its table.
    let look = pgharness::TestDb::builder()
        .without_migrations()
        .build()
        .await
        .unwrap();
    let left: i64 = look
        .client()
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = $1",
            &[&table],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "a half-migrated schema was left behind");
}
