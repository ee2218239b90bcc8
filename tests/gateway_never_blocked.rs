//! The gateway keeps writing while the exporter cold-starts on a large database.
//!
//! The writer uses the gateway's settings (rollback journal, 30 s busy timeout). Any error from
//! it, `database is locked` above all, fails the test; its worst insert latency is printed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;
use newapi_exporter::demo::gateway::Tables;
use newapi_exporter::demo::gateway::{Gateway, gateway_connection};

const ROWS: i64 = 1_000_000;

#[test]
fn a_cold_start_on_a_million_rows_never_blocks_the_gateways_writer() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let gw = Gateway::create(&db, Tables::NewApiOlder).unwrap();
    gw.conn
        .execute_batch(&format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS})
             INSERT INTO logs (user_id, created_at, type, model_name, quota, prompt_tokens,
                               completion_tokens, use_time, channel_id, `group`)
             SELECT i % 97, 1767225600 + i, CASE WHEN i % 53 = 0 THEN 5 ELSE 2 END,
                    'model-' || (i % 23), i % 1000, i % 300, i % 200, i % 10, i % 8,
                    CASE i % 3 WHEN 0 THEN 'default' WHEN 1 THEN 'vip' ELSE 'svip' END
             FROM n;"
        ))
        .unwrap();
    let journal: String = gw
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "delete", "the gateway's default rollback journal");
    drop(gw);

    let stop = Arc::new(AtomicBool::new(false));
    let writer_stop = stop.clone();
    let writer_db = db.clone();
    let writer = std::thread::spawn(move || {
        let conn = gateway_connection(&writer_db).unwrap();
        let mut worst = Duration::ZERO;
        let mut inserts = 0u64;
        let mut errors = Vec::new();
        while !writer_stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let r = conn.execute(
                "INSERT INTO logs (user_id, created_at, type, model_name, quota, prompt_tokens,
                                   completion_tokens, channel_id, `group`)
                 VALUES (1, 1767225600, 2, 'live-model', 10, 3, 4, 1, 'default')",
                [],
            );
            worst = worst.max(t.elapsed());
            match r {
                Ok(_) => inserts += 1,
                Err(e) => errors.push(e.to_string()),
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (worst, inserts, errors)
    });

    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let exp = Running::start(&[
        "--sqlite-path",
        db.to_str().unwrap(),
        "--poll-interval",
        "300ms",
    ]);
    exp.wait_ready(Duration::from_secs(120));
    let cold_start = started.elapsed();
    // Keep writing across a few incremental polls.
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let (worst, inserts, errors) = writer.join().unwrap();
    println!(
        "cold start on {ROWS} rows: {cold_start:?}; concurrent writer: {inserts} inserts, worst insert latency {worst:?}"
    );
    assert!(errors.is_empty(), "the writer failed: {errors:?}");
    assert!(inserts > 100, "the writer ran during the cold start");
    assert!(
        worst < Duration::from_secs(2),
        "a writer waited {worst:?}: reads are not short enough"
    );

    // Every live row is counted once the exporter catches up.
    let expected: i64 = gateway_connection(&db)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM logs WHERE type = 2 AND model_name = 'live-model'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let s = exp.scrape();
    let live: f64 = series(&s, "newapi_requests_total")
        .iter()
        .filter(|(l, _)| l["model"] == "live-model")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(live, expected as f64);
}
