//! The rules that compare logs with quota_data per hour: what counts, the adjacent-hour
//! netting, the lag; and the incremental re-comparison that a poll runs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::recording::{HourKey, LogsHour, PairKey, QdHour, Recording};
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
    let pairs: BTreeSet<&PairKey> = rec
        .logs_hourly
        .keys()
        .chain(rec.qd_hourly.keys())
        .map(|k| &k.pair)
        .collect();
    pairs
        .into_iter()
        .filter_map(|key| compare_one(rec, key, range).map(|r| (key.clone(), r)))
        .collect()
}

/// Compares one (user, model) pair from the recording's current hours.
pub fn compare_one(rec: &Recording, key: &PairKey, range: Range) -> Option<PairResult> {
    let at = |hour| HourKey {
        pair: key.clone(),
        hour,
    };
    let bounds = at(i64::MIN)..=at(i64::MAX);
    let l: Vec<(i64, &LogsHour)> = rec
        .logs_hourly
        .range(bounds.clone())
        .map(|(k, v)| (k.hour, v))
        .collect();
    let q: Vec<(i64, &QdHour)> = rec
        .qd_hourly
        .range(bounds)
        .map(|(k, v)| (k.hour, v))
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
        let (cmp, first) = models.entry(pair.model.as_str()).or_default();
        cmp.add(&p.cmp);
        if let Some(f) = p.first_log {
            *first = Some(first.map_or(f, |o: i64| o.min(f)));
        }
        for d in &p.deficits {
            deficits.push(Deficit {
                hour: d.hour,
                pair: pair.clone(),
                amount: d.amount.clone(),
                tokens: d.tokens,
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
mod tests {
    use super::*;

    fn key(h: i64) -> HourKey {
        HourKey::new(1, "m", h * HOUR)
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
            .map(|d| (d.hour / HOUR, d.amount.quota))
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

    /// The poll path: compare every pair once, then after each change only the dirty pairs; on
    /// both generations (pairs per user and model with netting, or per channel without).
    #[test]
    fn comparing_only_changed_pairs_equals_comparing_everything() {
        for per_channel in [false, true] {
            incremental_equals_full(per_channel);
        }
    }

    fn incremental_equals_full(per_channel: bool) {
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
        let mut rec = Recording {
            per_channel,
            hour_from_log_row: per_channel,
            ..Recording::default()
        };
        let pair = |user: i64, model: usize, channel: i64| PairKey {
            channel_id: if per_channel { channel } else { 0 },
            ..PairKey::user_model(user, ["a", "b", "c"][model])
        };
        let mut incremental = IncrementalComparison::default();
        incremental.update(&mut rec, range);
        for round in 0..200 {
            // New log rows for a few pairs, at any hour around the range.
            for _ in 0..next(4) {
                let key = pair(next(5), next(3) as usize, next(3));
                let h = rec.logs_hour(key, (8 + next(25)) * HOUR);
                let t = h.first.max(1);
                h.add_mirrored(1, 10 + next(90), next(50), t, t);
            }
            // Now and then a flush: quota_data read again, some hours changed or gone.
            if round % 3 == 0 {
                let mut fresh = rec.qd_hourly.clone();
                for _ in 0..next(6) {
                    let key = HourKey {
                        pair: pair(next(5), next(3) as usize, next(3)),
                        hour: (8 + next(25)) * HOUR,
                    };
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
            let report = incremental.update(&mut rec, range);
            assert_eq!(incremental.pairs, compare_all(&rec, range), "round {round}");
            assert_eq!(*report, reconcile(&rec, 10 * HOUR, 30 * HOUR, 28 * HOUR));
            assert_eq!(
                report.channels.is_empty(),
                !per_channel || report.models.is_empty()
            );
        }
        assert!(!incremental.pairs.is_empty());
    }

    /// On the current generation the hour is the log row's own: a deficit and a surplus in
    /// adjacent hours are two real faults, both reported, never netted.
    #[test]
    fn the_current_generation_does_not_net_adjacent_hours() {
        let mut rec = Recording {
            hour_from_log_row: true,
            per_channel: true,
            ..Recording::default()
        };
        rec.logs_hourly.insert(key(10), logs(5, 500));
        rec.qd_hourly.insert(key(10), qd(4, 400));
        rec.logs_hourly.insert(key(11), logs(3, 300));
        rec.qd_hourly.insert(key(11), qd(4, 400));
        let r = reconcile(&rec, 0, 100 * HOUR, 100 * HOUR);
        let one = Amount {
            requests: 1,
            quota: 100,
        };
        assert_eq!(r.totals.missing, one);
        assert_eq!(r.totals.excess, one);
        assert_eq!(r.channels.len(), 1);
        assert_eq!(
            (&r.channels[0].missing, &r.channels[0].excess),
            (&one, &one)
        );
    }

    #[test]
    fn lag_uses_the_end_of_the_newest_hour() {
        assert_eq!(lag_seconds(Some(7200 + 100), None, Some(3600)), 100);
        assert_eq!(lag_seconds(Some(3000), None, Some(3600)), 0);
        assert_eq!(lag_seconds(Some(5000), Some(1000), None), 4000);
        assert_eq!(lag_seconds(None, None, Some(3600)), 0);
    }
}
