//! A small notes model twice over, as a diesel-async app and a sea-orm app would declare it,
//! for the suite in `tests/`: both run on `#[pgharness::test]` with the connection or pool
//! their app uses injected, over the diesel-layout migrations in `migrations/`.

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
