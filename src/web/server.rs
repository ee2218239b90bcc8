//! The HTTP(S) server: one accept loop for plain HTTP and TLS that a slow or hostile client
//! cannot hold up.
//!
//! - At most `max_connections` connections are served at once; beyond that new ones wait in
//!   the listen backlog, so the process never runs out of file descriptors (the usual soft
//!   limit is 1,024).
//! - A client must send a request's headers within `header_read_timeout`, and an idle
//!   keep-alive connection is closed after the same time; a TLS handshake gets as long.
//! - On shutdown the listener closes at once, requests under way get `shutdown_grace` to
//!   finish, and whatever is left is dropped.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// Bounds on what clients may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub shutdown_grace: Duration,
}

/// File descriptors kept for everything but client connections (database connections, the
/// SQLite file, OTLP, logs).
const RESERVED_FDS: u64 = 128;
/// Most client connections served at once, whatever the descriptor limit.
const MAX_CONNECTIONS: u64 = 8192;

impl Limits {
    /// The limits for this process: as many connections as its descriptor limit leaves room
    /// for (after [`raise_fd_limit`]), at most [`MAX_CONNECTIONS`].
    pub fn for_this_process() -> Self {
        let fds = raise_fd_limit();
        Limits {
            max_connections: fds.saturating_sub(RESERVED_FDS).clamp(16, MAX_CONNECTIONS) as usize,
            header_read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(3),
        }
    }
}

/// Raises the soft limit on open files to the hard limit, as Go programs (every official
/// exporter) do at start-up: the usual soft limit of 1,024 would otherwise let a thousand idle
/// clients take every descriptor. Returns the soft limit in force.
#[cfg(unix)]
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    // rlim_t is u64 on Linux but not on every unix.
    #[allow(clippy::unnecessary_cast)]
    let soft = lim.rlim_cur as u64;
    soft
}

#[cfg(not(unix))]
pub fn raise_fd_limit() -> u64 {
    1024
}

/// Serves `app` on every listener (over TLS with `tls`) until `shutdown` completes.
pub async fn serve(
    listeners: Vec<TcpListener>,
    app: Router,
    tls: Option<rustls::ServerConfig>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let acceptor = tls.map(|c| TlsAcceptor::from(Arc::new(c)));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header_read_timeout)
        .max_concurrent_streams(32);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    // One accepting task per listener hands its connections over; the channel holds one, so a
    // listener stops accepting while every connection slot is taken.
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::channel::<TcpStream>(1);
    let acceptors: Vec<_> = listeners
        .into_iter()
        .map(|listener| tokio::spawn(accept_loop(listener, accepted_tx.clone())))
        .collect();
    drop(accepted_tx);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot?,
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            stream = accepted.recv() => match stream {
                Some(stream) => stream,
                None => break,
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        let handshake = limits.header_read_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            match acceptor {
                None => {
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    let _ = watcher.watch(conn.into_owned()).await;
                }
                Some(acceptor) => {
                    let Ok(Ok(tls)) =
                        tokio::time::timeout(handshake, acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                    let _ = watcher.watch(conn.into_owned()).await;
                }
            }
        });
    }
    for acceptor in acceptors {
        acceptor.abort();
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::info!(
                "closing connections still open after {:?}",
                limits.shutdown_grace
            );
        }
    }
    Ok(())
}

/// Accepts connections on one listener and hands them over until the receiver is gone.
async fn accept_loop(listener: TcpListener, to: tokio::sync::mpsc::Sender<TcpStream>) {
    let mut failing = false;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                failing = false;
                if to.send(stream).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was accepted: say so
                // once, and do not spin.
                if !failing {
                    tracing::warn!("accepting a connection failed: {e}");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
