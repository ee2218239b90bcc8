//! Request outcomes from `perf_metrics` on SQLite, MariaDB and PostgreSQL, with the table as gorm
//! creates it, against hand-computed values; hours that freeze between polls are counted once,
//! and the table's retention cleanup never lowers the counters.

use newapi_exporter::clock::{HOUR, hour_of, unix_now};
use newapi_exporter::collect::plausible::Reason;
use newapi_exporter::db::dsn::DbConfig;
use newapi_exporter::poll::Pipeline;

use crate::common::engines::Server;
use crate::common::*;

/// gorm's `perf_metrics` on MySQL and PostgreSQL.
fn ddl(server: Server) -> Vec<&'static str> {
    match server {
        Server::Mysql => vec![
            "CREATE TABLE `perf_metrics` (`id` bigint AUTO_INCREMENT, `model_name` varchar(128), \
             `channel_id` bigint, `group` varchar(64), `bucket_ts` bigint, \
             `request_count` bigint DEFAULT 0, `success_count` bigint DEFAULT 0, \
             `total_latency_ms` bigint DEFAULT 0, `ttft_sum_ms` bigint DEFAULT 0, \
             `ttft_count` bigint DEFAULT 0, `output_tokens` bigint DEFAULT 0, \
             `generation_ms` bigint DEFAULT 0, PRIMARY KEY (`id`), \
             UNIQUE INDEX `idx_perf_model_channel_group_bucket` (`model_name`, `channel_id`, `group`, `bucket_ts`), \
             INDEX `idx_perf_bucket_ts` (`bucket_ts`))",
        ],
        Server::Postgres => vec![
            "CREATE TABLE \"perf_metrics\" (\"id\" bigserial, \"model_name\" varchar(128), \
             \"channel_id\" bigint, \"group\" varchar(64), \"bucket_ts\" bigint, \
             \"request_count\" bigint DEFAULT 0, \"success_count\" bigint DEFAULT 0, \
             \"total_latency_ms\" bigint DEFAULT 0, \"ttft_sum_ms\" bigint DEFAULT 0, \
             \"ttft_count\" bigint DEFAULT 0, \"output_tokens\" bigint DEFAULT 0, \
             \"generation_ms\" bigint DEFAULT 0, PRIMARY KEY (\"id\"))",
            "CREATE UNIQUE INDEX \"idx_perf_model_channel_group_bucket\" ON \"perf_metrics\" \
             (\"model_name\", \"channel_id\", \"group\", \"bucket_ts\")",
            "CREATE INDEX \"idx_perf_bucket_ts\" ON \"perf_metrics\" (\"bucket_ts\")",
        ],
    }
}

/// (model, channel, group, bucket relative to the current hour, requests, successes, latency ms).
type Bucket = (&'static str, Option<i64>, &'static str, i64, i64, i64, i64);

const BUCKETS: [Bucket; 8] = [
    // Two days ago, per channel and a row from before the channel column (NULL).
    ("gpt-4o", Some(1), "default", -48 * HOUR, 10, 9, 5000),
    ("gpt-4o", None, "default", -48 * HOUR, 5, 5, 1000),
    ("gpt-4o", Some(2), "vip", -5 * HOUR, 4, 1, 8000),
    // Still live: the last hour and the current one.
    ("gpt-4o", Some(1), "default", -HOUR, 3, 2, 900),
    ("claude-3", Some(3), "default", 0, 2, 2, 400),
    // Set aside: a count no gateway writes.
    (
        "gpt-4o",
        Some(4),
        "default",
        -10 * HOUR,
        3_000_000_000,
        0,
        0,
    ),
    // Dated three days ahead: in no real hour yet.
    ("claude-3", Some(3), "default", 72 * HOUR, 100, 100, 100),
    // Before 2020: in none either (relative to hour 0).
    ("claude-3", Some(3), "default", i64::MIN, 7, 7, 7),
];

/// Inserts naming no column (`group` is quoted differently on each engine), ids given.
fn rows(hour: i64) -> Vec<String> {
    BUCKETS
        .iter()
        .enumerate()
        .map(|(i, (model, channel, group, at, req, ok, ms))| {
            let bucket = if *at == i64::MIN { 3600 } else { hour + at };
            let channel = channel.map_or("NULL".to_string(), |c| c.to_string());
            format!(
                "INSERT INTO perf_metrics VALUES ({id}, '{model}', {channel}, '{group}', {bucket}, \
                 {req}, {ok}, {ms}, 0, 0, 0, 0)",
                id = i + 1
            )
        })
        .collect()
}

