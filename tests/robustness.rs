//! Hostile and damaged rows, as a careful operator's database can hold them: millisecond,
//! pre-2020 and far-future timestamps, amounts beyond what the gateway writes. The exporter
//! stays ready, the normal rows' figures stay exact, and each planted row is reported once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use newapi_exporter::clock::unix_now;
use rusqlite::Connection;

use crate::common::engines::{SERVERS, TestDb, admin_dsn};
use crate::common::*;

const MS: i64 = 1_795_999_694_000;

/// The demo gateway's database, and a copy of it with implausible rows planted.
fn clean_and_planted(dir: &Path) -> (PathBuf, PathBuf) {
    let clean = dir.join("clean.db");
    newapi_exporter::demo::create(&clean, Duration::from_secs(6 * 3600), 5).unwrap();
    let planted = dir.join("planted.db");
    std::fs::copy(&clean, &planted).unwrap();
    let now = unix_now();
    let recent = now - now.rem_euclid(3600) - 3 * 3600 + 60;
    let conn = Connection::open(&planted).unwrap();
    let log = |created_at: i64, quota: i64| {
        conn.execute(
            "INSERT INTO logs (user_id, username, created_at, type, model_name, quota, prompt_tokens,
               completion_tokens, channel_id, `group`, token_id)
             VALUES (1, 'user01', ?1, 2, 'gpt-4o', ?2, 10, 5, 1, 'default', 1001)",
            [created_at, quota],
        )
        .unwrap();
    };
    // Two overflowing amounts in one group of one chunk: their sum must not overflow.
    log(recent, 9_223_372_036_854_775_807);
    log(MS, 100);
    log(-5, 50);
    log(253_402_300_799, 70);
    log(recent, 9_223_372_036_854_775_000);
    let qd = |created_at: i64, count: i64, quota: i64| {
        conn.execute(
            "INSERT INTO quota_data (user_id, username, model_name, created_at, use_group, token_id,
               channel_id, node_name, token_used, count, quota)
             VALUES (1, 'user01', 'gpt-4o', ?1, 'default', 1001, 1, 'node-1', 5, ?2, ?3)",
            [created_at, count, quota],
        )
        .unwrap();
    };
    qd(MS, 1, 10);
    qd(i64::MAX, 1, 10);
    qd(recent - recent.rem_euclid(3600), 1, i64::MAX);
    qd(0, 1, 10);
    (clean, planted)
}

/// Rejected rows by (table, reason).
fn rejected(samples: &[Sample]) -> BTreeMap<(String, String), f64> {
    series(samples, "newapi_exporter_rows_rejected_total")
        .into_iter()
        .map(|(l, v)| ((l["table"].clone(), l["reason"].clone()), v))
        .collect()
}

fn expected_rejections() -> BTreeMap<(String, String), f64> {
    [
        ("logs", "amount_out_of_range", 2.0),
        ("logs", "timestamp_before_2020", 1.0),
        ("logs", "timestamp_future", 1.0),
        ("logs", "timestamp_milliseconds", 1.0),
        ("quota_data", "amount_out_of_range", 1.0),
        ("quota_data", "timestamp_before_2020", 1.0),
        ("quota_data", "timestamp_future", 1.0),
        ("quota_data", "timestamp_milliseconds", 1.0),
    ]
    .into_iter()
    .map(|(t, r, n)| ((t.to_string(), r.to_string()), n))
    .collect()
}

/// Everything the gateway's rows produce, but the counters of rejected rows and the
/// exporter's own timing.
fn figures(samples: &[Sample]) -> BTreeMap<(String, Labels), f64> {
    samples
        .iter()
        .filter(|s| s.name.starts_with("newapi_quota_data_") || s.name == "newapi_gateway_info")
        .map(|s| ((s.name.clone(), s.labels.clone()), s.value))
        .collect()
}

fn sum_of(samples: &[Sample], name: &str) -> f64 {
    series(samples, name).values().sum()
}

fn time_to_ready(db: &Path) -> Duration {
    let started = Instant::now();
    let exp = Running::start(&[
        "--sqlite-path",
        db.to_str().unwrap(),
        "--db.chunk-rows",
        "500",
    ]);
    exp.wait_ready(Duration::from_secs(60));
    started.elapsed()
}

