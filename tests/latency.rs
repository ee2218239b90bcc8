//! The request-duration and time-to-first-response histograms against an SQL oracle: SQLite's
//! own JSON functions over the same file (the exporter reads `other.frt` as text), on SQLite
//! and on MariaDB and PostgreSQL holding the same rows.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use newapi_exporter::collect::logs::{DURATION_BUCKETS, FIRST_RESPONSE_BUCKETS_MS};
use newapi_exporter::demo;
use rusqlite::Connection;

use crate::common::engines::{SERVERS, TestDb, admin_dsn};
use crate::common::*;

/// Rows the demo does not write: a request of 0 s, one beyond the last bucket and one whose
/// `use_time` is NULL (no duration: in no bucket, and nothing added to the sum), a `frt` on
/// the bucket edges, `null`, text that is not JSON, and an empty `other`; and one three days
/// old, before the hours the histograms cover.
fn edge_rows(conn: &Connection) {
    let now = newapi_exporter::clock::unix_now() - 60;
    for (age, use_time, other) in [
        (0, Some(0), r#"{"frt":100}"#),
        (0, Some(301), r#"{"frt":30000}"#),
        (0, None, r#"{"frt":250}"#),
        (0, Some(2), r#"{"frt":30001,"model_ratio":1}"#),
        (0, Some(5), r#"{"group_ratio":1,"frt":0}"#),
        (0, Some(1), r#"{"frt":null}"#),
        (0, Some(3), ""),
        (0, Some(4), "not json"),
        (3 * 86_400, Some(7), r#"{"frt":700}"#),
    ] {
        conn.execute(
            "INSERT INTO logs (user_id, created_at, type, content, username, token_name, \
             model_name, quota, prompt_tokens, completion_tokens, use_time, is_stream, channel_id, \
             `group`, request_id, other, token_id) VALUES (7, ?1, 2, '', 'user07', 'key-3', \
             'gpt-4o', 100, 10, 10, ?2, 1, 1, 'default', 'edge', ?3, 1007)",
            rusqlite::params![now - age, use_time, other],
        )
        .unwrap();
    }
}

type Key = BTreeMap<String, String>;

/// Bucket series (with `le`), `_count` and `_sum` of both histograms, from SQL: the billed
/// requests of the last two days (the histograms cover the reconciliation window, a day, and
/// every row read after the start).
fn oracle(db: &Path) -> BTreeMap<(String, Key), f64> {
    let conn = Connection::open(db).unwrap();
    let mut out = BTreeMap::new();
    let duration_cols: Vec<String> = DURATION_BUCKETS
        .iter()
        .map(|le| format!("SUM(use_time <= {le})"))
        .collect();
    let frt = "(CASE WHEN json_valid(other) AND json_type(other, '$.frt') = 'integer' \
               THEN json_extract(other, '$.frt') END)";
    let frt_cols: Vec<String> = FIRST_RESPONSE_BUCKETS_MS
        .iter()
        .map(|le| format!("SUM(COALESCE({frt} <= {le}, 0))"))
        .collect();
    let sql = format!(
        "SELECT model_name, CAST(channel_id AS TEXT), COALESCE((SELECT name FROM channels WHERE channels.id = logs.channel_id), ''), `group`, \
         COUNT(use_time), COALESCE(SUM(use_time), 0), {}, SUM({frt} IS NOT NULL), COALESCE(SUM({frt}), 0), {} \
         FROM logs WHERE {BILLED_REQUEST} AND created_at >= {since} GROUP BY 1, 2, 3, 4",
        duration_cols.join(", "),
        frt_cols.join(", "),
        since = newapi_exporter::clock::unix_now() - 2 * 86_400,
    );
    let mut stmt = conn.prepare(&sql).unwrap();
    let mut rows = stmt.query([]).unwrap();
    while let Some(r) = rows.next().unwrap() {
        let key: Key = [
            ("model", r.get::<_, String>(0).unwrap()),
            ("channel_id", r.get(1).unwrap()),
            ("channel_name", r.get(2).unwrap()),
            ("group", r.get(3).unwrap()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let int = |i: usize| r.get::<_, i64>(i).unwrap() as f64;
        let mut put = |name: &str, le: Option<String>, v: f64| {
            let mut k = key.clone();
            if let Some(le) = le {
                k.insert("le".into(), le);
            }
            out.insert((name.to_string(), k), v);
        };
        let d = "newapi_request_duration_seconds";
        put(&format!("{d}_count"), None, int(4));
        put(&format!("{d}_sum"), None, int(5));
        put(&format!("{d}_bucket"), Some("+Inf".into()), int(4));
        for (i, le) in DURATION_BUCKETS.iter().enumerate() {
            put(&format!("{d}_bucket"), Some(le.to_string()), int(6 + i));
        }
        let f = "newapi_time_to_first_response_seconds";
        let n = int(14);
        if n > 0.0 {
            put(&format!("{f}_count"), None, n);
            put(&format!("{f}_sum"), None, int(15) / 1000.0);
            put(&format!("{f}_bucket"), Some("+Inf".into()), n);
            for (i, le) in FIRST_RESPONSE_BUCKETS_MS.iter().enumerate() {
                put(
                    &format!("{f}_bucket"),
                    Some((*le as f64 / 1000.0).to_string()),
                    int(16 + i),
                );
            }
        }
    }
    out
}

fn histograms(samples: &[Sample]) -> BTreeMap<(String, Key), f64> {
    samples
        .iter()
        .filter(|s| {
            s.name.starts_with("newapi_request_duration_seconds")
                || s.name.starts_with("newapi_time_to_first_response_seconds")
        })
        .map(|s| ((s.name.clone(), s.labels.clone()), s.value))
        .collect()
}

fn assert_matches(samples: &[Sample], want: &BTreeMap<(String, Key), f64>, what: &str) {
    let got = histograms(samples);
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !got.contains_key(*k))
        .take(3)
        .collect();
    let extra: Vec<_> = got
        .keys()
        .filter(|k| !want.contains_key(*k))
        .take(3)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: series missing {missing:?}, not expected {extra:?}"
    );
    for (k, v) in want {
        assert!(
            (got[k] - v).abs() < 1e-6,
            "{what}: {k:?}: {} != {v}",
            got[k]
        );
    }
}

#[test]
fn latency_histograms_match_sql_on_every_engine() {
    let test = "latency_histograms_match_sql_on_every_engine";
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    demo::create(&db, Duration::from_secs(2 * 3600), 11).unwrap();
    edge_rows(&Connection::open(&db).unwrap());
    let want = oracle(&db);
    // The fixture reaches every bucket, and the edge rows are where they belong.
    let series_of = |name: &str| want.keys().filter(|(n, _)| n == name).count();
    assert!(series_of("newapi_time_to_first_response_seconds_count") > 3);
    let edge: Key = [
        ("model", "gpt-4o"),
        ("channel_id", "1"),
        ("channel_name", "openai-primary"),
        ("group", "default"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert!(want.contains_key(&("newapi_request_duration_seconds_count".into(), edge)));
    assert_matches(&InProcess::new(&db).poll(), &want, "SQLite");
    for server in SERVERS {
        let Some(admin) = admin_dsn(server, test) else {
            continue;
        };
        let t = TestDb::create_with(server, &admin, "latency", true);
        t.copy_from_sqlite(&db, &["logs", "quota_data", "channels", "options"]);
        let samples = InProcess::with_dsn(&t.dsn, None).poll();
        assert_matches(&samples, &want, &format!("{server:?}"));
    }
}
