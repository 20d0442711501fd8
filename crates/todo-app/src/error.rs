//! How failures become HTTP responses.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio_postgres::error::SqlState;

/// An error answered to the client as `{"error": "..."}` with a fitting status.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The thing asked for does not exist.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The request conflicts with existing data.
    #[error("{0}")]
    Conflict(String),
    /// The request is well-formed but its content is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// Anything else: logged, and answered as 500 without details.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl From<tokio_postgres::Error> for AppError {
    fn from(error: tokio_postgres::Error) -> Self {
        match error.code() {
            Some(code) if code == &SqlState::UNIQUE_VIOLATION => {
                let what = error.as_db_error().and_then(|db| db.constraint()).map_or(
                    "a unique value",
                    |c| {
                        if c.contains("email") {
                            "that email"
                        } else {
                            "that title"
                        }
                    },
                );
                AppError::Conflict(format!("{what} is already taken"))
            }
            Some(code) if code == &SqlState::CHECK_VIOLATION => AppError::Invalid(
                error
                    .as_db_error()
                    .and_then(|db| db.constraint())
                    .map_or("invalid value".to_owned(), |c| format!("violates {c}")),
            ),
            _ => AppError::Internal(error.into()),
        }
    }
}

impl From<deadpool_postgres::PoolError> for AppError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        match error {
            deadpool_postgres::PoolError::Backend(error) => error.into(),
            other => AppError::Internal(other.into()),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = match &self {
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::Conflict(_) => StatusCode::CONFLICT,
            AppError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::Internal(error) => {
                tracing::error!(error = format!("{error:#}"), "request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}
