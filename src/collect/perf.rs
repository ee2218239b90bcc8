//! Request outcomes from `perf_metrics`: every relayed request, succeeded or failed, by model
//! and group, with its summed latency. The gateway writes the table by default (each node adds
//! its hour buckets at every flush), while `logs` holds error rows only with `ERROR_LOG_ENABLED`
//! and then one per channel attempt: this is the per-request failure rate.
//!
//! Buckets are hours. The last [`LIVE_HOURS`] hours can still grow (a node flushes a finished
//! hour within its flush interval; some builds flush the current hour too) and are summed again
//! at each poll through the `bucket_ts` index; older hours are read once, when they leave that
//! span, and kept as totals. The table's retention cleanup deletes only such old hours, so the
//! counters never go down.

use std::collections::BTreeMap;

use anyhow::Result;
use prometheus::proto::MetricFamily;

use super::plausible::{MAX_AMOUNT, MIN_TIME, Reason};
use super::{Admission, Collector, Context, OTHER};
use crate::clock::{DAY, HOUR, hour_of};
use crate::db::{Database, Dialect, Sources, Value};
use crate::metrics::{self as m, Family};

/// Hours summed again at every poll.
pub const LIVE_HOURS: i64 = 3;
/// Largest latency sum one bucket may hold (about 35 years of milliseconds): a million such
/// rows still add up inside 64 bits.
const MAX_LATENCY_MS: i64 = 1 << 40;
/// Columns the collector reads.
const COLUMNS: [&str; 6] = [
    "model_name",
    "group",
    "bucket_ts",
    "request_count",
    "success_count",
    "total_latency_ms",
];

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Totals {
    requests: i64,
    successes: i64,
    latency_ms: i64,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.requests = self.requests.saturating_add(o.requests);
        self.successes = self.successes.saturating_add(o.successes);
        self.latency_ms = self.latency_ms.saturating_add(o.latency_ms);
    }

    fn max(&self, o: &Totals) -> Totals {
        Totals {
            requests: self.requests.max(o.requests),
            successes: self.successes.max(o.successes),
            latency_ms: self.latency_ms.max(o.latency_ms),
        }
    }

    /// Requests that did not succeed (a row claiming more successes than requests adds none).
    fn failures(&self) -> i64 {
        (self.requests - self.successes).max(0)
    }
}

/// (model, group).
type Key = (String, String);

/// What one read of a span of hours found.
#[derive(Debug, Default)]
struct Reading {
    sums: BTreeMap<Key, Totals>,
    /// Rows out of range: the smallest id and how many, per statement.
    set_aside: Vec<(i64, u64)>,
}

/// The statements, built for the table's dialect.
#[derive(Debug)]
struct Statements {
    /// Sums by (model, group) over `bucket_ts` in `[?, ?)`.
    sums: String,
    /// The oldest bucket in `[?, ?)`.
    next_bucket: String,
}

impl Statements {
    fn new(d: Dialect) -> Self {
        let [model, group, bucket, requests, successes, latency] = COLUMNS.map(|c| d.ident(c));
        let ok = format!(
            "(COALESCE({requests}, 0) BETWEEN 0 AND {MAX_AMOUNT} \
             AND COALESCE({successes}, 0) BETWEEN 0 AND {MAX_AMOUNT} \
             AND COALESCE({latency}, 0) BETWEEN 0 AND {MAX_LATENCY_MS})"
        );
        let sound =
            |e: &str| d.sum_int(&format!("CASE WHEN {ok} THEN COALESCE({e}, 0) ELSE 0 END"));
        Statements {
            sums: format!(
                "SELECT {}, {}, {}, {}, {}, {}, MIN(CASE WHEN {ok} THEN NULL ELSE {id} END) \
                 FROM perf_metrics WHERE {bucket} >= ? AND {bucket} < ? GROUP BY 1, 2",
                d.text_key(&model),
                d.text_key(&group),
                sound(&requests),
                sound(&successes),
                sound(&latency),
                d.sum_int(&format!("CASE WHEN {ok} THEN 0 ELSE 1 END")),
                id = d.ident("id"),
            ),
            next_bucket: format!(
                "SELECT MIN({bucket}) FROM perf_metrics WHERE {bucket} >= ? AND {bucket} < ?"
            ),
        }
    }
}

pub struct PerfCollector {
    statements: Statements,
    /// Hours before this are summed into `frozen`; `None` until the first read.
    frozen_below: Option<i64>,
    frozen: BTreeMap<Key, Totals>,
    live: BTreeMap<Key, Totals>,
    /// What the counters last showed: they never go down.
    emitted: BTreeMap<Key, Totals>,
    admission: Admission,
}

