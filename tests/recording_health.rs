//! Recording health: planted drift, one database per known cause, checked against an SQL
//! oracle through the gauges and through `reconcile --format json`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use newapi_exporter::demo::gateway::{Flavor, Gateway, LogRow};
use newapi_exporter::poller::unix_now;
use rusqlite::{Connection, params};
use serde_json::Value as Json;

const HOUR: i64 = 3600;
const MODELS: [&str; 2] = ["gpt-4o", "claude-sonnet-4-5"];
const USERS: i64 = 4;
const HOURS: i64 = 16;

/// First hour of the fixtures: far enough back that every hour is settled, recent enough to
/// sit inside the default 24 h window.
fn base_hour() -> i64 {
    let now = unix_now();
    now - now.rem_euclid(HOUR) - 20 * HOUR
}

fn consume(user: i64, model: &str, t: i64, quota: i64) -> LogRow {
    LogRow {
        user_id: user,
        username: format!("user{user}"),
        created_at: t,
        log_type: 2,
        model_name: model.to_string(),
        quota,
        prompt_tokens: 100 + quota % 50,
        completion_tokens: 20 + quota % 30,
        use_time: 2,
        channel_id: 1,
        group: "default".into(),
        request_id: format!("req-{t}-{user}-{quota}"),
        ..LogRow::default()
    }
}

/// Healthy traffic: every consume row fed to the map, flushed at the end of each hour. `plant`
/// runs before each hour's flush and may add drift.
fn build(db: &Path, mut plant: impl FnMut(&mut Gateway, i64)) -> Gateway {
    let mut gw = Gateway::create(db, Flavor::NewApi).unwrap();
    gw.add_channel(1, 1, "openai", 1, 10.0, 100, "default", "gpt-4o")
        .unwrap();
    let base = base_hour();
    gw.conn.execute_batch("BEGIN").unwrap();
    for h in 0..HOURS {
        let hour = base + h * HOUR;
        for user in 1..=USERS {
            for (mi, model) in MODELS.iter().enumerate() {
                for k in 0..3 {
                    let t = hour + 60 + k * 900 + user * 7 + mi as i64;
                    let q = 1_000 * (user + 1) + 37 * k + 500 * mi as i64 + h;
                    gw.record(&consume(user, model, t, q), true, t).unwrap();
                }
            }
        }
        plant(&mut gw, hour);
        gw.flush().unwrap();
    }
    gw.conn.execute_batch("COMMIT").unwrap();
    gw
}

/// Independent oracle: per model, logs minus quota_data per (hour, user, model) over settled
/// hours, with no netting (the fixtures that need netting assert it separately).
#[derive(Debug, Default, Clone, PartialEq)]
struct Drift {
    missing_requests: i64,
    missing_quota: i64,
    excess_requests: i64,
    excess_quota: i64,
}

const MIRRORED: &str = "type = 2 AND NOT (prompt_tokens = 0 AND completion_tokens = 0
    AND COALESCE(request_id, '') = '' AND COALESCE(other, '') LIKE '%pre_consumed_quota%')";

fn oracle(db: &Path) -> BTreeMap<String, Drift> {
    let conn = Connection::open(db).unwrap();
    let sql = format!(
        "WITH l AS (SELECT created_at - created_at % 3600 AS h, user_id AS u, COALESCE(model_name, '') AS m,
                           COUNT(*) AS r, SUM(quota) AS q FROM logs WHERE {MIRRORED} GROUP BY 1, 2, 3),
              d AS (SELECT created_at AS h, user_id AS u, COALESCE(model_name, '') AS m,
                           SUM(count) AS r, SUM(quota) AS q FROM quota_data GROUP BY 1, 2, 3),
              j AS (SELECT COALESCE(l.m, d.m) AS m, COALESCE(l.r, 0) - COALESCE(d.r, 0) AS dr,
                           COALESCE(l.q, 0) - COALESCE(d.q, 0) AS dq
                    FROM l FULL OUTER JOIN d ON l.h = d.h AND l.u = d.u AND l.m = d.m)
         SELECT m, SUM(MAX(dr, 0)), SUM(MAX(dq, 0)), SUM(MAX(-dr, 0)), SUM(MAX(-dq, 0))
         FROM j GROUP BY m"
    );
    let mut stmt = conn.prepare(&sql).unwrap();
    stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            Drift {
                missing_requests: r.get(1)?,
                missing_quota: r.get(2)?,
                excess_requests: r.get(3)?,
                excess_quota: r.get(4)?,
            },
        ))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Oracle lag per model and overall: newest mirrored consume log minus the end of the newest
