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
