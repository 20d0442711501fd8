//! Connection slots and privileges: a full server is waited for, a hopeless wait says what
//! to change, and a role with only CONNECT + CREATE is enough.

mod common;

use std::time::{Duration, Instant};

use common::{admin, configured_server, connect, isolated_settings};
use pgharness::backend;
use pgharness::events::log_only;
use pgharness::{BackendKind, SecretUrl, TestDb};

/// Opens connections until the server refuses one with 53300.
async fn fill_all_slots(config: &tokio_postgres::Config) -> Vec<tokio_postgres::Client> {
    let mut held = Vec::new();
    loop {
        match config.connect(tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                held.push(client);
            }
            Err(error) => {
                assert_eq!(
                    error.code(),
                    Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS),
                    "{error}"
                );
                return held;
            }
        }
        assert!(held.len() < 50, "the server never ran out of slots");
    }
}

#[tokio::test]
async fn a_full_server_is_waited_for_and_a_hopeless_wait_says_what_to_change() {
    let mut settings = isolated_settings(BackendKind::Native, "slots");
    settings.max_connections = 10;
    let server = backend::ensure(&settings, &log_only)
        .await
        .expect("native starts");
    let mut held = fill_all_slots(&server.admin_config()).await;

    // Nothing frees up: the error names the cause and the settings to change.
    settings.acquire_timeout = Duration::from_millis(800);
    let error = TestDb::builder()
        .settings(settings.clone())
        .without_migrations()
        .build()
        .await
        .unwrap_err();
    assert!(error.is_too_many_clients(), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("53300") && message.contains("PGHARNESS_POOL_SIZE"),
        "{message}"
    );

    // A slot frees up while the test waits: it gets its database. The sync point is the
    // server's own log: it has refused the waiting test at least once.
    let data_dir: String = held[0]
        .query_one("SHOW data_directory", &[])
        .await
        .unwrap()
        .get(0);
    let log = std::path::Path::new(&data_dir)
        .parent()
        .unwrap()
        .join("server.log");
    let refusals = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("too many clients already")
            .count()
    };
    let before = refusals();
    settings.acquire_timeout = Duration::from_secs(30);
    let waiting = tokio::spawn(
        TestDb::builder()
            .settings(settings.clone())
            .without_migrations()
            .build(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while refusals() == before {
        assert!(
            Instant::now() < deadline,
            "the server never refused the waiting test ({})",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!waiting.is_finished(), "it cannot have a connection yet");
    // Tests log in as a role without superuser: the slots reserved for superusers are not
    // theirs, so free those and one more.
    let reserved: String = held[0]
        .query_one("SHOW superuser_reserved_connections", &[])
        .await
        .unwrap()
        .get(0);
    for _ in 0..=reserved.parse::<usize>().unwrap() {
        held.pop();
    }
    let db = waiting
        .await
        .unwrap()
        .expect("the test gets a slot once one frees up");
    db.client().simple_query("SELECT 1").await.unwrap();
    drop(db);
    drop(held);
    backend::stop(&settings, BackendKind::Native).await.unwrap();
}

#[tokio::test]
async fn a_role_with_only_connect_and_create_is_enough_and_its_password_never_shows() {
    let server = configured_server().await;
    let admin = admin(&server).await;
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let (database, role) = (format!("pgh_priv_{suffix}"), format!("pgh_app_{suffix}"));
    let password = format!("pw-{suffix}-secret");
    admin
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .await
        .unwrap();
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{password}' NOSUPERUSER NOCREATEDB NOCREATEROLE;
             GRANT CONNECT, CREATE ON DATABASE {database} TO {role};"
        ))
        .await
        .unwrap();
    let mut settings = pgharness::Settings::load().unwrap();
    settings.backend = BackendKind::Url;
    settings.url = Some(SecretUrl::new(common::with_database(
        server.url_as(&role, &password).expose(),
        &database,
    )));

    let db = TestDb::builder()
        .settings(settings)
        .build()
        .await
        .expect("CONNECT + CREATE suffice");
    let row = db
        .client()
        .query_one("SELECT rolsuper, rolcreatedb, current_user::text FROM pg_roles WHERE rolname = current_user", &[])
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, bool>(0),
            row.get::<_, bool>(1),
            row.get::<_, String>(2)
        ),
        (false, false, role.clone())
    );
    db.client()
        .execute("INSERT INTO users (email, name) VALUES ('a@b.c', 'A')", &[])
        .await
        .unwrap();
    let shown = format!("{db:?} {} {:?}", db.server(), db.server());
    assert!(!shown.contains(&password), "password leaked: {shown}");
    assert!(
        db.connection_string().contains(&password),
        "the connection string is for clients and carries it"
    );
    drop(db);

    let other = connect(server.admin_config()).await;
    other
        .batch_execute(&format!("DROP DATABASE {database} WITH (FORCE)"))
        .await
        .unwrap();
    other
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_refused_url_server_fails_at_once_naming_the_server() {
    // A port nobody listens on, and a url backend: nobody is starting that server.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let root = std::env::temp_dir().join(format!("pgharness-it-refused-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&root).unwrap();
    let url = format!("postgres://app:s3cret@127.0.0.1:{port}/app");
    let settings = pgharness::Settings::load_from(
        &root,
        [
            ("PGHARNESS_BACKEND".to_owned(), "url".to_owned()),
            ("PGHARNESS_URL".to_owned(), url),
            ("PGHARNESS_ACQUIRE_TIMEOUT".to_owned(), "300s".to_owned()),
        ],
    )
    .unwrap();
    let error = pgharness::TestDb::builder()
        .settings(settings)
        .without_migrations()
        .build()
        .await
        .unwrap_err();
    // Not a timeout after waiting for a server to come up: the refusal itself.
    assert!(
        matches!(error, pgharness::Error::Postgres { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(!message.contains("s3cret"), "{message}");
}

#[tokio::test]
async fn a_missing_migrations_directory_is_an_error_naming_it() {
    let mut settings = pgharness::Settings::load().unwrap();
    settings.migrations = std::path::PathBuf::from("/nonexistent/pgharness-migrations");
    let error = pgharness::TestDb::builder()
        .settings(settings)
        .build()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("/nonexistent/pgharness-migrations"),
        "{error}"
    );
    assert!(error.contains("without_migrations"), "{error}");
}

/// A server a user gives stores SCRAM verifiers with 4096 iterations, which a dependent
/// crate's debug build spends ~100 ms on at every login: pgharness derives the salted
/// password once and keeps it (0600, in the state directory) for every later login, while
/// the server still checks every proof — a wrong password still fails as it would.
#[tokio::test]
async fn a_url_server_s_key_stretching_is_paid_once_and_a_wrong_password_still_fails() {
    let server = configured_server().await;
    let admin = admin(&server).await;
    let role = common::Role::create(&admin, "scram", &server).await;
    let url = url::Url::parse(&role.url()).unwrap();
    let verifier: String = admin
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&url.username()],
        )
        .await
        .unwrap()
        .get(0);
    assert!(verifier.starts_with("SCRAM-SHA-256$4096:"), "{verifier}");
    let state = std::env::temp_dir().join(format!("pgharness-scram-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&state).unwrap();
    let mut settings = role.settings();
    settings.state_dir = state.clone();

    let db = TestDb::builder()
        .settings(settings.clone())
        .without_migrations()
        .build()
        .await
        .expect("the relayed login");
    let pooled = db.pool().get().await.expect("a second login");
    let who: String = pooled
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, url.username());
    // One salted password, derived once, for both logins and the processes that follow.
    let cache = state.join("scram-cache");
    let text = std::fs::read_to_string(&cache).expect("the salted password is kept");
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        !text.contains(url.password().unwrap()),
        "the password itself is never kept"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777,
        0o600
    );
    drop(pooled);
    drop(db);

    let mut wrong = url.clone();
    wrong.set_password(Some("not-the-password")).unwrap();
    settings.url = Some(SecretUrl::new(wrong.to_string()));
    let error = TestDb::builder()
        .settings(settings)
        .without_migrations()
        .build()
        .await
        .expect_err("a wrong password is refused");
    assert_eq!(
        error.as_db_error().map(|db| db.code().code()),
        Some("28P01"),
        "{error}"
    );
    role.drop_all(&admin).await;
}