/// quota_data hour (minus the first log when the model has no quota_data row).
fn oracle_lag(db: &Path) -> (i64, BTreeMap<String, i64>) {
    let conn = Connection::open(db).unwrap();
    let sql = format!(
        "SELECT l.m, l.newest, l.first, d.newest FROM
           (SELECT model_name AS m, MAX(created_at) AS newest, MIN(created_at) AS first FROM logs
            WHERE {MIRRORED} GROUP BY 1) l
         LEFT JOIN (SELECT model_name AS m, MAX(created_at) AS newest FROM quota_data GROUP BY 1) d
         ON l.m = d.m"
    );
    let mut stmt = conn.prepare(&sql).unwrap();
    let per_model: BTreeMap<String, i64> = stmt
        .query_map([], |r| {
            let newest: i64 = r.get(1)?;
            let since = match r.get::<_, Option<i64>>(3)? {
                Some(h) => h + HOUR,
                None => r.get(2)?,
            };
            Ok((r.get::<_, String>(0)?, (newest - since).max(0)))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let overall: (i64, i64, Option<i64>) = conn
        .query_row(
            &format!(
                "SELECT (SELECT MAX(created_at) FROM logs WHERE {MIRRORED}),
                        (SELECT MIN(created_at) FROM logs WHERE {MIRRORED}),
                        (SELECT MAX(created_at) FROM quota_data)"
            ),
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let since = overall.2.map_or(overall.1, |h| h + HOUR);
    ((overall.0 - since).max(0), per_model)
}

fn gauge_by_model(samples: &[Sample], name: &str) -> BTreeMap<String, i64> {
    series(samples, name)
        .into_iter()
        .map(|(l, v)| (l["model"].clone(), v as i64))
        .collect()
}

fn scalar(samples: &[Sample], name: &str) -> f64 {
    *series(samples, name)
        .values()
        .next()
        .unwrap_or_else(|| panic!("{name} is missing"))
}

fn reconcile_json(db: &Path, extra: &[&str]) -> Json {
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["reconcile", "--format", "json", "--sqlite-path"])
        .arg(db)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "reconcile failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reconcile prints JSON")
}

/// Checks the reconciliation gauges of a scrape against the oracle; returns the oracle's drift
/// and lags.
fn assert_gauges_match_oracle(
    db: &Path,
    samples: &[Sample],
) -> (BTreeMap<String, Drift>, i64, BTreeMap<String, i64>) {
    let want = oracle(db);
    let (lag, model_lag) = oracle_lag(db);
    for (metric, get) in [
        (
            "newapi_quota_data_missing_requests",
            (|d: &Drift| d.missing_requests) as fn(&Drift) -> i64,
        ),
        ("newapi_quota_data_missing_quota", |d| d.missing_quota),
        ("newapi_quota_data_excess_requests", |d| d.excess_requests),
        ("newapi_quota_data_excess_quota", |d| d.excess_quota),
    ] {
        let got = gauge_by_model(samples, metric);
        for (model, d) in &want {
            assert_eq!(
                got.get(model).copied().unwrap_or(0),
                get(d),
                "{metric} for {model}"
            );
        }
        assert_eq!(
            got.values().sum::<i64>(),
            want.values().map(get).sum::<i64>(),
            "{metric} total"
        );
    }
    assert_eq!(scalar(samples, "newapi_quota_data_lag_seconds") as i64, lag);
    assert_eq!(
        gauge_by_model(samples, "newapi_quota_data_model_lag_seconds"),
        model_lag
    );
    (want, lag, model_lag)
}

/// Checks gauges and the JSON report against the oracle; returns the scrape.
fn check_against_oracle(db: &Path) -> Vec<Sample> {
    let samples = InProcess::new(db).poll();
    let (want, lag, model_lag) = assert_gauges_match_oracle(db, &samples);
    let report = reconcile_json(db, &[]);
    assert_eq!(report["lag_seconds"].as_i64(), Some(lag));
    let total = |f: fn(&Drift) -> i64| want.values().map(f).sum::<i64>();
    let t = &report["totals"];
    assert_eq!(
        t["missing"]["requests"].as_i64(),
        Some(total(|d| d.missing_requests))
    );
    assert_eq!(
        t["missing"]["quota"].as_i64(),
        Some(total(|d| d.missing_quota))
    );
    assert_eq!(
        t["excess"]["requests"].as_i64(),
        Some(total(|d| d.excess_requests))
    );
    assert_eq!(
        t["excess"]["quota"].as_i64(),
        Some(total(|d| d.excess_quota))
    );
    for m in report["models"].as_array().unwrap() {
        let name = m["model"].as_str().unwrap();
        let d = want.get(name).cloned().unwrap_or_default();
        assert_eq!(
            m["missing"]["quota"].as_i64(),
            Some(d.missing_quota),
            "{name}"
        );
        assert_eq!(
            m["missing"]["requests"].as_i64(),
            Some(d.missing_requests),
            "{name}"
        );
        assert_eq!(
            m["excess"]["quota"].as_i64(),
            Some(d.excess_quota),
            "{name}"
        );
        assert_eq!(
            m["lag_seconds"].as_i64(),
            model_lag.get(name).copied().or(Some(0)),
            "{name}"
        );
    }
    samples
}

fn sum_i64(db: &Path, sql: &str) -> i64 {
    Connection::open(db)
        .unwrap()
        .query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
        .unwrap()
        .unwrap_or(0)
}

/// The exporter keeps polling while the gateway flushes into the current hour: a new row, then
/// an increment of that row in place, each reach the next poll of the same process.
#[test]
fn flushes_between_polls_reach_the_next_poll() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let mut gw = build(&db, |_, _| {});
    let mut exp = InProcess::new(&db);
    let check = |samples: &[Sample], step: &str| {
        for (metric, column) in [
            ("newapi_quota_data_requests_total", "count"),
            ("newapi_quota_data_quota_total", "quota"),
            ("newapi_quota_data_tokens_total", "token_used"),
        ] {
            let got = gauge_by_model(samples, metric);
            for model in MODELS {
                let sql =
                    format!("SELECT SUM({column}) FROM quota_data WHERE model_name = '{model}'");
                assert_eq!(got[model], sum_i64(&db, &sql), "{step}: {metric} {model}");
            }
        }
        // Healthy history, and the new rows sit in the current hour, which is not settled:
        // nothing is missing or in excess.
        for metric in [
            "newapi_quota_data_missing_requests",
            "newapi_quota_data_missing_quota",
            "newapi_quota_data_excess_requests",
            "newapi_quota_data_excess_quota",
        ] {
            let got = gauge_by_model(samples, metric);
            assert!(got.values().all(|v| *v == 0), "{step}: {metric} {got:?}");
        }
        let (lag, model_lag) = oracle_lag(&db);
        assert_eq!(
            scalar(samples, "newapi_quota_data_lag_seconds") as i64,
            lag,
            "{step}"
        );
        assert_eq!(
            gauge_by_model(samples, "newapi_quota_data_model_lag_seconds"),
            model_lag,
            "{step}"
        );
        lag
    };
    assert_eq!(check(&exp.poll(), "start"), 0);
    let now = unix_now();
    let before = sum_i64(&db, "SELECT SUM(count) FROM quota_data");
    // Logged, not flushed yet: quota_data is unchanged.
    gw.record(&consume(1, "gpt-4o", now, 700), true, now)
        .unwrap();
    check(&exp.poll(), "logged");
    gw.flush().unwrap();
    assert_eq!(
        sum_i64(&db, "SELECT SUM(count) FROM quota_data"),
        before + 1
    );
    check(&exp.poll(), "new row flushed");
    // The same (user, model, hour) again: the gateway increments the row in place.
    let rows = sum_i64(&db, "SELECT COUNT(*) FROM quota_data");
    gw.record(&consume(1, "gpt-4o", now, 300), true, now)
        .unwrap();
    gw.flush().unwrap();
    assert_eq!(sum_i64(&db, "SELECT COUNT(*) FROM quota_data"), rows);
    check(&exp.poll(), "row incremented in place");
    check(&exp.poll(), "nothing changed");
}

