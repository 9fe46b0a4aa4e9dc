//! The HTTP server of a control node: the client API under `/v1/` ([`api`]; a VM's logs are
//! forwarded to its agent by [`logs`]), `/metrics`, and the Raft peer routes under `/raft/` ([`raft_routes`]) on one listener.

pub mod api;
pub mod auth;
pub mod error;
pub mod logs;
pub mod openapi;
pub mod raft_routes;
pub mod rate_limit;
pub mod strict;
pub mod tls;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;

use crate::metrics::{RequestLabels, RouteLabels};
use crate::node::ControlNode;

/// The whole router of a node.
pub fn router(node: Arc<ControlNode>) -> Router {
    let routes = Router::new()
        .merge(api::routes())
        .merge(raft_routes::routes())
        .layer(axum::middleware::from_fn_with_state(
            node.clone(),
            auth::require,
        ));
    // Outside authentication, so that callers without a valid token are limited too;
    // inside `record`, so that refusals show in the request counts.
    let routes = match node.config.rate_limit {
        Some(limit) => routes.layer(axum::middleware::from_fn_with_state(
            Arc::new(rate_limit::RateLimitState {
                node: node.clone(),
                limiter: rate_limit::ClientLimiter::new(limit),
            }),
            rate_limit::limit,
        )),
        None => routes,
    };
    routes
        .layer(axum::middleware::from_fn_with_state(node.clone(), record))
        .with_state(node)
}

/// Counts every request and records its latency by matched route.
async fn record(State(node): State<Arc<ControlNode>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    if route.starts_with("/raft/") {
        return next.run(req).await;
    }
    let method = req.method().as_str().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    let m = &node.metrics;
    m.requests
        .get_or_create(&RequestLabels {
            method,
            route: route.clone(),
            status: resp.status().as_u16(),
        })
        .inc();
    m.latency
        .get_or_create(&RouteLabels { route })
        .observe(start.elapsed().as_secs_f64());
    resp
}
