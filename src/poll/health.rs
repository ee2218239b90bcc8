//! The exporter's own metrics: whether the last poll worked, how long it and each collector
//! took, what was read.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

use super::pipeline::CollectorRun;
use crate::metrics::{self as m, MetricDef};

/// Bucket bounds of the poll-time histogram (seconds), on /metrics and over OTLP alike.
pub const POLL_DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

pub struct Health {
    pub registry: Registry,
    pub up: IntGauge,
    pub poll_duration: Histogram,
    pub poll_errors: IntCounter,
    pub rows_read: IntCounterVec,
    pub rows_rejected: IntCounterVec,
    pub last_poll: Gauge,
    pub cursor: IntGauge,
    collector_success: GaugeVec,
    collector_duration: GaugeVec,
}

fn opts(def: &MetricDef) -> Opts {
    Opts::new(def.name, def.help)
}

impl Health {
    pub fn new() -> Self {
        let registry = Registry::new();
        let up = IntGauge::with_opts(opts(&m::UP)).expect("valid metric");
        let build_info = IntGaugeVec::new(
            opts(&m::EXPORTER_BUILD_INFO),
            &["version", "revision", "branch", "rustversion"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                env!("NEWAPI_BUILD_REVISION"),
                env!("NEWAPI_BUILD_BRANCH"),
                env!("NEWAPI_BUILD_RUST_VERSION"),
            ])
            .set(1);
        let poll_duration = Histogram::with_opts(
            HistogramOpts::new(
                m::EXPORTER_POLL_DURATION_SECONDS.name,
                m::EXPORTER_POLL_DURATION_SECONDS.help,
            )
            .buckets(POLL_DURATION_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let poll_errors =
            IntCounter::with_opts(opts(&m::EXPORTER_POLL_ERRORS_TOTAL)).expect("valid metric");
        let rows_read =
            IntCounterVec::new(opts(&m::EXPORTER_ROWS_READ_TOTAL), &["table"]).expect("valid");
        let rows_rejected =
            IntCounterVec::new(opts(&m::EXPORTER_ROWS_REJECTED_TOTAL), &["table", "reason"])
                .expect("valid metric");
        let last_poll =
            Gauge::with_opts(opts(&m::EXPORTER_LAST_POLL_TIMESTAMP_SECONDS)).expect("valid metric");
        let cursor = IntGauge::with_opts(opts(&m::EXPORTER_LOGS_CURSOR)).expect("valid metric");
        let collector_success =
            GaugeVec::new(opts(&m::EXPORTER_COLLECTOR_SUCCESS), &["collector"]).expect("valid");
        let collector_duration = GaugeVec::new(
            opts(&m::EXPORTER_COLLECTOR_DURATION_SECONDS),
            &["collector"],
        )
        .expect("valid metric");
        let all: [Box<dyn prometheus::core::Collector>; 10] = [
            Box::new(rows_rejected.clone()),
            Box::new(up.clone()),
            Box::new(build_info),
            Box::new(poll_duration.clone()),
            Box::new(poll_errors.clone()),
            Box::new(rows_read.clone()),
            Box::new(last_poll.clone()),
            Box::new(cursor.clone()),
            Box::new(collector_success.clone()),
            Box::new(collector_duration.clone()),
        ];
        for c in all {
            registry.register(c).expect("unique metric names");
        }
        // The standard process_* metrics (CPU, memory, file descriptors, start time), as every
        // official exporter serves them; Linux only.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric names");
        Health {
            registry,
            up,
            poll_duration,
            poll_errors,
            rows_read,
            rows_rejected,
            last_poll,
            cursor,
            collector_success,
            collector_duration,
        }
    }

    /// Records how each collector's last run went.
    pub fn record_runs(&self, runs: &[CollectorRun]) {
        for run in runs {
            self.collector_success
                .with_label_values(&[run.collector])
                .set(if run.success { 1.0 } else { 0.0 });
            self.collector_duration
                .with_label_values(&[run.collector])
                .set(run.seconds);
        }
    }

    /// Adds `newapi_exporter_otlp_errors_total` and returns it.
    pub fn otlp_error_counter(&self) -> IntCounter {
        let c = IntCounter::with_opts(opts(&m::EXPORTER_OTLP_ERRORS_TOTAL)).expect("valid metric");
        self.registry
            .register(Box::new(c.clone()))
            .expect("registered once");
        c
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}
