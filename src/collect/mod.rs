//! Collectors: each reads one of the gateway's tables into its own state and renders its metric
//! families from that state. Adding a metric family touches one collector file.
//!
//! Polling and rendering are separate so that a scrape never touches the database: the poller
//! calls [`Collector::poll`] on its own thread, then renders every collector once into the
//! snapshot that `/metrics` serves.

pub mod channels;
pub mod ledger;
pub mod logs;
pub mod nodes;
pub mod options;
pub mod perf;
pub mod plausible;
pub mod quota_data;
pub mod recording_health;
pub mod tasks;
pub mod users;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use prometheus::proto::MetricFamily;

use crate::clock::{HOUR, hour_of};
use crate::db::{Database, Sources};
use crate::reconcile::{Recording, Report};
use crate::schema::Schema;
use channels::ChannelsCollector;
use logs::LogsCollector;
use options::OptionsCollector;
use plausible::{Limits, Reason};
use quota_data::QuotaDataCollector;
use recording_health::RecordingHealthCollector;

/// THE registration list: the collectors for a database of this schema, in the order they run
/// (each may read what an earlier one left in the [`Context`]: options before anything that
/// needs `DataExportInterval`, channels before the names they label, logs and quota_data before
/// the reconciliation of the two).
pub fn for_schema(
    src: &mut Sources,
    schema: &Schema,
    settings: &Settings,
) -> Vec<Box<dyn Collector>> {
    let rules = schema.generation.rules();
    // Only a generation with quota_data has rules.
    let has_quota_data = rules.is_some();
    let mut collectors: Vec<Box<dyn Collector>> = vec![
        Box::new(OptionsCollector::default()),
        Box::new(ChannelsCollector::default()),
        Box::new(users::UsersCollector::default()),
        Box::new(nodes::NodesCollector::default()),
        Box::new(tasks::TasksCollector::default()),
        Box::new(perf::PerfCollector::new(
            src.main().dialect(),
            settings.labels.max_series,
        )),
    ];
    if has_quota_data {
        collectors.push(Box::new(QuotaDataCollector::new(
            src.main().dialect(),
            rules.is_some_and(|r| r.per_channel),
            settings.labels.max_series,
        )));
    }
    collectors.push(Box::new(LogsCollector::new(
        schema,
        src.logs().dialect(),
        &settings.labels,
    )));
    // The one-shot commands poll once: there is no second reading to compare with.
    if settings.fixed_range.is_none() {
        collectors.push(Box::new(ledger::LedgerCollector::new(
            settings.ledger_window_secs,
            settings.refunds,
        )));
    }
    if has_quota_data {
        collectors.push(Box::new(RecordingHealthCollector::new(
            settings.labels.max_series,
        )));
    }
    collectors
}

/// Label choices that bound the number of series.
#[derive(Debug, Clone, Default)]
pub struct LabelSettings {
    /// Add a `user` label (the username) to the usage counters.
    pub user: bool,
    /// Usage labels left out (their series are summed together).
    pub exclude: BTreeSet<String>,
    /// Most label sets per metric; later ones are folded into `model="__other__"`.
    pub max_series: Option<usize>,
}

/// The model value that folded series carry.
pub const OTHER: &str = "__other__";

/// Decides, once and for good, whether a series is kept or folded: the first `max` distinct
/// keys are kept, later ones folded. Membership never changes, so kept counters and the
/// folded `__other__` series both stay monotonic.
#[derive(Debug, Default)]
pub struct Admission {
    max: Option<usize>,
    kept: HashSet<String>,
    folded: HashSet<String>,
}

impl Admission {
    pub fn new(max: Option<usize>) -> Self {
        Admission {
            max,
            ..Admission::default()
        }
    }

    /// Whether every key is admitted (no `--series.max-per-metric`): callers may skip building
    /// the key.
    pub fn unbounded(&self) -> bool {
        self.max.is_none()
    }

    /// True when `key` has its own series.
    pub fn admit(&mut self, key: &str) -> bool {
        if self.max.is_none() {
            return true;
        }
        if self.kept.contains(key) {
            return true;
        }
        if self.folded.contains(key) {
            return false;
        }
        if self.max.is_none_or(|m| self.kept.len() < m) {
            self.kept.insert(key.to_string());
            true
        } else {
            self.folded.insert(key.to_string());
            false
        }
    }

    /// Distinct keys folded so far.
    pub fn folded(&self) -> usize {
        self.folded.len()
    }
}

/// Log rows one read statement covers by default. Each statement holds SQLite's read lock
/// while it runs and the gateway's commits wait for it: 5,000 rows keep that wait near 20 ms
/// even for rows inside the reconciliation window, which are grouped by hour and user too.
pub const DEFAULT_CHUNK_ROWS: i64 = 5_000;

