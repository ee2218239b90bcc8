//! Usage counters from `logs`: requests, quota, tokens, refunds and errors by model, channel
//! and group.
//!
//! The table is read by primary-key ranges of at most `chunk_rows` ids, each range one short
//! statement with the GROUP BY done in SQL, so the gateway's SQLite writers wait at most one
//! chunk. The cold start walks the whole table this way (on MySQL and PostgreSQL, where no
//! writer waits for a reader, a chunk on each pooled connection at once); later polls read
//! only `id > cursor`.
//! Counters are the table's totals, so a restarted exporter reports the same values.

mod by_time;
mod cursor;

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Result;
use prometheus::proto::MetricFamily;

use super::plausible::{Limits, MAX_AMOUNT, Reason};
use super::{Admission, Collector, Context, LabelSettings, OTHER};
use crate::db::{Database, Dialect, Engine, Row, Sources, Value};
use crate::metrics::{self as m, Family};
use crate::reconcile::{Name, Names, PairKey, TimeSpan};
use crate::schema::{LOG_TYPE_CONSUME, LOG_TYPE_ERROR, LOG_TYPE_REFUND, Schema};
use by_time::ByTime;
pub use by_time::LATE_ROWS_SECS;
use cursor::{GAP_MAX, GAP_WINDOW, NewestRow};

/// Labels of every usage series, in order.
pub const USAGE_LABELS: [&str; 4] = ["model", "channel_id", "channel_name", "group"];

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct UsageKey {
    model: Name,
    channel_id: Name,
    group: Name,
    /// The username, with `--labels.user` only.
    user: Name,
}

/// Running totals for one (model, channel, group).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub requests: u64,
    pub quota: u64,
    pub corrections: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub use_time_seconds: u64,
    pub refunds: u64,
    pub refund_quota: u64,
    pub errors: u64,
    pub channel_tests: u64,
    pub channel_test_quota: u64,
    pub settlements: u64,
    pub zero_usage: u64,
    pub saturated: u64,
    /// Billed requests in the latency histograms: with a duration, its sum (seconds) and
    /// buckets, cumulative (`le`) as [`DURATION_BUCKETS`]...
    pub duration_count: u64,
    pub duration_seconds: u64,
    pub duration_buckets: [u64; 8],
    /// ...and with a time to first response: their count, sum (ms) and buckets.
    pub first_response_count: u64,
    pub first_response_ms: u64,
    pub first_response_buckets: [u64; 8],
}

impl Usage {
    fn add(&mut self, o: &Usage) {
        self.requests = self.requests.saturating_add(o.requests);
        self.quota = self.quota.saturating_add(o.quota);
        self.corrections = self.corrections.saturating_add(o.corrections);
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
        self.use_time_seconds = self.use_time_seconds.saturating_add(o.use_time_seconds);
        self.refunds = self.refunds.saturating_add(o.refunds);
        self.refund_quota = self.refund_quota.saturating_add(o.refund_quota);
        self.errors = self.errors.saturating_add(o.errors);
        self.channel_tests = self.channel_tests.saturating_add(o.channel_tests);
        self.channel_test_quota = self.channel_test_quota.saturating_add(o.channel_test_quota);
        self.settlements = self.settlements.saturating_add(o.settlements);
        self.zero_usage = self.zero_usage.saturating_add(o.zero_usage);
        self.saturated = self.saturated.saturating_add(o.saturated);
        self.duration_count = self.duration_count.saturating_add(o.duration_count);
        self.duration_seconds = self.duration_seconds.saturating_add(o.duration_seconds);
        for (a, b) in self.duration_buckets.iter_mut().zip(o.duration_buckets) {
            *a = a.saturating_add(b);
        }
        self.first_response_count = self
            .first_response_count
            .saturating_add(o.first_response_count);
        self.first_response_ms = self.first_response_ms.saturating_add(o.first_response_ms);
        for (a, b) in self
            .first_response_buckets
            .iter_mut()
            .zip(o.first_response_buckets)
        {
            *a = a.saturating_add(b);
        }
    }
}

