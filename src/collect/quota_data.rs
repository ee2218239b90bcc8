//! The dashboard's own view, from `quota_data`: requests, quota and tokens per model, and the
//! per-hour rows the reconciliation compares with `logs`.
//!
//! The gateway increments rows in place, so an id cursor alone misses changes. Hours inside
//! the reconciliation range (the window, and everything newer) are re-read through the
//! `created_at` index: the unsettled hours whenever one statement's row count and sums over
//! them changed since the last poll, the whole range every 10 minutes; the cost follows the
//! recent hours, not the table. Older hours are frozen: read once at start-up in primary-key
//! chunks, plus any row inserted there later (found through the id cursor). An increment to a
//! frozen hour after start-up (a very late flush) shows in the counters after the next restart.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::Result;
use prometheus::proto::MetricFamily;

use super::plausible::{Limits, MAX_AMOUNT, MIN_TIME, Reason};
use super::{Admission, Collector, Context, OTHER};
use crate::clock::{HOUR, hour_of};
use crate::db::{Database, Dialect, Sources, Unreachable, Value};
use crate::metrics::{self as m, Family};
use crate::reconcile::{FastMap, Hourly, Name, PairKey, QdHour};

/// Hours re-read by one statement.
const LIVE_CHUNK_HOURS: i64 = 6;
/// Most rows one look for implausible rows returns; ids remembered as counted.
const REJECT_SCAN: usize = 1000;
const REJECTED_IDS_MAX: usize = 100_000;
/// Every poll re-reads only the hours that can still change (the unsettled ones), and on
/// MySQL and PostgreSQL only after the table was written; the whole window is re-read this
/// often, so that a late change to a settled hour (a backfill, a very late flush), or a write
/// the engine's statistics missed, shows too.
const FULL_REREAD_SECS: i64 = 600;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Totals {
    requests: i64,
    quota: i64,
    tokens: i64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.quota += o.quota;
        self.tokens += o.tokens;
    }

    fn max(&self, o: &Totals) -> Totals {
        Totals {
            requests: self.requests.max(o.requests),
            quota: self.quota.max(o.quota),
            tokens: self.tokens.max(o.tokens),
        }
    }
}

/// (pair, node_name): with the hour, the gateway's key of one quota_data row, one row per key
/// when healthy. The pair always carries the username; on the older generation its channel,
/// group and token stay empty and the node is empty.
type RowKey = (PairKey, Name);

/// The live rows: by hour in order (hours are split off as they freeze), then by key.
type LiveHours = BTreeMap<i64, FastMap<RowKey, LiveRow>>;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct LiveRow {
    rows: i64,
    totals: Totals,
}

pub struct QuotaDataCollector {
    frozen_sql: String,
    live_sql: String,
    amount_rejects_sql: String,
    future_sql: String,
    next_time_sql: String,
    /// Ids of rows already counted as set aside (re-read rows are counted once).
    rejected_ids: HashSet<i64>,
    /// Rows keyed by all eight columns, and compared per channel (current generation).
    per_channel: bool,
    max_id_sql: String,
    bounds_sql: String,
    next_id_sql: String,
    started: bool,
    /// Hours before this are frozen.
    frozen_below: i64,
    cursor: i64,
    frozen: HashMap<String, Totals>,
    frozen_newest_hour: HashMap<String, i64>,
    live: LiveHours,
    /// What the counters last showed: they never go down, even if a row does.
    emitted: BTreeMap<String, Totals>,
    admission: Admission,
    /// When the whole window was last re-read.
    last_full_read: i64,
    /// The first hour re-read by the last poll, and what the bounds statement returned for it.
    live_fingerprint: Option<(i64, Vec<Value>)>,
    /// The first unsettled hour and the hour of the latest plausible time at the last re-read,
    /// and the engine's change marker of the table taken just before it.
    live_marker: Option<(i64, i64, String)>,
}

/// Columns of the frozen read: per model and flag, the sums of `count`, `quota` and
/// `token_used`, the newest hour, the flag, the first id and the number of rows.
const F_MODEL: usize = 0;
const F_COUNT: usize = 1;
const F_QUOTA: usize = 2;
const F_TOKENS: usize = 3;
const F_LATEST: usize = 4;
const F_FLAG: usize = 5;
const F_FIRST_ID: usize = 6;
const F_ROWS: usize = 7;

