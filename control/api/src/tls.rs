//! TLS for every HTTP client of Blixard (CLI, agent, peer traffic): rustls with the ring
//! provider, trusting only the cluster's CA bundle when one is configured.

use std::path::Path;
use std::sync::Once;

/// Errors loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: String, message: String },
}

static PROVIDER: Once = Once::new();

/// Installs rustls' process-wide crypto provider (ring) once.
pub fn install_provider() {
    PROVIDER.call_once(|| {
        // Fails only if another provider was installed first, which is fine too.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Reads a PEM file.
pub fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Makes `builder` trust exactly the certificates in the PEM bundle at `ca`.
pub fn trust_only(
    builder: reqwest::ClientBuilder,
    ca: &Path,
) -> Result<reqwest::ClientBuilder, TlsError> {
    install_provider();
    let pem = read_pem(ca)?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| TlsError::Pem {
        path: ca.display().to_string(),
        message: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: ca.display().to_string(),
            message: "holds no certificate".into(),
        });
    }
    Ok(builder.tls_certs_only(certs))
}
