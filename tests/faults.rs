//! Faults an operator meets: shutdown signals, a database file replaced under the exporter,
//! and the gateway's log retention deleting old rows.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use newapi_exporter::demo;
use rusqlite::Connection;

#[test]
fn sigterm_stops_within_a_second_even_during_a_cold_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let gw = newapi_exporter::demo::gateway::Gateway::create(
        &db,
        newapi_exporter::demo::gateway::Tables::NewApiOlder,
    )
    .unwrap();
    gw.conn
        .execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000)
             INSERT INTO logs (user_id, created_at, type, model_name, quota, prompt_tokens, completion_tokens, channel_id)
             SELECT i % 50, 1767225600 + i, 2, 'm' || (i % 9), 10, 1, 1, i % 4 FROM n;",
        )
        .unwrap();
    drop(gw);

    // Idle, after the first read.
    let mut exp = Running::start(&["--sqlite-path", db.to_str().unwrap()]);
    exp.wait_ready(Duration::from_secs(60));
    let (took, status) = exp.sigterm();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");

    // In the middle of the cold start, with small chunks so that it lasts.
    let mut exp = Running::start(&[
        "--sqlite-path",
        db.to_str().unwrap(),
        "--db.chunk-rows",
        "500",
    ]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(exp.get("/-/ready").0, 503, "still reading");
    let (took, status) = exp.sigterm();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

fn consume_count(db: &Path) -> f64 {
    Connection::open(db)
        .unwrap()
        .query_row(
            &format!("SELECT count(*) FROM logs WHERE {BILLED_REQUEST}"),
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap() as f64
}

fn requests(samples: &[Sample]) -> f64 {
    series(samples, "newapi_requests_total").values().sum()
}

#[test]
fn a_replaced_database_file_is_noticed_and_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    demo::create(&db, Duration::from_secs(12 * 3600), 1).unwrap();
    let exp = Running::start(&[
        "--sqlite-path",
        db.to_str().unwrap(),
        "--poll-interval",
        "200ms",
    ]);
    exp.wait_ready(Duration::from_secs(30));
    assert_eq!(requests(&exp.scrape()), consume_count(&db));

    // A restored backup: another file moved over the path.
    let other = dir.path().join("restored.db");
    demo::create(&other, Duration::from_secs(3 * 3600), 2).unwrap();
    let expected = consume_count(&other);
    std::fs::rename(&other, &db).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while requests(&exp.scrape()) != expected {
        assert!(
            Instant::now() < deadline,
            "the replaced file was not read again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let warned = exp
        .stderr_lines()
        .iter()
        .any(|l| l.contains("was replaced"));
    assert!(warned, "the replacement is logged");
}

#[test]
fn deleting_old_logs_never_lowers_the_counters() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    demo::create(&db, Duration::from_secs(12 * 3600), 3).unwrap();
    let mut exp = InProcess::new(&db);
    let before = requests(&exp.poll());
    assert_eq!(before, consume_count(&db));
    let conn = Connection::open(&db).unwrap();
    let cutoff: i64 = conn
        .query_row("SELECT MIN(created_at) + 6 * 3600 FROM logs", [], |r| {
            r.get(0)
        })
        .unwrap();
    // The gateway's "delete old logs" action, then new traffic.
    let deleted = conn
        .execute("DELETE FROM logs WHERE created_at < ?1", [cutoff])
        .unwrap();
    assert!(deleted > 100);
    for _ in 0..7 {
        conn.execute(
            "INSERT INTO logs (user_id, created_at, type, model_name, quota, prompt_tokens, completion_tokens, channel_id)
             VALUES (1, 1767225600, 2, 'gpt-4o', 5, 1, 1, 1)",
            [],
        )
        .unwrap();
    }
    let after = requests(&exp.poll());
    assert_eq!(
        after,
        before + 7.0,
        "old rows stay counted; new ones are added"
    );
    assert!(after > consume_count(&db));
}

/// Each collector's run is counted apart: a table that disappears under the exporter fails its
/// own collector (success 0) while the others keep succeeding, and `newapi_up` says the poll
/// failed.
#[test]
fn a_failing_collector_is_named_by_its_success_gauge() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    demo::create(&db, Duration::from_secs(3 * 3600), 1).unwrap();
    let mut exp = InProcess::new(&db);
    let samples = exp.poll();
    let by_collector = |s: &[Sample], name: &str| -> Vec<(String, f64)> {
        series(s, name)
            .into_iter()
            .map(|(l, v)| (l["collector"].clone(), v))
            .collect()
    };
    let success = |s: &[Sample]| by_collector(s, "newapi_exporter_collector_success");
    let expected: Vec<(String, f64)> = [
        "channels",
        "ledger",
        "logs",
        "nodes",
        "options",
        "perf_metrics",
        "quota_data",
        "reconcile",
        "tasks",
        "users",
    ]
    .iter()
    .map(|c| (c.to_string(), 1.0))
    .collect();
    assert_eq!(success(&samples), expected);
    let durations = by_collector(&samples, "newapi_exporter_collector_duration_seconds");
    assert_eq!(durations.len(), 10);
    assert!(
        durations
            .iter()
            .all(|(_, secs)| *secs >= 0.0 && *secs < 30.0)
    );

    Connection::open(&db)
        .unwrap()
        .execute_batch("DROP TABLE channels")
        .unwrap();
    let samples = exp.poll();
    let failed: Vec<String> = success(&samples)
        .into_iter()
        .filter(|(_, v)| *v == 0.0)
        .map(|(c, _)| c)
        .collect();
    // Both collectors that read the table say so; the others keep serving.
    assert_eq!(failed, ["channels", "ledger"]);
    assert_eq!(series(&samples, "newapi_up")[&labels(&[])], 0.0);
}

fn usage_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with("newapi_requests_total") || l.starts_with("newapi_quota_total"))
        .map(String::from)
        .collect()
}

