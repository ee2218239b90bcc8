//! The poll loop: connects, detects the schema, runs every collector, and hands the result of
//! each poll to whoever publishes it (the snapshot that scrapes serve until the next poll).
//!
//! Runs on its own thread because the database calls block. A failed poll keeps the previous
//! state (counters never go back), sets `newapi_up` to 0 and is logged once per outage.

pub mod health;
pub mod pipeline;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use prometheus::IntCounter;
use prometheus::proto::MetricFamily;

use crate::clock::unix_now;
use crate::collect::{GatewayOptions, Settings};
use crate::db::dsn::DbConfig;
use crate::db::{self, Sources};
use crate::metrics::{EXPORTER_SERIES_FOLDED_TOTAL, Family};
use crate::reconcile::Report;
use crate::schema::Generation;
use health::Health;
pub use health::POLL_DURATION_BUCKETS;
pub use pipeline::{CollectorRun, Pipeline};

/// Opens the gateway's databases; called again after a failure.
pub type Connector = Box<dyn FnMut() -> Result<Sources> + Send>;

/// Opens the configured databases on every (re)connect.
pub fn connector(main: DbConfig, logs: Option<DbConfig>) -> Connector {
    Box::new(move || db::open(&main, &logs))
}

/// Opens the gateway's SQLite database on every (re)connect.
pub fn sqlite_connector(path: std::path::PathBuf) -> Connector {
    connector(DbConfig::Sqlite(path), None)
}

/// What one poll produced: the metric families to serve and what the landing page shows.
#[derive(Debug, Clone, Default)]
pub struct PollOutput {
    pub families: Vec<MetricFamily>,
    pub status: Status,
}

/// Where each poll's output goes (the snapshot store the outputs read).
pub trait Publish {
    fn publish(&self, out: PollOutput);
}

/// What the landing page shows about the last poll.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub database: String,
    pub generation: Option<Generation>,
    pub last_poll: Option<SystemTime>,
    pub last_error: Option<String>,
    pub logs_cursor: i64,
    pub ready: bool,
    /// The reconciliation over the window; `None` on one-api (no quota_data).
    pub report: Option<Arc<Report>>,
    /// The gateway's settings as last read (quota per USD, the dashboard's flush interval).
    pub options: GatewayOptions,
}

pub struct Poller {
    connect: Connector,
    sources: Option<Sources>,
    pipeline: Option<Pipeline>,
    health: Health,
    settings: Settings,
    stop: Arc<AtomicBool>,
    database: String,
    outage: Option<String>,
    ready: bool,
    /// What was at the database files' paths when the pipeline was built: another file there
    /// later is another database.
    built_on: Vec<Option<(u64, u64)>>,
    /// Told each poll's duration once the poll's snapshot is published (the OTLP histograms).
    on_poll_duration: Option<Box<dyn Fn(f64) + Send>>,
}

impl Poller {
    /// Tells `f` each poll's duration once its snapshot is published.
    pub fn on_poll_duration(&mut self, f: Box<dyn Fn(f64) + Send>) {
        self.on_poll_duration = Some(f);
    }

    /// Adds `newapi_exporter_otlp_errors_total` to the exporter's metrics and returns it.
    pub fn otlp_error_counter(&mut self) -> IntCounter {
        self.health.otlp_error_counter()
    }

    /// Where the poller reads, passwords masked.
    pub fn database(&self) -> &str {
        &self.database
    }

    pub fn new(
        connect: Connector,
        database: String,
        settings: Settings,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Poller {
            connect,
            sources: None,
            pipeline: None,
            health: Health::new(),
            settings,
            stop,
            database,
            outage: None,
            ready: false,
            built_on: Vec::new(),
            on_poll_duration: None,
        }
    }