pub struct LogsCollector {
    /// The aggregate statement up to its WHERE condition, built for this schema. Parameters:
    /// the hour range twice, the consume type with `flags_unmirrored`, the hour range twice more
    /// with `per_channel`, the plausibility limits, then the condition's.
    select_sql: String,
    /// The same for rows dated before the reconciliation's hours (see [`Self::read_old`]):
    /// parameters are only the consume type with `flags_unmirrored`, the plausibility limits
    /// and the condition's.
    old_rows_select_sql: String,
    /// Whether the select list tests the consume type for the unmirrored flag (one parameter
    /// after the hour ranges).
    flags_unmirrored: bool,
    /// The same select list with one result row per log row, for reads where nearly every row
    /// is a group of its own anyway.
    per_row_select_sql: String,
    /// Whether one-shot commands read with it: on SQLite, where the rows cost no transfer and
    /// a full-history read would otherwise have the engine sort every row by eleven columns
    /// only to find groups of one row (a million rows make 830k groups), while the exporter
    /// adds up rows in a hash map at a fraction of that. Server engines keep grouping, which
    /// also keeps the rows sent small.
    per_row_on_one_shot: bool,
    /// Whether rows in range keep the pair's channel, group, token and username (current
    /// generation: two more hour ranges as parameters).
    per_channel: bool,
    /// Groups by the labels, the hour, the user and the unmirrored flag.
    group_sql: String,
    /// The same plus the id: one group per row.
    group_by_row_sql: String,
    id: String,
    next_id_sql: String,
    max_id_sql: String,
    errors_and_refunds: bool,
    has_use_time: bool,
    cursor: i64,
    /// The row at the cursor when it was read: tells whether the rows counted are still there.
    newest: Option<NewestRow>,
    /// The row with one id (created_at, quota).
    row_sql: String,
    /// The smallest id of a row written after a time.
    first_after_sql: String,
    usage: HashMap<UsageKey, Usage>,
    /// The names the usage keys hold.
    names: Names,
    /// Whether commits can become visible out of id order (MySQL, PostgreSQL).
    track_gaps: bool,
    /// Whether rows keep their hour and user for the reconciliation: not on one-api, which has
    /// no quota_data to compare with.
    keeps_hours: bool,
    labels: LabelSettings,
    admission: Admission,
    /// Ids not seen below the cursor, with the time they were first missed.
    gaps: BTreeMap<i64, i64>,
    /// The table has no usable ids (ClickHouse): it is read by time.
    read_by_time: bool,
    by_time: ByTime,
    /// Whether rows set aside are counted as rejected by this read (not by the re-reads of
    /// open hours on ClickHouse).
    count_rejections: bool,
    /// The quoted `created_at` column.
    created: String,
    /// The oldest `created_at` in a range.
    next_time_sql: String,
    /// Row count, oldest and newest `created_at` in a range.
    time_stats_sql: String,
    /// The time of the oldest row still in the table (an index read).
    oldest_sql: String,
    /// What it returned at the last poll; `None` for an empty table.
    oldest: Option<i64>,
}

/// Columns of the aggregate statement, in order.
/// A read of at least this many chunks' worth of ids is long (a cold start, a catch-up): its
/// chunks are read with the statement for rows dated before the reconciliation's hours until
/// it reaches them. Shorter reads hold the newest rows, and take the full statement at once.
const LONG_READ_CHUNKS: i64 = 16;

const C_TYPE: usize = 0;
const C_MODEL: usize = 1;
const C_CHANNEL: usize = 2;
const C_GROUP: usize = 3;
const C_HOUR: usize = 4;
const C_USER: usize = 5;
const C_UNMIRRORED: usize = 6;
const C_ROWS: usize = 7;
const C_QUOTA_POS: usize = 8;
const C_QUOTA_NEG: usize = 9;
const C_PROMPT: usize = 10;
const C_COMPLETION: usize = 11;
const C_USE_TIME: usize = 12;
const C_QUOTA: usize = 13;
const C_FIRST: usize = 14;
const C_LATEST: usize = 15;
/// The smallest id of the group: the row's id when grouping by row.
const C_ID: usize = 16;
/// The token id and username of rows in range (current generation; NULL otherwise).
const C_TOKEN: usize = 17;
const C_PAIR_USERNAME: usize = 18;
/// Why the group's rows are set aside (0: plausible rows; see `plausible`).
const C_FLAG: usize = 19;
/// What kind of consume row the group holds (see [`RowKind`]).
const C_KIND: usize = 20;
/// The latency histograms, over rows dated from the start of the reconciliation's hours on
/// (see [`LogsCollector::read`]): the group's bucket of [`DURATION_BUCKETS`] (-1: none; the
/// number of bounds: beyond the last) and the sum of its `use_time`...
const C_DURATION_BUCKET: usize = 21;
const C_DURATION_SUM: usize = 22;
/// ...and the same for the time to first response (`other.frt`, milliseconds).
const C_FRT_BUCKET: usize = 23;
const C_FRT_SUM: usize = 24;
/// The username, selected and grouped by only with `--labels.user`.
const C_USERNAME: usize = 25;

/// Upper bounds of the request-duration histogram's buckets: `use_time` is whole seconds,
/// the gateway's elapsed time rounded down.
pub const DURATION_BUCKETS: [i64; 8] = [1, 2, 5, 10, 30, 60, 120, 300];
/// Upper bounds of the time-to-first-response histogram's buckets, in milliseconds as the
/// gateway writes `other.frt`.
pub const FIRST_RESPONSE_BUCKETS_MS: [i64; 8] = [100, 250, 500, 1000, 2000, 5000, 10_000, 30_000];

/// Consume rows that are not ordinary billed requests, told apart in SQL (first match wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowKind {
    /// An ordinary billed request.
    Billed = 0,
    /// A channel test: mirrored into quota_data, never charged.
    ChannelTest = 1,
    /// An async task's settlement row: quota charged (or given back) for a request already
    /// counted.
    Settlement = 2,
    /// The upstream returned no usage: served, nothing billed.
    ZeroUsage = 3,
    /// Billed at a clamped amount: the quota computation overflowed (`quota_saturation`).
    Saturated = 4,
}

impl RowKind {
    fn of(code: i64) -> RowKind {
        [
            RowKind::ChannelTest,
            RowKind::Settlement,
            RowKind::ZeroUsage,
            RowKind::Saturated,
        ]
        .into_iter()
        .find(|k| *k as i64 == code)
        .unwrap_or(RowKind::Billed)
    }
}