/// With a window that is not a whole number of hours, the hour before its first hour still
/// takes part in netting: a row logged there at xx:59:59 and filed by the gateway under the next
/// hour nets out, on every poll of the same process, not only the first.
#[test]
fn a_skewed_row_at_the_edge_of_an_uneven_window_nets_out_on_every_poll() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let mut gw = Gateway::create(&db, Flavor::NewApi).unwrap();
    let window = 90 * 60;
    // Default DataExportInterval (5 min) and settle margin (5 min).
    let now = unix_now();
    let settled = (now - 600) - (now - 600).rem_euclid(HOUR);
    let since = settled - window;
    let first_hour = since - since.rem_euclid(HOUR);
    let t = first_hour - 1;
    gw.record(&consume(1, "gpt-4o", t, 500), true, first_hour)
        .unwrap();
    gw.flush().unwrap();
    let mut exp = InProcess::with_settings(
        &db,
        newapi_exporter::collect::Settings {
            window_secs: window,
            ..Default::default()
        },
    );
    for poll in 0..3 {
        let s = exp.poll();
        for metric in [
            "newapi_quota_data_excess_requests",
            "newapi_quota_data_missing_requests",
        ] {
            assert_eq!(
                gauge_by_model(&s, metric).get("gpt-4o"),
                Some(&0),
                "poll {poll}: {metric}"
            );
        }
    }
}

