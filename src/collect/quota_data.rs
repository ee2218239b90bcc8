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

use std::collections::{BTreeMap, HashMap};

use anyhow::Result;
use prometheus::proto::MetricFamily;

use super::{Admission, Collector, Context, OTHER};
use crate::clock::{HOUR, hour_of};
use crate::db::{Database, Dialect, Sources, Value};
use crate::metrics::{self as m, Family};
use crate::reconcile::{HourKey, PairKey, QdHour};

/// Hours re-read by one statement.
const LIVE_CHUNK_HOURS: i64 = 6;
/// Every poll re-reads only the hours that can still change (the unsettled ones); the whole
/// window is re-read this often, so that a late change to a settled hour (a backfill, a very
/// late flush) shows too.
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

/// (hour, pair, node_name): the gateway's key of one quota_data row, one row per key when
/// healthy. The pair always carries the username; on the older generation its channel,
/// group and token stay empty and the node is empty.
type RowKey = (i64, PairKey, String);

/// The first key of an hour, for splitting the live rows by hour.
fn first_key(hour: i64) -> RowKey {
    let pair = PairKey {
        user_id: i64::MIN,
        token_id: i64::MIN,
        channel_id: i64::MIN,
        ..PairKey::default()
    };
    (hour, pair, String::new())
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct LiveRow {
    rows: i64,
    totals: Totals,
}

pub struct QuotaDataCollector {
    frozen_sql: String,
    live_sql: String,
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
    live: BTreeMap<RowKey, LiveRow>,
    /// What the counters last showed: they never go down, even if a row does.
    emitted: BTreeMap<String, Totals>,
    admission: Admission,
    /// When the whole window was last re-read.
    last_full_read: i64,
    /// The first hour re-read by the last poll, and what the bounds statement returned for it.
    live_fingerprint: Option<(i64, Vec<Value>)>,
}

impl QuotaDataCollector {
    /// With `per_channel` (current generation), rows are keyed by all eight columns.
    pub fn new(dialect: Dialect, per_channel: bool, max_series: Option<usize>) -> Self {
        let d = dialect;
        let (id, created) = (d.ident("id"), d.ident("created_at"));
        let model = d.text_key(&d.ident("model_name"));
        let sums = format!(
            "COUNT(*), {}, {}, {}",
            d.sum_int(&d.ident("count")),
            d.sum_int(&d.ident("quota")),
            d.sum_int(&d.ident("token_used")),
        );
        QuotaDataCollector {
            // Parameters: id range, frozen boundary.
            frozen_sql: format!(
                "SELECT {model}, {sums}, MAX({created}) FROM quota_data \
                 WHERE {id} BETWEEN ? AND ? AND {created} < ? GROUP BY 1"
            ),
            // Parameters: created_at range.
            live_sql: if per_channel {
                format!(
                    "SELECT {created}, {user}, {username}, {model}, {group}, {token}, {channel}, \
                     {node}, {sums} FROM quota_data WHERE {created} >= ? AND {created} < ? \
                     GROUP BY 1, 2, 3, 4, 5, 6, 7, 8",
                    user = d.ident("user_id"),
                    username = d.text_key(&d.ident("username")),
                    group = d.text_key(&d.ident("use_group")),
                    token = d.ident("token_id"),
                    channel = d.ident("channel_id"),
                    node = d.text_key(&d.ident("node_name")),
                )
            } else {
                format!(
                    "SELECT {created}, {user}, {username}, {model}, '', 0, 0, '', {sums} \
                     FROM quota_data WHERE {created} >= ? AND {created} < ? GROUP BY 1, 2, 3, 4",
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
                "SELECT MIN({created}), MAX({created}), {sums} FROM quota_data WHERE {created} >= ?"
            ),
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
            let hi = lo.saturating_add(ctx.chunk_rows() - 1).min(top);
            let rows = db.query(
                &self.frozen_sql,
                &[
                    Value::Int(lo),
                    Value::Int(hi),
                    Value::Int(self.frozen_below),
                ],
            )?;
            for r in rows {
                let model = r[0].to_label();
                let n = |i: usize| r.get(i).and_then(Value::as_i64).unwrap_or(0);
                ctx.count_rows("quota_data", n(1).max(0) as u64);
                self.frozen.entry(model.clone()).or_default().add(&Totals {
                    requests: n(2),
                    quota: n(3),
                    tokens: n(4),
                });
                let newest = self.frozen_newest_hour.entry(model).or_insert(i64::MIN);
                *newest = (*newest).max(hour_of(n(5)));
            }
            self.cursor = hi;
        }
        if !ctx.stopping() {
            self.cursor = self.cursor.max(top);
        }
        Ok(())
    }

    /// Re-reads every row of hours at or after `from` (at or after `frozen_below`); unless
    /// `full`, only when their fingerprint changed since the last poll.
    fn read_live(
        &mut self,
        db: &mut dyn Database,
        ctx: &mut Context,
        from: i64,
        full: bool,
    ) -> Result<bool> {
        let from = from.max(self.frozen_below);
        let bounds = db.query(&self.bounds_sql, &[Value::Int(from)])?;
        let fingerprint = (from, bounds.first().cloned().unwrap_or_default());
        if !full && self.live_fingerprint.as_ref() == Some(&fingerprint) {
            return Ok(false);
        }
        self.live_fingerprint = Some(fingerprint);
        // Hours before `from` keep what was read before; the rest is read again and compared.
        let before = self.live.split_off(&first_key(from));
        let mut live = BTreeMap::new();
        let b = bounds.first();
        let min = b.and_then(|r| r.first()).and_then(Value::as_i64);
        let max = b.and_then(|r| r.get(1)).and_then(Value::as_i64);
        if let (Some(min), Some(max)) = (min, max) {
            let mut from = min;
            while from <= max {
                let to = from.saturating_add(LIVE_CHUNK_HOURS * HOUR);
                let rows = db.query(&self.live_sql, &[Value::Int(from), Value::Int(to)])?;
                for r in rows {
                    let n = |i: usize| r.get(i).and_then(Value::as_i64).unwrap_or(0);
                    let text = |i: usize| r.get(i).map(Value::to_label).unwrap_or_default();
                    let pair = PairKey {
                        user_id: n(1),
                        model: text(3),
                        channel_id: n(6),
                        group: text(4),
                        token_id: n(5),
                        username: text(2),
                    };
                    let key = (hour_of(n(0)), pair, text(7));
                    ctx.count_rows("quota_data", n(8).max(0) as u64);
                    let e: &mut LiveRow = live.entry(key).or_default();
                    e.rows += n(8);
                    e.totals.add(&Totals {
                        requests: n(9),
                        quota: n(10),
                        tokens: n(11),
                    });
                }
                from = to;
            }
        }
        let changed = live != before;
        self.live.append(&mut live);
        Ok(changed)
    }

    /// Moves live hours older than `below` into the frozen totals.
    /// Returns whether any hour moved.
    fn freeze_below(&mut self, below: i64) -> bool {
        if below <= self.frozen_below {
            return false;
        }
        let moved = self.live.keys().next().is_some_and(|k| k.0 < below);
        let keep = self.live.split_off(&first_key(below));
        for ((hour, pair, _), row) in std::mem::replace(&mut self.live, keep) {
            let model = pair.model;
            self.frozen
                .entry(model.clone())
                .or_default()
                .add(&row.totals);
            let newest = self.frozen_newest_hour.entry(model).or_insert(i64::MIN);
            *newest = (*newest).max(hour);
        }
        self.frozen_below = below;
        moved
    }
}

impl Collector for QuotaDataCollector {
    fn name(&self) -> &'static str {
        "quota_data"
    }

    fn poll(&mut self, src: &mut Sources, ctx: &mut Context) -> Result<()> {
        let db = src.main();
        let (live_from, live_until) = ctx.hourly_range();
        let mut changed = !self.started;
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
            self.last_full_read = ctx.now;
            self.frozen_below
        } else {
            ctx.settled_until()
        };
        changed |= self.read_live(db, ctx, from, full)?;
        self.started = true;
        if !changed {
            // quota_data only changes when a gateway node flushes: keep what was built.
            return Ok(());
        }

        // Per-hour view for the reconciliation, keyed like logs: (user_id, model, hour).
        let rec = &mut ctx.recording;
        rec.has_quota_data = true;
        let mut qd_hourly: BTreeMap<HourKey, QdHour> = BTreeMap::new();
        rec.qd_model_newest_hour = self
            .frozen_newest_hour
            .iter()
            .map(|(m, h)| (m.clone(), *h))
            .collect();
        let mut current: BTreeMap<String, Totals> =
            self.frozen.iter().map(|(m, t)| (m.clone(), *t)).collect();
        for ((hour, pair, _), row) in &self.live {
            let model = &pair.model;
            current.entry(model.clone()).or_default().add(&row.totals);
            let newest = rec
                .qd_model_newest_hour
                .entry(model.clone())
                .or_insert(*hour);
            *newest = (*newest).max(*hour);
            if *hour < live_until {
                let compared = if self.per_channel {
                    pair.clone()
                } else {
                    PairKey::user_model(pair.user_id, model)
                };
                let q = qd_hourly
                    .entry(HourKey {
                        pair: compared,
                        hour: *hour,
                    })
                    .or_default();
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