impl LogsCollector {
    pub fn new(schema: &Schema, dialect: Dialect, labels: &LabelSettings) -> Self {
        let cols = &schema.logs;
        let d = dialect;
        let ty = d.ident("type");
        let created = d.ident("created_at");
        let quota = d.ident("quota");
        let prompt = d.ident("prompt_tokens");
        let completion = d.ident("completion_tokens");
        // Rows inside the reconciliation's hour range (two `?` each) also keep their hour and
        // user; older rows collapse into one NULL bucket so the cold start stays cheap.
        let in_range = format!("{created} >= ? AND {created} < ?");
        // Async task settlement rows (no tokens, no request id, `pre_consumed_quota` in other)
        // never reach quota_data by design.
        let rules = schema.generation.rules();
        // Settlement rows of a generation that does not mirror them are flagged apart.
        let has_unmirrored = cols.has("other")
            && cols.has("request_id")
            && rules.is_some_and(|r| !r.settlements_mirrored);
        // On the current generation, rows in range also keep the token and username that
        // quota_data keys on (the channel and group are labels already).
        let per_channel = rules.is_some_and(|r| r.per_channel);
        let in_range_column = |old: bool, name: &str, expr: String| {
            if per_channel && cols.has(name) && !old {
                format!("CASE WHEN {in_range} THEN {expr} ELSE NULL END")
            } else {
                "NULL".to_string()
            }
        };
        let unmirrored = if has_unmirrored {
            format!(
                "CASE WHEN {ty} = ? AND {prompt} = 0 AND {completion} = 0 AND COALESCE({rid}, '') = '' \
                 AND {other} LIKE '%pre_consumed_quota%' THEN 1 ELSE 0 END",
                rid = d.ident("request_id"),
                other = d.ident("other"),
            )
        } else {
            "0".to_string()
        };
        let id = d.ident("id");
        // Each sum takes only values within 32 bits, so none can overflow. A row with any of
        // these amounts out of range is in a group of its own (its flag), which is set aside
        // whole: holding each amount to the range changes no sum that is counted, and costs the
        // server less than a test of the range in every sum.
        let amounts = [quota.clone(), prompt.clone(), completion.clone()];
        // Each statement comes in two forms: grouped, and one result row per log row (the
        // aggregates taken over that row alone).
        let sum = |per_row: bool, expr: String| if per_row { expr } else { d.sum_int(&expr) };
        let held =
            |per_row: bool, expr: &str, low: i64| sum(per_row, d.clamp(expr, low, MAX_AMOUNT));
        // `use_time` is not among the flagged amounts: a value out of range adds nothing.
        let bounded = |per_row: bool, column: &str, expr: &str| {
            sum(
                per_row,
                format!(
                    "CASE WHEN {column} BETWEEN -{MAX_AMOUNT} AND {MAX_AMOUNT} THEN {expr} ELSE 0 END"
                ),
            )
        };
        let of_rows = |per_row: bool, aggregate: &str, expr: &str| {
            if per_row {
                expr.to_string()
            } else {
                format!("{aggregate}({expr})")
            }
        };
        let flag = Limits::flag_sql(&created, &amounts);
        let hour_in_range =
            format!("CASE WHEN {in_range} THEN {created} - {created} % 3600 ELSE NULL END");
        let user_in_range = format!(
            "CASE WHEN {in_range} THEN {} ELSE NULL END",
            cols.or(d, "user_id", "0")
        );
        let use_time = cols.or(d, "use_time", "0");
        // In the order of the C_* constants. With `old`, the form for rows dated before the
        // reconciliation's hours, which keep no hour, user, token or username and take no
        // histogram bucket: those columns are constants, and the statement has no `?` for them.
        let select_list = |per_row: bool, old: bool| {
            let or_null = |expr: &String| {
                if old {
                    "NULL".to_string()
                } else {
                    expr.clone()
                }
            };
            let mut exprs = vec![
                ty.clone(),
                d.text_key(&d.ident("model_name")),
                cols.or(d, "channel_id", "NULL"),
                d.text_key(&cols.or(d, "group", "NULL")),
                or_null(&hour_in_range),
                or_null(&user_in_range),
                unmirrored.clone(),
                if per_row { "1" } else { "COUNT(*)" }.to_string(),
                held(per_row, &quota, 0),
                // The corrections: the negative part, negated once added up (a sum of held
                // values, so never the smallest integer).
                format!("-{}", sum(per_row, d.clamp(&quota, -MAX_AMOUNT, 0))),
                held(per_row, &prompt, -MAX_AMOUNT),
                held(per_row, &completion, -MAX_AMOUNT),
                // use_time is whole seconds of one request.
                bounded(per_row, &use_time, &use_time),
                held(per_row, &quota, -MAX_AMOUNT),
                of_rows(per_row, "MIN", &created),
                of_rows(per_row, "MAX", &created),
                of_rows(per_row, "MIN", &id),
                in_range_column(old, "token_id", d.ident("token_id")),
                in_range_column(old, "username", d.text_key(&d.ident("username"))),
                flag.clone(),
            ];
            let other = cols.has("other").then(|| d.ident("other"));
            let other_has = |key: &str| match &other {
                Some(o) => format!("{o} LIKE '%{key}%'"),
                None => "1 = 0".to_string(),
            };
            let no_tokens = format!("{prompt} = 0 AND {completion} = 0");
            exprs.push(format!(
                "CASE WHEN {ty} <> {LOG_TYPE_CONSUME} THEN 0 WHEN {} THEN {} \
             WHEN {no_tokens} AND {} THEN {} WHEN {no_tokens} AND {quota} = 0 THEN {} \
             WHEN {} THEN {} ELSE 0 END",
                schema.channel_test_sql(d),
                RowKind::ChannelTest as i64,
                other_has("pre_consumed_quota"),
                RowKind::Settlement as i64,
                RowKind::ZeroUsage as i64,
                other_has("quota_saturation"),
                RowKind::Saturated as i64,
            ));
            // The latency histograms: each row's bucket is a grouping key, so that the database
            // counts the rows per bucket and the exporter adds up groups, not rows. Rows dated
            // before the `?` take no bucket (-1), and the test on the date comes first: the
            // cold start does not take apart the text of every row ever logged. A value that
            // is text taken apart (`other.frt`) is computed once per row where the engine has a
            // bucket function. The per-row
            // form serves the one-shot commands, which render neither histograms nor
            // usernames: its rows end before them.
            if !per_row {
                let bucket = |value: &str, bounds: &[i64]| {
                    format!(
                        "CASE WHEN {created} < ? THEN -1 ELSE {} END",
                        d.bucket_index(value, bounds)
                    )
                };
                // Values beyond 32 bits are held at its limit, so the sum cannot overflow.
                let sum = |value: &str| {
                    d.sum_int(&format!(
                        "CASE WHEN {created} >= ? THEN {} ELSE 0 END",
                        d.clamp(value, 0, MAX_AMOUNT)
                    ))
                };
                let (duration, frt) = (
                    cols.has("use_time").then(|| use_time.clone()),
                    other.as_ref().map(|o| d.json_int(o, "frt")),
                );
                for value in [duration, frt]
                    .iter()
                    .zip([&DURATION_BUCKETS, &FIRST_RESPONSE_BUCKETS_MS])
                {
                    match value {
                        _ if old => exprs.extend(["-1".to_string(), "0".to_string()]),
                        (Some(v), bounds) => {
                            exprs.push(bucket(v, bounds));
                            exprs.push(sum(v));
                        }
                        // Still one `?` each, as the read binds them.
                        (None, _) => {
                            exprs.push(format!("CASE WHEN {created} < ? THEN -1 ELSE -1 END"));
                            exprs.push(format!("CASE WHEN {created} < ? THEN 0 ELSE 0 END"));
                        }
                    }
                }
                if labels.user {
                    exprs.push(d.text_key(&cols.or(d, "username", "NULL")));
                }
            }
            format!("SELECT {} FROM logs WHERE ", d.select_list(&exprs))
        };
        let select_sql = select_list(false, false);
        let old_rows_select_sql = select_list(false, true);
        let per_row_select_sql = select_list(true, false);
        // The token and username columns are constant NULLs unless per channel: grouping by
        // them would only widen every sort key of the cold start.
        let mut grouped = vec![1, 2, 3, 4, 5, 6, 7];
        if per_channel {
            grouped.extend([C_TOKEN + 1, C_PAIR_USERNAME + 1]);
        }
        grouped.push(C_FLAG + 1);
        grouped.push(C_KIND + 1);
        grouped.extend([C_DURATION_BUCKET + 1, C_FRT_BUCKET + 1]);
        if labels.user {
            grouped.push(C_USERNAME + 1);
        }
        let group = d.group_by(&grouped);
        let row_sql = format!("SELECT {created}, {quota} FROM logs WHERE {id} = ?");
        let first_after_sql = format!("SELECT MIN({id}) FROM logs WHERE {created} > ?");
        LogsCollector {
            per_row_select_sql,
            old_rows_select_sql,
            per_row_on_one_shot: dialect.0 == Engine::Sqlite,
            row_sql,
            first_after_sql,
            select_sql,
            flags_unmirrored: has_unmirrored,
            per_channel,
            group_by_row_sql: format!("{group}, {id}"),
            group_sql: group,
            id,
            next_id_sql: format!(
                "SELECT MIN({id}) FROM logs WHERE {id} > ?",
                id = d.ident("id")
            ),
            max_id_sql: format!("SELECT MAX({id}) FROM logs", id = d.ident("id")),
            errors_and_refunds: schema.generation.has_error_and_refund_logs(),
            has_use_time: cols.has("use_time"),
            // Ids may be zero or negative (an import): every one counts.
            cursor: i64::MIN,
            newest: None,

            usage: HashMap::new(),
            names: Names::default(),
            track_gaps: dialect.0 != Engine::Sqlite,
            keeps_hours: schema.quota_data.is_some(),
            labels: labels.clone(),
            admission: Admission::new(labels.max_series),
            gaps: BTreeMap::new(),
            read_by_time: dialect.0 == Engine::Clickhouse,
            by_time: ByTime::default(),
            count_rejections: true,
            time_stats_sql: format!(
                "SELECT COUNT(*), MIN({created}), MAX({created}) FROM logs \
                 WHERE {created} >= ? AND {created} < ?"
            ),
            // Not MIN(): ClickHouse's aggregate over no rows is 0, not NULL.
            next_time_sql: format!(
                "SELECT {created} FROM logs WHERE {created} >= ? AND {created} < ? \
                 ORDER BY {created} LIMIT 1"
            ),
            // The first row by primary key (by time on ClickHouse, whose table is sorted so):
            // where the gateway's log cleanup, or a TTL, has cut the table.
            oldest_sql: if dialect.0 == Engine::Clickhouse {
                format!("SELECT {created} FROM logs ORDER BY {created} LIMIT 1")
            } else {
                format!(
                    "SELECT {created} FROM logs ORDER BY {} LIMIT 1",
                    d.ident("id")
                )
            },
            oldest: None,
            created,
        }
    }