#[test]
fn implausible_rows_are_set_aside_and_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let (clean, planted) = clean_and_planted(dir.path());
    let settings = newapi_exporter::collect::Settings {
        chunk_rows: 500,
        ..newapi_exporter::collect::Settings::default()
    };
    let clean_scrape = InProcess::with_settings(&clean, settings.clone()).poll();
    let mut exp = InProcess::with_settings(&planted, settings);
    let first = exp.poll();
    assert_eq!(series(&first, "newapi_up")[&labels(&[])], 1.0);
    assert_eq!(rejected(&first), expected_rejections());
    // The recording health is what it is without the planted rows: none of them counts.
    let (got, want) = (figures(&first), figures(&clean_scrape));
    for (k, v) in &want {
        assert_eq!(got.get(k), Some(v), "{k:?}");
    }
    assert_eq!(
        got.len(),
        want.len(),
        "{:?}",
        got.keys()
            .filter(|k| !want.contains_key(*k))
            .collect::<Vec<_>>()
    );
    assert!(series(&first, "newapi_quota_data_lag_seconds")[&labels(&[])] < 86_400.0);
    // The usage counters against an SQL oracle: every consume row whose amounts are sound,
    // whatever its time.
    let conn = Connection::open(&planted).unwrap();
    let oracle =
        |sql: &str| -> f64 { conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap() as f64 };
    let sound = "quota BETWEEN -2147483647 AND 2147483647 \
                 AND prompt_tokens BETWEEN -2147483647 AND 2147483647 \
                 AND completion_tokens BETWEEN -2147483647 AND 2147483647";
    assert_eq!(
        sum_of(&first, "newapi_requests_total"),
        oracle(&format!(
            "SELECT COUNT(*) FROM logs WHERE {BILLED_REQUEST} AND {sound}"
        ))
    );
    assert_eq!(
        sum_of(&first, "newapi_quota_total"),
        oracle(&format!(
            "SELECT SUM(quota) FROM logs WHERE {BILLED_QUOTA} AND {sound} AND quota > 0"
        ))
    );
    // Later polls report no row twice.
    for _ in 0..3 {
        let again = exp.poll();
        assert_eq!(rejected(&again), expected_rejections());
    }
    // `check` names them.
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["check", "--sqlite-path"])
        .arg(&planted)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for ((table, reason), n) in expected_rejections() {
        assert!(text.contains(&format!("  {table}: {n} {reason}")), "{text}");
    }
    // Ready as fast as without them, and reconcile finishes.
    let (t_clean, t_planted) = (time_to_ready(&clean), time_to_ready(&planted));
    assert!(
        t_planted < t_clean * 2 + Duration::from_secs(2),
        "ready in {t_planted:?} with the planted rows, {t_clean:?} without"
    );
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["reconcile", "--format", "json", "--sqlite-path"])
        .arg(&planted)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let out_clean = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["reconcile", "--format", "json", "--sqlite-path"])
        .arg(&clean)
        .output()
        .unwrap();
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_slice(&out.stdout).unwrap(),
        serde_json::from_slice(&out_clean.stdout).unwrap(),
    );
    assert_eq!(a["totals"]["missing"], b["totals"]["missing"]);
    assert_eq!(a["totals"]["excess"], b["totals"]["excess"]);
    assert_eq!(a["channels"], b["channels"]);
}

/// The same planted rows on MariaDB and PostgreSQL: the same figures and rejections as on
/// SQLite.
#[test]
fn implausible_rows_are_set_aside_the_same_on_every_engine() {
    let test = "implausible_rows_are_set_aside_the_same_on_every_engine";
    let dir = tempfile::tempdir().unwrap();
    let (clean, planted) = clean_and_planted(dir.path());
    let expected = InProcess::new(&planted).poll();
    let tables = ["logs", "quota_data", "channels", "options"];
    for server in SERVERS {
        let Some(admin) = admin_dsn(server, test) else {
            continue;
        };
        // The first poll (the cold start) takes as long with the planted rows as without.
        let clean_db = TestDb::create_with(server, &admin, "plausible", true);
        clean_db.copy_from_sqlite(&clean, &tables);
        let started = Instant::now();
        InProcess::with_dsn(&clean_db.dsn, None).poll();
        let t_clean = started.elapsed();
        let db = TestDb::create_with(server, &admin, "implausible", true);
        db.copy_from_sqlite(&planted, &tables);
        let started = Instant::now();
        let got = InProcess::with_dsn(&db.dsn, None).poll();
        let t_planted = started.elapsed();
        assert!(
            t_planted < t_clean * 2 + Duration::from_secs(2),
            "{server:?}: ready in {t_planted:?} with the planted rows, {t_clean:?} without"
        );
        assert_eq!(series(&got, "newapi_up")[&labels(&[])], 1.0, "{server:?}");
        assert_eq!(rejected(&got), expected_rejections(), "{server:?}");
        assert_eq!(figures(&got), figures(&expected), "{server:?}");
        assert_eq!(
            sum_of(&got, "newapi_requests_total"),
            sum_of(&expected, "newapi_requests_total"),
            "{server:?}"
        );
    }
}
