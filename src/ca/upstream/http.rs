//! A small HTTP/1.1 client for upstream CA APIs (hyper), plain or TLS: keep-alive
//! connections reused while fresh, each step under a deadline, answers read up to a size
//! limit. A request is never sent twice: a signing request is not idempotent.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

use super::UpstreamFailure;
use crate::error::{Error, Result};
use crate::sync::Unpoisoned;

/// Largest answer read from an upstream (a certificate answer is a few KiB).
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// How long an idle connection is kept for reuse: well under the idle timeouts servers and
/// load balancers use, so a request rarely meets a connection the other side is closing.
const IDLE_FOR: Duration = Duration::from_secs(4);

/// A connection's request half.
type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Where an upstream API lives and how to reach it.
pub struct HttpTarget {
    /// `host:port` to connect to.
    authority: String,
    host: String,
    /// Path prefix of the base URL (no trailing slash).
    base_path: String,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    connect_timeout: Duration,
    /// Idle keep-alive connections and since when, newest last.
    idle: Mutex<Vec<(Sender, Instant)>>,
    max_idle: usize,
}

impl HttpTarget {
    /// Parses `url` (`http://host[:port][/path]` or `https://...`); an https URL trusts the
    /// authorities in `tls_ca_file`.
    pub fn new(
        url: &str,
        tls_ca_file: Option<&std::path::Path>,
        connect_timeout: Duration,
        max_idle: usize,
    ) -> Result<HttpTarget> {
        let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(Error::invalid(
                "ca.upstream.url",
                format!("{url:?} must start with http:// or https://"),
            ));
        };
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], rest[at..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(Error::invalid(
                "ca.upstream.url",
                format!("{url:?} needs a host (and no user info)"),
            ));
        }
        let default_port = if https { 443 } else { 80 };
        let (host, port) = match authority.strip_prefix('[') {
            // An IPv6 literal: [addr] or [addr]:port.
            Some(bracketed) => match bracketed.split_once(']') {
                Some((host, "")) => (host, None),
                Some((host, port)) => (host, Some(port.strip_prefix(':').unwrap_or(port))),
                None => ("", None),
            },
            None => match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        let port = match port {
            None => default_port,
            Some(port) => port.parse::<u16>().map_err(|_| {
                Error::invalid("ca.upstream.url", format!("{url:?}: bad port {port:?}"))
            })?,
        };
        if host.is_empty() {
            return Err(Error::invalid(
                "ca.upstream.url",
                format!("{url:?} needs a host"),
            ));
        }
        let host = host.to_string();
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let tls = if https {
            let ca_file = tls_ca_file.ok_or_else(|| {
                Error::invalid(
                    "ca.upstream.tls_ca_file",
                    "is required for an https:// upstream: the authorities its server \
                     certificate chains to",
                )
            })?;
            let config = crate::ca::pki::tls_client_config("ca.upstream.tls_ca_file", ca_file)?;
            let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| {
                Error::invalid(
                    "ca.upstream.url",
                    format!("{host:?} is not a TLS name: {e}"),
                )
            })?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(HttpTarget {
            authority,
            host,
            base_path: path.to_string(),
            tls,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
            max_idle,
        })
    }

    /// POSTs `body` (JSON) to `path` under the base URL and returns the status and answer,
    /// on a fresh idle connection or a new one. A request that an idle connection could not
    /// take (the other side closed it meanwhile) goes on a new one; a request once written is
    /// never sent again. Every failure to get an answer is [`UpstreamFailure::Unreachable`];
    /// the caller bounds the whole exchange with its own deadline.
    pub async fn post_json(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> std::result::Result<(http::StatusCode, Bytes), UpstreamFailure> {
        let mut request = http::Request::post(format!("{}{path}", self.base_path))
            .header(http::header::HOST, &self.host)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| self.unreachable("building a request to", &e))?;
        let mut idle = self.take_idle();
        loop {
            let reused = idle.is_some();
            let mut sender = match idle.take() {
                Some(sender) => sender,
                None => self.connect().await?,
            };
            let _ = sender.ready().await;
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let status = response.status();
                    let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                        .collect()
                        .await
                        .map_err(|e| self.unreachable("reading the answer of", &e))?
                        .to_bytes();
                    self.keep(sender);
                    return Ok((status, body));
                }
                Err(mut failed) => match failed.take_message() {
                    // Not written: safe to send on a new connection.
                    Some(unsent) if reused => request = unsent,
                    _ => {
                        return Err(
                            self.unreachable("exchanging a request with", &failed.into_error())
                        )
                    }
                },
            }
        }
    }

    fn unreachable(&self, what: &str, e: &dyn std::fmt::Display) -> UpstreamFailure {
        UpstreamFailure::Unreachable(format!("{what} {}: {e}", self.authority))
    }

    /// The newest idle connection that is still open and fresh; older ones are dropped.
    fn take_idle(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().unpoisoned();
        while let Some((sender, since)) = idle.pop() {
            if since.elapsed() < IDLE_FOR && !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    /// Keeps a connection whose exchange completed, for the next request.
    fn keep(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unpoisoned();
        idle.retain(|(_, since)| since.elapsed() < IDLE_FOR);
        if idle.len() < self.max_idle {
            idle.push((sender, Instant::now()));
        }
    }

    /// A new connection (TLS for an https URL), its driver spawned.
    async fn connect(&self) -> std::result::Result<Sender, UpstreamFailure> {
        let stream = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect(&self.authority),
        )
        .await
        .map_err(|_| {
            UpstreamFailure::Unreachable(format!(
                "connecting to {} took longer than {} ms",
                self.authority,
                self.connect_timeout.as_millis()
            ))
        })?
        .map_err(|e| self.unreachable("connecting to", &e))?;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None => handshake(TokioIo::new(stream)).await,
            Some((connector, name)) => {
                let stream = tokio::time::timeout(
                    self.connect_timeout,
                    connector.connect(name.clone(), stream),
                )
                .await
                .map_err(|_| {
                    UpstreamFailure::Unreachable(format!(
                        "the TLS handshake with {} took longer than {} ms",
                        self.authority,
                        self.connect_timeout.as_millis()
                    ))
                })?
                .map_err(|e| self.unreachable("TLS handshake with", &e))?;
                handshake(TokioIo::new(stream)).await
            }
        }
        .map_err(|e| self.unreachable("starting HTTP/1.1 with", &e))
    }
}

