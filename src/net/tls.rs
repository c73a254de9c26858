//! The inbound TLS acceptor: the server certificate and key read from PEM files, TLS 1.2
//! and 1.3 only, rustls with the ring provider.
//!
//! The session actor asks [`acceptor_for`] once per session with the configuration in
//! force; the acceptor is cached per configuration `Arc`, so the files are read again
//! after a `SIGHUP` reload (a new `Arc`) and not for every connection. Nothing here speaks
//! SMTP or logs key material.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, PerConfig};

/// Why no acceptor could be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or holds no certificate.
    #[error("server_smtp_tls_cert {path}: {reason}")]
    Cert {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The key file could not be read or holds no private key.
    #[error("server_smtp_tls_key {path}: {reason}")]
    Key {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds an acceptor from a PEM certificate chain and a PEM private key.
pub fn load_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let cert_err = |reason: String| TlsError::Cert {
        path: cert.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no certificate in the file".into()));
    }
    // The error text of the PEM reader never includes the key's bytes.
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

static CACHE: PerConfig<Result<TlsAcceptor, String>> = PerConfig::new();

/// The acceptor for `config`: `Ok(None)` when no certificate is configured, an error
/// (as text, so it can be cached and repeated) when the files are unusable. Built once
/// per configuration `Arc`.
pub fn acceptor_for(config: &Arc<Config>) -> Result<Option<TlsAcceptor>, String> {
    let (Some(cert), Some(key)) = (&config.server_smtp_tls_cert, &config.server_smtp_tls_key)
    else {
        return Ok(None);
    };
    CACHE
        .get_or_build(config, || {
            load_acceptor(cert, key).map_err(|e| e.to_string())
        })
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn loads_a_pem_pair_and_caches_per_config() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path());
        assert!(load_acceptor(&cert, &key).is_ok());
        let config = Arc::new(Config {
            server_smtp_tls_cert: Some(cert),
            server_smtp_tls_key: Some(key.clone()),
            ..Config::default()
        });
        assert!(acceptor_for(&config).unwrap().is_some());
        // Cached: removing the files does not matter for the same configuration...
        std::fs::remove_file(&key).unwrap();
        assert!(acceptor_for(&config).unwrap().is_some());
        // ...but a new configuration (a reload) reads them again.
        let reloaded = Arc::new((*config).clone());
        let Err(err) = acceptor_for(&reloaded) else {
            panic!("the key was removed")
        };
        assert!(err.starts_with("server_smtp_tls_key "), "{err}");
        assert!(acceptor_for(&Arc::new(Config::default()))
            .unwrap()
            .is_none());
    }

    #[test]
    fn refuses_a_file_without_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (_, key) = write_pair(dir.path());
        let Err(err) = load_acceptor(&key, &key) else {
            panic!("a key is not a certificate")
        };
        assert!(matches!(err, TlsError::Cert { .. }), "{err}");
    }
}
