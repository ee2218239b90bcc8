//! The comparison rules, each on a hand-computed fixture.

use super::*;
use crate::reconcile::HourKey;

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
        ..PairKey::user_model(user, &["a", "b", "c"][model].into())
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
                    let q = fresh.entry_or_default(key);
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
