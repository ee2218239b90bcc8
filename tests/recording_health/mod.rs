//! Recording health: planted drift, one database per known cause, checked against an SQL
//! oracle through the gauges and through `reconcile --format json`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use newapi_exporter::clock::unix_now;
use newapi_exporter::demo::gateway::Tables;
use newapi_exporter::demo::gateway::{Gateway, LogRow};
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
    let mut gw = Gateway::create(db, Tables::NewApiOlder).unwrap();
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

/// `reconcile` as a table, as people read it.
fn reconcile_table(db: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["reconcile", "--sqlite-path"])
        .arg(db)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    let mut gw = Gateway::create(&db, Tables::NewApiOlder).unwrap();
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

pub(crate) mod current;
mod drift;
mod incident_and_backfill;