#[test]
fn healthy_gateway_shows_no_drift() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    build(&db, |_, _| {});
    let s = check_against_oracle(&db);
    assert!(
        gauge_by_model(&s, "newapi_quota_data_missing_quota")
            .values()
            .all(|v| *v == 0)
    );
    assert_eq!(scalar(&s, "newapi_quota_data_lag_seconds"), 0.0);
    assert_eq!(scalar(&s, "newapi_quota_data_export_enabled"), 1.0);
    assert_eq!(
        scalar(&s, "newapi_quota_data_export_interval_seconds"),
        300.0
    );
    // Settled: hour end + the default 5 min interval + the default 5 min margin has passed.
    let now = unix_now();
    let settled = scalar(&s, "newapi_quota_data_settled_until_timestamp_seconds") as i64;
    let expected = (now - 600) - (now - 600).rem_euclid(HOUR);
    assert!(
        settled == expected || settled == expected - HOUR,
        "{settled} vs {expected}"
    );
    // The dashboard-side counters equal quota_data's sums.
    let qd = gauge_by_model(&s, "newapi_quota_data_quota_total");
    for m in MODELS {
        let want = sum_i64(
            &db,
            &format!("SELECT SUM(quota) FROM quota_data WHERE model_name = '{m}'"),
        );
        assert_eq!(qd[m], want);
        let req = gauge_by_model(&s, "newapi_quota_data_requests_total")[m];
        assert_eq!(
            req,
            sum_i64(
                &db,
                &format!("SELECT SUM(count) FROM quota_data WHERE model_name = '{m}'")
            )
        );
        let tok = gauge_by_model(&s, "newapi_quota_data_tokens_total")[m];
        assert_eq!(
            tok,
            sum_i64(
                &db,
                &format!("SELECT SUM(token_used) FROM quota_data WHERE model_name = '{m}'")
            )
        );
    }
}

#[test]
fn a_model_whose_logs_never_feed_the_map_is_missing_and_lags() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    build(&db, |gw, hour| {
        for k in 0..2 {
            let t = hour + 100 + k * 1000;
            let mut row = consume(2, "coze-workflow-async", t, 2_531_108);
            row.other = r#"{"async":true}"#.into();
            gw.record(&row, false, t).unwrap();
        }
    });
    let s = check_against_oracle(&db);
    let missing = gauge_by_model(&s, "newapi_quota_data_missing_quota");
    assert_eq!(missing["coze-workflow-async"], 2 * HOURS * 2_531_108);
    assert_eq!(missing["gpt-4o"], 0);
    let lag = gauge_by_model(&s, "newapi_quota_data_model_lag_seconds");
    assert!(lag["coze-workflow-async"] > 14 * HOUR);
    assert_eq!(lag["gpt-4o"], 0);
    // The table's first line names the model beside the overall lag: its first log at the first
    // hour + 100 s, its newest at the last hour + 1,100 s, 15 hours later.
    assert_eq!(HOURS, 16);
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["reconcile", "--sqlite-path"])
        .arg(&db)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let first = table.lines().next().unwrap_or_default();
    assert!(
        first.ends_with("; lag 0s; longest per model: coze-workflow-async (15h 16m 40s)"),
        "{first}"
    );
}

#[test]
fn a_flush_lost_to_a_restart_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let base = base_hour();
    build(&db, |gw, hour| {
        if hour == base + 5 * HOUR {
            gw.lose_pending();
        }
    });
    let s = check_against_oracle(&db);
    let lost: i64 = gauge_by_model(&s, "newapi_quota_data_missing_requests")
        .values()
        .sum();
    assert_eq!(lost, USERS * MODELS.len() as i64 * 3);
}

#[test]
fn refunds_and_task_settlements_are_not_missing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    build(&db, |gw, hour| {
        let mut refund = consume(1, "gpt-4o", hour + 2000, 5_000);
        refund.log_type = 6;
        gw.record(&refund, false, hour).unwrap();
        let mut task = consume(3, "kling-v2-1", hour + 2100, 400_000);
        task.prompt_tokens = 0;
        task.completion_tokens = 0;
        task.request_id.clear();
        task.other = r#"{"is_task":true,"pre_consumed_quota":400000}"#.into();
        gw.record(&task, false, hour).unwrap();
    });
    let s = check_against_oracle(&db);
    assert!(
        gauge_by_model(&s, "newapi_quota_data_missing_quota")
            .values()
            .all(|v| *v == 0)
    );
    assert_eq!(
        gauge_by_model(&s, "newapi_quota_data_unmirrored_quota")["kling-v2-1"],
        HOURS * 400_000
    );
    assert_eq!(scalar(&s, "newapi_quota_data_lag_seconds"), 0.0);
    let refunds: f64 = series(&s, "newapi_refund_quota_total").values().sum();
    assert_eq!(refunds, (HOURS * 5_000) as f64);
}

