//! `serve` and `demo`: the poll thread, the HTTP server, the OTLP push, and shutdown; and
//! `generate`, the benchmark database.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use crate::cli::{DbArgs, DemoArgs, GenerateArgs, ServeArgs, WebArgs, poll_settings};
use crate::collect::Settings;
use crate::db;
use crate::demo;
use crate::export::otlp::{self, Otlp};
use crate::poll::{Poller, connector};
use crate::snapshot::Shared;
use crate::web::{
    self,
    auth::{BasicAuth, require_auth},
    config::WebConfig,
    server::{self, Limits},
};

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// The poller for the databases `db` names, with the sliding-window settings.
fn poller_for(db: &DbArgs, settings: Settings, stop: Arc<AtomicBool>) -> Result<Poller> {
    let (main, logs) = db.configs()?;
    let database = db::describe(&main, &logs);
    Ok(Poller::new(connector(main, logs), database, settings, stop))
}

/// `serve`: polls the gateway's database and serves the metrics until SIGINT or SIGTERM.
pub fn run(args: ServeArgs) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let settings = poll_settings(&args.db, &args.window, &args.series);
    let poller = poller_for(&args.db, settings, stop.clone())?;
    let rt = runtime()?;
    let result = rt.block_on(serve(&args.web, poller, stop));
    // Never wait on work a stalled database holds up (see `serve`).
    rt.shutdown_timeout(Duration::from_millis(500));
    result
}

/// `demo`: a simulated gateway writing into a SQLite file, served like `serve` would.
pub fn run_demo(args: DemoArgs) -> Result<()> {
    demo::prepare(&args.db, args.history, args.generation.into())?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer_stop = stop.clone();
    let path = args.db.clone();
    let rate = args.rate;
    let writer = std::thread::Builder::new()
        .name("demo-gateway".into())
        .spawn(move || demo::write_live(&path, rate, writer_stop, 7))?;
    let db = DbArgs::sqlite(args.db.clone());
    let settings = poll_settings(&db, &args.window, &args.series);
    let poller = poller_for(&db, settings, stop.clone())?;
    tracing::info!(
        "demo gateway writing {rate} requests/s into {}",
        args.db.display()
    );
    runtime()?.block_on(serve(&args.web, poller, stop))?;
    writer
        .join()
        .map_err(|_| anyhow!("demo writer thread panicked"))?
}

/// `generate`: a large gateway database for benchmarks.
pub fn run_generate(args: &GenerateArgs) -> Result<()> {
    let started = Instant::now();
    demo::generate::generate(&args.db, args.rows, args.days, args.generation.into())?;
    println!(
        "wrote {} log rows to {} in {:.1?}",
        args.rows,
        args.db.display(),
        started.elapsed()
    );
    Ok(())
}

/// Serves metrics until SIGINT or SIGTERM, then stops the poll thread and sets `stop`.
async fn serve(web: &WebArgs, mut poller: Poller, stop: Arc<AtomicBool>) -> Result<()> {
    let shared = Arc::new(Shared::starting(poller.database()));
    let otlp_settings = otlp::settings(web.otlp_endpoint.as_deref())?;
    let mut listeners = Vec::new();
    for addr in &web.listen_address {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--web.listen-address)"))?;
        listeners.push(listener);
    }
    let otlp = match otlp_settings {
        Some(s) => {
            // This exporter's identity: its host and the port it serves on (the first).
            let port = listeners
                .first()
                .and_then(|l| l.local_addr().ok())
                .map_or(0, |a| a.port());
            let instance = format!("{}:{port}", otlp::host_name());
            let o = Otlp::start(&s, shared.clone(), poller.otlp_error_counter(), &instance)?;
            poller.on_poll_duration(o.poll_duration_recorder());
            Some(o)
        }
        None => None,
    };
    let interval = web.poll_interval;
    let poll_shared = shared.clone();
    let poll_thread = std::thread::Builder::new()
        .name("poller".into())
        .spawn(move || poller.run(poll_shared.as_ref(), interval))?;
    let web_config = match &web.web_config_file {
        Some(p) => WebConfig::load(p)?,
        None => WebConfig::default(),
    };
    let auth = BasicAuth::new(web_config.users.clone());
    let app = web::router(shared, &web.telemetry_path, web.grafana_url.as_deref())
        .layer(axum::middleware::from_fn_with_state(auth, require_auth));
    // Shutdown sets the flag and wakes the poller from its sleep between polls.
    let stop_polling = {
        let poller_thread = poll_thread.thread().clone();
        move || {
            stop.store(true, Ordering::Relaxed);
            poller_thread.unpark();
        }
    };
    let signal_stop = stop_polling.clone();
    let tls = web_config.rustls()?;
    let limits = Limits::for_this_process();
    tracing::debug!(?limits, "connection limits");
    let scheme = if tls.is_some() { "https" } else { "http" };
    for listener in &listeners {
        tracing::info!(
            "listening on {scheme}://{}{}",
            listener.local_addr()?,
            web.telemetry_path
        );
    }
    server::serve(listeners, app, tls, limits, async move {
        shutdown_signal().await;
        signal_stop();
    })
    .await?;
    stop_polling();
    // A poll waiting on a database that stopped answering would hold the exit up to its
    // statement deadline: give it a moment to end between statements, then leave without it.
    let deadline = Instant::now() + POLL_STOP_WAIT;
    while !poll_thread.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !poll_thread.is_finished() {
        tracing::warn!(
            "the poll under way did not end within {POLL_STOP_WAIT:?} (the database is not \
             answering): stopping without it"
        );
    }
    if let Some(o) = otlp {
        let _ = tokio::time::timeout(
            POLL_STOP_WAIT,
            tokio::task::spawn_blocking(move || o.shutdown()),
        )
        .await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// How long shutdown waits for the poll under way.
const POLL_STOP_WAIT: Duration = Duration::from_secs(2);

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
