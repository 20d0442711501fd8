//! A small notes model twice over, as a diesel-async app and a sea-orm app would declare it,
//! for the suite in `tests/`: both run on `#[pgharness::test]` with the connection or pool
//! their app uses injected, over the diesel-layout migrations in `migrations/`; and a
//! sea-orm migrator written in code ([`migration`]), as sea-orm apps keep their schema.

/// diesel's declaration of the `notes` table.
pub mod schema {
    diesel::table! {
        notes (id) {
            id -> Int8,
            body -> Text,
            done -> Bool,
        }
    }
}

/// A note as diesel reads it.
#[derive(Debug, PartialEq, Eq, diesel::Queryable, diesel::Selectable)]
#[diesel(table_name = schema::notes)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct Note {
    /// Its id.
    pub id: i64,
    /// Its text.
    pub body: String,
    /// Whether it is done.
    pub done: bool,
}

/// sea-orm's entity of the `notes` table.
pub mod note {
    use sea_orm::entity::prelude::*;

    /// A note as sea-orm reads it.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "notes")]
    pub struct Model {
        /// Its id.
        #[sea_orm(primary_key)]
        pub id: i64,
        /// Its text.
        pub body: String,
        /// Whether it is done.
        pub done: bool,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// sea-orm's entity of the `tags` table (made by [`migration`]).
pub mod tag {
    use sea_orm::entity::prelude::*;

    /// A tag as sea-orm reads it.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "tags")]
    pub struct Model {
        /// Its id.
        #[sea_orm(primary_key)]
        pub id: i32,
        /// Its unique name.
        #[sea_orm(unique)]
        pub name: String,
    }

    /// No relations.
    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A sea-orm migrator in code: the `tags` table, then a seed tag.
pub mod migration {
    use sea_orm_migration::prelude::*;

    /// The app's migrator.
    pub struct Migrator;

    impl MigratorTrait for Migrator {
        fn migrations() -> Vec<Box<dyn MigrationTrait>> {
            vec![Box::new(CreateTags), Box::new(SeedTags)]
        }
    }

    #[derive(Iden)]
    enum Tags {
        Table,
        Id,
        Name,
    }

    /// Creates `tags`.
    pub struct CreateTags;

    impl MigrationName for CreateTags {
        fn name(&self) -> &str {
            "m20240101_000001_create_tags"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for CreateTags {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .create_table(
                    Table::create()
                        .table(Tags::Table)
                        .col(
                            ColumnDef::new(Tags::Id)
                                .integer()
                                .not_null()
                                .auto_increment()
                                .primary_key(),
                        )
                        .col(ColumnDef::new(Tags::Name).string().not_null().unique_key())
                        .to_owned(),
                )
                .await
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .drop_table(Table::drop().table(Tags::Table).to_owned())
                .await
        }
    }

    /// Seeds the tag every deployment has.
    pub struct SeedTags;

    impl MigrationName for SeedTags {
        fn name(&self) -> &str {
            "m20240102_000001_seed_tags"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for SeedTags {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .exec_stmt(
                    Query::insert()
                        .into_table(Tags::Table)
                        .columns([Tags::Name])
                        .values_panic(["inbox".into()])
                        .to_owned(),
                )
                .await
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .exec_stmt(Query::delete().from_table(Tags::Table).to_owned())
                .await
        }
    }
}
