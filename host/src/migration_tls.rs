//! Mutual TLS between daemons for live migration: this host's certificate
//! and key, and the CA whose certificates its peers must present.
//!
//! With it, an outgoing migration's VMM checks that the destination's
//! certificate carries the address it connects to and proves itself with
//! this host's certificate; an incoming one accepts only a source with a
//! certificate of the CA. Without it, migrations stay on loopback: a stream
//! that crosses a network must not be readable or forgeable.

use std::net::IpAddr;
use std::path::Path;
use vmm::migration::{read_ca, TlsClient, TlsIdentity, TlsServer};

/// The daemon's migration credentials, read once at start.
#[derive(Clone, Debug)]
pub struct MigrationTls {
    identity: TlsIdentity,
    ca_pem: String,
}

#[derive(Debug, thiserror::Error)]
#[error("migration TLS: {0}")]
pub struct MigrationTlsError(#[from] vmm::migration::MigrationError);

impl MigrationTls {
    /// Reads and checks the files (each error names its file).
    pub fn read(cert: &Path, key: &Path, ca: &Path) -> Result<Self, MigrationTlsError> {
        Ok(MigrationTls {
            identity: TlsIdentity::read(cert, key)?,
            ca_pem: read_ca(ca)?,
        })
    }

    /// What the source VMM uses to reach the destination host at `address`:
    /// its certificate must carry that address.
    pub fn to_destination(&self, address: IpAddr) -> TlsClient {
        TlsClient {
            ca_pem: self.ca_pem.clone(),
            server_name: address.to_string(),
            identity: Some(self.identity.clone()),
        }
    }

    /// What a destination VMM serves: this host's certificate, and sources
    /// must present one of the CA's.
    pub fn from_source(&self) -> TlsServer {
        TlsServer {
            identity: self.identity.clone(),
            client_ca_pem: Some(self.ca_pem.clone()),
        }
    }
}

/// Whether a migration with `peer` may go ahead: over TLS always, in plain
/// TCP only with a loopback peer. The error says what is missing.
pub fn check_peer(tls: Option<&MigrationTls>, peer: IpAddr) -> Result<(), String> {
    if tls.is_some() || peer.to_canonical().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "{peer} is not a loopback address: migrating between hosts needs the daemon's \
             --migration-tls-cert, --migration-tls-key and --migration-tls-ca"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of its own (tests run in parallel: none shares one).
    fn written(name: &str, text: &str) -> std::path::PathBuf {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("bulkhead-mtls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{n}-{name}"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn credentials() -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (
            written("cert.pem", &cert.pem()),
            written("key.pem", &key.serialize_pem()),
        )
    }

    #[test]
    fn plain_tcp_only_to_a_loopback_peer() {
        assert!(check_peer(None, "127.0.0.1".parse().unwrap()).is_ok());
        assert!(check_peer(None, "::1".parse().unwrap()).is_ok());
        assert!(check_peer(None, "::ffff:127.0.0.1".parse().unwrap()).is_ok());
        let error = check_peer(None, "10.1.2.3".parse().unwrap()).unwrap_err();
        assert!(error.contains("--migration-tls-cert"), "{error}");
    }

    #[test]
    fn with_tls_any_peer_and_both_sides_authenticate() {
        let (cert, key) = credentials();
        let tls = MigrationTls::read(&cert, &key, &cert).unwrap();
        assert!(check_peer(Some(&tls), "10.1.2.3".parse().unwrap()).is_ok());
        let client = tls.to_destination("10.1.2.3".parse().unwrap());
        assert_eq!(client.server_name, "10.1.2.3");
        assert!(client.identity.is_some());
        assert!(tls.from_source().client_ca_pem.is_some());
    }

    #[test]
    fn unreadable_or_wrong_files_are_named() {
        let (cert, key) = credentials();
        let missing = std::path::Path::new("/nonexistent/ca.pem");
        let error = MigrationTls::read(&cert, &key, missing)
            .unwrap_err()
            .to_string();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
        let error = MigrationTls::read(&cert, &key, &key)
            .unwrap_err()
            .to_string();
        assert!(error.contains("no PEM certificate"), "{error}");
        let error = MigrationTls::read(&cert, &cert, &cert)
            .unwrap_err()
            .to_string();
        assert!(error.contains("private key"), "{error}");
    }
}
