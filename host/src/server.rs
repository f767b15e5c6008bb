//! `bulkhead serve`: the daemon's listeners (a Unix socket, and TCP with TLS
//! when asked), connection handling, and overload shedding.

use crate::api::{self, ApiError, ApiState, Peer};
use crate::audit::AuditLog;
use crate::events::EventBus;
use crate::manager::{Manager, ManagerConfig};
use anyhow::Context;
use axum::error_handling::HandleErrorLayer;
use axum::http::StatusCode;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::{TcpListener, UnixListener};
use tower::{Layer, ServiceBuilder};

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub socket: PathBuf,
    pub listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// Directories VM specs may take files from; `<state-dir>/images` is
    /// always one.
    pub allowed_dirs: Vec<PathBuf>,
    pub vmm_binary: PathBuf,
    /// Requests served at once; more are answered 503 at once.
    pub max_requests: usize,
    /// This host's certificate and key, and its peers' CA, for mutual TLS
    /// between daemons in live migration (all three, or none: then
    /// migrations stay on loopback).
    pub migration_tls: Option<MigrationTlsFiles>,
}

/// Where the daemon's migration credentials are.
#[derive(Clone, Debug)]
pub struct MigrationTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

type Service = axum::routing::Router;

fn tls_acceptor(cert: &PathBuf, key: &PathBuf) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("cannot read {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("{} is not a PEM certificate", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("cannot read {}", key.display()))?,
    ))
    .with_context(|| format!("{} is not a PEM key", key.display()))?
    .with_context(|| format!("no private key in {}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the TLS certificate and key do not fit together")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Whether a daemon answers at `path`. A connection alone proves nothing: a
/// VMM forked by a daemon that was just killed holds the listening socket
/// until its exec, and accepts connections nobody will answer.
fn daemon_answers(path: &PathBuf) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(path) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(std::time::Duration::from_secs(2)));
    let request = b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    if stream.write_all(request).is_err() {
        return false;
    }
    let mut answer = [0u8; 12];
    stream.read_exact(&mut answer).is_ok() && answer.starts_with(b"HTTP/1.1 200")
}

fn bind_unix(path: &PathBuf) -> anyhow::Result<UnixListener> {
    if path.exists() {
        if daemon_answers(path) {
            anyhow::bail!("{} is in use by another daemon", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Serves one HTTP/1.1 connection (with upgrades, for consoles).
fn serve_connection<IO>(io: IO, service: Service, peer: Peer)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let service = TowerToHyperService::new(axum::Extension(peer).layer(service));
        let served = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
            .await;
        if let Err(e) = served {
            tracing::debug!("connection ended: {e}");
        }
    });
}

/// Runs the daemon until SIGINT or SIGTERM. VMs keep running after it ends.
pub async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create {}", config.state_dir.display()))?;
    let images = config.state_dir.join("images");
    std::fs::create_dir_all(&images)?;
    let mut allowed_dirs = vec![images.canonicalize()?];
    for dir in &config.allowed_dirs {
        allowed_dirs.push(
            dir.canonicalize()
                .with_context(|| format!("--allow-dir {}", dir.display()))?,
        );
    }
    let tls = match (&config.listen, &config.tls_cert, &config.tls_key) {
        (Some(_), Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
        (Some(addr), None, None) if addr.ip().is_loopback() => {
            tracing::warn!("serving plain HTTP on {addr} (loopback only; use TLS elsewhere)");
            None
        }
        (Some(addr), _, _) => {
            anyhow::bail!(
                "--listen {addr} needs --tls-cert and --tls-key (plain HTTP only on loopback)"
            )
        }
        (None, _, _) => None,
    };
    let migration_tls = match &config.migration_tls {
        Some(files) => Some(Arc::new(crate::migration_tls::MigrationTls::read(
            &files.cert,
            &files.key,
            &files.ca,
        )?)),
        None => None,
    };
    let events = EventBus::default();
    let manager = {
        let config = ManagerConfig {
            state_dir: config.state_dir.clone(),
            allowed_dirs,
            vmm_binary: config.vmm_binary.clone(),
            kvm_device: "/dev/kvm".into(),
            cgroups: crate::cgroup::Cgroups::detect(),
        };
        let events = events.clone();
        tokio::task::spawn_blocking(move || Manager::open(config, events)).await??
    };
    let state = Arc::new(ApiState {
        manager,
        audit: AuditLog::open(&config.state_dir.join("audit.log"))?,
        events,
        console_writers: Default::default(),
        // SAFETY: geteuid has no preconditions.
        daemon_uid: unsafe { libc::geteuid() },
        migration_tls,
    });
    let router = api::router(state);
    // One limit for the whole daemon, shared by every connection.
    let service = ServeRouter::new(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "too many requests in progress; retry shortly",
                )
            }))
            .load_shed()
            .concurrency_limit(config.max_requests.max(1))
            .service(router),
    );

    let unix = bind_unix(&config.socket)?;
    eprintln!("bulkhead: serving on {}", config.socket.display());
    let tcp = match config.listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            eprintln!("bulkhead: serving on {scheme}://{}", listener.local_addr()?);
            Some(listener)
        }
        None => None,
    };

    let unix_loop = {
        let service = service.clone();
        async move {
            loop {
                let Ok((stream, _)) = unix.accept().await else {
                    continue;
                };
                let uid = stream.peer_cred().map(|c| c.uid()).unwrap_or(u32::MAX);
                serve_connection(stream, service.router(), Peer::Local { uid });
            }
        }
    };
    let tcp_loop = async move {
        let Some(listener) = tcp else {
            return std::future::pending().await;
        };
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = service.router();
            match &tls {
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        match acceptor.accept(stream).await {
                            Ok(stream) => serve_connection(stream, service, Peer::Remote),
                            Err(e) => tracing::debug!("TLS handshake failed: {e}"),
                        }
                    });
                }
                None => serve_connection(stream, service, Peer::Remote),
            }
        }
    };
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = unix_loop => {}
        _ = tcp_loop => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    eprintln!("bulkhead: daemon stopping; VMs keep running");
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}

/// The limited service, shareable as a Router (the type each connection takes).
#[derive(Clone)]
struct ServeRouter(axum::Router);

impl ServeRouter {
    fn new<S>(service: S) -> Self
    where
        S: tower::Service<
                axum::extract::Request,
                Response = axum::response::Response,
                Error = std::convert::Infallible,
            > + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        ServeRouter(axum::Router::new().fallback_service(service))
    }

    fn router(&self) -> axum::Router {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_that_accepts_but_never_answers_is_taken_over() {
        let dir = std::env::temp_dir().join(format!("bulkhead-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        // What a VMM forked by a killed daemon holds until its exec.
        let ghost = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(!daemon_answers(&path));
        let listener = bind_unix(&path).unwrap();
        drop(ghost);
        // The new listener is the one at the path now.
        let (_client, accepted) =
            tokio::join!(tokio::net::UnixStream::connect(&path), listener.accept());
        assert!(accepted.is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