/// Chunks each connection reads in turn within one read of several chunks (see
/// [`Context::id_chunks`]).
pub const CHUNKS_PER_LANE: usize = 8;

/// How the recording health is judged.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest number of rows one statement may cover (a primary-key range).
    pub chunk_rows: i64,
    /// Settled hours compared by the reconciliation gauges.
    pub window_secs: i64,
    /// Slack after hour end + `DataExportInterval` before an hour counts as settled.
    pub settle_margin_secs: i64,
    /// A fixed `[since, until)` range (the `reconcile` and `backfill` commands) instead of the
    /// sliding window.
    pub fixed_range: Option<(i64, i64)>,
    pub labels: LabelSettings,
    /// The window the second-ledger comparison adds up (`--ledger.window`).
    pub ledger_window_secs: i64,
    /// Whether refunds lower `used_quota` (`--ledger.refunds`).
    pub refunds: ledger::RefundRule,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            chunk_rows: DEFAULT_CHUNK_ROWS,
            window_secs: 24 * HOUR,
            settle_margin_secs: 300,
            fixed_range: None,
            labels: LabelSettings::default(),
            ledger_window_secs: HOUR,
            refunds: ledger::RefundRule::Auto,
        }
    }
}

/// Gateway settings from the `options` table; a missing row means the gateway's default.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayOptions {
    pub quota_per_unit: f64,
    pub data_export_enabled: bool,
    /// `DataExportInterval`, in seconds (the gateway stores minutes).
    pub data_export_interval_seconds: i64,
    pub log_consume_enabled: bool,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            quota_per_unit: 500_000.0,
            data_export_enabled: true,
            data_export_interval_seconds: 300,
            log_consume_enabled: true,
        }
    }
}