#[test]
fn duplicate_rows_from_two_nodes_are_counted_and_later_increments_show_as_excess() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let gw = build(&db, |_, _| {});
    let hour = base_hour() + 3 * HOUR;
    // Node B inserted its own row for a key node A had already inserted; each holds part.
    let (id, count, quota): (i64, i64, i64) = gw
        .conn
        .query_row(
            "SELECT id, count, quota FROM quota_data WHERE created_at = ?1 AND user_id = 1 AND model_name = 'gpt-4o'",
            [hour],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    gw.conn
        .execute(
            "UPDATE quota_data SET count = 1, quota = 1000, token_used = 0 WHERE id = ?1",
            [id],
        )
        .unwrap();
    gw.conn
        .execute(
            "INSERT INTO quota_data (user_id, username, model_name, created_at, token_used, count, quota)
             VALUES (1, 'user1', 'gpt-4o', ?1, 0, ?2, ?3)",
            params![hour, count - 1, quota - 1000],
        )
        .unwrap();
    let s = check_against_oracle(&db);
    assert_eq!(scalar(&s, "newapi_quota_data_duplicate_rows"), 1.0);
    assert_eq!(
        gauge_by_model(&s, "newapi_quota_data_excess_quota")["gpt-4o"],
        0
    );
    // A later flush increments both rows: the second increment is excess.
    gw.conn
        .execute(
            "UPDATE quota_data SET count = count + 1, quota = quota + 250
             WHERE created_at = ?1 AND user_id = 1 AND model_name = 'gpt-4o'",
            [hour],
        )
        .unwrap();
    let s = check_against_oracle(&db);
    assert_eq!(
        gauge_by_model(&s, "newapi_quota_data_excess_quota")["gpt-4o"],
        500
    );
}

#[test]
fn hour_boundary_skew_nets_out() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    build(&db, |gw, hour| {
        // A request logged at xx:59:59 whose map entry took the next hour's clock reading.
        let t = hour + HOUR - 1;
        gw.record(&consume(4, "gpt-4o", t, 4_444), true, t + 2)
            .unwrap();
    });
    // Without netting, every hour but the first would show a deficit and an excess.
    let raw = oracle(&db);
    assert!(raw["gpt-4o"].missing_quota > 0 && raw["gpt-4o"].excess_quota > 0);
    let s = InProcess::new(&db).poll();
    for metric in [
        "newapi_quota_data_missing_quota",
        "newapi_quota_data_missing_requests",
        "newapi_quota_data_excess_quota",
        "newapi_quota_data_excess_requests",
    ] {
        assert!(
            gauge_by_model(&s, metric).values().all(|v| *v == 0),
            "{metric}: {:?}",
            gauge_by_model(&s, metric)
        );
    }
    let report = reconcile_json(&db, &[]);
    assert_eq!(report["totals"]["missing"]["quota"].as_i64(), Some(0));
    assert_eq!(report["totals"]["excess"]["quota"].as_i64(), Some(0));
}

#[test]
fn deleted_old_logs_show_as_excess_not_missing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let gw = build(&db, |_, _| {});
    let deleted = gw
        .conn
        .execute(
            "DELETE FROM logs WHERE created_at < ?1",
            [base_hour() + 3 * HOUR],
        )
        .unwrap();
    assert!(deleted > 0);
    let s = check_against_oracle(&db);
    assert!(
        gauge_by_model(&s, "newapi_quota_data_missing_quota")
            .values()
            .all(|v| *v == 0)
    );
    let excess: i64 = gauge_by_model(&s, "newapi_quota_data_excess_requests")
        .values()
        .sum();
    assert_eq!(excess, deleted as i64);
}

#[test]
fn export_switched_off_is_visible_and_missing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let base = base_hour();
    build(&db, |gw, hour| {
        if hour >= base + 10 * HOUR {
            gw.lose_pending(); // the gateway stopped feeding the map
        }
    });
    Gateway::open(&db, Flavor::NewApi)
        .unwrap()
        .set_option("DataExportEnabled", "false")
        .unwrap();
    let s = check_against_oracle(&db);
    assert_eq!(scalar(&s, "newapi_quota_data_export_enabled"), 0.0);
    let missing: i64 = gauge_by_model(&s, "newapi_quota_data_missing_requests")
        .values()
        .sum();
    assert_eq!(missing, 6 * USERS * MODELS.len() as i64 * 3);
    assert!(scalar(&s, "newapi_quota_data_lag_seconds") >= (5 * HOUR) as f64);
}

