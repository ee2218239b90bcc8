//! Reconciliation of what the gateway billed (`logs`) with what its dashboard recorded
//! (`quota_data`), on (hour, user_id, model_name).
//!
//! The logs and quota_data collectors keep per-hour aggregates for the hours in range; this
//! module compares them. One computation serves the gauges, the `reconcile` command, the landing
//! page and `backfill`, so all four always agree.
//!
//! Rules (see the schema notes on why the two tables drift):
//! - only consume rows (type 2) are compared; refunds never reach quota_data, and async task
//!   settlement rows are mirrored by no code path, so they are reported apart as "unmirrored";
//! - missing and excess count only settled hours: an hour is settled once its end plus
//!   `DataExportInterval` plus a margin is in the past (until then a flush may still come);
//! - a deficit in one hour matched by an excess in the adjacent hour, for the same user and
//!   model, nets out: the gateway takes the hour from a fresh clock reading, so a request at
//!   xx:59:59 can land in the next hour.

use std::collections::{BTreeMap, HashMap, HashSet};

use prometheus::proto::MetricFamily;
use serde::Serialize;

use crate::collect::{Collector, Context, Family};
use crate::db::Sources;

pub const HOUR: i64 = 3600;

/// (user_id, model_name, hour start): ordered so that one pass over the map visits each user's
/// model hour by hour.
pub type HourKey = (i64, String, i64);

pub fn hour_of(t: i64) -> i64 {
    t - t.rem_euclid(HOUR)
}

/// Consume log rows of one (hour, user, model).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogsHour {
    /// Rows the gateway mirrors into quota_data.
    pub requests: i64,
    pub quota: i64,
    pub tokens: i64,
    /// Newest and oldest `created_at` of those rows.
    pub latest: i64,
    pub first: i64,
    /// Async task settlement rows: billed, never mirrored by design.
    pub unmirrored_requests: i64,
    pub unmirrored_quota: i64,
}

impl LogsHour {
    pub fn add_mirrored(
        &mut self,
        requests: i64,
        quota: i64,
        tokens: i64,
        first: i64,
        latest: i64,
    ) {
        if self.requests == 0 {
            self.first = first;
            self.latest = latest;
        } else {
            self.first = self.first.min(first);
            self.latest = self.latest.max(latest);
        }
        self.requests += requests;
        self.quota += quota;
        self.tokens += tokens;
    }
}

/// quota_data rows of one (hour, user, model).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QdHour {
    pub rows: i64,
    /// Rows beyond the first for the same (hour, user_id, username, model): duplicates written
    /// by several gateway nodes flushing the same key.
    pub extra_rows: i64,
    pub requests: i64,
    pub quota: i64,
    pub tokens: i64,
}

/// (user_id, model_name): the unit the reconciliation compares, and caches between polls.
pub type PairKey = (i64, String);

/// Per-hour state shared by the logs and quota_data collectors and read here.
#[derive(Debug, Clone, Default)]
pub struct Recording {
    pub logs_hourly: BTreeMap<HourKey, LogsHour>,
    pub qd_hourly: BTreeMap<HourKey, QdHour>,
    /// Per model, over all history: oldest and newest mirrored consume log time.
    pub logs_model_times: HashMap<String, (i64, i64)>,
    /// Per model, over all history: newest quota_data hour.
    pub qd_model_newest_hour: HashMap<String, i64>,
    /// Set by the quota_data collector when the table exists.
    pub has_quota_data: bool,
    /// (user, model) pairs whose hours changed since the reconciliation last compared them:
    /// a poll compares only these again while the window stays put.
    pub dirty: HashSet<PairKey>,
}

impl Recording {
    /// Adds consume log rows to one (user, model, hour).
    pub fn logs_hour(&mut self, user: i64, model: &str, hour: i64) -> &mut LogsHour {
        self.dirty.insert((user, model.to_string()));
        self.logs_hourly
            .entry((user, model.to_string(), hour))
            .or_default()
    }