impl QuotaDataCollector {
    /// With `per_channel` (current generation), rows are keyed by all eight columns.
    pub fn new(dialect: Dialect, per_channel: bool, max_series: Option<usize>) -> Self {
        let d = dialect;
        let (id, created) = (d.ident("id"), d.ident("created_at"));
        let model = d.text_key(&d.ident("model_name"));
        // Rows whose amounts are out of range add nothing (their sums could overflow) and are
        // counted apart: the row count and the sums cover plausible rows only.
        let amounts = [d.ident("count"), d.ident("quota"), d.ident("token_used")];
        let ok = Limits::amounts_ok_sql(&amounts);
        let sound = |expr: &str| d.sum_int(&format!("CASE WHEN {ok} THEN {expr} ELSE 0 END"));
        let sums = format!(
            "{}, {}, {}, {}, {}",
            sound("1"),
            sound(&amounts[0]),
            sound(&amounts[1]),
            sound(&amounts[2]),
            d.sum_int(&format!("CASE WHEN {ok} THEN 0 ELSE 1 END")),
        );
        // The same per row: the live read takes every row as it is and adds up rows of one key
        // (duplicates) itself, which spares the database a sort of every row by eight columns.
        let sound_row = |expr: &str| format!("CASE WHEN {ok} THEN {expr} ELSE 0 END");
        let row_sums = format!(
            "{}, {}, {}, {}, CASE WHEN {ok} THEN 0 ELSE 1 END",
            sound_row("1"),
            sound_row(&amounts[0]),
            sound_row(&amounts[1]),
            sound_row(&amounts[2]),
        );
        let flag = Limits::flag_sql(&created, &amounts);
        // The frozen read groups by the flag, and a flagged group is set aside whole: holding
        // each amount to the range changes no sum that is kept, keeps every sum from
        // overflowing, and costs the server less than a test of all three amounts in each sum.
        let held: Vec<String> = amounts
            .iter()
            .map(|a| d.sum_int(&d.clamp(a, -MAX_AMOUNT, MAX_AMOUNT)))
            .collect();
        QuotaDataCollector {
            // Parameters: plausibility limits, id range, frozen boundary. Columns in the order
            // of the `F_*` constants.
            frozen_sql: format!(
                "SELECT {model}, {held}, MAX({created}), {flag}, MIN({id}), COUNT(*) FROM quota_data \
                 WHERE {id} BETWEEN ? AND ? AND {created} < ? GROUP BY 1, {}",
                F_FLAG + 1,
                held = held.join(", "),
            ),
            // Parameters: created_at range.
            amount_rejects_sql: format!(
                "SELECT {id} FROM quota_data WHERE {created} >= ? AND {created} < ? AND NOT {ok} \
                 ORDER BY {id} LIMIT {REJECT_SCAN}"
            ),
            // Parameters: the latest plausible time.
            future_sql: format!(
                "SELECT {id}, {created}, {count}, {quota}, {tokens} FROM quota_data \
                 WHERE {created} > ? ORDER BY {created} LIMIT {REJECT_SCAN}",
                count = amounts[0],
                quota = amounts[1],
                tokens = amounts[2],
            ),
            next_time_sql: format!(
                "SELECT MIN({created}) FROM quota_data WHERE {created} >= ? AND {created} < ?"
            ),
            // Parameters: created_at range.
            live_sql: if per_channel {
                format!(
                    "SELECT {created}, {user}, {username}, {model}, {group}, {token}, {channel}, \
                     {node}, {row_sums} FROM quota_data WHERE {created} >= ? AND {created} < ?",
                    user = d.ident("user_id"),
                    username = d.text_key(&d.ident("username")),
                    group = d.text_key(&d.ident("use_group")),
                    token = d.ident("token_id"),
                    channel = d.ident("channel_id"),
                    node = d.text_key(&d.ident("node_name")),
                )
            } else {
                format!(
                    "SELECT {created}, {user}, {username}, {model}, '', 0, 0, '', {row_sums} \
                     FROM quota_data WHERE {created} >= ? AND {created} < ?",
                    user = d.ident("user_id"),
                    username = d.text_key(&d.ident("username")),
                )
            },
            per_channel,
            max_id_sql: format!("SELECT MAX({id}) FROM quota_data"),
            next_id_sql: format!("SELECT MIN({id}) FROM quota_data WHERE {id} > ?"),
            // The range to re-read, and a fingerprint of it: the gateway only ever increments
            // `count` or inserts rows, so any flush changes the row count or a sum.
            bounds_sql: format!(
                "SELECT MIN({created}), MAX({created}), {sums} FROM quota_data \
                 WHERE {created} >= ? AND {created} < ?"
            ),
            rejected_ids: HashSet::new(),
            started: false,
            frozen_below: i64::MIN,
            cursor: 0,
            frozen: HashMap::new(),
            frozen_newest_hour: HashMap::new(),
            live: BTreeMap::new(),
            emitted: BTreeMap::new(),
            admission: Admission::new(max_series),
            last_full_read: i64::MIN,
            live_fingerprint: None,
            live_marker: None,
        }
    }