    /// The series a row group counts in: excluded labels blanked, and beyond
    /// `--series.max-per-metric` the shared `__other__` series.
    fn series_key(&mut self, model: &str, channel_id: &str, group: &str, user: &str) -> UsageKey {
        let exclude = &self.labels.exclude;
        let names = &mut self.names;
        let mut keep = |label: &str, v: &str| {
            if exclude.contains(label) {
                Name::default()
            } else {
                names.get(v)
            }
        };
        let key = UsageKey {
            model: keep("model", model),
            channel_id: keep("channel_id", channel_id),
            group: keep("group", group),
            user: if self.labels.user {
                self.names.get(user)
            } else {
                Name::default()
            },
        };
        if self.admission.unbounded() {
            return key;
        }
        let id = format!(
            "{}\u{1f}{}\u{1f}{}\u{1f}{}",
            key.model, key.channel_id, key.group, key.user
        );
        if self.admission.admit(&id) {
            key
        } else {
            UsageKey {
                model: self.names.get(OTHER),
                channel_id: Name::default(),
                group: Name::default(),
                user: Name::default(),
            }
        }
    }

    /// Reads and applies the rows matching `condition`; with `by_row`, returns their ids.
    ///
    /// The latency histograms take rows dated from the start of the reconciliation's hours
    /// (the window and an hour before it) and every row read after that: their counters begin
    /// when the exporter starts, as `rate()` and `histogram_quantile()` expect, and the cold
    /// start does not take apart the text of every row the gateway ever logged.
    fn read(
        &mut self,
        db: &mut dyn Database,
        ctx: &mut Context,
        condition: &str,
        params: &[Value],
        by_row: bool,
    ) -> Result<Vec<i64>> {
        self.read_each(db, ctx, condition, &[params.to_vec()], by_row)
    }

