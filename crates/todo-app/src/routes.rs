//! The HTTP API.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use deadpool_postgres::Pool;
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;

use crate::error::AppError;

/// A user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Id.
    pub id: i64,
    /// Unique email address.
    pub email: String,
    /// Display name.
    pub name: String,
}

/// A user with counts of their todos.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSummary {
    /// The user.
    #[serde(flatten)]
    pub user: User,
    /// Todos not done yet.
    pub open: i64,
    /// Todos completed (counted when completed, kept when a todo is deleted).
    pub completed: i32,
}

/// A todo.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Todo {
    /// Id.
    pub id: i64,
    /// Owner.
    pub user_id: i64,
    /// Title, unique per user.
    pub title: String,
    /// Completed?
    pub done: bool,
}

/// Body of `POST /users`.
#[derive(Debug, Deserialize, Serialize)]
pub struct NewUser {
    /// Email address.
    pub email: String,
    /// Display name.
    pub name: String,
}

/// Body of `POST /users/{id}/todos`.
#[derive(Debug, Deserialize, Serialize)]
pub struct NewTodo {
    /// Title.
    pub title: String,
}

#[derive(Debug, Deserialize)]
struct TodoFilter {
    done: Option<bool>,
}

/// The whole app.
pub fn router(pool: Pool) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/users", post(create_user))
        .route("/users/{id}", get(get_user).delete(delete_user))
        .route("/users/{id}/todos", post(create_todo).get(list_todos))
        .route("/todos/{id}/complete", post(complete_todo))
        .route("/todos/{id}", axum::routing::delete(delete_todo))
        .with_state(pool)
}

fn user(row: &Row) -> User {
    User {
        id: row.get("id"),
        email: row.get("email"),
        name: row.get("name"),
    }
}

fn todo(row: &Row) -> Todo {
    Todo {
        id: row.get("id"),
        user_id: row.get("user_id"),
        title: row.get("title"),
        done: row.get("done"),
    }
}

async fn health(State(pool): State<Pool>) -> Result<&'static str, AppError> {
    pool.get().await?.simple_query("SELECT 1").await?;
    Ok("ok")
}

async fn create_user(
    State(pool): State<Pool>,
    Json(new): Json<NewUser>,
) -> Result<(StatusCode, Json<User>), AppError> {
    let email = new.email.trim().to_lowercase();
    if !email.contains('@') {
        return Err(AppError::Invalid("email must contain @".into()));
    }
    let client = pool.get().await?;
    let row = client
        .query_one(
            "INSERT INTO users (email, name) VALUES ($1, $2) RETURNING id, email, name",
            &[&email, &new.name.trim()],
        )
        .await?;
    Ok((StatusCode::CREATED, Json(user(&row))))
}

async fn get_user(
    State(pool): State<Pool>,
    Path(id): Path<i64>,
) -> Result<Json<UserSummary>, AppError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "SELECT u.id, u.email, u.name, u.completed_count,
                    (SELECT count(*) FROM todos t WHERE t.user_id = u.id AND NOT t.done) AS open
               FROM users u WHERE u.id = $1",
            &[&id],
        )
        .await?
        .ok_or(AppError::NotFound("user"))?;
    Ok(Json(UserSummary {
        user: user(&row),
        open: row.get("open"),
        completed: row.get("completed_count"),
    }))
}

async fn delete_user(
    State(pool): State<Pool>,
    Path(id): Path<i64>,
) -> Result<StatusCode, AppError> {
    let client = pool.get().await?;
    match client
        .execute("DELETE FROM users WHERE id = $1", &[&id])
        .await?
    {
        0 => Err(AppError::NotFound("user")),
        _ => Ok(StatusCode::NO_CONTENT),
    }
}

async fn create_todo(
    State(pool): State<Pool>,
    Path(user_id): Path<i64>,
    Json(new): Json<NewTodo>,
) -> Result<(StatusCode, Json<Todo>), AppError> {
    let client = pool.get().await?;
    // Insert only for an existing user, so a missing user is a 404, not a constraint error.
    let row = client
        .query_opt(
            "INSERT INTO todos (user_id, title) SELECT id, $2 FROM users WHERE id = $1
             RETURNING id, user_id, title, done",
            &[&user_id, &new.title.trim()],
        )
        .await?
        .ok_or(AppError::NotFound("user"))?;
    Ok((StatusCode::CREATED, Json(todo(&row))))
}

async fn list_todos(
    State(pool): State<Pool>,
    Path(user_id): Path<i64>,
    Query(filter): Query<TodoFilter>,
) -> Result<Json<Vec<Todo>>, AppError> {
    let client = pool.get().await?;
    if client
        .query_opt("SELECT 1 FROM users WHERE id = $1", &[&user_id])
        .await?
        .is_none()
    {
        return Err(AppError::NotFound("user"));
    }
    let rows = client
        .query(
            "SELECT id, user_id, title, done FROM todos
              WHERE user_id = $1 AND ($2::boolean IS NULL OR done = $2)
              ORDER BY id",
            &[&user_id, &filter.done],
        )
        .await?;
    Ok(Json(rows.iter().map(todo).collect()))
}

/// Completing spans three tables in one transaction: the todo, the user's counter and
/// the audit trail. Either all change or none.
async fn complete_todo(
    State(pool): State<Pool>,
    Path(id): Path<i64>,
) -> Result<Json<Todo>, AppError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "UPDATE todos SET done = true, completed_at = now() WHERE id = $1 AND NOT done
             RETURNING id, user_id, title, done",
            &[&id],
        )
        .await?;
    let Some(row) = row else {
        let exists = tx
            .query_opt("SELECT 1 FROM todos WHERE id = $1", &[&id])
            .await?
            .is_some();
        return Err(if exists {
            AppError::Conflict("todo is already completed".into())
        } else {
            AppError::NotFound("todo")
        });
    };
    let todo = todo(&row);
    tx.execute(
        "UPDATE users SET completed_count = completed_count + 1 WHERE id = $1",
        &[&todo.user_id],
    )
    .await?;
    tx.execute(
        "INSERT INTO todo_events (todo_id, user_id, kind) VALUES ($1, $2, 'completed')",
        &[&todo.id, &todo.user_id],
    )
    .await?;
    tx.commit().await?;
    Ok(Json(todo))
}

async fn delete_todo(
    State(pool): State<Pool>,
    Path(id): Path<i64>,
) -> Result<StatusCode, AppError> {
    let client = pool.get().await?;
    match client
        .execute("DELETE FROM todos WHERE id = $1", &[&id])
        .await?
    {
        0 => Err(AppError::NotFound("todo")),
        _ => Ok(StatusCode::NO_CONTENT),
    }
}
