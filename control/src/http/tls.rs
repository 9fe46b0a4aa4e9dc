//! Serving HTTPS for a control node: the certificate and key of its configuration, through
//! the shared rustls acceptor and axum listener of [`blixard_api::tls_server`].

use tokio_rustls::TlsAcceptor;

pub use blixard_api::tls_server::{ServerTlsError, TlsListener};

use crate::config::TlsFiles;

/// The rustls acceptor for `files`.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, ServerTlsError> {
    blixard_api::tls_server::acceptor(&files.cert, &files.key)
}