/// What collectors share during a poll.
pub struct Context {
    pub schema: Schema,
    /// `channels.name` by channel id label value, kept by the channels collector.
    pub channel_names: HashMap<String, String>,
    pub options: GatewayOptions,
    /// Label sets folded into `__other__`, by family, for `newapi_exporter_series_folded_total`.
    pub folded: BTreeMap<&'static str, usize>,
    /// Rows read this poll, by table, for `newapi_exporter_rows_read_total`.
    pub rows_read: BTreeMap<&'static str, u64>,
    /// Rows set aside this poll, by table and reason, for
    /// `newapi_exporter_rows_rejected_total`.
    pub rows_rejected: BTreeMap<(&'static str, Reason), u64>,
    /// (table, reason) pairs already logged: each is logged once, with a row's id.
    rejections_logged: HashSet<(&'static str, Reason)>,
    pub settings: Settings,
    /// Highest `logs.id` ingested, kept by the logs collector.
    pub logs_cursor: i64,
    /// Per-hour aggregates of logs and quota_data, kept by their collectors.
    pub recording: Recording,
    /// Collectors whose read failed in the current poll: what builds on them keeps its
    /// previous state rather than publish a half-read one.
    pub failed: BTreeSet<&'static str>,
    /// The last reconciliation, for the landing page.
    pub report: Option<Arc<Report>>,
    /// Unix time of the current poll.
    pub now: i64,
    stop: Arc<AtomicBool>,
}

impl Context {
    pub fn new(schema: Schema, mut settings: Settings, stop: Arc<AtomicBool>) -> Self {
        settings.chunk_rows = settings.chunk_rows.max(1);
        // How the comparison reads the hours follows from the generation, once.
        let rules = schema.generation.rules();
        let recording = Recording {
            per_channel: rules.is_some_and(|r| r.per_channel),
            hour_from_log_row: rules.is_some_and(|r| !r.adjacent_hour_netting),
            ..Recording::default()
        };
        Context {
            schema,
            channel_names: HashMap::new(),
            options: GatewayOptions::default(),
            rows_read: BTreeMap::new(),
            rows_rejected: BTreeMap::new(),
            rejections_logged: HashSet::new(),
            folded: BTreeMap::new(),
            settings,
            logs_cursor: 0,
            recording,
            failed: BTreeSet::new(),
            report: None,
            now: 0,
            stop,
        }
    }

    /// Whether this is the one read of a one-shot command (`reconcile`, `backfill`): a fixed
    /// range, usually all history, read once.
    pub fn one_shot(&self) -> bool {
        self.settings.fixed_range.is_some()
    }

    pub fn chunk_rows(&self) -> i64 {
        self.settings.chunk_rows
    }

    /// The id ranges of the next read from `lo` to `end`: one chunk where the engine reads one
    /// statement at a time, and [`CHUNKS_PER_LANE`] for each statement it runs at once
    /// otherwise, so that its connections stay busy while the exporter adds up what came back.
    pub fn id_chunks(&self, db: &dyn Database, lo: i64, end: i64) -> Vec<(i64, i64)> {
        let count = match db.parallel_reads() {
            1 => 1,
            lanes => lanes * CHUNKS_PER_LANE,
        };
        let mut out = Vec::with_capacity(count);
        let mut from = lo;
        while out.len() < count && from <= end {
            let to = from.saturating_add(self.chunk_rows() - 1).min(end);
            out.push((from, to));
            if to == end {
                break;
            }
            from = to + 1;
        }
        out
    }

    /// End of the newest settled hour: every hour ending at or before it has had its last
    /// flush (hour end + `DataExportInterval` + margin is in the past).
    pub fn settled_until(&self) -> i64 {
        hour_of(
            self.now - self.options.data_export_interval_seconds - self.settings.settle_margin_secs,
        )
    }

    /// The `[since, until)` range the reconciliation reports on.
    pub fn window(&self) -> (i64, i64) {
        match self.settings.fixed_range {
            Some(r) => r,
            None => {
                let until = self.settled_until();
                (until - self.settings.window_secs, until)
            }
        }
    }

    /// Hours whose per-hour aggregates are kept: the window plus an hour on each side for
    /// netting; with the sliding window, every newer hour too (it becomes settled later).
    pub fn hourly_range(&self) -> (i64, i64) {
        let (since, until) = self.window();
        let since = hour_of(since) - HOUR;
        match self.settings.fixed_range {
            Some(_) => (since, until.saturating_add(HOUR)),
            // Rows dated further ahead are set aside, not kept hour by hour.
            None => (since, self.plausible().latest.saturating_add(1)),
        }
    }

    pub fn count_rows(&mut self, table: &'static str, n: u64) {
        *self.rows_read.entry(table).or_default() += n;
    }

    /// The limits a row must keep to this poll.
    pub fn plausible(&self) -> Limits {
        Limits::at(self.now)
    }

    /// Counts `n` rows of `table` set aside for `reason`; the first time for this table and
    /// reason, logs it with the id of one such row.
    pub fn reject(&mut self, table: &'static str, reason: Reason, id: i64, n: u64) {
        *self.rows_rejected.entry((table, reason)).or_default() += n;
        if self.rejections_logged.insert((table, reason)) {
            tracing::warn!(
                table,
                reason = reason.as_str(),
                id,
                "a row was set aside: it is left out of the reconciliation (counted in \
                 newapi_exporter_rows_rejected_total; logged once per reason)"
            );
        }
    }

    /// True once shutdown was requested: long reads stop between chunks.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    pub fn channel_name(&self, channel_id: &str) -> &str {
        self.channel_names
            .get(channel_id)
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// One group of metrics backed by one table.
///
/// A collector reads in [`Collector::poll`] (on the poll thread, the only place that touches
/// the database) and renders from its own state in [`Collector::render`]. For example, one
/// gauge from a count:
///
/// ```
/// use anyhow::Result;
/// use newapi_exporter::collect::{Collector, Context};
/// use newapi_exporter::db::Sources;
/// use newapi_exporter::metrics::{Family, UP};
/// use prometheus::proto::MetricFamily;
///
/// #[derive(Default)]
/// struct TokensCollector {
///     tokens: Option<i64>,
/// }
///
/// impl Collector for TokensCollector {
///     fn name(&self) -> &'static str {
///         "tokens"
///     }
///
///     fn poll(&mut self, src: &mut Sources, _ctx: &mut Context) -> Result<()> {
///         let rows = src.main().query("SELECT COUNT(*) FROM tokens", &[])?;
///         self.tokens = rows.first().and_then(|r| r.first()).and_then(|v| v.as_i64());
///         Ok(())
///     }
///
///     fn render(&self, _ctx: &Context, out: &mut Vec<MetricFamily>) {
///         // A real collector renders its own definition from `metrics`.
///         let mut f = Family::of(&UP);
///         if let Some(n) = self.tokens {
///             f.sample(&[], n as f64);
///         }
///         f.finish(out);
///     }
/// }
/// ```
pub trait Collector: Send {
    /// Short name for logs.
    fn name(&self) -> &'static str;

    /// Reads what changed since the last poll into the collector's state.
    fn poll(&mut self, src: &mut Sources, ctx: &mut Context) -> Result<()>;

    /// Appends this collector's metric families, rendered from its state.
    fn render(&self, ctx: &Context, out: &mut Vec<MetricFamily>);
}
