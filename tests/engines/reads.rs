//! How the exporter reads MySQL and PostgreSQL: a cold start on both pooled connections at once,
//! and idle polls that leave quota_data's unsettled hours unread until the table is written.

use super::*;
use newapi_exporter::demo::generate::generate;

fn rows_read(samples: &[Sample], table: &str) -> f64 {
    series(samples, "newapi_exporter_rows_read_total")
        .iter()
        .find(|(l, _)| l["table"] == table)
        .map_or(0.0, |(_, v)| *v)
}

/// 20,000 log rows of the current generation, read in chunks of 300 ids: the cold start reads
/// sixteen chunks at a time over two connections, and the newest 10,000 ids one chunk at a time
/// row by row. Every series comes out as SQLite's one-chunk-at-a-time read gives it.
#[test]
fn a_cold_start_in_parallel_chunks_counts_what_a_sequential_read_counts() {
    let test = "a_cold_start_in_parallel_chunks_counts_what_a_sequential_read_counts";
    let dir = tempfile::tempdir().unwrap();
    let sqlite = dir.path().join("generated.db");
    generate(&sqlite, 20_000, 3, Tables::NewApiCurrent).unwrap();
    let expected = gateway_series(&InProcess::with_chunk(&sqlite, 300).poll());
    let requests: f64 = expected
        .iter()
        .filter(|((n, _), _)| n == "newapi_requests_total")
        .map(|(_, v)| v)
        .sum();
    // An independent count of what those series add up to: consume rows less the kinds
    // counted apart (channel tests, settlements, zero-usage rows).
    let conn = rusqlite::Connection::open(&sqlite).unwrap();
    let consume: f64 = conn
        .query_row("SELECT COUNT(*) FROM logs WHERE type = 2", [], |r| r.get(0))
        .unwrap();
    assert!(
        requests > 0.0 && requests <= consume,
        "{requests} of {consume}"
    );
    for server in SERVERS {
        let Some(admin) = admin_dsn(server, test) else {
            continue;
        };
        let db = TestDb::create_with(server, &admin, "lanes", true);
        db.copy_from_sqlite(&sqlite, &["logs", "quota_data", "channels", "options"]);
        let settings = Settings {
            chunk_rows: 300,
            ..Settings::default()
        };
        let got = gateway_series(&InProcess::with_dsn_settings(&db.dsn, None, settings).poll());
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{server:?}: series differ"
        );
        assert_eq!(got, expected, "{server:?}: values differ");
    }
}

/// An idle poll reads no quota_data row: the engine's count of the table's writes stands
/// still. A flush that adds to a row of the current hour (the gateway's UPDATE) shows within
/// a few polls: at once on MySQL, within PostgreSQL's statistics delay there.
#[test]
fn quota_data_is_re_read_only_after_a_write() {
    let test = "quota_data_is_re_read_only_after_a_write";
    let now = unix_now();
    let hour = now - now.rem_euclid(3600);
    for server in SERVERS {
        let Some(admin) = admin_dsn(server, test) else {
            continue;
        };
        let db = TestDb::create(server, &admin, "marker");
        let insert = |user: i64, count: i64| {
            format!(
                "INSERT INTO quota_data (user_id, username, model_name, created_at, token_used, count, quota) \
                 VALUES ({user}, 'u{user}', 'gpt-4o', {hour}, 100, {count}, 1000)"
            )
        };
        db.exec(&[&insert(1, 3), &insert(2, 4)]);
        let mut exp = InProcess::with_dsn(&db.dsn, None);
        let quota_data_requests =
            |s: &[Sample]| -> f64 { series(s, "newapi_quota_data_requests_total").values().sum() };
        let first = exp.poll();
        assert_eq!(quota_data_requests(&first), 7.0, "{server:?}");
        let read_at_start = rows_read(&first, "quota_data");
        assert!(read_at_start >= 2.0, "{server:?}: {read_at_start}");
        // Polls with nothing written read none of the table's rows (on PostgreSQL, once the
        // statistics of the inserts above have arrived).
        let mut idle = exp.poll();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let before = rows_read(&idle, "quota_data");
            std::thread::sleep(Duration::from_millis(300));
            idle = exp.poll();
            if rows_read(&idle, "quota_data") == before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{server:?}: idle polls keep reading quota_data"
            );
        }
        let settled = rows_read(&idle, "quota_data");
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(rows_read(&exp.poll(), "quota_data"), settled, "{server:?}");
        }
        db.exec(&[
            "UPDATE quota_data SET count = count + 5, quota = quota + 500 WHERE user_id = 1",
        ]);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = exp.poll();
            if quota_data_requests(&s) == 12.0 {
                assert!(rows_read(&s, "quota_data") > settled, "{server:?}");
                break;
            }
            assert_eq!(quota_data_requests(&s), 7.0, "{server:?}");
            assert!(
                Instant::now() < deadline,
                "{server:?}: the flush was not seen within 20 s"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}
