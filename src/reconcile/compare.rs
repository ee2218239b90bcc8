//! The rules that compare logs with quota_data per hour: what counts, the adjacent-hour
//! netting, the lag; and the incremental re-comparison that a poll runs.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use super::recording::{LogsHour, PairKey, QdHour, Recording};
use super::report::{Amount, ChannelReport, Comparison, Deficit, ModelReport, Report};
use crate::clock::{HOUR, hour_of};

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

/// What quota_data lacks for one settled hour of one (user, model).
#[derive(Debug, Clone, PartialEq)]
struct HourDeficit {
    hour: i64,
    amount: Amount,
    tokens: i64,
    recorded: Amount,
}

/// The comparison of one (user, model) over a range.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PairResult {
    cmp: Comparison,
    /// Oldest mirrored consume log in range.
    first_log: Option<i64>,
    /// Deficits of settled hours after netting.
    deficits: Vec<HourDeficit>,
}

/// Compares logs and quota_data over `[since, until)`; missing and excess only for settled
/// hours (before `settled_until`).
pub fn reconcile(rec: &Recording, since: i64, until: i64, settled_until: i64) -> Report {
    let range = Range {
        since,
        until,
        settled_until,
    };
    assemble(&compare_all(rec, range), range, rec.per_channel)
}

/// Compares every (user, model) pair of the recording.
pub fn compare_all(rec: &Recording, range: Range) -> BTreeMap<PairKey, PairResult> {
    let pairs: HashSet<&PairKey> = rec
        .logs_hourly
        .pairs()
        .chain(rec.qd_hourly.pairs())
        .collect();
    pairs
        .into_iter()
        .filter_map(|key| compare_one(rec, key, range).map(|r| (key.clone(), r)))
        .collect()
}

/// Compares one (user, model) pair from the recording's current hours.
pub fn compare_one(rec: &Recording, key: &PairKey, range: Range) -> Option<PairResult> {
    let l: Vec<(i64, &LogsHour)> = rec
        .logs_hourly
        .hours(key)
        .into_iter()
        .flatten()
        .map(|(h, v)| (*h, v))
        .collect();
    let q: Vec<(i64, &QdHour)> = rec
        .qd_hourly
        .hours(key)
        .into_iter()
        .flatten()
        .map(|(h, v)| (*h, v))
        .collect();
    compare_pair(&l, &q, range, !rec.hour_from_log_row)
}

/// Compares the hours of one (user, model), each side ordered by hour; `None` when nothing of
/// it is in range.
fn compare_pair(
    logs: &[(i64, &LogsHour)],
    qd: &[(i64, &QdHour)],
    range: Range,
    net_adjacent_hours: bool,
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
                    recorded: Amount::default(),
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
        d.recorded = Amount {
            requests: q.requests,
            quota: q.quota,
        };
    }
    hours.sort_unstable_by_key(|(h, _)| *h);
    if net_adjacent_hours {
        net_adjacent(&mut hours, |d| &mut d.requests, |d| d.logged_requests);
        net_adjacent(&mut hours, |d| &mut d.quota, |d| d.logged_quota);
    }
    for (h, d) in &hours {
        if !range.counted(*h) {
            continue;
        }
        if d.requests > 0 || d.quota > 0 {
            let amount = Amount {
                requests: d.requests.max(0),
                quota: d.quota.max(0),
            };
            r.deficits.push(HourDeficit {
                hour: *h,
                amount,
                tokens: d.tokens.max(0),
                recorded: d.recorded,
            });
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
/// With `per_channel`, also per channel (the pairs carry it).
pub fn assemble(pairs: &BTreeMap<PairKey, PairResult>, range: Range, per_channel: bool) -> Report {
    // Keyed by borrowed names: this runs every poll that changed anything.
    let mut models: BTreeMap<&str, (Comparison, Option<i64>)> = BTreeMap::new();
    let mut deficits = Vec::new();
    let mut channels: BTreeMap<i64, ChannelReport> = BTreeMap::new();
    for (pair, p) in pairs {
        if per_channel {
            let c = channels.entry(pair.channel_id).or_default();
            c.channel_id = pair.channel_id;
            c.missing.add(&p.cmp.missing);
            c.excess.add(&p.cmp.excess);
        }
        let (cmp, first) = models.entry(&*pair.model).or_default();
        cmp.add(&p.cmp);
        if let Some(f) = p.first_log {
            *first = Some(first.map_or(f, |o: i64| o.min(f)));
        }
        for d in &p.deficits {
            deficits.push(Deficit {
                hour: d.hour,
                pair: pair.clone(),
                amount: d.amount,
                tokens: d.tokens,
                recorded: d.recorded,
            });
        }
    }
    deficits.sort_by(|a, b| (a.hour, &a.pair).cmp(&(b.hour, &b.pair)));

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
        totals.add(&cmp);
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
        channels: channels.into_values().collect(),
        per_channel,
        deficits,
    }
}

/// One hour of one (user, model): logs minus quota_data, and how much the logs side holds.
#[derive(Debug, Clone, Copy, Default)]
struct HourDiff {
    requests: i64,
    quota: i64,
    tokens: i64,
    logged_requests: i64,
    logged_quota: i64,
    /// What quota_data holds for the hour (netting leaves it alone).
    recorded: Amount,
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

/// The comparison kept between polls: each (user, model) compared over `range`; a call compares
/// again only the pairs the recording marked dirty, unless the range moved (once an hour).
#[derive(Debug, Default)]
pub struct IncrementalComparison {
    pairs: BTreeMap<PairKey, PairResult>,
    range: Option<Range>,
    report: Option<Arc<Report>>,
}

impl IncrementalComparison {
    /// The report over `range` for the recording as it is now; clears its dirty pairs.
    pub fn update(&mut self, rec: &mut Recording, range: Range) -> Arc<Report> {
        let dirty = std::mem::take(&mut rec.dirty);
        rec.compared = true;
        let report = match &self.report {
            // Nothing the comparison reads has changed since the last call.
            Some(r) if self.range == Some(range) && dirty.is_empty() => r.clone(),
            Some(_) if self.range == Some(range) => {
                for key in dirty {
                    match compare_one(rec, &key, range) {
                        Some(r) => self.pairs.insert(key, r),
                        None => self.pairs.remove(&key),
                    };
                }
                Arc::new(assemble(&self.pairs, range, rec.per_channel))
            }
            _ => {
                self.pairs = compare_all(rec, range);
                Arc::new(assemble(&self.pairs, range, rec.per_channel))
            }
        };
        self.range = Some(range);
        self.report = Some(report.clone());
        report
    }
}

#[cfg(test)]
#[path = "compare_tests.rs"]
mod tests;