/// HTTP/1.1 on `io`; its connection task ends when the connection closes or every sender is
/// dropped.
async fn handshake<T>(io: TokioIo<T>) -> std::io::Result<Sender>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keep-alive HTTP/1.1 server on loopback that answers `{}` to every request; counts
    /// the connections it accepts.
    fn counting_server() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { break };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut pending = Vec::new();
                    let mut buffer = [0u8; 4096];
                    loop {
                        // One request: its head, then Content-Length bytes of body.
                        let head_end = loop {
                            if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                                break at + 4;
                            }
                            match stream.read(&mut buffer) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => pending.extend_from_slice(&buffer[..n]),
                            }
                        };
                        let head = String::from_utf8_lossy(&pending[..head_end]).to_lowercase();
                        let length: usize = head
                            .split("content-length:")
                            .nth(1)
                            .and_then(|rest| rest.split("\r\n").next())
                            .and_then(|n| n.trim().parse().ok())
                            .unwrap_or(0);
                        while pending.len() < head_end + length {
                            match stream.read(&mut buffer) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => pending.extend_from_slice(&buffer[..n]),
                            }
                        }
                        pending.drain(..head_end + length);
                        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
                        if stream.write_all(answer).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (url, accepted)
    }

    #[tokio::test]
    async fn requests_in_turn_share_one_kept_alive_connection() {
        let (url, accepted) = counting_server();
        let target = HttpTarget::new(&url, None, Duration::from_secs(1), 4).unwrap();
        for _ in 0..5 {
            let (status, body) = target.post_json("/x", b"{}".to_vec()).await.unwrap();
            assert_eq!((status, body.as_ref()), (http::StatusCode::OK, &b"{}"[..]));
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        // With no connection kept, each request opens its own.
        let (url, accepted) = counting_server();
        let target = HttpTarget::new(&url, None, Duration::from_secs(1), 0).unwrap();
        for _ in 0..3 {
            target.post_json("/x", b"{}".to_vec()).await.unwrap();
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn urls_name_their_host_port_and_path() {
        let t = HttpTarget::new("http://127.0.0.1:8888", None, Duration::from_secs(1), 1).unwrap();
        assert_eq!(
            (t.authority.as_str(), t.host.as_str(), t.base_path.as_str()),
            ("127.0.0.1:8888", "127.0.0.1", "")
        );
        let t = HttpTarget::new("http://ca.example/ra/", None, Duration::from_secs(1), 1).unwrap();
        assert_eq!(
            (t.authority.as_str(), t.host.as_str(), t.base_path.as_str()),
            ("ca.example:80", "ca.example", "/ra")
        );
        let t = HttpTarget::new("http://[::1]:9000", None, Duration::from_secs(1), 1).unwrap();
        assert_eq!(
            (t.authority.as_str(), t.host.as_str()),
            ("[::1]:9000", "::1")
        );
        for bad in [
            "ftp://x",
            "http://",
            "http://user@host",
            "http://host:notaport",
        ] {
            assert!(
                HttpTarget::new(bad, None, Duration::from_secs(1), 1).is_err(),
                "{bad}"
            );
        }
        let no_roots = HttpTarget::new("https://ca.example", None, Duration::from_secs(1), 1);
        assert!(no_roots.err().unwrap().to_string().contains("tls_ca_file"));
    }
}