/// An app that takes host, port, user, password and database (and startup options) lands
/// in the test's schema with `connect_params()`, named after it; `Debug` hides the password.
#[tokio::test]
async fn an_app_configured_by_fields_reaches_the_schema_with_connect_params() {
    let db = TestDb::builder()
        .without_migrations()
        .build()
        .await
        .unwrap();
    db.client()
        .batch_execute("CREATE TABLE marker (id int)")
        .await
        .unwrap();
    let params = db.connect_params();
    // As an app builds its own configuration from fields.
    let mut config = tokio_postgres::Config::new();
    if params.host.starts_with('/') {
        config.host_path(&params.host);
    } else {
        config.host(&params.host);
    }
    config
        .port(params.port)
        .user(&params.user)
        .dbname(&params.database)
        .options(&params.options)
        .application_name(&params.application_name);
    if let Some(password) = &params.password {
        config.password(password);
    }
    let app = connect(config).await;
    let row = app
        .query_one(
            "SELECT current_schema()::text, to_regclass('marker') IS NOT NULL, current_setting('application_name')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), db.schema());
    assert!(row.get::<_, bool>(1));
    assert_eq!(row.get::<_, String>(2), db.schema());
    if let Some(password) = &params.password {
        assert!(!format!("{params:?}").contains(password.as_str()));
    }
}
