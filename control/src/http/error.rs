//! The one error type of the HTTP API: every failure becomes
//! `{"error": {"code": …, "message": …}}` with a fitting status, and internals stay in the log.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use blixard_api::types::codes;
use blixard_api::validate::ValidationError;
use blixard_api::{ErrorBody, ErrorDetail};

use crate::node::NodeError;
use crate::state_machine::ApplyError;

/// An API failure.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, codes::INVALID_ARGUMENT, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.into(),
                // Whatever a message quotes from the request (a serde error names an unknown
                // field as sent), a refused character is shown escaped, never echoed.
                message: blixard_api::validate::escaped(&self.message),
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::invalid(e.to_string())
    }
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::NotFound(m) => ApiError::not_found(m),
            ApplyError::AlreadyExists(m) => {
                ApiError::new(StatusCode::CONFLICT, codes::ALREADY_EXISTS, m)
            }
            ApplyError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, codes::CONFLICT, m),
            ApplyError::KeyMismatch(m) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                codes::IDEMPOTENCY_KEY_MISMATCH,
                m,
            ),
            ApplyError::KeySpent(m) => {
                ApiError::new(StatusCode::CONFLICT, codes::IDEMPOTENCY_KEY_SPENT, m)
            }
        }
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::NoLeader => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::NO_LEADER,
                e.to_string(),
            ),
            NodeError::LeaderUnreachable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::UNAVAILABLE,
                "the leader could not be reached; retry shortly",
            ),
            NodeError::Invalid(m) => ApiError::invalid(m),
            NodeError::NotFound(m) => ApiError::not_found(m),
            NodeError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, codes::CONFLICT, m),
            NodeError::Unavailable(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE, m)
            }
            NodeError::OutcomeUnknown(_) => {
                tracing::warn!(error = %error_chain(&e), "forwarded write without an outcome");
                ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    codes::OUTCOME_UNKNOWN,
                    "the leader stopped answering after it received the request, so it may \
                     have been applied; read the result, or retry with the same Idempotency-Key",
                )
            }
            // Raft, store, start-up and protocol failures: internals, never the client's fault.
            other => {
                tracing::error!(error = %error_chain(&other), "internal error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    codes::INTERNAL,
                    "internal error; see the control node's log",
                )
            }
        }
    }
}

/// `e` and each of its causes, `: `-separated (messages never repeat their cause, so each
/// appears once).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let (status, code) = match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => {
                (StatusCode::PAYLOAD_TOO_LARGE, codes::PAYLOAD_TOO_LARGE)
            }
            StatusCode::UNSUPPORTED_MEDIA_TYPE => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                codes::UNSUPPORTED_MEDIA_TYPE,
            ),
            // Well-formed JSON of the wrong shape (unknown field, wrong type, missing field).
            StatusCode::UNPROCESSABLE_ENTITY => (StatusCode::BAD_REQUEST, codes::INVALID_ARGUMENT),
            _ => (StatusCode::BAD_REQUEST, codes::INVALID_JSON),
        };
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request body too large".to_string()
        } else {
            r.body_text()
        };
        ApiError::new(status, code, message)
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::invalid(r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::invalid(r.body_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_errors_map_to_statuses() {
        let cases: Vec<(NodeError, StatusCode, &str)> = vec![
            (
                NodeError::NoLeader,
                StatusCode::SERVICE_UNAVAILABLE,
                codes::NO_LEADER,
            ),
            (
                NodeError::LeaderUnreachable("x".into()),
                StatusCode::SERVICE_UNAVAILABLE,
                codes::UNAVAILABLE,
            ),
            (
                NodeError::Invalid("x".into()),
                StatusCode::BAD_REQUEST,
                codes::INVALID_ARGUMENT,
            ),
            (
                NodeError::NotFound("x".into()),
                StatusCode::NOT_FOUND,
                codes::NOT_FOUND,
            ),
            (
                NodeError::Conflict("x".into()),
                StatusCode::CONFLICT,
                codes::CONFLICT,
            ),
            (
                NodeError::Unavailable("x".into()),
                StatusCode::SERVICE_UNAVAILABLE,
                codes::UNAVAILABLE,
            ),
            // The leader died with the request in hand: neither "failed" nor "internal".
            (
                NodeError::OutcomeUnknown("x".into()),
                StatusCode::GATEWAY_TIMEOUT,
                codes::OUTCOME_UNKNOWN,
            ),
            // A start-up failure is never the client's fault.
            (
                NodeError::Config("bad cert".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                codes::INTERNAL,
            ),
            (
                NodeError::Raft("x".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                codes::INTERNAL,
            ),
        ];
        for (e, status, code) in cases {
            let what = format!("{e:?}");
            let a = ApiError::from(e);
            assert_eq!((a.status, a.code), (status, code), "{what}");
        }
    }

    #[test]
    fn error_chain_names_each_cause_once() {
        let e = NodeError::DataDir {
            path: "/d".into(),
            source: std::io::Error::other("permission denied"),
        };
        assert_eq!(error_chain(&e), "cannot create /d: permission denied");
    }
}
