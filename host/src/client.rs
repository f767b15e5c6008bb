//! The API client the CLI uses: HTTP/1.1 over the daemon's Unix socket or
//! over TCP (`http://HOST:PORT` on loopback).

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
}

impl Endpoint {
    /// `http://HOST:PORT` or a socket path.
    pub fn parse(text: &str) -> anyhow::Result<Endpoint> {
        if let Some(rest) = text.strip_prefix("http://") {
            Ok(Endpoint::Tcp(rest.trim_end_matches('/').to_string()))
        } else if text.starts_with("https://") {
            bail!("the CLI speaks TLS to the daemon only through a local socket for now; use --socket")
        } else {
            Ok(Endpoint::Unix(PathBuf::from(text)))
        }
    }
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
            Endpoint::Tcp(addr) => addr.clone(),
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