    /// [`Self::read`] for several parameter lists of the same condition, run together where
    /// the engine reads in parallel; nothing is applied unless every one was read.
    fn read_each(
        &mut self,
        db: &mut dyn Database,
        ctx: &mut Context,
        condition: &str,
        each: &[Vec<Value>],
        by_row: bool,
    ) -> Result<Vec<i64>> {
        let form = if by_row { Form::ByRow } else { Form::Grouped };
        let (sql, all) = self.statement(ctx, condition, form);
        let results = db.query_each(&sql, &with_leading(&all, each))?;
        Ok(self.apply_all(ctx, results.iter().flatten(), by_row))
    }

    /// [`Self::read_each`] for the chunks of a long read (a cold start, a catch-up), first
    /// with the statement for rows dated before the reconciliation's hours, which costs the
    /// server far less per row. A chunk whose newest row is within the hours is read again in
    /// full: ids follow time closely but not exactly (several nodes, clocks apart), so each
    /// chunk is judged by its own rows, not by a boundary id. Nothing is applied unless every
    /// chunk was read. Returns whether any chunk was read again (the read has reached the
    /// reconciliation's hours).
    fn read_old(
        &mut self,
        db: &mut dyn Database,
        ctx: &mut Context,
        condition: &str,
        each: &[Vec<Value>],
    ) -> Result<bool> {
        let since = ctx.hourly_range().0;
        let (sql, all) = self.statement(ctx, condition, Form::OldRows);
        let mut results = db.query_each(&sql, &with_leading(&all, each))?;
        // A group whose newest time is unknown (NULL) is read in full too, as its rows would be.
        let recent = |groups: &Vec<Row>| {
            groups.iter().any(|g| {
                g.get(C_LATEST)
                    .and_then(Value::as_i64)
                    .is_none_or(|t| t >= since)
            })
        };
        let again: Vec<usize> = (0..each.len()).filter(|&i| recent(&results[i])).collect();
        if !again.is_empty() {
            let params: Vec<Vec<Value>> = again.iter().map(|&i| each[i].clone()).collect();
            let (sql, all) = self.statement(ctx, condition, Form::Grouped);
            let full = db.query_each(&sql, &with_leading(&all, &params))?;
            for (i, groups) in again.iter().zip(full) {
                results[*i] = groups;
            }
        }
        self.apply_all(ctx, results.iter().flatten(), false);
        Ok(!again.is_empty())
    }

    /// The aggregate statement of `form` for `condition`, and the parameters that come before
    /// the condition's own.
    fn statement(&self, ctx: &Context, condition: &str, form: Form) -> (String, Vec<Value>) {
        let old = form == Form::OldRows;
        // An empty range puts every row in the single NULL hour bucket.
        let (from, until) = if self.keeps_hours {
            ctx.hourly_range()
        } else {
            (0, 0)
        };
        let mut all = Vec::new();
        if !old {
            all.extend([from, until, from, until].map(Value::Int));
        }
        if self.flags_unmirrored {
            all.push(Value::Int(LOG_TYPE_CONSUME));
        }
        if self.per_channel && !old {
            for _ in 0..2 {
                all.extend([Value::Int(from), Value::Int(until)]);
            }
        }
        all.extend(ctx.plausible().flag_params().map(Value::Int));
        let one_shot_per_row = self.per_row_on_one_shot && ctx.one_shot() && !old;
        if !one_shot_per_row && !old {
            let since = ctx.hourly_range().0;
            all.extend([since; 4].map(Value::Int));
        }
        let sql = match form {
            _ if one_shot_per_row => format!("{}{condition}", self.per_row_select_sql),
            Form::OldRows => format!("{}{condition}{}", self.old_rows_select_sql, self.group_sql),
            Form::Grouped => format!("{}{condition}{}", self.select_sql, self.group_sql),
            Form::ByRow => format!("{}{condition}{}", self.select_sql, self.group_by_row_sql),
        };
        (sql, all)
    }