#[test]
fn one_api_has_no_recording_metrics_and_the_page_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let mut gw = Gateway::create(&db, Flavor::OneApi).unwrap();
    gw.record(&consume(1, "gpt-4o", 1_767_225_600, 10), true, 0)
        .unwrap();
    let s = InProcess::new(&db).poll();
    assert!(s.iter().all(|x| !x.name.starts_with("newapi_quota_data_")));
    let exp = Running::start(&["--sqlite-path", db.to_str().unwrap()]);
    exp.wait_ready(Duration::from_secs(20));
    let (_, page) = exp.get("/");
    assert!(
        page.contains("one-api, which has no quota_data table"),
        "{page}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["reconcile", "--sqlite-path", db.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no quota_data table"));
}

/// On one-api there is nothing to compare, so the per-hour aggregates of recent logs are not
/// kept: a long-running exporter's memory does not grow by an hour of them every hour.
#[test]
fn one_api_keeps_no_hourly_state() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let mut gw = Gateway::create(&db, Flavor::OneApi).unwrap();
    let now = unix_now();
    for (k, model) in ["gpt-4o", "claude"].iter().enumerate() {
        let t = now - 3 * HOUR + k as i64 * 60;
        gw.record(&consume(1 + k as i64, model, t, 10), true, t)
            .unwrap();
    }
    let mut src = newapi_exporter::serve::sqlite_connector(db.clone())().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut p = newapi_exporter::poller::Poller::build_pipeline(
        &mut src,
        newapi_exporter::collect::Settings::default(),
        stop,
    )
    .unwrap();
    for _ in 0..2 {
        p.poll(&mut src, unix_now()).unwrap();
        assert!(p.ctx.recording.logs_hourly.is_empty());
        assert!(p.ctx.recording.dirty.is_empty());
    }
    assert_eq!(p.ctx.logs_cursor, 2, "both rows were read");
}

