//! The plain-HTTP listener: health now; CRL, OCSP and metrics as they land.

use std::future::Future;

use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

/// Serves the HTTP routes on `listener` until `stop` completes.
pub async fn serve(
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new().route("/healthz", get(|| async { "ok\n" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
}