    /// Reads rows of frozen hours with ids in `(self.cursor, top]`, in chunks.
    fn read_frozen(&mut self, db: &mut dyn Database, top: i64, ctx: &mut Context) -> Result<()> {
        while self.cursor < top && !ctx.stopping() {
            let next = db.query(&self.next_id_sql, &[Value::Int(self.cursor)])?;
            let Some(lo) = next.first().and_then(|r| r.first()).and_then(Value::as_i64) else {
                break;
            };
            if lo > top {
                break;
            }
            let ranges = ctx.id_chunks(db, lo, top);
            let hi = ranges.last().map_or(lo, |r| r.1);
            let params: Vec<Vec<Value>> = ranges
                .iter()
                .map(|&(from, to)| {
                    let mut p: Vec<Value> = ctx.plausible().flag_params().map(Value::Int).to_vec();
                    p.extend([from, to, self.frozen_below].map(Value::Int));
                    p
                })
                .collect();
            for r in db
                .query_each(&self.frozen_sql, &params)?
                .into_iter()
                .flatten()
            {
                let model = r[F_MODEL].to_label();
                let n = |i: usize| r.get(i).and_then(Value::as_i64).unwrap_or(0);
                let rows = n(F_ROWS).max(0) as u64;
                ctx.count_rows("quota_data", rows);
                // A quota_data row is an hour's sum: dated outside the plausible hours it
                // belongs to none, and is set aside whole (as the rows dated ahead, which are
                // never read hour by hour).
                if let Some(reason) = Reason::of_flag(n(F_FLAG)) {
                    ctx.reject("quota_data", reason, n(F_FIRST_ID), rows);
                    continue;
                }
                self.frozen.entry(model.clone()).or_default().add(&Totals {
                    requests: n(F_COUNT),
                    quota: n(F_QUOTA),
                    tokens: n(F_TOKENS),
                });
                let newest = self.frozen_newest_hour.entry(model).or_insert(i64::MIN);
                *newest = (*newest).max(hour_of(n(F_LATEST)));
            }
            self.cursor = hi;
        }
        if !ctx.stopping() {
            self.cursor = self.cursor.max(top);
        }
        Ok(())
    }