    /// One poll: every collector runs even when another fails; the first error is returned.
    fn poll_collectors(&mut self) -> Result<()> {
        if let Some(src) = &self.sources {
            let files = src.files();
            if files.iter().any(Option::is_none) {
                // Moved away, deleted or unreadable: the open connection would go on reading
                // the old file. Keep the last values (newapi_up 0) until it is back.
                self.sources = None;
                bail!(
                    "{} is gone (moved, deleted or unreadable): serving the last values until it is back",
                    self.database
                );
            }
            if self.pipeline.is_some() && files != self.built_on {
                self.sources = None;
            }
        }
        if self.sources.is_none() {
            let mut fresh = (self.connect)()?;
            let files = fresh.files();
            if self.pipeline.is_some() && files != self.built_on {
                // A different database at the same path (a restored backup): its totals
                // replace ours, like an exporter restart. Built before the old state goes, so
                // an unreadable replacement costs nothing.
                let pipeline =
                    Pipeline::build(&mut fresh, self.settings.clone(), self.stop.clone())
                        .with_context(|| {
                            format!(
                                "{} was replaced by a file that cannot be read",
                                self.database
                            )
                        })?;
                tracing::warn!(
                    "{} was replaced (a new file at the same path): reading it from the start",
                    self.database
                );
                self.pipeline = Some(pipeline);
                self.built_on = files;
            }
            self.sources = Some(fresh);
        }
        let src = self.sources.as_mut().expect("connected above");
        if self.pipeline.is_none() {
            self.pipeline = Some(Pipeline::build(
                src,
                self.settings.clone(),
                self.stop.clone(),
            )?);
            self.built_on = src.files();
        }
        let pipeline = self.pipeline.as_mut().expect("built above");
        let result = pipeline.poll(src, unix_now());
        self.health.record_runs(&pipeline.runs);
        result
    }

    /// Runs one poll and publishes its output.
    pub fn poll_once(&mut self, to: &impl Publish) {
        let started = Instant::now();
        let result = self.poll_collectors();
        let took = started.elapsed().as_secs_f64();
        self.health.poll_duration.observe(took);
        match &result {
            Ok(()) => {
                self.health.up.set(1);
                if let Some(prev) = self.outage.take() {
                    tracing::info!(previous_error = %prev, "gateway database reachable again");
                }
                self.ready = true;
            }
            Err(e) => {
                self.health.up.set(0);
                self.health.poll_errors.inc();
                let msg = format!("{e:#}");
                // One error line per outage; later failures of the same outage at debug level.
                if self.outage.is_none() {
                    tracing::error!("poll failed: {msg}");
                } else {
                    tracing::debug!("poll failed again: {msg}");
                }
                self.outage = Some(msg);
                // Reconnect on the next poll; collectors keep their state.
                self.sources = None;
            }
        }
        let now = SystemTime::now();
        self.health.last_poll.set(
            now.duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        to.publish(self.render(Some(now)));
        // After publishing: the hook may read the snapshot this poll made.
        if let Some(f) = &self.on_poll_duration {
            f(took);
        }
    }

    fn render(&mut self, last_poll: Option<SystemTime>) -> PollOutput {
        let mut families = Vec::new();
        let mut generation = None;
        let mut cursor = 0;
        let mut report = None;
        let mut options = GatewayOptions::default();
        if let Some(p) = &mut self.pipeline {
            for (table, n) in std::mem::take(&mut p.ctx.rows_read) {
                self.health.rows_read.with_label_values(&[table]).inc_by(n);
            }
            for ((table, reason), n) in std::mem::take(&mut p.ctx.rows_rejected) {
                self.health
                    .rows_rejected
                    .with_label_values(&[table, reason.as_str()])
                    .inc_by(n);
            }
            if self.ready {
                for c in &p.collectors {
                    c.render(&p.ctx, &mut families);
                }
            }
            generation = Some(p.ctx.schema.generation);
            report = p.ctx.report.clone();
            cursor = p.ctx.logs_cursor;
            options = p.ctx.options.clone();
        }
        self.health.cursor.set(cursor);
        if let Some(p) = &self.pipeline
            && p.ctx.settings.labels.max_series.is_some()
        {
            let mut f = Family::of(&EXPORTER_SERIES_FOLDED_TOTAL);
            for (family, n) in &p.ctx.folded {
                f.sample(&[("family", family)], *n as f64);
            }
            f.finish(&mut families);
        }
        families.extend(self.health.registry.gather());
        PollOutput {
            families,
            status: Status {
                database: self.database.clone(),
                generation,
                last_poll,
                last_error: self.outage.clone(),
                logs_cursor: cursor,
                ready: self.ready,
                report,
                options,
            },
        }
    }

    /// Polls every `interval` until `stop` is set.
    pub fn run(mut self, to: &impl Publish, interval: Duration) {
        to.publish(self.render(None));
        while !self.stop.load(Ordering::Relaxed) {
            self.poll_once(to);
            // Asleep until the next poll; shutdown unparks this thread (see `commands::serve`).
            let next = Instant::now() + interval;
            while !self.stop.load(Ordering::Relaxed) {
                let left = next.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::park_timeout(left);
            }
        }
    }
}