fn wait_for(exp: &Running, what: &str, mut ok: impl FnMut(&Running) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok(exp) {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn up(exp: &Running) -> f64 {
    series(&parse_metrics(&exp.get("/metrics").1), "newapi_up")[&labels(&[])]
}

/// A database file moved away, then replaced by an unreadable file: the last values stay with
/// `newapi_up 0`, `/-/ready` says why, the log says what happened; the file back in place is
/// read again, and its counters carry on.
#[test]
fn a_vanished_or_unreadable_file_keeps_the_last_values() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    demo::create(&db, Duration::from_secs(3 * 3600), 4).unwrap();
    let exp = Running::start(&[
        "--sqlite-path",
        db.to_str().unwrap(),
        "--poll-interval",
        "200ms",
    ]);
    exp.wait_ready(Duration::from_secs(30));
    let before = usage_lines(&exp.get("/metrics").1);
    assert!(before.len() > 10);

    let away = dir.path().join("moved.db");
    std::fs::rename(&db, &away).unwrap();
    wait_for(&exp, "newapi_up turns 0", |e| up(e) == 0.0);
    assert_eq!(
        usage_lines(&exp.get("/metrics").1),
        before,
        "the last values stay"
    );
    let (status, body) = exp.get("/-/ready");
    assert_eq!(status, 503);
    assert!(body.contains("is gone"), "{body}");
    assert!(
        exp.stderr_lines().iter().any(|l| l.contains("is gone")),
        "the log says what happened"
    );
    assert!(
        !exp.stderr_lines()
            .iter()
            .any(|l| l.contains("was replaced"))
    );

    // An unreadable file in its place: still the last values.
    std::fs::write(&db, b"this is not a database").unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(up(&exp), 0.0);
    assert_eq!(usage_lines(&exp.get("/metrics").1), before);

    // The original file back: read again, and the counters carry on from where they were.
    std::fs::rename(&away, &db).unwrap();
    wait_for(&exp, "newapi_up turns 1", |e| up(e) == 1.0);
    assert_eq!(exp.get("/-/ready").0, 200);
    assert_eq!(usage_lines(&exp.get("/metrics").1), before);
}

/// Ids given out again: every row is counted once. The table purged and written to again
/// before the next poll; the newest row deleted and its id reused; ids of zero and below.
#[test]
fn rows_are_counted_once_when_ids_are_reused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    demo::create(&db, Duration::from_secs(2 * 3600), 6).unwrap();
    let conn = Connection::open(&db).unwrap();
    let insert = |id: Option<i64>, created_at: i64| {
        conn.execute(
            "INSERT INTO logs (id, user_id, created_at, type, model_name, quota, prompt_tokens, completion_tokens, channel_id)
             VALUES (?1, 1, ?2, 2, 'gpt-4o', 5, 1, 1, 1)",
            rusqlite::params![id, created_at],
        )
        .unwrap();
    };
    let now = newapi_exporter::clock::unix_now();
    // An import's ids of zero and below count like any other.
    insert(Some(0), now - 7200);
    insert(Some(-5), now - 7200);
    let mut exp = InProcess::new(&db);
    let mut counted = requests(&exp.poll());
    assert_eq!(
        counted,
        consume_count(&db),
        "ids of zero and below are counted"
    );

    // The newest row deleted, and its id given out again to a new row.
    let newest: i64 = conn
        .query_row("SELECT MAX(id) FROM logs", [], |r| r.get(0))
        .unwrap();
    conn.execute("DELETE FROM logs WHERE id = ?1", [newest])
        .unwrap();
    insert(None, now + 1);
    let reused: i64 = conn
        .query_row("SELECT MAX(id) FROM logs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(reused, newest, "SQLite gives the id out again");
    let after = requests(&exp.poll());
    assert_eq!(
        after,
        counted + 1.0,
        "the row with the reused id is counted"
    );
    counted = after;

    // Purged, and written to again before the next poll: the new rows count, once.
    conn.execute("DELETE FROM logs", []).unwrap();
    for i in 0..4 {
        insert(None, now + 2 + i);
    }
    let after = requests(&exp.poll());
    assert_eq!(
        after,
        counted + 4.0,
        "rows written after a purge are counted"
    );
    assert_eq!(requests(&exp.poll()), counted + 4.0, "and only once");
    counted += 4.0;

    // Purged and left empty, then written to.
    conn.execute("DELETE FROM logs", []).unwrap();
    assert_eq!(requests(&exp.poll()), counted);
    insert(None, now + 10);
    assert_eq!(requests(&exp.poll()), counted + 1.0);
}

/// `check` runs SQLite's quick_check on the tables it reads and fails on a damaged one.
#[test]
fn check_fails_on_a_damaged_logs_table() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    demo::create(&db, Duration::from_secs(3 * 3600), 8).unwrap();
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
            .args(["check", "--sqlite-path", db.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = check();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("integrity: ok"));
    // Garbage over the first page of the logs table's b-tree.
    let (root, page_size): (i64, i64) = {
        let conn = Connection::open(&db).unwrap();
        (
            conn.query_row(
                "SELECT rootpage FROM sqlite_master WHERE name = 'logs'",
                [],
                |r| r.get(0),
            )
            .unwrap(),
            conn.query_row("PRAGMA page_size", [], |r| r.get(0))
                .unwrap(),
        )
    };
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
        f.seek(SeekFrom::Start(((root - 1) * page_size) as u64))
            .unwrap();
        f.write_all(&[0xA5; 64]).unwrap();
    }
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a damaged database passed the check");
    assert!(err.contains("is damaged") && err.contains("logs"), "{err}");
}

/// A hot journal left by a writer that crashed mid-transaction: a message that says what it is
/// and what to do, not "readonly database".
#[test]
fn a_hot_journal_gets_its_own_message() {
    if !require_tool("sqlite3", "a_hot_journal_gets_its_own_message") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    demo::create(&db, Duration::from_secs(3 * 3600), 9).unwrap();
    // A writer that spills its transaction to the journal, then is killed.
    let mut writer = Command::new("sqlite3")
        .arg(&db)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = writer.stdin.as_mut().unwrap();
        stdin
            .write_all(b"PRAGMA cache_size=1;\nBEGIN;\nUPDATE logs SET quota = quota + 1;\n")
            .unwrap();
        stdin.flush().unwrap();
    }
    let journal = dir.path().join("one-api.db-journal");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&journal).map(|m| m.len()).unwrap_or(0) < 4096 {
        assert!(Instant::now() < deadline, "no journal was written");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    writer.kill().unwrap();
    writer.wait().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["check", "--sqlite-path", db.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("hot journal"), "{err}");
    assert!(!err.contains("readonly database"), "{err}");
}