    /// Re-reads every row of hours at or after `from` (at or after `frozen_below`) up to the
    /// latest plausible time; unless `full`, only when their fingerprint changed since the last
    /// poll. All or nothing: a failed read leaves the previous state as it was.
    fn read_live(
        &mut self,
        db: &mut dyn Database,
        ctx: &mut Context,
        from: i64,
        full: bool,
    ) -> Result<bool> {
        let from = from.max(self.frozen_below);
        let until = ctx.plausible().latest.saturating_add(1);
        let bounds = db.query(&self.bounds_sql, &[Value::Int(from), Value::Int(until)])?;
        let fingerprint = (from, bounds.first().cloned().unwrap_or_default());
        if !full && self.live_fingerprint.as_ref() == Some(&fingerprint) {
            return Ok(false);
        }
        let b = bounds.first();
        let min = b.and_then(|r| r.first()).and_then(Value::as_i64);
        let mut live = LiveHours::new();
        let mut implausible = false;
        // Statements cover LIVE_CHUNK_HOURS each, and skip to the next hour that has rows: the
        // number of statements follows the rows present, not the span between two values.
        let mut next = min;
        while let Some(chunk_from) = next.filter(|t| *t < until) {
            let to = chunk_from
                .saturating_add(LIVE_CHUNK_HOURS * HOUR)
                .min(until);
            let rows = db.query(&self.live_sql, &[Value::Int(chunk_from), Value::Int(to)])?;
            for r in rows {
                let n = |r: &[Value], i: usize| r.get(i).and_then(Value::as_i64).unwrap_or(0);
                implausible |= n(&r, 12) > 0;
                if n(&r, 8) == 0 {
                    continue;
                }
                let (hour, rows, totals) = (
                    hour_of(n(&r, 0)),
                    n(&r, 8),
                    Totals {
                        requests: n(&r, 9),
                        quota: n(&r, 10),
                        tokens: n(&r, 11),
                    },
                );
                let (user_id, channel_id, token_id) = (n(&r, 1), n(&r, 6), n(&r, 5));
                let names = &mut ctx.recording.names;
                let mut text =
                    |i: usize| names.get(&r.get(i).map(Value::label_ref).unwrap_or_default());
                let pair = PairKey {
                    user_id,
                    channel_id,
                    token_id,
                    model: text(3),
                    group: text(4),
                    username: text(2),
                };
                let key = (pair, text(7));
                ctx.count_rows("quota_data", rows.max(0) as u64);
                let e: &mut LiveRow = live.entry(hour).or_default().entry(key).or_default();
                e.rows += rows;
                e.totals.add(&totals);
            }
            next = first_int(&db.query(&self.next_time_sql, &[Value::Int(to), Value::Int(until)])?);
        }
        if implausible {
            let ids = db.query(
                &self.amount_rejects_sql,
                &[Value::Int(from), Value::Int(until)],
            )?;
            for id in ids.iter().filter_map(|r| r.first().and_then(Value::as_i64)) {
                self.reject_once(ctx, id, Reason::AmountOutOfRange);
            }
        }
        if full {
            // Rows dated beyond the latest plausible time are never read hour by hour: count
            // them (through the created_at index) at each full re-read.
            let latest = ctx.plausible().latest;
            for r in db.query(&self.future_sql, &[Value::Int(latest)])? {
                let n = |i: usize| r.get(i).and_then(Value::as_i64).unwrap_or(0);
                if let Some(reason) = Reason::of_row(n(1), &[n(2), n(3), n(4)], ctx.now) {
                    self.reject_once(ctx, n(0), reason);
                }
            }
        }
        // Only now, with everything read, does the new state replace the old one.
        self.live_fingerprint = Some(fingerprint);
        let before = self.live.split_off(&from);
        let changed = live != before;
        self.live.append(&mut live);
        Ok(changed)
    }

    /// Counts a re-read row as set aside the first time it is seen.
    fn reject_once(&mut self, ctx: &mut Context, id: i64, reason: Reason) {
        if self.rejected_ids.len() < REJECTED_IDS_MAX && self.rejected_ids.insert(id) {
            ctx.reject("quota_data", reason, id, 1);
        }
    }

    /// Moves live hours older than `below` into the frozen totals.
    /// Returns whether any hour moved.
    fn freeze_below(&mut self, below: i64) -> bool {
        if below <= self.frozen_below {
            return false;
        }
        let moved = self.live.keys().next().is_some_and(|h| *h < below);
        let keep = self.live.split_off(&below);
        for (hour, rows) in std::mem::replace(&mut self.live, keep) {
            for ((pair, _), row) in rows {
                let model = pair.model.to_string();
                self.frozen
                    .entry(model.clone())
                    .or_default()
                    .add(&row.totals);
                let newest = self.frozen_newest_hour.entry(model).or_insert(i64::MIN);
                *newest = (*newest).max(hour);
            }
        }
        self.frozen_below = below;
        moved
    }
}

fn first_int(rows: &[Vec<Value>]) -> Option<i64> {
    rows.first()?.first()?.as_i64()
}