/// (model, group, successes, failures, latency seconds) worked out by hand from [`BUCKETS`].
const EXPECTED: [(&str, &str, f64, f64, f64); 3] = [
    ("claude-3", "default", 2.0, 0.0, 0.4),
    ("gpt-4o", "default", 16.0, 2.0, 6.9),
    ("gpt-4o", "vip", 1.0, 3.0, 8.0),
];

fn check(samples: &[Sample], expected: &[(&str, &str, f64, f64, f64)], what: &str) {
    let requests = series(samples, "newapi_perf_requests_total");
    let latency = series(samples, "newapi_perf_request_latency_seconds_total");
    let mut want_requests = std::collections::BTreeMap::new();
    let mut want_latency = std::collections::BTreeMap::new();
    for (model, group, ok, failed, secs) in expected {
        for (outcome, n) in [("success", ok), ("failure", failed)] {
            let l = labels(&[("model", model), ("group", group), ("outcome", outcome)]);
            want_requests.insert(l, *n);
        }
        want_latency.insert(labels(&[("model", model), ("group", group)]), *secs);
    }
    assert_eq!(requests, want_requests, "{what}: requests");
    assert_eq!(latency.len(), want_latency.len(), "{what}: latency series");
    for (l, v) in &want_latency {
        let got = latency.get(l).copied().unwrap_or(f64::NAN);
        assert!(
            (got - v).abs() < 1e-9,
            "{what}: latency {l:?}: {got} != {v}"
        );
    }
}

fn pipeline(config: &DbConfig) -> (newapi_exporter::db::Sources, Pipeline) {
    pipeline_on(config, &None)
}

#[test]
fn request_outcomes_are_read_on_every_engine_and_frozen_hours_count_once() {
    let hour = hour_of(unix_now());
    let now = hour + 1800;
    on_every_engine(
        "request_outcomes_are_read_on_every_engine",
        ddl,
        &rows(hour),
        |config, what| {
            let (mut src, mut p) = pipeline(config);
            p.poll(&mut src, now).unwrap();
            check(&scrape_pipeline(&p), &EXPECTED, what);
            assert_eq!(
                p.ctx
                    .rows_rejected
                    .get(&("perf_metrics", Reason::AmountOutOfRange)),
                Some(&1),
                "{what}: the out-of-range row is set aside"
            );
            // Four hours on, the live hours of the first poll are frozen: the same totals.
            p.poll(&mut src, now + 4 * HOUR).unwrap();
            check(&scrape_pipeline(&p), &EXPECTED, &format!("{what}, 4 h on"));
            assert_eq!(
                p.ctx
                    .rows_rejected
                    .get(&("perf_metrics", Reason::AmountOutOfRange)),
                Some(&1),
                "{what}: set aside once"
            );
        },
    );
}

#[test]
fn late_flushes_count_and_the_retention_cleanup_lowers_nothing() {
    use newapi_exporter::demo::gateway::{Gateway, Tables};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let gw = Gateway::create(&db, Tables::NewApiCurrent).unwrap();
    let hour = hour_of(unix_now());
    for r in rows(hour) {
        gw.conn.execute(&r, []).unwrap();
    }
    let (mut src, mut p) = pipeline(&DbConfig::Sqlite(db.clone()));
    let now = hour + 1800;
    p.poll(&mut src, now).unwrap();
    check(&scrape_pipeline(&p), &EXPECTED, "first poll");
    // A node flushes two more requests (one failed) into the last hour, and the retention
    // cleanup deletes everything older than a day.
    gw.conn
        .execute(
            "UPDATE perf_metrics SET request_count = request_count + 2, \
             success_count = success_count + 1, total_latency_ms = total_latency_ms + 600 \
             WHERE model_name = 'gpt-4o' AND bucket_ts = ?1",
            [hour - HOUR],
        )
        .unwrap();
    gw.conn
        .execute(
            "DELETE FROM perf_metrics WHERE bucket_ts < ?1",
            [hour - 24 * HOUR],
        )
        .unwrap();
    p.poll(&mut src, now + 60).unwrap();
    let mut expected = EXPECTED;
    expected[1] = ("gpt-4o", "default", 17.0, 3.0, 7.5);
    check(
        &scrape_pipeline(&p),
        &expected,
        "after a late flush and a cleanup",
    );
    // A fresh exporter sees only what is left: its counters restart lower, as after any
    // restart (the rate of a counter survives that).
    let (mut src, mut fresh) = pipeline(&DbConfig::Sqlite(db));
    fresh.poll(&mut src, now + 60).unwrap();
    let requests = series(&scrape_pipeline(&fresh), "newapi_perf_requests_total");
    let success = labels(&[
        ("model", "gpt-4o"),
        ("group", "default"),
        ("outcome", "success"),
    ]);
    // 9 + 5 two days ago are gone: 3 left (2 + 1 in the last hour).
    assert_eq!(requests.get(&success), Some(&3.0));
}
