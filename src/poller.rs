//! The poll loop: connects, detects the schema, runs every collector, and publishes one
//! immutable [`Snapshot`] that scrapes serve until the next poll.
//!
//! Runs on its own thread because the database calls block. A failed poll keeps the previous
//! state (counters never go back), sets `newapi_up` to 0 and is logged once per outage.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use prometheus::proto::MetricFamily;
use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::collect::{
    Collector, Context, Settings, channels::ChannelsCollector, logs::LogsCollector,
    options::OptionsCollector, quota_data::QuotaDataCollector,
};
use crate::db::Sources;
use crate::reconcile::{ReconcileCollector, Report};
use crate::schema::{Flavor, Schema};

/// Opens the gateway's databases; called again after a failure.
pub type Connector = Box<dyn FnMut() -> Result<Sources> + Send>;

/// What the landing page shows about the last poll.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub database: String,
    pub flavor: Option<Flavor>,
    pub last_poll: Option<SystemTime>,
    pub last_error: Option<String>,
    pub logs_cursor: i64,
    pub ready: bool,
    /// The reconciliation over the window; `None` on one-api (no quota_data).
    pub report: Option<Arc<Report>>,
}

/// Everything a scrape serves, built once per poll.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub families: Vec<MetricFamily>,
    /// `families` in the Prometheus text format.
    pub text: String,
    pub status: Status,
}

/// The exporter's view shared between the poll thread and the HTTP handlers.
#[derive(Default)]
pub struct Shared {
    snapshot: RwLock<Arc<Snapshot>>,
}

impl Shared {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn publish(&self, s: Snapshot) {
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(s);
    }
}

/// The exporter's own metrics.
struct Health {
    registry: Registry,
    up: IntGauge,
    poll_duration: Histogram,
    poll_errors: IntCounter,
    rows_read: IntCounterVec,
    last_poll: Gauge,
    cursor: IntGauge,
}

