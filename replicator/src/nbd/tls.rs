//! TLS for NBD (`NBD_OPT_STARTTLS`): the server's rustls configuration, built from PEM files.
//!
//! rustls with the `ring` provider (the crate the replication link's AEAD already uses): TLS 1.3
//! and 1.2, no older versions (the NBD spec: 1.2 at least). Client certificates are asked for
//! only with a client CA, and then required.

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The files of a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Clients must present a certificate signed by one of these CAs (PEM); `None`: no client
    /// certificate is asked for.
    pub client_ca: Option<PathBuf>,
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {} holds no usable PEM {kind}: {detail}", path.display())]
    Pem { what: &'static str, path: PathBuf, kind: &'static str, detail: String },
    #[error(
        "{what} {} has mode {mode:04o}: anyone on this machine can read the private key; chmod 600 (or 640 with a group) {}",
        path.display(),
        path.display()
    )]
    KeyMode { what: &'static str, path: PathBuf, mode: u32 },
    #[error("the TLS certificate {} and key {} cannot serve: {source}", cert.display(), key.display())]
    Server {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("tls_client_ca {}: {detail}", path.display())]
    ClientCa { path: PathBuf, detail: String },
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let bad = |detail: String| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        kind: "certificate",
        detail,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    const WHAT: &str = "tls_key";
    let meta = std::fs::metadata(path).map_err(|source| TlsError::Read {
        what: WHAT,
        path: path.to_path_buf(),
        source,
    })?;
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
    // World-readable is refused; group-readable is allowed (Debian keeps keys 0640 root:ssl-cert).
    if mode & 0o004 != 0 {
        return Err(TlsError::KeyMode { what: WHAT, path: path.to_path_buf(), mode });
    }
    let pem = read(WHAT, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        what: WHAT,
        path: path.to_path_buf(),
        kind: "private key",
        detail: e.to_string(),
    })
}

/// The rustls server configuration for `files`.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certificates("tls_cert", &files.cert)?;
    let key = private_key(&files.key)?;
    let server_err =
        |source| TlsError::Server { cert: files.cert.clone(), key: files.key.clone(), source };
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(server_err)?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certificates("tls_client_ca", ca)? {
                roots
                    .add(c)
                    .map_err(|e| TlsError::ClientCa { path: ca.clone(), detail: e.to_string() })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| TlsError::ClientCa { path: ca.clone(), detail: e.to_string() })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let cfg = builder.with_single_cert(certs, key).map_err(server_err)?;
    Ok(Arc::new(cfg))
}