/// The incident: 105 workflow log rows with quota 265,766,280; 20 quota_data rows with
/// 56,317,943; newest log (2025-10-21 16:32) four days after the newest quota_data hour
/// (2025-10-17 15:00).
fn incident_db(db: &Path) {
    let mut gw = Gateway::create(db, Flavor::NewApi).unwrap();
    let first_hour = 1_760_644_800; // 2025-10-16T20:00:00Z
    let newest_qd_hour = 1_760_713_200; // 2025-10-17T15:00:00Z
    let newest_log = 1_761_064_320; // 2025-10-21T16:32:00Z
    let model = "coze-workflow-async";
    gw.conn.execute_batch("BEGIN").unwrap();
    let mut n = 0;
    let mut quota_left: i64 = 265_766_280;
    let mut log = |gw: &mut Gateway, t: i64| {
        n += 1;
        let q = if n == 105 { quota_left } else { 2_531_108 };
        quota_left -= q;
        gw.record(&consume(7, model, t, q), false, t).unwrap();
    };
    // Two logs in each of the 20 hours quota_data has, ending at its newest hour ...
    for h in 0..20 {
        let hour = first_hour + h * HOUR;
        log(&mut gw, hour + 300);
        log(&mut gw, hour + 2400);
    }
    assert_eq!(first_hour + 19 * HOUR, newest_qd_hour);
    // ... and 65 more over the next four days, the last at 2025-10-21 16:32.
    let step = (newest_log - (newest_qd_hour + HOUR)) / 64;
    for i in 0..65 {
        log(&mut gw, newest_qd_hour + HOUR + i * step);
    }
    let last: i64 = gw
        .conn
        .query_row("SELECT MAX(created_at) FROM logs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(last, newest_log);
    for h in 0..20 {
        let q = if h == 19 { 2_815_900 } else { 2_815_897 };
        gw.conn
            .execute(
                "INSERT INTO quota_data (user_id, username, model_name, created_at, token_used, count, quota)
                 VALUES (7, 'user7', ?1, ?2, 120, 1, ?3)",
                params![model, first_hour + h * HOUR, q],
            )
            .unwrap();
    }
    gw.conn.execute_batch("COMMIT").unwrap();
}

#[test]
fn the_incident_reports_the_209m_gap_and_the_four_day_lag() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    incident_db(&db);
    assert_eq!(sum_i64(&db, "SELECT COUNT(*) FROM logs"), 105);
    assert_eq!(sum_i64(&db, "SELECT SUM(quota) FROM logs"), 265_766_280);
    assert_eq!(sum_i64(&db, "SELECT COUNT(*) FROM quota_data"), 20);
    assert_eq!(
        sum_i64(&db, "SELECT SUM(quota) FROM quota_data"),
        56_317_943
    );
    let four_days_32_min = 4 * 86_400 + 32 * 60;

    let report = reconcile_json(&db, &[]);
    let t = &report["totals"];
    assert_eq!(t["logs"]["requests"].as_i64(), Some(105));
    assert_eq!(t["logs"]["quota"].as_i64(), Some(265_766_280));
    assert_eq!(t["quota_data"]["rows"].as_i64(), Some(20));
    assert_eq!(t["quota_data"]["quota"].as_i64(), Some(56_317_943));
    assert_eq!(t["missing"]["quota"].as_i64(), Some(209_448_337));
    assert_eq!(t["missing"]["requests"].as_i64(), Some(85));
    assert_eq!(t["logs"]["latest"].as_i64(), Some(1_761_064_320));
    assert_eq!(t["quota_data"]["latest"].as_i64(), Some(1_760_713_200));
    assert_eq!(report["lag_seconds"].as_i64(), Some(four_days_32_min));
    assert_eq!(report["models"][0]["model"], "coze-workflow-async");
    assert_eq!(
        report["models"][0]["lag_seconds"].as_i64(),
        Some(four_days_32_min)
    );

    // The gauge shows the full lag even though the incident is older than the window.
    let s = InProcess::new(&db).poll();
    assert_eq!(
        scalar(&s, "newapi_quota_data_lag_seconds") as i64,
        four_days_32_min
    );

    // A range in RFC 3339 with an offset selects the same hours.
    let r2 = reconcile_json(
        &db,
        &[
            "--since",
            "2025-10-17T04:00:00+08:00",
            "--until",
            "1761066000",
        ],
    );
    assert_eq!(r2["totals"]["missing"]["quota"].as_i64(), Some(209_448_337));

    // The table and CSV forms carry the same figures.
    for (format, needle) in [("table", "209448337"), ("csv", ",209448337,")] {
        let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
            .args([
                "reconcile",
                "--format",
                format,
                "--sqlite-path",
                db.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(needle), "{format}: {text}");
        assert!(text.contains("coze-workflow-async"));
    }
}

#[test]
fn the_landing_page_shows_the_comparison() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    build(&db, |gw, hour| {
        let t = hour + 100;
        gw.record(&consume(2, "<b>wf</b>", t, 9_999), false, t)
            .unwrap();
    });
    let exp = Running::start(&["--sqlite-path", db.to_str().unwrap()]);
    exp.wait_ready(Duration::from_secs(20));
    let (_, page) = exp.get("/");
    assert!(page.contains("Recording health"));
    assert!(
        page.contains("&lt;b&gt;wf&lt;/b&gt;"),
        "model names are escaped"
    );
    assert!(!page.contains("<b>wf</b>"));
    assert!(page.contains(&(HOURS * 9_999).to_string()));
    // The other models keep recording, so the overall lag is zero; the page names the model
    // that never did: its first and newest logs are HOURS - 1 hours apart.
    assert_eq!(HOURS, 16);
    assert!(page.contains("quota_data lag: 0s"), "{page}");
    assert!(
        page.contains("longest per model: &lt;b&gt;wf&lt;/b&gt; (15h)"),
        "{page}"
    );
}

fn qd_snapshot(db: &Path) -> String {
    Connection::open(db)
        .unwrap()
        .query_row(
            "SELECT COALESCE(group_concat(id || ':' || user_id || ':' || username || ':' || model_name || ':' ||
                    created_at || ':' || count || ':' || quota || ':' || token_used, ';'), '')
             FROM (SELECT * FROM quota_data ORDER BY id)",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