    /// Replaces the quota_data side with a fresh read; pairs whose hours differ become dirty.
    pub fn replace_qd_hourly(&mut self, fresh: BTreeMap<HourKey, QdHour>) {
        let old = std::mem::replace(&mut self.qd_hourly, fresh);
        let changed = old
            .iter()
            .filter(|(k, v)| self.qd_hourly.get(*k) != Some(*v))
            .chain(self.qd_hourly.iter().filter(|(k, _)| !old.contains_key(*k)));
        for ((user, model, _), _) in changed {
            self.dirty.insert((*user, model.clone()));
        }
    }

    /// Forgets hours before `from` (they left the window). They take part in no comparison
    /// (see `Context::hourly_range`), so no pair becomes dirty.
    pub fn prune(&mut self, from: i64) {
        self.logs_hourly.retain(|k, _| k.2 >= from);
        self.qd_hourly.retain(|k, _| k.2 >= from);
    }
}

/// Lag of quota_data behind logs: newest mirrored log minus the end of the newest quota_data
/// hour, or minus the first log when quota_data has nothing for it at all.
pub fn lag_seconds(
    newest_log: Option<i64>,
    first_log: Option<i64>,
    newest_qd_hour: Option<i64>,
) -> i64 {
    let Some(newest) = newest_log else { return 0 };
    let since = match newest_qd_hour {
        Some(h) => h + HOUR,
        None => first_log.unwrap_or(newest),
    };
    (newest - since).max(0)
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct LogsSide {
    pub requests: i64,
    pub quota: i64,
    pub tokens: i64,
    pub latest: i64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct QdSide {
    pub rows: i64,
    pub requests: i64,
    pub quota: i64,
    pub tokens: i64,
    pub latest: i64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Amount {
    pub requests: i64,
    pub quota: i64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Comparison {
    pub logs: LogsSide,
    pub quota_data: QdSide,
    pub missing: Amount,
    pub excess: Amount,
    /// Async task settlement rows, never mirrored by design: not part of missing.
    pub unmirrored: Amount,
    /// Duplicate quota_data rows (beyond the first per key).
    pub duplicate_rows: i64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ModelReport {
    pub model: String,
    pub lag_seconds: i64,
    #[serde(flatten)]
    pub cmp: Comparison,
}

/// The reconciliation of one time range; its JSON form is the `reconcile --format json`
/// interface.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Report {
    pub since: i64,
    pub until: i64,
    pub settled_until: i64,
    pub lag_seconds: i64,
    pub totals: Comparison,
    pub models: Vec<ModelReport>,
    /// Per (hour, user_id, model) deficits of settled hours after netting: what backfill adds.
    #[serde(skip)]
    /// Each is ((hour, user_id, model), requests and quota, tokens), ordered by hour.
    pub deficits: Vec<((i64, i64, String), Amount, i64)>,
}

/// What a report covers: `[since, until)`, with missing and excess counted only for hours
/// ending at or before `settled_until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub since: i64,
    pub until: i64,
    pub settled_until: i64,
}

impl Range {
    fn in_range(&self, h: i64) -> bool {
        h + HOUR > self.since && h < self.until
    }

    fn counted(&self, h: i64) -> bool {
        self.in_range(h) && h + HOUR <= self.settled_until
    }

    /// One hour beyond each edge takes part in netting, so that a row that moved across an
    /// edge can still net out; only hours in range are counted.
    fn near(&self, h: i64) -> bool {
        h + 2 * HOUR > self.since && h < self.until + HOUR
    }
}

/// The comparison of one (user, model) over a range.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PairResult {
    cmp: Comparison,
    /// Oldest mirrored consume log in range.
    first_log: Option<i64>,
    /// (hour, requests and quota, tokens) deficits of settled hours after netting.
    deficits: Vec<(i64, Amount, i64)>,
}

impl Report {
    /// The model lagging most, when it lags more than the whole: the overall lag stays low while
    /// other models keep recording, which is how one model that stopped can go unnoticed.
    pub fn worst_model_lag(&self) -> Option<&ModelReport> {
        self.models
            .iter()
            .filter(|m| m.lag_seconds > self.lag_seconds)
            .max_by_key(|m| m.lag_seconds)
    }
}

/// Compares logs and quota_data over `[since, until)`; missing and excess only for settled
/// hours (before `settled_until`).
pub fn reconcile(rec: &Recording, since: i64, until: i64, settled_until: i64) -> Report {
    let range = Range {
        since,
        until,
        settled_until,
    };
    assemble(&compare_all(rec, range), range)
}

/// Compares every (user, model) pair of the recording.
pub fn compare_all(rec: &Recording, range: Range) -> BTreeMap<PairKey, PairResult> {
    let pairs: std::collections::BTreeSet<(i64, &str)> = rec
        .logs_hourly
        .keys()
        .chain(rec.qd_hourly.keys())
        .map(|(user, model, _)| (*user, model.as_str()))
        .collect();
    pairs
        .into_iter()
        .filter_map(|(user, model)| {
            let key = (user, model.to_string());
            compare_one(rec, &key, range).map(|r| (key, r))
        })
        .collect()
}

/// Compares one (user, model) pair from the recording's current hours.
pub fn compare_one(rec: &Recording, key: &PairKey, range: Range) -> Option<PairResult> {
    let (user, model) = (key.0, key.1.clone());
    let bounds = (user, model.clone(), i64::MIN)..=(user, model, i64::MAX);
    let l: Vec<(i64, &LogsHour)> = rec
        .logs_hourly
        .range(bounds.clone())
        .map(|(k, v)| (k.2, v))
        .collect();
    let q: Vec<(i64, &QdHour)> = rec.qd_hourly.range(bounds).map(|(k, v)| (k.2, v)).collect();
    compare_pair(&l, &q, range)
}

/// Compares the hours of one (user, model), each side ordered by hour; `None` when nothing of
/// it is in range.
fn compare_pair(
    logs: &[(i64, &LogsHour)],
    qd: &[(i64, &QdHour)],
    range: Range,
) -> Option<PairResult> {
    let mut r = PairResult::default();
    let mut hours: Vec<(i64, HourDiff)> = Vec::new();
    for &(h, l) in logs {
        if range.in_range(h) {
            if l.requests > 0 {
                r.cmp.logs.requests += l.requests;
                r.cmp.logs.quota += l.quota;
                r.cmp.logs.tokens += l.tokens;
                r.cmp.logs.latest = r.cmp.logs.latest.max(l.latest);
                r.first_log = Some(r.first_log.map_or(l.first, |f| f.min(l.first)));
            }
            if range.counted(h) {
                r.cmp.unmirrored.requests += l.unmirrored_requests;
                r.cmp.unmirrored.quota += l.unmirrored_quota;
            }
        }
        if range.near(h) {
            hours.push((
                h,
                HourDiff {
                    requests: l.requests,
                    quota: l.quota,
                    tokens: l.tokens,
                    logged_requests: l.requests,
                    logged_quota: l.quota,
                },
            ));
        }
    }
    let logged = hours.len();
    for &(h, q) in qd {
        if range.in_range(h) {
            r.cmp.quota_data.rows += q.rows;
            r.cmp.quota_data.requests += q.requests;
            r.cmp.quota_data.quota += q.quota;
            r.cmp.quota_data.tokens += q.tokens;
            r.cmp.quota_data.latest = r.cmp.quota_data.latest.max(h);
            if range.counted(h) {
                r.cmp.duplicate_rows += q.extra_rows;
            }
        }
        if !range.near(h) {
            continue;
        }
        // Merge into the logs side's hour, or add the hour (both lists are by hour).
        let d = match hours[..logged].binary_search_by_key(&h, |(hh, _)| *hh) {
            Ok(i) => &mut hours[i].1,
            Err(_) => {
                hours.push((h, HourDiff::default()));
                &mut hours.last_mut().expect("pushed").1
            }
        };
        d.requests -= q.requests;
        d.quota -= q.quota;
        d.tokens -= q.tokens;
    }
    hours.sort_unstable_by_key(|(h, _)| *h);
    net_adjacent(&mut hours, |d| &mut d.requests, |d| d.logged_requests);
    net_adjacent(&mut hours, |d| &mut d.quota, |d| d.logged_quota);
    for (h, d) in &hours {
        if !range.counted(*h) {
            continue;
        }
        if d.requests > 0 || d.quota > 0 {
            let amount = Amount {
                requests: d.requests.max(0),
                quota: d.quota.max(0),
            };
            r.deficits.push((*h, amount, d.tokens.max(0)));
        }
        r.cmp.missing.requests += d.requests.max(0);
        r.cmp.missing.quota += d.quota.max(0);
        r.cmp.excess.requests += (-d.requests).max(0);
        r.cmp.excess.quota += (-d.quota).max(0);
    }
    // Seen only in the hours beyond an edge.
    (r.cmp != Comparison::default()).then_some(r)
}

/// Sums the pairs into the per-model and total report.
pub fn assemble(pairs: &BTreeMap<PairKey, PairResult>, range: Range) -> Report {
    // Keyed by borrowed names: this runs every poll that changed anything.
    let mut models: BTreeMap<&str, (Comparison, Option<i64>)> = BTreeMap::new();
    let mut deficits = Vec::new();
    for ((user, model), p) in pairs {
        let (cmp, first) = models.entry(model.as_str()).or_default();
        add_comparison(cmp, &p.cmp);
        if let Some(f) = p.first_log {
            *first = Some(first.map_or(f, |o: i64| o.min(f)));
        }
        for (h, amount, tokens) in &p.deficits {
            deficits.push(((*h, *user, model.clone()), amount.clone(), *tokens));
        }
    }
    deficits.sort_by(|a, b| a.0.cmp(&b.0));

    let mut totals = Comparison::default();
    let mut newest_log = None;
    let mut oldest_log: Option<i64> = None;
    let mut newest_qd = None;
    let mut out = Vec::with_capacity(models.len());
    for (name, (cmp, first_log)) in models {
        let (nl, nq) = (
            (cmp.logs.requests > 0).then_some(cmp.logs.latest),
            (cmp.quota_data.rows > 0).then_some(cmp.quota_data.latest),
        );
        newest_log = newest_log.max(nl);
        newest_qd = newest_qd.max(nq);
        if let Some(f) = first_log {
            oldest_log = Some(oldest_log.map_or(f, |o| o.min(f)));
        }
        add_comparison(&mut totals, &cmp);
        out.push(ModelReport {
            model: name.to_string(),
            lag_seconds: lag_seconds(nl, first_log, nq),
            cmp,
        });
    }
    Report {
        since: range.since,
        until: range.until,
        // Reported as the end of the last hour that counted, so that a report over a range in
        // the past is the same whenever it runs.
        settled_until: range
            .settled_until
            .min(hour_of(range.until.saturating_add(HOUR - 1))),
        lag_seconds: lag_seconds(newest_log, oldest_log, newest_qd),
        totals,
        models: out,
        deficits,
    }
}

fn add_comparison(t: &mut Comparison, c: &Comparison) {
    t.logs.requests += c.logs.requests;
    t.logs.quota += c.logs.quota;
    t.logs.tokens += c.logs.tokens;
    t.logs.latest = t.logs.latest.max(c.logs.latest);
    t.quota_data.rows += c.quota_data.rows;
    t.quota_data.requests += c.quota_data.requests;
    t.quota_data.quota += c.quota_data.quota;
    t.quota_data.tokens += c.quota_data.tokens;
    t.quota_data.latest = t.quota_data.latest.max(c.quota_data.latest);
    t.missing.requests += c.missing.requests;
    t.missing.quota += c.missing.quota;
    t.excess.requests += c.excess.requests;
    t.excess.quota += c.excess.quota;
    t.unmirrored.requests += c.unmirrored.requests;
    t.unmirrored.quota += c.unmirrored.quota;
    t.duplicate_rows += c.duplicate_rows;
}

/// One hour of one (user, model): logs minus quota_data, and how much the logs side holds.
#[derive(Debug, Clone, Copy, Default)]
struct HourDiff {
    requests: i64,
    quota: i64,
    tokens: i64,
    logged_requests: i64,
    logged_quota: i64,
}

/// Explains differences by rows that moved to the adjacent hour, then returns what is left.
///
/// A row logged in hour h may be recorded in quota_data under h+1 (and, rarely, h-1). With
/// `f[h]` the amount moved from h to h+1, capped by what h logged, the residual of hour h is
/// `d[h] + f[h-1] - f[h]`. Chains are allowed: when every hour holds a skewed row, each middle
/// hour nets to zero and only the first and last hours show a difference. A backward pass
/// finds how much each hour can absorb from its predecessor; a forward pass then moves only
/// what will be absorbed, so a deficit that nothing explains stays in its own hour (where
/// backfill adds it). The same is run in the other direction for the rare backward shift.
fn net_adjacent(
    hours: &mut [(i64, HourDiff)],
    value: fn(&mut HourDiff) -> &mut i64,
    cap: fn(&HourDiff) -> i64,
) {
    let n = hours.len();
    let mut absorb = vec![0; n];
    let mut out = vec![0; n];
    for forward in [true, false] {
        // Positions in the order rows move: forward in time, then backward.
        let at = |k: usize| if forward { k } else { n - 1 - k };
        let step = if forward { HOUR } else { -HOUR };
        // absorb[k]: inflow position k can take from its predecessor; out[k]: what it can pass on.
        for k in (0..n).rev() {
            let next_adjacent = k + 1 < n && hours[at(k + 1)].0 - hours[at(k)].0 == step;
            let d = *value(&mut hours[at(k)].1);
            out[k] = if next_adjacent {
                absorb[k + 1].min(cap(&hours[at(k)].1).max(0))
            } else {
                0
            };
            absorb[k] = (out[k] - d).max(0);
        }
        let mut inflow = 0;
        for k in 0..n {
            let v = value(&mut hours[at(k)].1);
            let r = *v + inflow;
            let moved = out[k].min(r.max(0));
            *v = r - moved;
            inflow = moved;
        }
    }
}

/// The recording-health gauges, computed after the logs and quota_data collectors ran.
#[derive(Default)]
pub struct ReconcileCollector {
    report: Option<std::sync::Arc<Report>>,
    lag: i64,
    model_lag: BTreeMap<String, i64>,
    admission: crate::collect::Admission,
    /// The series each model is shown in (itself, or `__other__`).
    shown_as: HashMap<String, String>,
    /// Each (user, model) compared over `range`; a poll compares again only the pairs whose
    /// hours changed, unless the range moved (once an hour).
    pairs: BTreeMap<PairKey, PairResult>,
    range: Option<Range>,
    /// Hours before this were forgotten by the last prune.
    pruned_below: Option<i64>,
}

impl ReconcileCollector {
    pub fn new(max_series: Option<usize>) -> Self {
        ReconcileCollector {
            admission: crate::collect::Admission::new(max_series),
            ..ReconcileCollector::default()
        }
    }

    fn shown<'a>(&'a self, model: &'a str) -> &'a str {
        self.shown_as
            .get(model)
            .map(String::as_str)
            .unwrap_or(model)
    }
}

impl Collector for ReconcileCollector {
    fn name(&self) -> &'static str {
        "reconcile"
    }

    fn poll(&mut self, _src: &mut Sources, ctx: &mut Context) -> anyhow::Result<()> {
        let rec = &ctx.recording;
        if !rec.has_quota_data {
            self.report = None;
            ctx.report = None;
            return Ok(());
        }
        let (since, until) = ctx.window();
        let range = Range {
            since,
            until,
            settled_until: ctx.settled_until(),
        };
        let report = match &self.report {
            // Nothing the comparison reads has changed since the last poll.
            Some(r) if self.range == Some(range) && rec.dirty.is_empty() => r.clone(),
            Some(_) if self.range == Some(range) => {
                for key in &rec.dirty {
                    match compare_one(rec, key, range) {
                        Some(r) => self.pairs.insert(key.clone(), r),
                        None => self.pairs.remove(key),
                    };
                }
                std::sync::Arc::new(assemble(&self.pairs, range))
            }
            _ => {
                self.pairs = compare_all(rec, range);
                std::sync::Arc::new(assemble(&self.pairs, range))
            }
        };
        self.range = Some(range);
        ctx.recording.dirty.clear();
        let rec = &ctx.recording;
        // Lag over all history (an outage longer than the window still shows in full).
        self.model_lag.clear();
        let mut newest_log = None;
        let mut oldest_log: Option<i64> = None;
        for (model, (first, last)) in &rec.logs_model_times {
            let q = rec.qd_model_newest_hour.get(model).copied();
            self.model_lag
                .insert(model.clone(), lag_seconds(Some(*last), Some(*first), q));
            newest_log = newest_log.max(Some(*last));
            oldest_log = Some(oldest_log.map_or(*first, |o| o.min(*first)));
        }
        let newest_qd = rec.qd_model_newest_hour.values().copied().max();
        self.lag = lag_seconds(newest_log, oldest_log, newest_qd);
        for model in report
            .models
            .iter()
            .map(|m| &m.model)
            .chain(self.model_lag.keys())
        {
            if !self.shown_as.contains_key(model) {
                let shown = if self.admission.admit(model) {
                    model.clone()
                } else {
                    crate::collect::OTHER.to_string()
                };
                self.shown_as.insert(model.clone(), shown);
            }
        }
        ctx.folded.insert("reconcile", self.admission.folded());
        // Hours only leave the range the collectors keep when the window moves (once an hour).
        let keep_from = ctx.hourly_range().0;
        if self.pruned_below != Some(keep_from) {
            ctx.recording.prune(keep_from);
            self.pruned_below = Some(keep_from);
        }
        ctx.report = Some(report.clone());
        self.report = Some(report);
        Ok(())
    }

    fn render(&self, ctx: &Context, out: &mut Vec<MetricFamily>) {
        let Some(report) = &self.report else { return };
        let mut f = Family::of(&crate::metrics::QUOTA_DATA_LAG_SECONDS);
        f.sample(&[], self.lag as f64);
        f.finish(out);
        let mut f = Family::of(&crate::metrics::QUOTA_DATA_MODEL_LAG_SECONDS);
        let mut lags: BTreeMap<&str, i64> = BTreeMap::new();
        for (model, lag) in &self.model_lag {
            let e = lags.entry(self.shown(model)).or_default();
            *e = (*e).max(*lag);
        }
        for (model, lag) in lags {
            f.sample(&[("model", model)], lag as f64);
        }
        f.finish(out);
        use crate::metrics as m;
        type Field = fn(&Comparison) -> i64;
        let per_model: [(&m::MetricDef, Field); 5] = [
            (&m::QUOTA_DATA_MISSING_QUOTA, |c| c.missing.quota),
            (&m::QUOTA_DATA_MISSING_REQUESTS, |c| c.missing.requests),
            (&m::QUOTA_DATA_EXCESS_QUOTA, |c| c.excess.quota),
            (&m::QUOTA_DATA_EXCESS_REQUESTS, |c| c.excess.requests),
            (&m::QUOTA_DATA_UNMIRRORED_QUOTA, |c| c.unmirrored.quota),
        ];
        for (def, get) in per_model {
            let mut sums: BTreeMap<&str, i64> = BTreeMap::new();
            for model in &report.models {
                *sums.entry(self.shown(&model.model)).or_default() += get(&model.cmp);
            }
            let mut f = Family::of(def);
            for (model, v) in sums {
                f.sample(&[("model", model)], v as f64);
            }
            f.finish(out);
        }
        let mut f = Family::of(&crate::metrics::QUOTA_DATA_DUPLICATE_ROWS);
        f.sample(&[], report.totals.duplicate_rows as f64);
        f.finish(out);
        let mut f = Family::of(&crate::metrics::QUOTA_DATA_SETTLED_UNTIL_TIMESTAMP_SECONDS);
        f.sample(&[], ctx.settled_until() as f64);
        f.finish(out);
    }
}

/// Reads `[since, until)` once and reconciles it: the `reconcile` and `backfill` commands.
pub fn run_once(
    src: &mut Sources,
    since: i64,
    until: i64,
    settle_margin_secs: i64,
    chunk_rows: i64,
) -> anyhow::Result<Report> {
    let settings = crate::collect::Settings {
        chunk_rows,
        window_secs: until - since,
        settle_margin_secs,
        fixed_range: Some((since, until)),
        ..crate::collect::Settings::default()
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut p = crate::poller::Poller::build_pipeline(src, settings, stop)?;
    if p.ctx.schema.quota_data.is_none() {
        anyhow::bail!(
            "{} was written by one-api, which has no quota_data table: there is no dashboard view to reconcile",
            src.describe()
        );
    }
    p.poll(src, crate::poller::unix_now())?;
    p.ctx
        .report
        .take()
        .map(|r| Report::clone(&r))
        .ok_or_else(|| anyhow::anyhow!("the reconciliation produced no report"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(h: i64) -> HourKey {
        (1, "m".to_string(), h * HOUR)
    }

    fn logs(requests: i64, quota: i64) -> LogsHour {
        LogsHour {
            requests,
            quota,
            ..LogsHour::default()
        }
    }

    fn qd(requests: i64, quota: i64) -> QdHour {
        QdHour {
            rows: 1,
            requests,
            quota,
            ..QdHour::default()
        }
    }

    #[test]
    fn a_row_moved_to_the_next_hour_nets_out() {
        let mut rec = Recording::default();
        rec.logs_hourly.insert(key(10), logs(5, 500));
        rec.qd_hourly.insert(key(10), qd(4, 400));
        rec.logs_hourly.insert(key(11), logs(3, 300));
        rec.qd_hourly.insert(key(11), qd(4, 400));
        let r = reconcile(&rec, 0, 100 * HOUR, 100 * HOUR);
        assert_eq!(r.totals.missing, Amount::default());
        assert_eq!(r.totals.excess, Amount::default());
    }

    #[test]
    fn a_chain_of_skewed_rows_nets_out() {
        let mut rec = Recording::default();
        // Every hour 10..=14 logged one skewed row of 7 that quota_data filed under the next hour.
        for h in 10..=14 {
            rec.logs_hourly.insert(key(h), logs(3, 300 + 7));
            let moved_in = if h == 10 { 0 } else { 7 };
            rec.qd_hourly.insert(key(h), qd(3, 300 + moved_in));
        }
        rec.qd_hourly.insert(key(15), qd(0, 7));
        let r = reconcile(&rec, 0, 100 * HOUR, 100 * HOUR);
        assert_eq!(r.totals.missing, Amount::default());
        assert_eq!(r.totals.excess, Amount::default());
    }

    #[test]
    fn an_unexplained_deficit_stays_in_its_own_hour() {
        let mut rec = Recording::default();
        for h in 10..=12 {
            rec.logs_hourly.insert(key(h), logs(2, 200));
        }
        rec.qd_hourly.insert(key(12), qd(1, 100));
        let r = reconcile(&rec, 0, 100 * HOUR, 100 * HOUR);
        let hours: Vec<(i64, i64)> = r
            .deficits
            .iter()
            .map(|(k, a, _)| (k.0 / HOUR, a.quota))
            .collect();
        assert_eq!(hours, vec![(10, 200), (11, 200), (12, 100)]);
    }

    #[test]
    fn a_shift_cannot_move_more_than_the_hour_logged() {
        let mut rec = Recording::default();
        rec.logs_hourly.insert(key(10), logs(1, 100));
        rec.qd_hourly.insert(key(11), qd(5, 500));
        let r = reconcile(&rec, 0, 100 * HOUR, 100 * HOUR);
        assert_eq!(r.totals.missing, Amount::default());
        assert_eq!(
            r.totals.excess,
            Amount {
                requests: 4,
                quota: 400
            }
        );
    }

    #[test]
    fn hours_two_apart_do_not_net() {
        let mut rec = Recording::default();
        rec.logs_hourly.insert(key(10), logs(5, 500));
        rec.qd_hourly.insert(key(12), qd(5, 500));
        let r = reconcile(&rec, 0, 100 * HOUR, 100 * HOUR);
        assert_eq!(
            r.totals.missing,
            Amount {
                requests: 5,
                quota: 500
            }
        );
        assert_eq!(
            r.totals.excess,
            Amount {
                requests: 5,
                quota: 500
            }
        );
    }

    #[test]
    fn unsettled_hours_are_compared_but_not_counted() {
        let mut rec = Recording::default();
        rec.logs_hourly.insert(key(10), logs(5, 500));
        let r = reconcile(&rec, 0, 100 * HOUR, 10 * HOUR);
        assert_eq!(r.totals.missing, Amount::default());
        assert_eq!(r.totals.logs.requests, 5);
        let r = reconcile(&rec, 0, 100 * HOUR, 11 * HOUR);
        assert_eq!(
            r.totals.missing,
            Amount {
                requests: 5,
                quota: 500
            }
        );
    }

    #[test]
    fn a_past_range_reports_the_same_settled_end_whenever_it_runs() {
        let mut rec = Recording::default();
        rec.logs_hourly.insert(key(10), logs(5, 500));
        // Reported twice, an hour of wall-clock time apart: the range ends at hour 12.
        let early = reconcile(&rec, 0, 12 * HOUR, 20 * HOUR);
        let late = reconcile(&rec, 0, 12 * HOUR, 21 * HOUR);
        assert_eq!(early, late);
        assert_eq!(early.settled_until, 12 * HOUR);
        // A range ending inside an hour counts that hour once it has settled.
        let r = reconcile(&rec, 0, 10 * HOUR + 1800, 20 * HOUR);
        assert_eq!(r.settled_until, 11 * HOUR);
        assert_eq!(r.totals.missing.requests, 5);
        // Not settled yet: the settled end is the wall-clock one.
        let r = reconcile(&rec, 0, 12 * HOUR, 11 * HOUR);
        assert_eq!(r.settled_until, 11 * HOUR);
    }

    /// The poll path: compare every pair once, then after each change only the dirty pairs.
    #[test]
    fn comparing_only_changed_pairs_equals_comparing_everything() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: i64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 33) % n as u64) as i64
        };
        let range = Range {
            since: 10 * HOUR,
            until: 30 * HOUR,
            settled_until: 28 * HOUR,
        };
        let mut rec = Recording::default();
        let mut pairs = compare_all(&rec, range);
        for round in 0..200 {
            // New log rows for a few pairs, at any hour around the range.
            for _ in 0..next(4) {
                let model = ["a", "b", "c"][next(3) as usize];
                let h = rec.logs_hour(next(5), model, (8 + next(25)) * HOUR);
                let t = h.first.max(1);
                h.add_mirrored(1, 10 + next(90), next(50), t, t);
            }
            // Now and then a flush: quota_data read again, some hours changed or gone.
            if round % 3 == 0 {
                let mut fresh = rec.qd_hourly.clone();
                for _ in 0..next(6) {
                    let key = (
                        next(5),
                        ["a", "b", "c"][next(3) as usize].to_string(),
                        (8 + next(25)) * HOUR,
                    );
                    if next(4) == 0 {
                        fresh.remove(&key);
                    } else {
                        let q = fresh.entry(key).or_default();
                        q.rows = 1 + next(2);
                        q.extra_rows = q.rows - 1;
                        q.requests += 1;
                        q.quota += 10 + next(90);
                    }
                }
                rec.replace_qd_hourly(fresh);
            }
            for key in std::mem::take(&mut rec.dirty) {
                match compare_one(&rec, &key, range) {
                    Some(r) => pairs.insert(key, r),
                    None => pairs.remove(&key),
                };
            }
            let full = compare_all(&rec, range);
            assert_eq!(pairs, full, "round {round}");
            assert_eq!(
                assemble(&pairs, range),
                reconcile(&rec, 10 * HOUR, 30 * HOUR, 28 * HOUR)
            );
        }
        assert!(!pairs.is_empty());
    }

    #[test]
    fn lag_uses_the_end_of_the_newest_hour() {
        assert_eq!(lag_seconds(Some(7200 + 100), None, Some(3600)), 100);
        assert_eq!(lag_seconds(Some(3000), None, Some(3600)), 0);
        assert_eq!(lag_seconds(Some(5000), Some(1000), None), 4000);
        assert_eq!(lag_seconds(None, None, Some(3600)), 0);
    }
}
