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

/// A certificate (chain) and its private key, in PEM: what a side of a
/// mutual-TLS migration proves itself with. Carried as text, not paths, so a
/// sandboxed VMM opens no host file for it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key: this lands in logs and error reports.
        f.debug_struct("TlsIdentity")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .finish_non_exhaustive()
    }
}

/// The source's TLS settings: whom it trusts, the name it expects, and what
/// it proves itself with to a destination that authenticates its sources.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsClient {
    /// The CA certificate(s), PEM, the destination's certificate must chain to.
    pub ca_pem: String,
    /// The name (or IP address) the destination's certificate must carry.
    pub server_name: String,
    /// This source's certificate, for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<TlsIdentity>,
}

/// The destination's TLS settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsServer {
    pub identity: TlsIdentity,
    /// With these CA certificate(s), PEM: mutual TLS, a source must present
    /// a certificate that chains to one of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_pem: Option<String>,
}

/// The certificates in `pem` (`what` names them in errors); at least one.
fn certificates(
    pem: &str,
    what: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, MigrationError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| MigrationError::Tls(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(MigrationError::Tls(format!("{what}: no PEM certificate")));
    }
    Ok(certs)
}

/// A trust store of the CA certificates in `pem`.
fn trust(pem: &str, what: &str) -> Result<rustls::RootCertStore, MigrationError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(pem, what)? {
        roots
            .add(cert)
            .map_err(|e| MigrationError::Tls(format!("{what}: {e}")))?;
    }
    Ok(roots)
}

impl TlsIdentity {
    fn parts(
        &self,
    ) -> Result<
        (
            Vec<rustls::pki_types::CertificateDer<'static>>,
            rustls::pki_types::PrivateKeyDer<'static>,
        ),
        MigrationError,
    > {
        use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
        let certs = certificates(&self.cert_pem, "certificate")?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| MigrationError::Tls(format!("private key: {e}")))?;
        Ok((certs, key))
    }

    /// Reads a certificate and key from PEM files (the CLI, for the user's
    /// own files), naming the file that is wrong.
    pub fn read(cert: &std::path::Path, key: &std::path::Path) -> Result<Self, MigrationError> {
        let identity = TlsIdentity {
            cert_pem: read_pem(cert)?,
            key_pem: read_pem(key)?,
        };
        identity.parts()?;
        Ok(identity)
    }
}

/// Reads a CA file (PEM): its text, once checked to hold certificates a
/// trust store takes. The error names the file.
pub fn read_ca(path: &std::path::Path) -> Result<String, MigrationError> {
    let pem = read_pem(path)?;
    trust(&pem, &path.display().to_string())?;
    Ok(pem)
}

