//! HTTP routes: the metrics endpoint, a landing page, and health/readiness probes, behind the
//! optional TLS and basic auth of `--web.config.file` ([`config`]).
//!
//! Handlers only read the last published snapshot; none touches the database.

pub mod config;
mod landing;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::snapshot::Shared;
use landing::landing;

const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub fn router(shared: Arc<Shared>, telemetry_path: &str) -> Router {
    let metrics_path = telemetry_path.to_string();
    Router::new()
        .route(telemetry_path, get(metrics))
        .route(
            "/",
            get(move |s: State<Arc<Shared>>| landing(s, metrics_path.clone())),
        )
        .route("/-/healthy", get(|| async { "OK\n" }))
        .route("/-/ready", get(ready))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let snap = shared.snapshot();
    ([(header::CONTENT_TYPE, TEXT_FORMAT)], snap.text.clone()).into_response()
}

async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    if shared.snapshot().status.ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the first read of the gateway's database has not finished\n",
        )
            .into_response()
    }
}
