//! Wiring of the `serve` and `demo` commands: the poll thread, the HTTP server, and shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};

use crate::cli::{DbArgs, SeriesArgs, WebArgs, WindowArgs};
use crate::collect::Settings;
use crate::db::Sources;
use crate::db::dsn::DbConfig;
use crate::poller::{Connector, Poller, Shared};

/// Opens the gateway's SQLite database on every (re)connect.
pub fn sqlite_connector(path: PathBuf) -> Connector {
    let cfg = DbConfig::Sqlite(path);
    Box::new(move || open(&cfg, &None))
}

/// The databases named by the gateway's settings: the main one, and the logs one when
/// `LOG_SQL_DSN` is set. A malformed DSN is an error here, at start-up.
pub fn db_configs(db: &DbArgs) -> Result<(DbConfig, Option<DbConfig>)> {
    let main = DbConfig::from_dsn(db.sql_dsn.as_deref(), &db.sqlite_path)?;
    let logs =
        match db.log_sql_dsn.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(dsn) => Some(DbConfig::from_dsn(Some(dsn), &db.sqlite_path).map_err(|e| {
                anyhow::anyhow!("{}", e.to_string().replace("SQL_DSN", "LOG_SQL_DSN"))
            })?),
        };
    Ok((main, logs))
}

/// Where the exporter reads, passwords masked.
pub fn describe(main: &DbConfig, logs: &Option<DbConfig>) -> String {
    match logs {
        Some(l) => format!("{} (logs: {})", main.describe(), l.describe()),
        None => main.describe(),
    }
}

/// Opens the configured databases.
pub fn open(main: &DbConfig, logs: &Option<DbConfig>) -> Result<Sources> {
    let m = crate::db::connect(main)?;
    let l = logs.as_ref().map(crate::db::connect).transpose()?;
    Ok(Sources::new(m, l))
}

pub fn poller_for(
    db: &DbArgs,
    window: &WindowArgs,
    series: &SeriesArgs,
    stop: Arc<AtomicBool>,
) -> Result<Poller> {
    let settings = Settings {
        chunk_rows: db.chunk_rows,
        window_secs: window.window.as_secs() as i64,
        settle_margin_secs: window.settle.margin.as_secs() as i64,
        fixed_range: None,
        labels: series.settings(),
    };
    let (main, logs) = db_configs(db)?;
    let database = describe(&main, &logs);
    Ok(Poller::new(
        Box::new(move || open(&main, &logs)),
        database,
        settings,
        stop,
    ))
}

/// Serves metrics until SIGINT or SIGTERM, then stops the poll thread and sets `stop`.
pub async fn run(web: &WebArgs, mut poller: Poller, stop: Arc<AtomicBool>) -> Result<()> {
    let shared = Arc::new(Shared::default());
    let otlp = match crate::export::otlp::settings(web.otlp_endpoint.as_deref())? {
        Some(s) => Some(crate::export::otlp::Otlp::start(
            &s,
            shared.clone(),
            poller.otlp_error_counter(),
        )?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(web.listen_address)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (--web.listen-address)",
                web.listen_address
            )
        })?;
    let interval = web.poll_interval;
    let poll_shared = shared.clone();
    let poll_thread = std::thread::Builder::new()
        .name("poller".into())
        .spawn(move || poller.run(poll_shared, interval))?;
    let web_config = match &web.web_config_file {
        Some(p) => crate::web_config::WebConfig::load(p)?,
        None => crate::web_config::WebConfig::default(),
    };
    let auth = crate::web_config::BasicAuth::new(web_config.users.clone());
    let app = crate::web::router(shared, &web.telemetry_path).layer(
        axum::middleware::from_fn_with_state(auth, crate::web_config::require_auth),
    );
    // Shutdown sets the flag and wakes the poller from its sleep between polls.
    let stop_polling = {
        let poller_thread = poll_thread.thread().clone();
        move || {
            stop.store(true, Ordering::Relaxed);
            poller_thread.unpark();
        }
    };
    let signal_stop = stop_polling.clone();
    match web_config.rustls()? {
        None => {
            let addr = listener.local_addr()?;
            tracing::info!("listening on http://{addr}{}", web.telemetry_path);
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    shutdown_signal().await;
                    signal_stop();
                })
                .await?;
        }
        Some(tls) => {
            let tls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls));
            let handle = axum_server::Handle::new();
            let signal_handle = handle.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                signal_stop();
                signal_handle.graceful_shutdown(Some(std::time::Duration::from_millis(500)));
            });
            let server = axum_server::from_tcp_rustls(listener.into_std()?, tls)?
                .handle(handle.clone())
                .serve(app.into_make_service());
            let task = tokio::spawn(server);
            if let Some(addr) = handle.listening().await {
                tracing::info!("listening on https://{addr}{}", web.telemetry_path);
            }
            task.await??;
        }
    }
    stop_polling();
    tokio::task::spawn_blocking(move || {
        let _ = poll_thread.join();
        if let Some(o) = otlp {
            o.shutdown();
        }
    })
    .await
    .ok();
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