impl PerfCollector {
    pub fn new(dialect: Dialect, max_series: Option<usize>) -> Self {
        PerfCollector {
            statements: Statements::new(dialect),
            frozen_below: None,
            frozen: BTreeMap::new(),
            live: BTreeMap::new(),
            emitted: BTreeMap::new(),
            admission: Admission::new(max_series),
        }
    }

    /// Sums of the buckets in `[from, until)`, one statement per day that has buckets, and the
    /// rows out of range among them.
    fn read(
        &self,
        db: &mut dyn Database,
        ctx: &mut Context,
        from: i64,
        until: i64,
    ) -> Result<Reading> {
        let st = &self.statements;
        let mut sums: BTreeMap<Key, Totals> = BTreeMap::new();
        let mut set_aside = Vec::new();
        let first = |db: &mut dyn Database, lo: i64| -> Result<Option<i64>> {
            let rows = db.query(&st.next_bucket, &[Value::Int(lo), Value::Int(until)])?;
            Ok(rows.first().and_then(|r| r.first()).and_then(Value::as_i64))
        };
        let mut next = first(db, from)?;
        while let Some(lo) = next.filter(|t| *t < until) {
            if ctx.stopping() {
                break;
            }
            let hi = lo.saturating_add(DAY).min(until);
            let rows = db.query(&st.sums, &[Value::Int(lo), Value::Int(hi)])?;
            ctx.count_rows("perf_metrics", rows.len() as u64);
            for r in &rows {
                let text = |i: usize| r.get(i).map(Value::to_label).unwrap_or_default();
                let int = |i: usize| r.get(i).and_then(Value::as_i64).unwrap_or(0);
                if int(5) > 0 {
                    set_aside.push((int(6), int(5) as u64));
                }
                sums.entry((text(0), text(1))).or_default().add(&Totals {
                    requests: int(2),
                    successes: int(3),
                    latency_ms: int(4),
                });
            }
            next = if hi < until { first(db, hi)? } else { None };
        }
        Ok(Reading { sums, set_aside })
    }
}

impl Collector for PerfCollector {
    fn name(&self) -> &'static str {
        "perf_metrics"
    }

    fn poll(&mut self, src: &mut Sources, ctx: &mut Context) -> Result<()> {
        let Some(cols) = &ctx.schema.perf_metrics else {
            return Ok(());
        };
        if !COLUMNS.iter().all(|c| cols.has(c)) {
            return Ok(());
        }
        let db = src.main();
        let live_from = hour_of(ctx.now) - LIVE_HOURS * HOUR;
        // Buckets before 2020 or dated ahead of the plausible time belong to no real hour.
        let frozen_from = self.frozen_below.unwrap_or(MIN_TIME);
        // All or nothing: the state changes only once every read has succeeded.
        let Reading {
            sums: newly_frozen,
            set_aside,
        } = if frozen_from < live_from {
            self.read(db, ctx, frozen_from, live_from)?
        } else {
            Default::default()
        };
        let live_from = live_from.max(frozen_from);
        let until = ctx.plausible().latest.saturating_add(1);
        let live = self.read(db, ctx, live_from, until)?.sums;
        if ctx.stopping() {
            return Ok(());
        }
        for (k, t) in newly_frozen {
            self.frozen.entry(k).or_default().add(&t);
        }
        // Rows set aside are counted as their hours freeze, each hour once, and only by a
        // poll that succeeded.
        for (id, n) in set_aside {
            ctx.reject("perf_metrics", Reason::AmountOutOfRange, id, n);
        }
        self.frozen_below = Some(live_from);
        self.live = live;
        let mut current = self.frozen.clone();
        for (k, t) in &self.live {
            current.entry(k.clone()).or_default().add(t);
        }
        for ((model, group), t) in current {
            let key = if self.admission.admit(&format!("{model}\u{1f}{group}")) {
                (model, group)
            } else {
                (OTHER.to_string(), String::new())
            };
            let e = self.emitted.entry(key).or_default();
            *e = e.max(&t);
        }
        ctx.folded.insert("perf_metrics", self.admission.folded());
        Ok(())
    }

    fn render(&self, _ctx: &Context, out: &mut Vec<MetricFamily>) {
        let mut requests = Family::of(&m::PERF_REQUESTS_TOTAL);
        let mut latency = Family::of(&m::PERF_REQUEST_LATENCY_SECONDS_TOTAL);
        for ((model, group), t) in &self.emitted {
            let (model, group) = (model.as_str(), group.as_str());
            for (outcome, n) in [("success", t.successes), ("failure", t.failures())] {
                let l = [("model", model), ("group", group), ("outcome", outcome)];
                requests.sample(&l, n as f64);
            }
            latency.sample(
                &[("model", model), ("group", group)],
                t.latency_ms as f64 / 1000.0,
            );
        }
        requests.finish(out);
        latency.finish(out);
    }
}