impl Health {
    fn new() -> Self {
        use crate::metrics as m;
        let registry = Registry::new();
        let up = IntGauge::new(m::UP.name, m::UP.help).expect("valid metric");
        let build_info = prometheus::IntGaugeVec::new(
            Opts::new(m::EXPORTER_BUILD_INFO.name, m::EXPORTER_BUILD_INFO.help),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let poll_duration = Histogram::with_opts(
            HistogramOpts::new(
                m::EXPORTER_POLL_DURATION_SECONDS.name,
                m::EXPORTER_POLL_DURATION_SECONDS.help,
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
        )
        .expect("valid metric");
        let poll_errors = IntCounter::new(
            m::EXPORTER_POLL_ERRORS_TOTAL.name,
            m::EXPORTER_POLL_ERRORS_TOTAL.help,
        )
        .expect("valid metric");
        let rows_read = IntCounterVec::new(
            Opts::new(
                m::EXPORTER_ROWS_READ_TOTAL.name,
                m::EXPORTER_ROWS_READ_TOTAL.help,
            ),
            &["table"],
        )
        .expect("valid metric");
        let last_poll = Gauge::new(
            m::EXPORTER_LAST_POLL_TIMESTAMP_SECONDS.name,
            m::EXPORTER_LAST_POLL_TIMESTAMP_SECONDS.help,
        )
        .expect("valid metric");
        let cursor = IntGauge::new(m::EXPORTER_LOGS_CURSOR.name, m::EXPORTER_LOGS_CURSOR.help)
            .expect("valid metric");
        for c in [
            Box::new(up.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(build_info),
            Box::new(poll_duration.clone()),
            Box::new(poll_errors.clone()),
            Box::new(rows_read.clone()),
            Box::new(last_poll.clone()),
            Box::new(cursor.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Health {
            registry,
            up,
            poll_duration,
            poll_errors,
            rows_read,
            last_poll,
            cursor,
        }
    }
}

/// The collectors built for one database's schema, and the context they share.
pub struct Pipeline {
    pub collectors: Vec<Box<dyn Collector>>,
    pub ctx: Context,
}

impl Pipeline {
    /// One poll at time `now`: every collector runs even when another fails; the first error
    /// is returned.
    pub fn poll(&mut self, src: &mut Sources, now: i64) -> Result<()> {
        self.ctx.now = now;
        let mut first_err = None;
        for c in &mut self.collectors {
            let started = Instant::now();
            let result = c.poll(src, &mut self.ctx);
            tracing::debug!(collector = c.name(), took = ?started.elapsed(), "collector polled");
            if let Err(e) = result {
                let e = e.context(format!("collector {}", c.name()));
                if first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
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
}

impl Poller {
    /// Adds `newapi_exporter_otlp_errors_total` to the exporter's metrics and returns it.
    pub fn otlp_error_counter(&mut self) -> IntCounter {
        let def = &crate::metrics::EXPORTER_OTLP_ERRORS_TOTAL;
        let c = IntCounter::new(def.name, def.help).expect("valid metric");
        self.health
            .registry
            .register(Box::new(c.clone()))
            .expect("registered once");
        c
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
        }
    }

    /// Detects the schema and builds the collectors for it, in dependency order.
    pub fn build_pipeline(
        src: &mut Sources,
        settings: Settings,
        stop: Arc<AtomicBool>,
    ) -> Result<Pipeline> {
        let schema = Schema::detect(src)?;
        tracing::info!(
            database = %src.describe(),
            flavor = %schema.flavor,
            "gateway schema detected"
        );
        let dialect = src.logs().dialect();
        let mut collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(OptionsCollector::default()),
            Box::new(ChannelsCollector::default()),
        ];
        if schema.quota_data.is_some() {
            collectors.push(Box::new(QuotaDataCollector::new(
                src.main().dialect(),
                settings.labels.max_series,
            )));
        }
        collectors.push(Box::new(LogsCollector::new(
            &schema,
            dialect,
            &settings.labels,
        )));
        if schema.quota_data.is_some() {
            collectors.push(Box::new(ReconcileCollector::new(
                settings.labels.max_series,
            )));
        }
        Ok(Pipeline {
            collectors,
            ctx: Context::new(schema, settings, stop),
        })
    }

    /// One poll: every collector runs even when another fails; the first error is returned.
    fn poll_collectors(&mut self) -> Result<()> {
        if self.sources.as_ref().is_some_and(Sources::is_replaced) {
            // A different database now: its totals replace ours (like an exporter restart).
            tracing::warn!(
                "{} was replaced (a new file at the same path): reading it from the start",
                self.database
            );
            self.sources = None;
            self.pipeline = None;
        }
        if self.sources.is_none() {
            self.sources = Some((self.connect)()?);
        }
        let src = self.sources.as_mut().expect("connected above");
        if self.pipeline.is_none() {
            self.pipeline = Some(Self::build_pipeline(
                src,
                self.settings.clone(),
                self.stop.clone(),
            )?);
        }
        self.pipeline
            .as_mut()
            .expect("built above")
            .poll(src, unix_now())
    }

    /// Runs one poll and publishes the resulting snapshot.
    pub fn poll_once(&mut self, shared: &Shared) {
        let started = Instant::now();
        let result = self.poll_collectors();
        self.health
            .poll_duration
            .observe(started.elapsed().as_secs_f64());
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
        shared.publish(self.render(Some(now)));
    }

    fn render(&mut self, last_poll: Option<SystemTime>) -> Snapshot {
        let mut families = Vec::new();
        let mut flavor = None;
        let mut cursor = 0;
        let mut report = None;
        if let Some(p) = &mut self.pipeline {
            for (table, n) in std::mem::take(&mut p.ctx.rows_read) {
                self.health.rows_read.with_label_values(&[table]).inc_by(n);
            }
            if self.ready {
                for c in &p.collectors {
                    c.render(&p.ctx, &mut families);
                }
            }
            flavor = Some(p.ctx.schema.flavor);
            report = p.ctx.report.clone();
            cursor = p.ctx.logs_cursor;
        }
        self.health.cursor.set(cursor);
        if let Some(p) = &self.pipeline
            && p.ctx.settings.labels.max_series.is_some()
        {
            let mut f = crate::collect::Family::of(&crate::metrics::EXPORTER_SERIES_FOLDED_TOTAL);
            for (family, n) in &p.ctx.folded {
                f.sample(&[("family", family)], *n as f64);
            }
            f.finish(&mut families);
        }
        families.extend(self.health.registry.gather());
        let mut text = String::new();
        if let Err(e) = TextEncoder::new().encode_utf8(&families, &mut text) {
            tracing::error!("encoding metrics failed: {e}");
        }
        Snapshot {
            families,
            text,
            status: Status {
                database: self.database.clone(),
                flavor,
                last_poll,
                last_error: self.outage.clone(),
                logs_cursor: cursor,
                ready: self.ready,
                report,
            },
        }
    }

    /// Polls every `interval` until `stop` is set.
    pub fn run(mut self, shared: Arc<Shared>, interval: Duration) {
        shared.publish(self.render(None));
        while !self.stop.load(Ordering::Relaxed) {
            self.poll_once(&shared);
            // Asleep until the next poll; shutdown unparks this thread (see `serve`).
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