    /// Applies the groups read; with `by_row`, returns their ids.
    fn apply_all<'a>(
        &mut self,
        ctx: &mut Context,
        groups: impl Iterator<Item = &'a Row>,
        by_row: bool,
    ) -> Vec<i64> {
        let mut read = 0;
        let mut ids = Vec::new();
        for g in groups {
            read += self.apply(g, ctx);
            if by_row && let Some(id) = g.get(C_ID).and_then(Value::as_i64) {
                ids.push(id);
            }
        }
        ctx.count_rows("logs", read);
        ids
    }

    /// Folds one aggregated group into the counters and the per-hour recording state.
    fn apply(&mut self, row: &[Value], ctx: &mut Context) -> u64 {
        let int = |i: usize| row.get(i).and_then(Value::as_i64).unwrap_or(0);
        // Sums are never negative by construction; clamp anyway so bad data cannot wrap.
        let uint = |i: usize| int(i).max(0) as u64;
        let label = |i: usize| row.get(i).map(Value::label_ref).unwrap_or_default();
        // A histogram bucket column: the first cumulative bucket the group's rows count in.
        let bucket = |i: usize| usize::try_from(row.get(i).and_then(Value::as_i64)?).ok();
        let rows = uint(C_ROWS);
        let set_aside = Reason::of_flag(int(C_FLAG));
        if let Some(reason) = set_aside {
            if self.count_rejections {
                ctx.reject("logs", reason, int(C_ID), rows);
            }
            if !reason.still_counted() {
                return rows;
            }
        }
        let ty = int(C_TYPE);
        let counted = ty == LOG_TYPE_CONSUME
            || (self.errors_and_refunds && (ty == LOG_TYPE_ERROR || ty == LOG_TYPE_REFUND));
        if !counted {
            return rows;
        }
        let model = ctx.recording.names.get(&label(C_MODEL));
        // Rows set aside for their time count in the usage counters only.
        if ty == LOG_TYPE_CONSUME && set_aside.is_none() {
            let (first, latest) = (int(C_FIRST), int(C_LATEST));
            let rec = &mut ctx.recording;
            let unmirrored = int(C_UNMIRRORED) != 0;
            if !unmirrored {
                let span = TimeSpan {
                    first,
                    last: latest,
                };
                match rec.logs_model_times.get_mut(&*model) {
                    Some(times) => times.widen(span),
                    None => {
                        rec.logs_model_times.insert(model.to_string(), span);
                    }
                }
            }
            if let Some(hour) = row.get(C_HOUR).and_then(Value::as_i64) {
                let pair = if self.per_channel {
                    PairKey {
                        user_id: int(C_USER),
                        model: model.clone(),
                        channel_id: int(C_CHANNEL),
                        group: rec.names.get(&label(C_GROUP)),
                        token_id: int(C_TOKEN),
                        username: rec.names.get(&label(C_PAIR_USERNAME)),
                    }
                } else {
                    PairKey::user_model(int(C_USER), &model)
                };
                let h = rec.logs_hour(pair, hour);
                let n = rows as i64;
                if unmirrored {
                    h.unmirrored_requests += n;
                    h.unmirrored_quota += int(C_QUOTA);
                } else {
                    let tokens = int(C_PROMPT) + int(C_COMPLETION);
                    h.add_mirrored(n, int(C_QUOTA), tokens, first, latest);
                }
            }
        }
        let key = self.series_key(
            &model,
            &label(C_CHANNEL),
            &label(C_GROUP),
            &label(C_USERNAME),
        );
        let u = self.usage.entry(key).or_default();
        match ty {
            LOG_TYPE_CONSUME => match RowKind::of(int(C_KIND)) {
                RowKind::ChannelTest => {
                    u.channel_tests = u.channel_tests.saturating_add(rows);
                    u.channel_test_quota = u.channel_test_quota.saturating_add(uint(C_QUOTA_POS));
                }
                RowKind::ZeroUsage => u.zero_usage = u.zero_usage.saturating_add(rows),
                // Quota charged (or given back) for a request counted at its submission.
                RowKind::Settlement => {
                    u.settlements = u.settlements.saturating_add(rows);
                    u.quota = u.quota.saturating_add(uint(C_QUOTA_POS));
                    u.corrections = u.corrections.saturating_add(uint(C_QUOTA_NEG));
                }
                kind @ (RowKind::Billed | RowKind::Saturated) => {
                    if kind == RowKind::Saturated {
                        u.saturated = u.saturated.saturating_add(rows);
                    }
                    u.requests = u.requests.saturating_add(rows);
                    u.quota = u.quota.saturating_add(uint(C_QUOTA_POS));
                    u.corrections = u.corrections.saturating_add(uint(C_QUOTA_NEG));
                    u.prompt_tokens = u.prompt_tokens.saturating_add(uint(C_PROMPT));
                    u.completion_tokens = u.completion_tokens.saturating_add(uint(C_COMPLETION));
                    u.use_time_seconds = u.use_time_seconds.saturating_add(uint(C_USE_TIME));
                    if let Some(i) = bucket(C_DURATION_BUCKET) {
                        u.duration_count = u.duration_count.saturating_add(rows);
                        u.duration_seconds =
                            u.duration_seconds.saturating_add(uint(C_DURATION_SUM));
                        for b in u.duration_buckets.iter_mut().skip(i) {
                            *b = b.saturating_add(rows);
                        }
                    }
                    if let Some(i) = bucket(C_FRT_BUCKET) {
                        u.first_response_count = u.first_response_count.saturating_add(rows);
                        u.first_response_ms = u.first_response_ms.saturating_add(uint(C_FRT_SUM));
                        for b in u.first_response_buckets.iter_mut().skip(i) {
                            *b = b.saturating_add(rows);
                        }
                    }
                }
            },
            LOG_TYPE_ERROR => u.errors = u.errors.saturating_add(rows),
            _ => {
                u.refunds = u.refunds.saturating_add(rows);
                u.refund_quota = u.refund_quota.saturating_add(uint(C_QUOTA_POS));
            }
        }
        rows
    }
}

