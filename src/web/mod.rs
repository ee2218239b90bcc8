//! HTTP routes: the metrics endpoint, a landing page, and health/readiness probes, behind the
//! optional TLS and basic auth of `--web.config.file` ([`config`]).
//!
//! Handlers only read the last published snapshot; none touches the database.

pub mod auth;
pub mod config;
mod landing;
pub mod openmetrics;
pub mod runbook;
pub mod server;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use percent_encoding::percent_decode_str;

use crate::snapshot::Shared;
use landing::landing;

const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The routes. The metrics path is a literal, not a route pattern: it is compared with each
/// request's percent-decoded path, so any path (`/:metrics`, `/{x}`, `/métriques`) is served
/// exactly where it says and nowhere else.
pub fn router(shared: Arc<Shared>, telemetry_path: &str, grafana_url: Option<&str>) -> Router {
    let metrics_path = telemetry_path.to_string();
    let grafana = grafana_url.map(str::to_string);
    let literal = telemetry_path.to_string();
    Router::new()
        .route(
            "/",
            get(move |s: State<Arc<Shared>>| landing(s, metrics_path.clone(), grafana.clone())),
        )
        .route("/runbook", get(runbook::runbook))
        .route("/-/healthy", get(|| async { "OK\n" }))
        .route("/-/ready", get(ready))
        .fallback(
            move |s: State<Arc<Shared>>, method: Method, uri: Uri, headers: HeaderMap| {
                let is_metrics = percent_decode_str(uri.path()).decode_utf8_lossy() == literal;
                async move {
                    match (is_metrics, method) {
                        (true, Method::GET | Method::HEAD) => metrics(s, headers).await,
                        (true, _) => StatusCode::METHOD_NOT_ALLOWED.into_response(),
                        (false, _) => (StatusCode::NOT_FOUND, "not found\n").into_response(),
                    }
                }
            },
        )
        .with_state(shared)
        // gzip for clients that ask (Prometheus always does): a scrape shrinks about tenfold.
        .layer(tower_http::compression::CompressionLayer::new().gzip(true))
}

/// The Prometheus text format, or OpenMetrics for clients that prefer it.
async fn metrics(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let snap = shared.snapshot();
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .unwrap_or("");
    if openmetrics::preferred(accept) {
        // Encoded at the first request for this snapshot, then served as bytes.
        let body = snap
            .openmetrics
            .get_or_init(|| openmetrics::encode(&snap.families))
            .clone();
        return ([(header::CONTENT_TYPE, openmetrics::CONTENT_TYPE)], body).into_response();
    }
    ([(header::CONTENT_TYPE, TEXT_FORMAT)], snap.text.clone()).into_response()
}

async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    let snap = shared.snapshot();
    let status = &snap.status;
    if let (true, Some(error)) = (status.ready, &status.last_error) {
        // The last values are still served (with newapi_up 0), but nothing current.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the last read of the gateway's database failed: {error}\n"),
        )
            .into_response()
    } else if status.ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the first read of the gateway's database has not finished\n",
        )
            .into_response()
    }
}
