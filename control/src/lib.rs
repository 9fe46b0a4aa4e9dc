//! `blixard-control`: a control-plane node. Three (or five) of them form an openraft cluster
//! whose log and state machine live in SQLite; every node serves the HTTP API, forwarding
//! writes to the leader.
//!
//! Layout: pure cores ([`state_machine`], [`scheduler`]) with no IO; [`store`] (the only
//! SQLite user), [`network`] (Raft RPC client), [`node`] (the Raft runtime), [`http`] (axum
//! routes), [`leader_loop`] and [`election_trigger`] around them; [`run`] wires them together for the binary.

pub mod admission;
pub mod config;
pub mod election_trigger;
pub mod faults;
pub mod gather;
pub mod heartbeat_forward;
pub mod http;
pub mod leader_check;
pub mod leader_loop;
pub mod listing;
pub mod liveness;
pub mod metrics;
pub mod network;
pub mod node;
pub mod plan;
pub mod pre_vote;
pub mod raft_types;
pub mod scheduler;
pub mod sd_status;
pub mod state_index;
pub mod state_machine;
pub mod store;

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::net::TcpListener;

pub use config::Config;
use node::{ControlNode, NodeError};

/// Errors that stop a node.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("http server")]
    Serve(#[source] std::io::Error),
    #[error("signal handler")]
    Signal(#[source] std::io::Error),
    #[error(
        "raft stopped on a fatal error: {0}; exiting so that the service manager restarts \
         this node (if the disk is full, free space: nothing acknowledged is lost)"
    )]
    RaftStopped(String),
}

/// Resolves when the Raft core has stopped on a fatal error (a storage error such as a full
/// disk: openraft 0.9 ends its core on any `StorageError`), with that error.
async fn raft_stopped(node: std::sync::Arc<ControlNode>) -> String {
    let mut metrics = node.raft.metrics();
    loop {
        if let Err(e) = &metrics.borrow_and_update().running_state {
            return e.to_string();
        }
        if metrics.changed().await.is_err() {
            return "the Raft core is gone".into();
        }
    }
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Runs a node until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), RunError> {
    let listen = config.listen;
    let task_retention_ms = config.task_retention_ms;
    let acceptor = match &config.tls {
        Some(files) => {
            Some(http::tls::acceptor(files).map_err(|e| NodeError::Config(e.to_string()))?)
        }
        None => None,
    };
    if config.auth.is_none() {
        tracing::warn!(
            "authentication is off: anyone who can reach {listen} can drive the cluster"
        );
    }
    let node = ControlNode::open(config).await?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: listen.to_string(),
            source,
        })?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let app = http::router(node.clone());
    let stopped = async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    };
    let server = match acceptor {
        Some(acceptor) => {
            let tls = http::tls::TlsListener {
                tcp: listener,
                acceptor,
            };
            let app = app.into_make_service_with_connect_info::<http::rate_limit::PeerAddr>();
            tokio::spawn(async move { axum::serve(tls, app).with_graceful_shutdown(stopped).await })
        }
        None => {
            let app = app.into_make_service_with_connect_info::<http::rate_limit::PeerAddr>();
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
            })
        }
    };
    node.bootstrap().await?;
    let placer = tokio::spawn(leader_loop::run(
        node.clone(),
        Default::default(),
        task_retention_ms,
    ));
    let elections = tokio::spawn(election_trigger::run(node.clone()));
    tracing::info!(node_id = node.id, %listen, "serving");
    notify(&[
        NotifyState::Ready,
        NotifyState::Status("serving; waiting for a leader"),
    ]);
    let status = tokio::spawn(sd_status::run(node.clone()));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(RunError::Signal)?;
    let mut fatal = None;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        e = raft_stopped(node.clone()) => fatal = Some(e),
    }
    if let Some(e) = &fatal {
        // The node can neither append nor apply: stop answering (a client retries another
        // node) and exit non-zero rather than serve stale reads as a zombie.
        tracing::error!(error = %e, "raft stopped on a fatal error; exiting");
    }
    tracing::info!("stopping");
    notify(&[NotifyState::Stopping]);
    status.abort();
    placer.abort();
    elections.abort();
    let _ = stop_tx.send(true);
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Err(e))) => return Err(RunError::Serve(e)),
        Ok(_) => {}
        Err(_) => tracing::warn!("http server did not stop within 5s"),
    }
    if let Err(e) = node.raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    match fatal {
        Some(e) => Err(RunError::RaftStopped(e)),
        None => Ok(()),
    }
}
