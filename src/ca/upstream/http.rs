//! A small HTTP/1.1 client for upstream CA APIs: one connection per request (hyper), plain or
//! TLS, each step under a deadline, answers read up to a size limit.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

use super::UpstreamFailure;
use crate::error::{Error, Result};

/// Largest answer read from an upstream (a certificate answer is a few KiB).
const MAX_ANSWER_BYTES: usize = 1 << 20;

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
}

impl HttpTarget {
    /// Parses `url` (`http://host[:port][/path]` or `https://...`); an https URL trusts the
    /// authorities in `tls_ca_file`.
    pub fn new(
        url: &str,
        tls_ca_file: Option<&std::path::Path>,
        connect_timeout: Duration,
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
        })
    }

    /// POSTs `body` (JSON) to `path` under the base URL and returns the status and answer.
    /// Every failure to get an answer is [`UpstreamFailure::Unreachable`]; the caller bounds
    /// the whole exchange with its own deadline.
    pub async fn post_json(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> std::result::Result<(http::StatusCode, Bytes), UpstreamFailure> {
        let unreachable = |what: &str, e: &dyn std::fmt::Display| {
            UpstreamFailure::Unreachable(format!("{what} {}: {e}", self.authority))
        };
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
        .map_err(|e| unreachable("connecting to", &e))?;
        let _ = stream.set_nodelay(true);
        let request = http::Request::post(format!("{}{path}", self.base_path))
            .header(http::header::HOST, &self.host)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unreachable("building a request to", &e))?;
        match &self.tls {
            None => exchange(TokioIo::new(stream), request).await,
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
                .map_err(|e| unreachable("TLS handshake with", &e))?;
                exchange(TokioIo::new(stream), request).await
            }
        }
        .map_err(|e| unreachable("exchanging a request with", &e))
    }
}

/// One request on a fresh connection.
async fn exchange<T>(
    io: TokioIo<T>,
    request: http::Request<Full<Bytes>>,
) -> std::io::Result<(http::StatusCode, Bytes)>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(std::io::Error::other)?;
    let driver = tokio::spawn(connection);
    let answer = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(std::io::Error::other)?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    driver.abort();
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_host_port_and_path() {
        let t = HttpTarget::new("http://127.0.0.1:8888", None, Duration::from_secs(1)).unwrap();
        assert_eq!(
            (t.authority.as_str(), t.host.as_str(), t.base_path.as_str()),
            ("127.0.0.1:8888", "127.0.0.1", "")
        );
        let t = HttpTarget::new("http://ca.example/ra/", None, Duration::from_secs(1)).unwrap();
        assert_eq!(
            (t.authority.as_str(), t.host.as_str(), t.base_path.as_str()),
            ("ca.example:80", "ca.example", "/ra")
        );
        let t = HttpTarget::new("http://[::1]:9000", None, Duration::from_secs(1)).unwrap();
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
                HttpTarget::new(bad, None, Duration::from_secs(1)).is_err(),
                "{bad}"
            );
        }
        let no_roots = HttpTarget::new("https://ca.example", None, Duration::from_secs(1));
        assert!(no_roots.err().unwrap().to_string().contains("tls_ca_file"));
    }
}
