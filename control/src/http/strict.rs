//! What a `/v1/` request may carry besides what its handler reads, and how long its body may
//! take.
//!
//! A precondition in the wrong place must never be dropped silently (`DELETE` with a body
//! `{"expected_generation": 99}`, `PUT` with `?expected_generation=99`): a handler that reads
//! no query takes [`NoQuery`], one that reads no body takes [`NoBody`], and both refuse with a
//! 400 whatever would otherwise be ignored. Handlers that read a query deserialize it with
//! `deny_unknown_fields`, so an unknown parameter is a 400 there too.
//!
//! [`bound_body`] reads every `/v1/` body before the handler runs: a `Content-Length` past
//! [`BODY_LIMIT`] ([`SNAPSHOT_BODY_LIMIT`] for a restore, see [`body_bounds`]) is a 413 from
//! the header alone (so also before a `100 Continue`), a body
//! still incomplete after [`BODY_TIMEOUT`] a 408. The pure rule is [`announced`].

use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use blixard_api::types::codes;

use super::error::ApiError;

/// Largest client request body.
pub const BODY_LIMIT: usize = 64 * 1024;
/// Longest a client may take to send a request body once its headers arrived.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest body of `POST /v1/cluster/snapshot` (a restore): room for 10,000s of VMs, and
/// within what one Raft entry may carry to the peers (`raft_routes`' 64 MiB).
pub const SNAPSHOT_BODY_LIMIT: usize = 32 * 1024 * 1024;
/// Longest a restore's body may take to arrive.
pub const SNAPSHOT_BODY_TIMEOUT: Duration = Duration::from_secs(120);

/// The size and time bounds of a request's body, by its route.
pub fn body_bounds(method: &axum::http::Method, path: &str) -> (usize, Duration) {
    if method == axum::http::Method::POST && path == "/v1/cluster/snapshot" {
        (SNAPSHOT_BODY_LIMIT, SNAPSHOT_BODY_TIMEOUT)
    } else {
        (BODY_LIMIT, BODY_TIMEOUT)
    }
}

/// Refuses any query string: the handler reads none.
pub struct NoQuery;

impl<S: Send + Sync> FromRequestParts<S> for NoQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        match parts.uri.query() {
            None | Some("") => Ok(NoQuery),
            Some(q) => Err(ApiError::invalid(format!(
                "{} {} takes no query parameters (got {}){}",
                parts.method,
                route(parts),
                parameter_names(q),
                if q.contains("expected_generation") {
                    "; expected_generation of an update goes in the body"
                } else {
                    ""
                }
            ))),
        }
    }
}

/// Refuses any request body: the handler reads none. Extract it last.
pub struct NoBody;

impl<S: Send + Sync> FromRequest<S> for NoBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        let refuse = || {
            ApiError::invalid(format!(
                "{} {} takes no body{}",
                parts.method,
                route(&parts),
                if parts.method == axum::http::Method::DELETE {
                    " (expected_generation goes in the query: ?expected_generation=N)"
                } else {
                    ""
                }
            ))
        };
        // [`bound_body`] has already read the body within its limits.
        let bytes =
            axum::body::Bytes::from_request(Request::from_parts(parts.clone(), body), state)
                .await
                .map_err(|_| refuse())?;
        if carries_nothing(&bytes) {
            Ok(NoBody)
        } else {
            Err(refuse())
        }
    }
}

/// Whether a body says nothing: empty, blank, or the empty JSON object `{}` (which
/// `blixard_api::Client`, older agents among its users, sends to bodyless `POST`s).
pub fn carries_nothing(body: &[u8]) -> bool {
    if body.iter().all(u8::is_ascii_whitespace) {
        return true;
    }
    matches!(
        serde_json::from_slice::<serde_json::Value>(body),
        Ok(serde_json::Value::Object(m)) if m.is_empty()
    )
}

fn route(parts: &Parts) -> String {
    parts
        .extensions
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| parts.uri.path().to_string())
}

/// The names in a query string, escaped and comma-separated, for an error message.
fn parameter_names(query: &str) -> String {
    let names: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let name = p.split('=').next().unwrap_or("");
            blixard_api::validate::escaped(name)
        })
        .collect();
    names.join(", ")
}

/// The body length a request announces: `None` without a `Content-Length`, `Some(u64::MAX)`
/// for one that is not a number (hyper refuses those before us; this keeps the rule total).
pub fn announced(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get(header::CONTENT_LENGTH)?;
    Some(
        v.to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(u64::MAX),
    )
}

fn too_large(limit: usize) -> Response {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        codes::PAYLOAD_TOO_LARGE,
        format!("request body too large (at most {limit} bytes)"),
    )
    .into_response()
}

/// Middleware of the `/v1/` routes: bounds every request body in size and in time, then hands
/// the handler the body already read.
pub async fn bound_body(req: Request, next: Next) -> Response {
    let (limit, timeout) = body_bounds(req.method(), req.uri().path());
    if announced(req.headers()).is_some_and(|n| n > limit as u64) {
        // Answered from the header: the body is never read, so hyper never sends
        // `100 Continue`, and closes the connection after this answer.
        let mut resp = too_large(limit);
        resp.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return resp;
    }
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await;
    let bytes = match read {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            // `to_bytes` fails on the limit or on a broken connection; tell them apart.
            let msg = e.to_string();
            if msg.contains("length limit") {
                return too_large(limit);
            }
            return ApiError::invalid(format!("reading the request body: {msg}")).into_response();
        }
        Err(_) => {
            let mut resp = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                codes::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    timeout.as_secs()
                ),
            )
            .into_response();
            resp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return resp;
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announced_lengths() {
        let cases: [(Option<&str>, Option<u64>); 5] = [
            (None, None),
            (Some("0"), Some(0)),
            (Some("65536"), Some(65_536)),
            (Some("104857600"), Some(104_857_600)),
            (Some("ten"), Some(u64::MAX)),
        ];
        for (value, want) in cases {
            let mut h = HeaderMap::new();
            if let Some(v) = value {
                h.insert(header::CONTENT_LENGTH, v.parse().expect("header value"));
            }
            assert_eq!(announced(&h), want, "{value:?}");
        }
    }

    #[test]
    fn bodies_that_carry_nothing() {
        let cases: [(&[u8], bool); 7] = [
            (b"", true),
            (b" \r\n", true),
            (b"{}", true),
            (b" { } ", true),
            (br#"{"expected_generation":99}"#, false),
            (b"[]", false),
            (b"garbage", false),
        ];
        for (body, want) in cases {
            assert_eq!(
                carries_nothing(body),
                want,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn parameter_names_are_escaped() {
        assert_eq!(parameter_names("a=1&b"), "a, b");
        assert_eq!(parameter_names("x\u{202e}y=1"), "x\\u{202e}y");
    }
}