/// A PEM file's text, its path in the error.
pub fn read_pem(path: &std::path::Path) -> Result<String, MigrationError> {
    std::fs::read_to_string(path)
        .map_err(|e| MigrationError::Tls(format!("{}: {e}", path.display())))
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

/// A connected migration stream; over a plain Unix socket also a second
/// handle on the socket, which can carry descriptors (a same-host
/// migration's TAPs).
pub struct Connection {
    pub stream: Box<dyn Stream>,
    pub unix: Option<UnixStream>,
}

/// Connects to `uri` as the source, keeping a descriptor-passing handle
/// when the stream is a plain Unix socket.
pub fn connect(uri: &str, tls: Option<&TlsClient>) -> Result<Connection, MigrationError> {
    let connect_error = |source| MigrationError::Connect {
        uri: uri.to_string(),
        source,
    };
    match Endpoint::parse(uri)? {
        Endpoint::Tcp(address) => {
            let stream = TcpStream::connect(&address).map_err(connect_error)?;
            stream.set_nodelay(true).map_err(connect_error)?;
            let (read, write) = (stream.try_clone().map_err(connect_error)?, stream);
            Ok(Connection {
                stream: finish(write, tls.map(Side::Client), move |t| {
                    read.set_read_timeout(t)?;
                    read.set_write_timeout(t)
                })?,
                unix: None,
            })
        }
        Endpoint::Unix(path) => {
            let stream = UnixStream::connect(&path).map_err(connect_error)?;
            let unix = match tls {
                None => Some(stream.try_clone().map_err(connect_error)?),
                Some(_) => None,
            };
            let (read, write) = (stream.try_clone().map_err(connect_error)?, stream);
            Ok(Connection {
                stream: finish(write, tls.map(Side::Client), move |t| {
                    read.set_read_timeout(t)?;
                    read.set_write_timeout(t)
                })?,
                unix,
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
    use rustls::pki_types::ServerName;
    let roots = trust(&tls.ca_pem, "CA certificate")?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("protocol versions")(e.to_string()))?
        .with_root_certificates(roots);
    let config = match &tls.identity {
        Some(identity) => {
            let (certs, key) = identity.parts()?;
            config
                .with_client_auth_cert(certs, key)
                .map_err(|e| tls_error("certificate and key")(e.to_string()))?
        }
        None => config.with_no_client_auth(),
    };
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
        Ok(self.accept_connection(tls, expected)?.stream)
    }

    /// [`Listener::accept_expected`], keeping a descriptor-passing handle
    /// when the stream is a plain Unix socket.
    pub fn accept_connection(
        &self,
        tls: Option<&TlsServer>,
        expected: &Expected,
    ) -> Result<Connection, MigrationError> {
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
                Ok(Connection {
                    stream: finish(stream, tls.map(Side::Server), move |t| {
                        read.set_read_timeout(t)?;
                        read.set_write_timeout(t)
                    })?,
                    unix: None,
                })
            }
            Listener::Unix(listener, _) => {
                wait_for_a_peer(fd, expected.deadline)?;
                let (stream, _) = listener.accept().map_err(accept_error)?;
                let unix = match tls {
                    None => Some(stream.try_clone().map_err(accept_error)?),
                    Some(_) => None,
                };
                let read = stream.try_clone().map_err(accept_error)?;
                Ok(Connection {
                    stream: finish(stream, tls.map(Side::Server), move |t| {
                        read.set_read_timeout(t)?;
                        read.set_write_timeout(t)
                    })?,
                    unix,
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
    let (certs, key) = tls.identity.parts()?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("protocol versions")(e.to_string()))?;
    let config = match &tls.client_ca_pem {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(trust(ca, "client CA certificate")?),
                provider(),
            )
            .build()
            .map_err(|e| tls_error("client CA certificate")(e.to_string()))?;
            config.with_client_cert_verifier(verifier)
        }
        None => config.with_no_client_auth(),
    };
    let config = config
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
    use std::io::{Read, Write};

    /// A CA, and certificates it signs for 127.0.0.1.
    struct Authority {
        key: rcgen::KeyPair,
        cert: rcgen::Certificate,
    }

    impl Authority {
        fn new() -> Self {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let cert = params.self_signed(&key).unwrap();
            Authority { key, cert }
        }

        fn issue(&self) -> TlsIdentity {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
                .unwrap()
                .signed_by(&key, &self.cert, &self.key)
                .unwrap();
            TlsIdentity {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            }
        }

        fn pem(&self) -> String {
            self.cert.pem()
        }
    }

    /// A TLS session between a source and a destination over a socket
    /// pair: the destination's error, else the word the source sent.
    fn session(client: TlsClient, server: TlsServer) -> Result<String, MigrationError> {
        let (a, b) = UnixStream::pair().unwrap();
        let source = std::thread::spawn(move || {
            let mut stream = tls_client(a, &client)?;
            stream.write_all(b"hello").map_err(MigrationError::Socket)?;
            stream.flush().map_err(MigrationError::Socket)?;
            Ok::<_, MigrationError>(stream)
        });
        let mut stream = tls_server(b, &server)?;
        let mut word = [0u8; 5];
        stream
            .read_exact(&mut word)
            .map_err(MigrationError::Socket)?;
        let _ = source.join().unwrap();
        Ok(String::from_utf8_lossy(&word).into_owned())
    }

    fn mutual(
        ca: &Authority,
        source: TlsIdentity,
        destination: TlsIdentity,
    ) -> (TlsClient, TlsServer) {
        (
            TlsClient {
                ca_pem: ca.pem(),
                server_name: "127.0.0.1".into(),
                identity: Some(source),
            },
            TlsServer {
                identity: destination,
                client_ca_pem: Some(ca.pem()),
            },
        )
    }

    #[test]
    fn mutual_tls_between_two_hosts_of_one_authority() {
        let ca = Authority::new();
        let (client, server) = mutual(&ca, ca.issue(), ca.issue());
        assert_eq!(session(client, server).unwrap(), "hello");
    }

    #[test]
    fn a_destination_that_authenticates_sources_refuses_one_without_a_certificate() {
        let ca = Authority::new();
        let (mut client, server) = mutual(&ca, ca.issue(), ca.issue());
        client.identity = None;
        let error = session(client, server).unwrap_err().to_string();
        assert!(error.contains("handshake"), "{error}");
    }

    #[test]
    fn a_destination_refuses_a_source_another_authority_signed() {
        let (ca, stranger) = (Authority::new(), Authority::new());
        let (client, server) = mutual(&ca, stranger.issue(), ca.issue());
        let error = session(client, server).unwrap_err().to_string();
        assert!(error.contains("handshake"), "{error}");
    }

    #[test]
    fn a_source_refuses_a_destination_another_authority_signed() {
        let (ca, stranger) = (Authority::new(), Authority::new());
        let (client, server) = mutual(&ca, ca.issue(), stranger.issue());
        let (a, b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let _ = tls_server(b, &server);
        });
        let error = tls_client(a, &client).err().unwrap().to_string();
        assert!(error.contains("invalid peer certificate"), "{error}");
    }

    #[test]
    fn a_source_refuses_a_destination_certified_for_another_address() {
        let ca = Authority::new();
        let (mut client, server) = mutual(&ca, ca.issue(), ca.issue());
        client.server_name = "127.0.0.2".into();
        let (a, b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let _ = tls_server(b, &server);
        });
        let error = tls_client(a, &client).err().unwrap().to_string();
        assert!(error.contains("not valid for name"), "{error}");
    }

    #[test]
    fn bad_pem_is_named() {
        let ca = Authority::new();
        let mut identity = ca.issue();
        identity.key_pem = "not a key".into();
        assert!(identity
            .parts()
            .unwrap_err()
            .to_string()
            .contains("private key"));
        assert!(trust("junk", "CA certificate")
            .unwrap_err()
            .to_string()
            .contains("CA certificate: no PEM certificate"));
    }

    #[test]
    fn an_identity_never_shows_its_key() {
        let identity = Authority::new().issue();
        let shown = format!("{identity:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert!(!shown.contains(&identity.key_pem[40..80]), "{shown}");
    }

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