impl Collector for QuotaDataCollector {
    fn name(&self) -> &'static str {
        "quota_data"
    }

    fn poll(&mut self, src: &mut Sources, ctx: &mut Context) -> Result<()> {
        let db = src.main();
        let (live_from, live_until) = ctx.hourly_range();
        let mut changed = !self.started;
        // Rows dated before 2020 are read once, with the frozen hours, and set aside.
        let live_from = live_from.max(MIN_TIME);
        if !self.started {
            self.frozen_below = live_from;
        } else {
            changed |= self.freeze_below(live_from);
        }
        let top = db
            .query(&self.max_id_sql, &[])?
            .first()
            .and_then(|r| r.first())
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let cursor = self.cursor;
        self.read_frozen(db, top, ctx)?;
        changed |= self.cursor != cursor;
        if ctx.stopping() {
            return Ok(());
        }
        let full = ctx.now.saturating_sub(self.last_full_read) >= FULL_REREAD_SECS;
        let from = if full {
            self.frozen_below
        } else {
            ctx.settled_until()
        };
        // Where the engine counts the table's writes (MySQL, PostgreSQL), an idle poll reads
        // none of the unsettled hours: only a write, a new hour or the full re-read does (a
        // full read covers the unsettled hours too). quota_data's rows are dated at hour
        // starts, so rows dated ahead enter the range only when the hour of the latest
        // plausible time moves.
        let marker = match db.change_marker("quota_data") {
            Ok(m) => m,
            Err(e) if e.chain().any(|c| c.is::<Unreachable>()) => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "no change marker for quota_data: re-reading");
                None
            }
        }
        .map(|m| {
            let unsettled_from = ctx.settled_until().max(self.frozen_below);
            (unsettled_from, hour_of(ctx.plausible().latest), m)
        });
        if full || marker.is_none() || marker != self.live_marker {
            changed |= self.read_live(db, ctx, from, full)?;
            self.live_marker = marker;
        }
        if full {
            self.last_full_read = ctx.now;
        }
        self.started = true;
        if !changed {
            // quota_data only changes when a gateway node flushes: keep what was built.
            return Ok(());
        }

        // Per-hour view for the reconciliation, keyed like logs: (user_id, model, hour).
        let rec = &mut ctx.recording;
        rec.has_quota_data = true;
        let mut qd_hourly: Hourly<QdHour> = Hourly::default();
        rec.qd_model_newest_hour = self
            .frozen_newest_hour
            .iter()
            .map(|(m, h)| (m.clone(), *h))
            .collect();
        let mut current: BTreeMap<String, Totals> =
            self.frozen.iter().map(|(m, t)| (m.clone(), *t)).collect();
        for ((hour, pair), row) in self
            .live
            .iter()
            .flat_map(|(h, rows)| rows.iter().map(move |((p, _), r)| ((*h, p), r)))
        {
            let model = &pair.model;
            // Looked up before inserting: a clone of the model per row would dominate a
            // full-history read.
            match current.get_mut(&**model) {
                Some(t) => t.add(&row.totals),
                None => {
                    current.insert(model.to_string(), row.totals);
                }
            }
            match rec.qd_model_newest_hour.get_mut(&**model) {
                Some(newest) => *newest = (*newest).max(hour),
                None => {
                    rec.qd_model_newest_hour.insert(model.to_string(), hour);
                }
            }
            if hour < live_until {
                let q = if self.per_channel {
                    qd_hourly.hour_mut(pair, hour)
                } else {
                    qd_hourly.hour_mut(&PairKey::user_model(pair.user_id, model), hour)
                };
                q.rows += row.rows;
                q.extra_rows += row.rows - 1;
                q.requests += row.totals.requests;
                q.quota += row.totals.quota;
                q.tokens += row.totals.tokens;
            }
        }

        rec.replace_qd_hourly(qd_hourly);

        // Models beyond --series.max-per-metric share one series; membership is stable, so the
        // sums stay monotonic.
        let mut shown: BTreeMap<String, Totals> = BTreeMap::new();
        for (model, t) in current {
            let key = if self.admission.admit(&model) {
                model
            } else {
                OTHER.to_string()
            };
            shown.entry(key).or_default().add(&t);
        }
        for (model, t) in shown {
            let e = self.emitted.entry(model).or_default();
            *e = e.max(&t);
        }
        ctx.folded.insert("quota_data", self.admission.folded());
        Ok(())
    }

    fn render(&self, _ctx: &Context, out: &mut Vec<MetricFamily>) {
        let mut requests = Family::of(&m::QUOTA_DATA_REQUESTS_TOTAL);
        let mut quota = Family::of(&m::QUOTA_DATA_QUOTA_TOTAL);
        let mut tokens = Family::of(&m::QUOTA_DATA_TOKENS_TOTAL);
        for (model, t) in &self.emitted {
            let l = [("model", model.as_str())];
            requests.sample(&l, t.requests.max(0) as f64);
            quota.sample(&l, t.quota.max(0) as f64);
            tokens.sample(&l, t.tokens.max(0) as f64);
        }
        requests.finish(out);
        quota.finish(out);
        tokens.finish(out);
    }
}