/// Which statement a read takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    /// One result row per group of labels, hour, user and the rest.
    Grouped,
    /// The same with one group per log row (the newest ids, whose gaps are tracked).
    ByRow,
    /// [`Form::Grouped`] for rows dated before the reconciliation's hours.
    OldRows,
}

/// Each parameter list of a read, after the parameters its statement takes before them.
fn with_leading(leading: &[Value], each: &[Vec<Value>]) -> Vec<Vec<Value>> {
    each.iter()
        .map(|p| [leading, p.as_slice()].concat())
        .collect()
}

fn first_int(rows: &[Vec<Value>]) -> Option<i64> {
    rows.first()?.first()?.as_i64()
}

impl Collector for LogsCollector {
    fn name(&self) -> &'static str {
        "logs"
    }

    fn poll(&mut self, src: &mut Sources, ctx: &mut Context) -> Result<()> {
        let db = src.logs();
        self.oldest = first_int(&db.query(&self.oldest_sql, &[])?);
        if self.read_by_time {
            self.poll_by_time(db, ctx)?;
            ctx.folded.insert("usage", self.admission.folded());
            return Ok(());
        }
        let top = first_int(&db.query(&self.max_id_sql, &[])?);
        self.resume_after_deletions(db, top)?;
        let Some(top) = top else {
            return Ok(()); // empty table
        };
        if self.track_gaps && !self.gaps.is_empty() {
            self.recheck_gaps(db, ctx)?;
        }
        let by_row_from = top.saturating_sub(GAP_WINDOW);
        let range = format!("{} BETWEEN ? AND ?", self.id);
        // Until a long read reaches the reconciliation's hours, its chunks are read in the
        // form for older rows first.
        let mut before_hours = !(self.per_row_on_one_shot && ctx.one_shot());
        while self.cursor < top && !ctx.stopping() {
            let Some(lo) = first_int(&db.query(&self.next_id_sql, &[Value::Int(self.cursor)])?)
            else {
                break;
            };
            if lo > top {
                break;
            }
            let by_row = self.track_gaps && lo > by_row_from;
            // Near the top, chunks end where row-by-row reading starts.
            let end = if self.track_gaps && !by_row {
                by_row_from.min(top)
            } else {
                top
            };
            // The newest ids, read row by row, one chunk at a time.
            let chunks = if by_row {
                let to = lo.saturating_add(ctx.chunk_rows() - 1).min(end);
                vec![(lo, to)]
            } else {
                ctx.id_chunks(db, lo, end)
            };
            let hi = chunks.last().map_or(lo, |c| c.1);
            let ranges: Vec<Vec<Value>> = chunks
                .iter()
                .map(|&(from, to)| vec![Value::Int(from), Value::Int(to)])
                .collect();
            let long = end.saturating_sub(lo) >= ctx.chunk_rows().saturating_mul(LONG_READ_CHUNKS);
            if !by_row && long && before_hours {
                before_hours = !self.read_old(db, ctx, &range, &ranges)?;
                self.cursor = hi;
                continue;
            }
            let ids = self.read_each(db, ctx, &range, &ranges, by_row)?;
            if by_row {
                // Every id of (cursor, hi] not seen now may still commit.
                let seen: HashSet<i64> = ids.into_iter().collect();
                for id in self.cursor.max(by_row_from) + 1..=hi {
                    if !seen.contains(&id) && self.gaps.len() < GAP_MAX {
                        self.gaps.insert(id, ctx.now);
                    }
                }
            }
            self.cursor = hi;
        }
        if !ctx.stopping() && !self.track_gaps {
            self.cursor = self.cursor.max(top);
        }
        if self.track_gaps && !ctx.stopping() && self.cursor < top {
            // No row at all in (cursor, top]: those ids may still commit.
            for id in self.cursor.max(by_row_from) + 1..=top {
                if self.gaps.len() < GAP_MAX {
                    self.gaps.insert(id, ctx.now);
                }
            }
            self.cursor = top;
        }
        ctx.logs_cursor = self.cursor;
        if self.newest.is_none_or(|n| n.id != self.cursor) {
            self.newest = self.row_at(db, self.cursor)?;
        }
        ctx.folded.insert("usage", self.admission.folded());
        Ok(())
    }

    fn render(&self, ctx: &Context, out: &mut Vec<MetricFamily>) {
        let mut requests = Family::of(&m::REQUESTS_TOTAL);
        let mut quota = Family::of(&m::QUOTA_TOTAL);
        let mut corrections = Family::of(&m::QUOTA_CORRECTIONS_TOTAL);
        let mut tokens = Family::of(&m::TOKENS_TOTAL);
        let mut use_time = Family::of(&m::USE_TIME_SECONDS_TOTAL);
        let mut duration = Family::of(&m::REQUEST_DURATION_SECONDS);
        let mut first_response = Family::of(&m::TIME_TO_FIRST_RESPONSE_SECONDS);
        let duration_bounds = DURATION_BUCKETS.map(|s| s as f64);
        let first_response_bounds = FIRST_RESPONSE_BUCKETS_MS.map(|ms| ms as f64 / 1000.0);
        let mut refunds = Family::of(&m::REFUNDS_TOTAL);
        let mut refund_quota = Family::of(&m::REFUND_QUOTA_TOTAL);
        let mut errors = Family::of(&m::ERRORS_TOTAL);
        let mut channel_tests = Family::of(&m::CHANNEL_TEST_REQUESTS_TOTAL);
        let mut channel_test_quota = Family::of(&m::CHANNEL_TEST_QUOTA_TOTAL);
        let mut settlements = Family::of(&m::TASK_SETTLEMENTS_TOTAL);
        let mut zero_usage = Family::of(&m::ZERO_USAGE_REQUESTS_TOTAL);
        let mut saturated = Family::of(&m::QUOTA_SATURATED_REQUESTS_TOTAL);
        // Rows read by time: settled counts plus what the open hours hold now.
        let mut all = self.usage.clone();
        for (key, usage) in &self.by_time.open {
            all.entry(key.clone()).or_default().add(usage);
        }
        let mut keys: Vec<_> = all.keys().collect();
        keys.sort();
        for key in keys {
            let u = &all[key];
            let name = ctx.channel_name(&key.channel_id);
            let all = [
                (USAGE_LABELS[0], &*key.model),
                (USAGE_LABELS[1], &*key.channel_id),
                (USAGE_LABELS[2], name),
                (USAGE_LABELS[3], &*key.group),
                ("user", &*key.user),
            ];
            let excluded = |n: &str| {
                // Names come from ids: without channel_id there is no channel_name.
                self.labels.exclude.contains(n)
                    || (n == USAGE_LABELS[2] && self.labels.exclude.contains("channel_id"))
            };
            let l: Vec<(&str, &str)> = all
                .into_iter()
                .filter(|(n, _)| {
                    if *n == "user" {
                        self.labels.user
                    } else {
                        !excluded(n)
                    }
                })
                .collect();
            if u.channel_tests > 0 {
                channel_tests.sample(&l, u.channel_tests as f64);
                channel_test_quota.sample(&l, u.channel_test_quota as f64);
            }
            if u.settlements > 0 {
                settlements.sample(&l, u.settlements as f64);
            }
            if u.zero_usage > 0 {
                zero_usage.sample(&l, u.zero_usage as f64);
            }
            if u.saturated > 0 {
                saturated.sample(&l, u.saturated as f64);
            }
            // Settlement quota of a series with no billed request yet still shows.
            if u.requests > 0 || u.quota > 0 || u.corrections > 0 {
                requests.sample(&l, u.requests as f64);
                quota.sample(&l, u.quota as f64);
                corrections.sample(&l, u.corrections as f64);
                let mut lt = l.clone();
                lt.push(("token_type", "prompt"));
                tokens.sample(&lt, u.prompt_tokens as f64);
                let last = lt.len() - 1;
                lt[last].1 = "completion";
                tokens.sample(&lt, u.completion_tokens as f64);
                if self.has_use_time {
                    use_time.sample(&l, u.use_time_seconds as f64);
                }
                if u.duration_count > 0 {
                    duration.histogram(
                        &l,
                        &duration_bounds,
                        &u.duration_buckets,
                        u.duration_count,
                        u.duration_seconds as f64,
                    );
                }
                if u.first_response_count > 0 {
                    first_response.histogram(
                        &l,
                        &first_response_bounds,
                        &u.first_response_buckets,
                        u.first_response_count,
                        u.first_response_ms as f64 / 1000.0,
                    );
                }
            }
            if self.errors_and_refunds {
                if u.refunds > 0 {
                    refunds.sample(&l, u.refunds as f64);
                    refund_quota.sample(&l, u.refund_quota as f64);
                }
                if u.errors > 0 {
                    errors.sample(&l, u.errors as f64);
                }
            }
        }
        for f in [
            requests,
            quota,
            corrections,
            tokens,
            use_time,
            duration,
            first_response,
            refunds,
            refund_quota,
            errors,
            channel_tests,
            channel_test_quota,
            settlements,
            zero_usage,
            saturated,
        ] {
            f.finish(out);
        }
        let mut oldest = Family::of(&m::LOGS_OLDEST_TIMESTAMP_SECONDS);
        if let Some(t) = self.oldest {
            oldest.sample(&[], t as f64);
        }
        oldest.finish(out);
    }
}
