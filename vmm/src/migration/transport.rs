//! Where a migration stream goes: TCP or a Unix socket, optionally in TLS.

use super::protocol::Stream;
use super::MigrationError;
use serde::{Deserialize, Serialize};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A migration address: `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

impl Endpoint {
    pub fn parse(uri: &str) -> Result<Endpoint, MigrationError> {
        let bad = || MigrationError::Uri(uri.to_string());
        if let Some(address) = uri.strip_prefix("tcp:") {
            // An IP address, never a name: resolving one needs files and
            // system calls a sandboxed VMM does not have, and a tenant must
            // not make the host look names up.
            address.parse::<std::net::SocketAddr>().map_err(|_| bad())?;
            Ok(Endpoint::Tcp(address.to_string()))
        } else if let Some(path) = uri.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            Ok(Endpoint::Unix(PathBuf::from(path)))
        } else {
            Err(bad())
        }
    }
}

/// The source's TLS settings: whom it trusts and the name it expects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsClient {
    /// PEM file of the CA certificate(s) the destination's certificate must chain to.
    pub ca: PathBuf,
    /// The name the destination's certificate must carry.
    pub server_name: String,
}

/// The destination's TLS settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsServer {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn tls_error(what: &str) -> impl FnOnce(String) -> MigrationError + '_ {
    move |e| MigrationError::Tls(format!("{what}: {e}"))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How long one read or write on the stream may block before the migration
/// is declared broken (a peer that vanished without closing).
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to `uri` as the source.
pub fn connect(uri: &str, tls: Option<&TlsClient>) -> Result<Box<dyn Stream>, MigrationError> {
    let connect_error = |source| MigrationError::Connect {
        uri: uri.to_string(),
        source,
    };
    match Endpoint::parse(uri)? {
        Endpoint::Tcp(address) => {
            let stream = TcpStream::connect(&address).map_err(connect_error)?;
            stream.set_nodelay(true).map_err(connect_error)?;
            let (read, write) = (stream.try_clone().map_err(connect_error)?, stream);
            finish(write, tls.map(Side::Client), move |t| {
                read.set_read_timeout(t)?;
                read.set_write_timeout(t)
            })
        }
        Endpoint::Unix(path) => {
            let stream = UnixStream::connect(&path).map_err(connect_error)?;
            let (read, write) = (stream.try_clone().map_err(connect_error)?, stream);
            finish(write, tls.map(Side::Client), move |t| {
                read.set_read_timeout(t)?;
                read.set_write_timeout(t)
            })
        }
    }
}

/// Which end of a TLS session this process is.
enum Side<'a> {
    Client(&'a TlsClient),
    Server(&'a TlsServer),
}

/// Gives a connected socket its I/O timeouts (`set_timeouts`) and wraps it in
/// TLS when asked.
fn finish<S: std::io::Read + std::io::Write + Send + 'static>(
    stream: S,
    tls: Option<Side>,
    set_timeouts: impl FnOnce(Option<Duration>) -> std::io::Result<()>,
) -> Result<Box<dyn Stream>, MigrationError> {
    set_timeouts(Some(IO_TIMEOUT)).map_err(MigrationError::Socket)?;
    Ok(match tls {
        Some(Side::Client(tls)) => Box::new(tls_client(stream, tls)?),
        Some(Side::Server(tls)) => Box::new(tls_server(stream, tls)?),
        None => Box::new(stream),
    })
}

/// Drives a TLS handshake to its end, so a bad certificate is reported as such.
fn handshake<D, S: std::io::Read + std::io::Write>(
    connection: &mut rustls::ConnectionCommon<D>,
    socket: &mut S,
) -> Result<(), MigrationError> {
    while connection.is_handshaking() {
        connection
            .complete_io(socket)
            .map_err(|e| MigrationError::Tls(format!("handshake: {e}")))?;
    }
    Ok(())
}

fn tls_client<S: std::io::Read + std::io::Write + Send + 'static>(
    stream: S,
    tls: &TlsClient,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, S>, MigrationError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&tls.ca)
        .map_err(|e| MigrationError::Tls(format!("CA file {}: {e}", tls.ca.display())))?;
    for cert in certs {
        let cert =
            cert.map_err(|e| MigrationError::Tls(format!("CA file {}: {e}", tls.ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| MigrationError::Tls(format!("CA file {}: {e}", tls.ca.display())))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("protocol versions")(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(tls.server_name.clone())
        .map_err(|e| MigrationError::Tls(format!("server name {:?}: {e}", tls.server_name)))?;
    let connection = rustls::ClientConnection::new(Arc::new(config), name)
        .map_err(|e| tls_error("client")(e.to_string()))?;
    let mut stream = rustls::StreamOwned::new(connection, stream);
    handshake(&mut stream.conn, &mut stream.sock)?;
    Ok(stream)
}

/// A bound listener waiting for one source.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub fn bind(uri: &str) -> Result<Listener, MigrationError> {
        let listen_error = |source| MigrationError::Listen {
            uri: uri.to_string(),
            source,
        };
        Ok(match Endpoint::parse(uri)? {
            Endpoint::Tcp(address) => {
                Listener::Tcp(TcpListener::bind(&address).map_err(listen_error)?)
            }
            Endpoint::Unix(path) => {
                // A socket file nobody listens on is a leftover: replace it.
                if path.exists() && UnixStream::connect(&path).is_err() {
                    let _ = std::fs::remove_file(&path);
                }
                Listener::Unix(UnixListener::bind(&path).map_err(listen_error)?, path)
            }
        })
    }

    /// A listening socket bound by someone else (the daemon, which owns the
    /// host's addresses) and passed as a descriptor.
    pub fn from_descriptor(fd: std::os::fd::OwnedFd) -> Result<Listener, MigrationError> {
        use std::os::fd::AsRawFd;
        let option = |name: libc::c_int| -> std::io::Result<libc::c_int> {
            let mut value: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `value`, which we own.
            let rc = unsafe {
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    name,
                    (&mut value as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(value)
        };
        let refuse = |why: String| MigrationError::Incoming(format!("the passed listener {why}"));
        let listening =
            option(libc::SO_ACCEPTCONN).map_err(|e| refuse(format!("is no socket: {e}")))?;
        if listening != 1 {
            return Err(refuse("is not listening".into()));
        }
        match option(libc::SO_DOMAIN).map_err(|e| refuse(e.to_string()))? {
            libc::AF_INET | libc::AF_INET6 => Ok(Listener::Tcp(TcpListener::from(fd))),
            // The daemon removes its socket file; this side knows no path.
            libc::AF_UNIX => Ok(Listener::Unix(UnixListener::from(fd), PathBuf::new())),
            other => Err(refuse(format!("has address family {other}"))),
        }
    }

    /// The bound address (`tcp:127.0.0.1:PORT` for port 0 binds).
    pub fn uri(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| format!("tcp:{a}"))
                .unwrap_or_else(|_| "tcp:?".into()),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }

    /// Waits for the source; the stream then has I/O timeouts set.
    pub fn accept(&self, tls: Option<&TlsServer>) -> Result<Box<dyn Stream>, MigrationError> {
        self.accept_expected(tls, &Expected::default())
    }

    /// Waits for the source `expected` names, until its deadline: a TCP peer
    /// from another address is dropped before a byte of it is read.
    pub fn accept_expected(
        &self,
        tls: Option<&TlsServer>,
        expected: &Expected,
    ) -> Result<Box<dyn Stream>, MigrationError> {
        let accept_error = |e: std::io::Error| MigrationError::Incoming(format!("accept: {e}"));
        let fd = match self {
            Listener::Tcp(listener) => std::os::fd::AsRawFd::as_raw_fd(listener),
            Listener::Unix(listener, _) => std::os::fd::AsRawFd::as_raw_fd(listener),
        };
        match self {
            Listener::Tcp(listener) => {
                let stream = loop {
                    wait_for_a_peer(fd, expected.deadline)?;
                    let (stream, peer) = listener.accept().map_err(accept_error)?;
                    match expected.source {
                        Some(source) if peer.ip().to_canonical() != source.to_canonical() => {
                            tracing::warn!(%peer, %source, "dropped a migration peer that is not the expected source");
                        }
                        _ => break stream,
                    }
                };
                stream.set_nodelay(true).map_err(accept_error)?;
                let read = stream.try_clone().map_err(accept_error)?;
                finish(stream, tls.map(Side::Server), move |t| {
                    read.set_read_timeout(t)?;
                    read.set_write_timeout(t)
                })
            }
            Listener::Unix(listener, _) => {
                wait_for_a_peer(fd, expected.deadline)?;
                let (stream, _) = listener.accept().map_err(accept_error)?;
                let read = stream.try_clone().map_err(accept_error)?;
                finish(stream, tls.map(Side::Server), move |t| {
                    read.set_read_timeout(t)?;
                    read.set_write_timeout(t)
                })
            }
        }
    }
}

/// Whom a destination waits for, and until when; by default anyone, for ever.
#[derive(Clone, Copy, Debug, Default)]
pub struct Expected {
    /// A TCP source's address; Unix-socket peers are the socket's to limit.
    pub source: Option<std::net::IpAddr>,
    pub deadline: Option<std::time::Instant>,
}

/// Blocks until `fd` (a listener) has a connection to accept, or `deadline`.
fn wait_for_a_peer(fd: i32, deadline: Option<std::time::Instant>) -> Result<(), MigrationError> {
    loop {
        let timeout_ms = match deadline {
            None => -1,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(MigrationError::Incoming(
                        "no migration from the expected source before the deadline".into(),
                    ));
                }
                left.as_millis().min(i32::MAX as u128) as i32
            }
        };
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one descriptor the listener owns for the whole call.
        let rc = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
        if rc > 0 {
            return Ok(());
        }
        if rc < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(MigrationError::Incoming(format!(
                    "waiting for a source: {error}"
                )));
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            if !path.as_os_str().is_empty() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

fn tls_server<S: std::io::Read + std::io::Write + Send + 'static>(
    stream: S,
    tls: &TlsServer,
) -> Result<rustls::StreamOwned<rustls::ServerConnection, S>, MigrationError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| MigrationError::Tls(format!("certificate {}: {e}", tls.cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| MigrationError::Tls(format!("key {}: {e}", tls.key.display())))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("protocol versions")(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_error("certificate and key")(e.to_string()))?;
    let connection = rustls::ServerConnection::new(Arc::new(config))
        .map_err(|e| tls_error("server")(e.to_string()))?;
    let mut stream = rustls::StreamOwned::new(connection, stream);
    handshake(&mut stream.conn, &mut stream.sock)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uris() {
        assert_eq!(
            Endpoint::parse("tcp:127.0.0.1:4444").unwrap(),
            Endpoint::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            Endpoint::parse("tcp:[::1]:4444").unwrap(),
            Endpoint::Tcp("[::1]:4444".into())
        );
        for name in [
            "tcp:localhost:4444",
            "tcp:example.com:80",
            "tcp::4444",
            "tcp:1.2.3.4:x",
        ] {
            assert!(Endpoint::parse(name).is_err(), "{name}");
        }
        assert_eq!(
            Endpoint::parse("unix:/run/m.sock").unwrap(),
            Endpoint::Unix("/run/m.sock".into())
        );
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp::1",
            "tcp:h:99999",
            "unix:",
            "http://x",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
