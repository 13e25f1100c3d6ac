//! The plain-HTTP listener: the CRL and the OCSP responder (RFC 6960 GET and POST) for
//! relying parties, Prometheus metrics, liveness and readiness. Plain HTTP on purpose: CRLs
//! and OCSP responses are signed objects, and metrics carry no secrets.

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;

use crate::ca::ocsp::MAX_OCSP_REQUEST_BYTES;
use crate::ra::Ra;

/// What the HTTP handlers need.
#[derive(Clone)]
pub struct HttpState {
    pub ra: Arc<Ra>,
    /// Durable syncs so far, for the metrics.
    pub storage_syncs: Arc<dyn Fn() -> u64 + Send + Sync>,
}

/// Serves the HTTP routes on `listener` until `stop` completes.
pub async fn serve(
    listener: crate::listener::HttpListener,
    state: HttpState,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(stop)
        .await
}

/// The routes, for serving and for tests.
pub fn router(state: HttpState) -> Router {
    let ra = state.ra.clone();
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/crl", get(crl))
        .route("/crl/sm2", get(sm2_crl))
        .route("/ocsp", axum::routing::post(ocsp_post))
        .route("/ocsp/{*request}", get(ocsp_get))
        .layer(DefaultBodyLimit::max(MAX_OCSP_REQUEST_BYTES))
        .with_state(ra)
        .merge(
            Router::new()
                .route("/metrics", get(metrics))
                .route("/readyz", get(readyz))
                .with_state(state),
        )
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let syncs = (state.storage_syncs)();
    // Readiness as /readyz sees it (a durable write and a signature), for alerting.
    let ra = state.ra.clone();
    let ready = tokio::task::spawn_blocking(move || ra.readiness())
        .await
        .is_ok_and(|checked| checked.is_ok());
    state.ra.metrics().ready.set(i64::from(ready));
    state.ra.refresh_gauges(syncs);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.ra.metrics().render(),
    )
        .into_response()
}

/// Ready when storage takes a durable write and the CA key signs.
async fn readyz(State(state): State<HttpState>) -> Response {
    let ra = state.ra.clone();
    let checked = tokio::task::spawn_blocking(move || ra.readiness()).await;
    let ready = matches!(checked, Ok(Ok(())));
    state.ra.metrics().ready.set(i64::from(ready));
    match checked {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "not ready");
            // The reason for a load balancer's log and an operator's curl: an unavailable
            // dependency is named; an internal fault's details stay in the server's log.
            let reason = match &e {
                crate::error::Error::Unavailable(why) => why.clone(),
                _ => "an internal error (see the server log)".to_string(),
            };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            )
                .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "readiness task failed");
            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
        }
    }
}

async fn crl(State(ra): State<Arc<Ra>>) -> Response {
    serve_crl(ra, crate::model::KeyAlgorithm::P256).await
}

/// The SM2 issuing CA's CRL (`404` when this payra has no SM2 hierarchy).
async fn sm2_crl(State(ra): State<Arc<Ra>>) -> Response {
    serve_crl(ra, crate::model::KeyAlgorithm::Sm2).await
}

async fn serve_crl(ra: Arc<Ra>, algorithm: crate::model::KeyAlgorithm) -> Response {
    match tokio::task::spawn_blocking(move || ra.current_crl_of(algorithm)).await {
        Ok(Ok(crl)) => (
            [
                (header::CONTENT_TYPE, "application/pkix-crl"),
                (header::CACHE_CONTROL, "max-age=60"),
            ],
            crl.der,
        )
            .into_response(),
        Ok(Err(e)) if e.kind() == crate::error::ErrorKind::Unavailable => {
            // The CA key is out of reach for now (an HSM): a retry may succeed.
            tracing::error!(error = %e, "building the CRL failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "5")],
                "CRL unavailable; retry shortly\n",
            )
                .into_response()
        }
        Ok(Err(e)) if e.kind() == crate::error::ErrorKind::NotFound => {
            (StatusCode::NOT_FOUND, "no SM2 issuing CA here\n").into_response()
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "building the CRL failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "CRL unavailable\n").into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "CRL task failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "CRL unavailable\n").into_response()
        }
    }
}

fn ocsp_reply(der: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/ocsp-response")], der).into_response()
}

/// An HTTP-date (RFC 9110 §5.6.7, IMF-fixdate).
fn http_date(unix_s: i64) -> String {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::OffsetDateTime::from_unix_timestamp(unix_s)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| "Thu, 01 Jan 1970 00:00:00 GMT".to_string())
}

/// The answer to an OCSP GET with the caching headers of RFC 5019 §6.2 (`max-age` as
/// [`crate::ra::OcspFreshness`] says). An answer to a request with a nonce, or an error, is
/// not cacheable.
fn ocsp_get_reply(answer: crate::ra::OcspAnswer) -> Response {
    let Some(fresh) = answer.freshness else {
        return (
            [
                (
                    header::CONTENT_TYPE,
                    "application/ocsp-response".to_string(),
                ),
                (header::CACHE_CONTROL, "no-store".to_string()),
            ],
            answer.der,
        )
            .into_response();
    };
    use sha2::{Digest, Sha256};
    let max_age = fresh.max_age_s;
    let etag = format!("\"{}\"", hex::encode(&Sha256::digest(&answer.der)[..16]));
    (
        [
            (
                header::CONTENT_TYPE,
                "application/ocsp-response".to_string(),
            ),
            (
                header::CACHE_CONTROL,
                format!("max-age={max_age}, public, no-transform, must-revalidate"),
            ),
            (header::LAST_MODIFIED, http_date(fresh.this_update_s)),
            (header::EXPIRES, http_date(fresh.next_update_s)),
            (header::ETAG, etag),
        ],
        answer.der,
    )
        .into_response()
}

async fn ocsp_answer(ra: Arc<Ra>, request: Vec<u8>) -> Option<crate::ra::OcspAnswer> {
    match tokio::task::spawn_blocking(move || ra.ocsp_response(&request)).await {
        Ok(answer) => Some(answer),
        Err(e) => {
            tracing::error!(error = %e, "OCSP task failed");
            None
        }
    }
}

async fn ocsp_post(State(ra): State<Arc<Ra>>, body: Bytes) -> Response {
    match ocsp_answer(ra, body.to_vec()).await {
        Some(answer) => ocsp_reply(answer.der),
        None => ocsp_reply(crate::ca::OcspResponder::malformed()),
    }
}

/// RFC 6960 A.1: GET {url}/{url-encoding of base-64 encoding of the DER request}. The path
/// is already percent-decoded by the router.
/// `malformedRequest` for a GET, not cacheable.
fn malformed_get() -> Response {
    ocsp_get_reply(crate::ra::OcspAnswer {
        der: crate::ca::OcspResponder::malformed(),
        freshness: None,
    })
}

async fn ocsp_get(State(ra): State<Arc<Ra>>, Path(encoded): Path<String>) -> Response {
    if encoded.len() > MAX_OCSP_REQUEST_BYTES * 2 {
        return malformed_get();
    }
    let compact: String = encoded.chars().filter(|c| !c.is_whitespace()).collect();
    let Ok(der) = base64::engine::general_purpose::STANDARD.decode(compact.as_bytes()) else {
        return malformed_get();
    };
    match ocsp_answer(ra, der).await {
        Some(answer) => ocsp_get_reply(answer),
        None => malformed_get(),
    }
}
