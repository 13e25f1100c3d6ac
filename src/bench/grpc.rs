//! The load generator's own gRPC client: unary calls over HTTP/2 (the `h2` crate) over rustls,
//! with nothing in between.
//!
//! tonic's channel hands each call through a buffer task and hyper's dispatcher to the
//! connection task, which writes to the socket about once per call. Here each worker opens its
//! stream on the shared connection itself; the connection task, polled after the workers on the
//! load generator's single-threaded runtime, then writes everything queued since its last write
//! at once. The load generator spends less of the machine it shares with the server on its own
//! sends. The wire is the same as any gRPC client's: HTTP/2 with `te: trailers`, the
//! length-prefixed gRPC message, protobuf, mutual TLS.

use std::path::Path;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, Method, Request};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::client::Credential;
use crate::error::{Error, Result};

/// Largest response message accepted (payra's responses are a few kilobytes at most).
const MAX_RESPONSE: usize = 1 << 20;
/// How long one call, or setting up a connection, may take.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// One HTTP/2 connection to a payra server, shared by any number of concurrent calls.
#[derive(Clone)]
pub struct GrpcConnection {
    send: h2::client::SendRequest<Bytes>,
    authority: Arc<str>,
}

/// Why a call failed: the gRPC status code (or `None` for a transport failure) and a message.
#[derive(Debug)]
pub struct CallError {
    pub code: Option<u32>,
    pub message: String,
}