fn logs_snapshot(db: &Path) -> (i64, i64, i64) {
    Connection::open(db)
        .unwrap()
        .query_row(
            "SELECT COUNT(*), SUM(quota), SUM(id * 7 + quota % 13) FROM logs",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
}

fn backfill(db: &Path, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["backfill", "--sqlite-path"])
        .arg(db)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "backfill failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Each hour: part of the traffic flushed, the rest lost with the map (a restart), and an
/// async workflow model never fed at all.
fn drifted(db: &Path) -> Gateway {
    build(db, |gw, hour| {
        gw.flush().unwrap();
        for user in 1..=2 {
            let t = hour + 3000 + user;
            gw.record(&consume(user, "gpt-4o", t, 777 * user), true, t)
                .unwrap();
        }
        gw.lose_pending();
        let t = hour + 3100;
        gw.record(&consume(3, "coze-workflow-async", t, 2_000_000), false, t)
            .unwrap();
    })
}

#[test]
fn backfill_dry_run_apply_and_second_run() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let gw = drifted(&db);
    // Traffic in the current hour, not settled: backfill must leave it alone.
    let now = unix_now();
    let mut gw = gw;
    gw.record(&consume(2, "coze-workflow-async", now, 5_555), false, now)
        .unwrap();
    let before = oracle(&db);
    let settled_missing = before.values().map(|d| d.missing_quota).sum::<i64>() - 5_555;
    let settled_missing_requests = before.values().map(|d| d.missing_requests).sum::<i64>() - 1;
    let qd_before = qd_snapshot(&db);
    let logs_before = logs_snapshot(&db);

    let dry = backfill(&db, &[]);
    assert!(dry.contains("dry run"), "{dry}");
    assert!(dry.contains(&format!("{settled_missing} quota")), "{dry}");
    assert_eq!(qd_snapshot(&db), qd_before, "a dry run writes nothing");

    let until = (now + 2 * HOUR).to_string();
    let applied = backfill(&db, &["--apply", "--until", &until]);
    assert!(applied.contains("not settled"), "{applied}");
    assert!(
        applied.contains(&format!(
            "added {settled_missing_requests} requests and {settled_missing} quota"
        )),
        "{applied}"
    );
    assert_ne!(qd_snapshot(&db), qd_before);
    assert_eq!(
        logs_snapshot(&db),
        logs_before,
        "backfill never touches logs"
    );

    // Every settled gap is closed; the unsettled current-hour row is still unrecorded.
    let after = oracle(&db);
    assert_eq!(after.values().map(|d| d.missing_quota).sum::<i64>(), 5_555);
    assert_eq!(after.values().map(|d| d.excess_quota).sum::<i64>(), 0);
    let report = reconcile_json(&db, &[]);
    assert_eq!(report["totals"]["missing"]["quota"].as_i64(), Some(0));
    let s = InProcess::new(&db).poll();
    assert!(
        gauge_by_model(&s, "newapi_quota_data_missing_quota")
            .values()
            .all(|v| *v == 0)
    );

    // The rows look like the gateway's own: keyed by user, username, model and hour.
    let rows = sum_i64(
        &db,
        "SELECT COUNT(*) FROM quota_data WHERE model_name = 'coze-workflow-async' AND username = 'user3'",
    );
    assert_eq!(rows, HOURS);

    let qd_after = qd_snapshot(&db);
    let again = backfill(&db, &["--apply"]);
    assert!(again.contains("nothing to write"), "{again}");
    assert_eq!(qd_snapshot(&db), qd_after, "a second run writes nothing");
}

#[test]
fn backfill_alongside_a_gateway_flush_loses_no_increment() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    drop(drifted(&db));
    let sums = |db: &Path| {
        (
            sum_i64(db, "SELECT SUM(count) FROM quota_data"),
            sum_i64(db, "SELECT SUM(quota) FROM quota_data"),
        )
    };
    let (count0, quota0) = sums(&db);

    // A gateway node keeps flushing late increments into the very rows backfill increments.
    let stop = Arc::new(AtomicBool::new(false));
    let flusher = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut gw = Gateway::open(&db, Flavor::NewApi).unwrap();
            let base = base_hour();
            let (mut count, mut quota, mut i) = (0i64, 0i64, 0i64);
            while !stop.load(Ordering::Relaxed) || i < 20 {
                let hour = base + (i % HOURS) * HOUR;
                let user = 1 + i % 2;
                gw.feed(user, &format!("user{user}"), "gpt-4o", hour, 1, 3, 1);
                gw.flush().unwrap();
                count += 1;
                quota += 3;
                i += 1;
                // Back-to-back commits with no pause would starve every reader (SQLite has no
                // lock fairness); a real node flushes every few minutes.
                std::thread::sleep(Duration::from_millis(1));
            }
            (count, quota)
        })
    };
    let out = backfill(&db, &["--apply"]);
    stop.store(true, Ordering::Relaxed);
    let (flushed_count, flushed_quota) = flusher.join().unwrap();
    // "wrote N quota_data rows: added R requests and Q quota"
    let summary: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("wrote "))
        .unwrap_or_else(|| panic!("{out}"))
        .split_whitespace()
        .collect();
    let added = |what: &str| -> i64 {
        let at = summary.iter().position(|w| *w == what).unwrap();
        summary[at - 1].parse().unwrap()
    };
    let (count1, quota1) = sums(&db);
    assert!(added("requests") > 0, "{out}");
    assert_eq!(count1, count0 + added("requests") + flushed_count, "{out}");
    assert_eq!(quota1, quota0 + added("quota") + flushed_quota, "{out}");
}
