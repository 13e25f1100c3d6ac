//! Per-RPC observation: a request id (returned in `x-request-id` and attached to every log
//! line of the call), the status code, and the latency histogram. Nothing from the request
//! body is logged: tokens, keys and intents never reach the log.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use rand::RngCore;
use tracing::Instrument;

use crate::metrics::Metrics;

/// The tower layer that observes every gRPC request.
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<Metrics>,
}

impl ObserveLayer {
    pub fn new(metrics: Arc<Metrics>) -> ObserveLayer {
        ObserveLayer { metrics }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = ObserveService<S>;
    fn layer(&self, inner: S) -> ObserveService<S> {
        ObserveService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// See [`ObserveLayer`].
#[derive(Clone)]
pub struct ObserveService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// The standard gRPC services' methods that get a label of their own (any other path under
/// their prefixes is "other", as for unknown paths).
const STANDARD_METHODS: [&str; 4] = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The gRPC status code name of a unary response: tonic puts an error status in the headers
/// (trailers-only response); a success carries no status header.
fn code_of<B>(response: &http::Response<B>) -> &'static str {
    let code = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or(0);
    code_name(tonic::Code::from_i32(code))
}

/// The name of a gRPC status code, as in the `code` label.
pub(crate) fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for ObserveService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Only known methods become label values, so a client cannot add series at will.
        let path = request.uri().path();
        let method = if crate::wire::auth::Rpc::from_path(path).is_some()
            || STANDARD_METHODS.contains(&path)
        {
            path.rsplit('/').next().unwrap_or("unknown").to_string()
        } else {
            "other".to_string()
        };
        let mut id = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut id);
        let request_id = hex::encode(id);
        let span = tracing::info_span!("rpc", request_id = %request_id, method = %method);
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(
            async move {
                let mut response = future.await?;
                let code = code_of(&response);
                let elapsed = started.elapsed();
                metrics
                    .rpc_requests
                    .with_label_values(&[&method, code])
                    .inc();
                metrics
                    .rpc_latency
                    .with_label_values(&[&method, code])
                    .observe(elapsed.as_secs_f64());
                if let Ok(value) = http::HeaderValue::from_str(&request_id) {
                    response.headers_mut().insert("x-request-id", value);
                }
                tracing::debug!(code, micros = elapsed.as_micros() as u64, "rpc done");
                Ok(response)
            }
            .instrument(span),
        )
    }
}