impl CallError {
    fn transport(message: impl std::fmt::Display) -> CallError {
        CallError {
            code: None,
            message: message.to_string(),
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.code {
            Some(code) => write!(f, "gRPC status {code}: {}", self.message),
            None => write!(f, "transport: {}", self.message),
        }
    }
}

fn tls_config(root_ca: &Path, credential: &Credential) -> Result<rustls::ClientConfig> {
    let unreadable = |path: &Path, e: &dyn std::fmt::Display| {
        Error::FailedPrecondition(format!("{}: {e}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for certificate in
        CertificateDer::pem_file_iter(root_ca).map_err(|e| unreadable(root_ca, &e))?
    {
        roots
            .add(certificate.map_err(|e| unreadable(root_ca, &e))?)
            .map_err(|e| unreadable(root_ca, &e))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::internal(format!("TLS versions: {e}")))?
    .with_root_certificates(roots);
    let mut config = match credential {
        Credential::None => builder.with_no_client_auth(),
        Credential::Files { certificate, key } => {
            let chain = CertificateDer::pem_file_iter(certificate)
                .map_err(|e| unreadable(certificate, &e))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| unreadable(certificate, &e))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| unreadable(key, &e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::invalid("client credential", e))?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

impl GrpcConnection {
    /// Connects to `server` (`https://host:port`), trusting `root_ca`, presenting `credential`.
    pub async fn connect(
        server: &str,
        root_ca: &Path,
        credential: &Credential,
    ) -> Result<GrpcConnection> {
        let authority = server.trim_start_matches("https://").trim_end_matches('/');
        let host = authority
            .rsplit_once(':')
            .map(|(host, _)| host.trim_matches(['[', ']']))
            .unwrap_or(authority)
            .to_string();
        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(tls_config(root_ca, credential)?));
        let cannot = |e: &dyn std::fmt::Display| {
            Error::FailedPrecondition(format!("cannot connect to {server}: {e}"))
        };
        // `localhost` may name both ::1 and 127.0.0.1; the server may listen on one of them.
        let mut tcp = Err(cannot(&"no address"));
        for address in super::loopback_addresses("gRPC server", server)? {
            tcp = tokio::net::TcpStream::connect(address)
                .await
                .map_err(|e| cannot(&e));
            if tcp.is_ok() {
                break;
            }
        }
        let tcp = tcp?;
        tcp.set_nodelay(true).map_err(|e| cannot(&e))?;
        let name = ServerName::try_from(host).map_err(|e| Error::invalid("server", e))?;
        let handshakes = async {
            let tls = connector.connect(name, tcp).await.map_err(|e| cannot(&e))?;
            h2::client::Builder::new()
                .initial_window_size(1 << 20)
                .initial_connection_window_size(1 << 24)
                .handshake::<_, Bytes>(tls)
                .await
                .map_err(|e| cannot(&e))
        };
        let (send, connection) = tokio::time::timeout(CALL_TIMEOUT, handshakes)
            .await
            .map_err(|_| cannot(&"TLS and HTTP/2 handshakes took more than 30 s"))??;
        tokio::spawn(async move {
            // Ends when the server closes the connection or every handle is dropped; calls in
            // flight then fail with a transport error, which the report counts.
            let _ = connection.await;
        });
        Ok(GrpcConnection {
            send,
            authority: authority.into(),
        })
    }

    /// One unary call: `path` is `/package.Service/Method`. A call that gets no complete
    /// answer within [`CALL_TIMEOUT`] fails, so a stalled server cannot hang a run.
    pub async fn unary<Q, A>(&self, path: &str, request: &Q) -> std::result::Result<A, CallError>
    where
        Q: prost::Message,
        A: prost::Message + Default,
    {
        tokio::time::timeout(CALL_TIMEOUT, self.call(path, request))
            .await
            .unwrap_or_else(|_| {
                Err(CallError::transport(format!(
                    "no answer within {} s",
                    CALL_TIMEOUT.as_secs()
                )))
            })
    }

    async fn call<Q, A>(&self, path: &str, request: &Q) -> std::result::Result<A, CallError>
    where
        Q: prost::Message,
        A: prost::Message + Default,
    {
        let length = request.encoded_len();
        let mut body = BytesMut::with_capacity(5 + length);
        body.put_u8(0);
        body.put_u32(u32::try_from(length).map_err(CallError::transport)?);
        request.encode(&mut body).map_err(CallError::transport)?;
        let head = Request::builder()
            .method(Method::POST)
            .uri(format!("https://{}{path}", self.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .map_err(CallError::transport)?;
        let mut send = self
            .send
            .clone()
            .ready()
            .await
            .map_err(CallError::transport)?;
        let (response, mut stream) = send
            .send_request(head, false)
            .map_err(CallError::transport)?;
        // A server may answer before it reads the request (a refusal by the auth layer does)
        // and then reset the stream; the body's send then fails, but the answer stands.
        let sent = stream.send_data(body.freeze(), true);
        answer(sent, response).await
    }
}

/// The call's result from its response, given what sending the request's body gave: a failed
/// send counts only when no response arrives.
async fn answer<A: prost::Message + Default>(
    sent: std::result::Result<(), h2::Error>,
    response: h2::client::ResponseFuture,
) -> std::result::Result<A, CallError> {
    let response = match response.await {
        Ok(response) => response,
        Err(e) => {
            return Err(CallError::transport(match sent {
                Err(send) => format!("{send} ({e})"),
                Ok(()) => e.to_string(),
            }))
        }
    };
    let (parts, mut body) = response.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(CallError::transport(format!(
            "HTTP status {}",
            parts.status
        )));
    }
    // A "trailers-only" answer carries its status in the headers.
    if parts.headers.contains_key("grpc-status") {
        check_status(&parts.headers)?;
    }
    let mut message = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(CallError::transport)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if message.len() + chunk.len() > MAX_RESPONSE + 5 {
            return Err(CallError::transport("response larger than 1 MiB"));
        }
        message.extend_from_slice(&chunk);
    }
    match body.trailers().await.map_err(CallError::transport)? {
        Some(trailers) => check_status(&trailers)?,
        None if parts.headers.contains_key("grpc-status") => {}
        None => return Err(CallError::transport("no grpc-status in the answer")),
    }
    if message.len() < 5 || message[0] != 0 {
        return Err(CallError::transport("not one uncompressed gRPC message"));
    }
    let declared = u32::from_be_bytes([message[1], message[2], message[3], message[4]]) as usize;
    if declared != message.len() - 5 {
        return Err(CallError::transport("gRPC message length does not match"));
    }
    A::decode(&message[5..]).map_err(CallError::transport)
}

/// The call's status from `grpc-status` and the percent-encoded `grpc-message`.
fn check_status(headers: &HeaderMap) -> std::result::Result<(), CallError> {
    let status = tonic::Status::from_header_map(headers)
        .ok_or_else(|| CallError::transport("no grpc-status in the answer"))?;
    if status.code() == tonic::Code::Ok {
        return Ok(());
    }
    Err(CallError {
        code: Some(status.code() as u32),
        message: status.message().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The auth layer refuses a call before reading its body, so the server resets the stream
    /// (NO_ERROR) right after its trailers-only answer. A client that sends the body after the
    /// reset gets an error from the send; the call's result is still the server's status.
    #[tokio::test]
    async fn an_answer_sent_before_the_request_body_is_the_calls_result() {
        let (client_io, server_io) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.unwrap();
            while let Some(request) = connection.accept().await {
                let (request, mut respond) = request.unwrap();
                let refusal = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "16")
                    .header("grpc-message", "no%20client%20certificate")
                    .body(())
                    .unwrap();
                respond.send_response(refusal, true).unwrap();
                // The request's body is dropped unread.
                drop(request);
            }
        });
        let (send, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let head = Request::builder()
            .method(Method::POST)
            .uri("https://localhost/payra.v1.Verification/GetCertificateStatus")
            .body(())
            .unwrap();
        let (response, mut stream) = send
            .ready()
            .await
            .unwrap()
            .send_request(head, false)
            .unwrap();
        // Wait for the server's reset, so that the body's send comes after it every time.
        let reset = std::future::poll_fn(|cx| stream.poll_reset(cx))
            .await
            .unwrap();
        assert_eq!(reset, h2::Reason::NO_ERROR);
        let sent = stream.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true);
        assert!(sent.is_err(), "the body's send fails after the reset");
        let refused = answer::<crate::wire::proto::GetCertificateStatusResponse>(sent, response)
            .await
            .expect_err("the server refused the call");
        assert_eq!(refused.code, Some(16), "{refused}");
        assert_eq!(refused.message, "no client certificate");
    }
}
