//! The API client the CLI uses: HTTP/1.1 over the daemon's Unix socket, over
//! TLS (`https://HOST:PORT`, trusting a given CA), or plain TCP
//! (`http://HOST:PORT`, which the daemon serves only on loopback).

use anyhow::{bail, Context};
use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
    Tls {
        /// HOST:PORT
        addr: String,
        /// The name (or IP) the daemon's certificate must carry.
        server_name: String,
        /// PEM file of the CA(s) to trust.
        ca: PathBuf,
    },
}

impl Endpoint {
    /// A socket path, `http://HOST:PORT`, or `https://HOST:PORT` (with `ca`).
    pub fn parse(text: &str, ca: Option<&std::path::Path>) -> anyhow::Result<Endpoint> {
        if let Some(rest) = text.strip_prefix("http://") {
            Ok(Endpoint::Tcp(rest.trim_end_matches('/').to_string()))
        } else if let Some(rest) = text.strip_prefix("https://") {
            let addr = rest.trim_end_matches('/').to_string();
            let Some(ca) = ca else {
                bail!("{text}: https needs --ca PEM (the CA that signed the daemon's certificate)");
            };
            let host = match addr.rsplit_once(':') {
                Some((host, port)) if port.parse::<u16>().is_ok() => host,
                _ => bail!("{text}: expected https://HOST:PORT"),
            };
            Ok(Endpoint::Tls {
                server_name: host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                addr,
                ca: ca.to_path_buf(),
            })
        } else {
            Ok(Endpoint::Unix(PathBuf::from(text)))
        }
    }
}

fn tls_connector(ca: &std::path::Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    let file = std::fs::File::open(ca).with_context(|| format!("cannot read {}", ca.display()))?;
    for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(file)) {
        roots
            .add(cert.with_context(|| format!("{} is not PEM", ca.display()))?)
            .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("no certificate in {}", ca.display());
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        config,
    )))
}

#[derive(Clone, Debug)]
pub struct Client {
    pub endpoint: Endpoint,
    pub token: Option<String>,
}

/// An answer: status and JSON body (Null when empty or not JSON).
pub struct Answer {
    pub status: StatusCode,
    pub body: serde_json::Value,
    pub text: String,
}

impl Answer {
    /// The error message the daemon gave, for a failed call.
    pub fn error_message(&self) -> String {
        self.body["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| self.text.clone())
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

impl Client {
    async fn connect(&self) -> anyhow::Result<Sender> {
        async fn handshake<IO>(io: IO) -> anyhow::Result<Sender>
        where
            IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        {
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
            tokio::spawn(async move {
                let _ = connection.with_upgrades().await;
            });
            Ok(sender)
        }
        match &self.endpoint {
            Endpoint::Unix(path) => {
                handshake(
                    tokio::net::UnixStream::connect(path)
                        .await
                        .with_context(|| {
                            format!("cannot reach the daemon at {}", path.display())
                        })?,
                )
                .await
            }
            Endpoint::Tcp(addr) => {
                handshake(
                    tokio::net::TcpStream::connect(addr)
                        .await
                        .with_context(|| format!("cannot reach the daemon at {addr}"))?,
                )
                .await
            }
            Endpoint::Tls {
                addr,
                server_name,
                ca,
            } => {
                let connector = tls_connector(ca)?;
                let tcp = tokio::net::TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("cannot reach the daemon at {addr}"))?;
                let name = rustls::pki_types::ServerName::try_from(server_name.clone())
                    .with_context(|| format!("{server_name} is not a host name or address"))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .with_context(|| format!("TLS with the daemon at {addr}"))?;
                handshake(tls).await
            }
        }
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<Request<Full<Bytes>>> {
        let host = match &self.endpoint {
            Endpoint::Unix(_) => "localhost".to_string(),
            Endpoint::Tcp(addr) | Endpoint::Tls { addr, .. } => addr.clone(),
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, host);
        if let Some(token) = &self.token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some(value) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(value)?)
            }
            None => Bytes::new(),
        };
        Ok(builder.body(Full::new(body))?)
    }

    /// One call; the answer whatever its status.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<Answer> {
        let mut sender = self.connect().await?;
        let response = sender
            .send_request(self.request(method, path, body)?)
            .await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Ok(Answer { status, body, text })
    }

    /// A call that must succeed; its JSON body.
    pub async fn expect(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let answer = self.call(method, path, body).await?;
        if !answer.status.is_success() {
            bail!("{} ({})", answer.error_message(), answer.status);
        }
        Ok(answer.body)
    }

    /// Attaches to VM `id`'s console; the stream carries raw console bytes.
    pub async fn console(
        &self,
        id: &str,
        write: bool,
    ) -> anyhow::Result<TokioIo<hyper::upgrade::Upgraded>> {
        let mut sender = self.connect().await?;
        let mut request = self.request(
            Method::GET,
            &format!("/v1/vms/{id}/console?write={write}"),
            None,
        )?;
        request.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("upgrade"),
        );
        request.headers_mut().insert(
            header::UPGRADE,
            header::HeaderValue::from_static(crate::api::console::CONSOLE_PROTOCOL),
        );
        let response = sender.send_request(request).await?;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let message = body["error"]["message"].as_str().unwrap_or("").to_string();
            bail!("cannot attach to the console: {message} ({status})");
        }
        Ok(TokioIo::new(hyper::upgrade::on(response).await?))
    }
}
