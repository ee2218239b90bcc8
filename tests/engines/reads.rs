//! How the exporter reads MySQL and PostgreSQL: a cold start on both pooled connections at once,
//! and idle polls that leave quota_data's unsettled hours unread until the table is written.

use super::*;
use newapi_exporter::demo::generate::generate;

/// 20,000 log rows of the current generation over two days, read in chunks of 300 ids: the
/// cold start reads sixteen chunks at a time over two connections (those of the first day with
/// the statement for rows before the reconciliation's hours, the chunks that reach the hours
/// again in full), and the newest 10,000 ids one chunk at a time row by row. Every series comes
/// out as SQLite's read of four chunks with the full statement gives it.
#[test]
fn a_cold_start_in_parallel_chunks_counts_what_a_sequential_read_counts() {
    let test = "a_cold_start_in_parallel_chunks_counts_what_a_sequential_read_counts";
    let dir = tempfile::tempdir().unwrap();
    fixture_time();
    let sqlite = dir.path().join("generated.db");
    generate(&sqlite, 20_000, 2, Tables::NewApiCurrent).unwrap();
    let expected = gateway_series(&InProcess::new(&sqlite).poll());
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
        let differ: Vec<_> = got
            .iter()
            .filter(|(k, v)| expected.get(*k) != Some(*v))
            .map(|(k, v)| (k, v, expected.get(k)))
            .collect();
        assert!(differ.is_empty(), "{server:?}: values differ: {differ:?}");
    }
}

/// The engines' own count of a table's writes: it stands still while nothing is written and
/// moves after a write (on PostgreSQL once the writer's statistics arrive, within seconds).
#[test]
fn the_change_marker_moves_with_a_write_and_only_then() {
    use newapi_exporter::db::dsn::DbConfig;
    let test = "the_change_marker_moves_with_a_write_and_only_then";
    let now = unix_now();
    let hour = now - now.rem_euclid(3600);
    for server in SERVERS {
        let Some(admin) = admin_dsn(server, test) else {
            continue;
        };
        let db = TestDb::create(server, &admin, "marker");
        db.exec(&[&format!(
            "INSERT INTO quota_data (user_id, username, model_name, created_at, token_used, count, quota) \
             VALUES (1, 'u1', 'gpt-4o', {hour}, 100, 3, 1000)"
        )]);
        let cfg = DbConfig::from_dsn(Some(&db.dsn), Path::new("unused.db")).unwrap();
        let mut conn = newapi_exporter::db::connect(&cfg).unwrap();
        let mut marker = || conn.change_marker("quota_data").unwrap();
        // Settled: two readings a second and a half apart agree (MySQL does not vouch for the
        // second of a write; PostgreSQL's counts of the insert arrive).
        let deadline = Instant::now() + Duration::from_secs(30);
        let settled = loop {
            let a = marker();
            std::thread::sleep(Duration::from_millis(1500));
            if let Some(m) = a.clone()
                && marker() == a
            {
                break m;
            }
            assert!(
                Instant::now() < deadline,
                "{server:?}: the marker never settles"
            );
        };
        std::thread::sleep(Duration::from_millis(1200));
        assert_eq!(
            marker(),
            Some(settled.clone()),
            "{server:?}: moved without a write"
        );
        db.exec(&["UPDATE quota_data SET count = count + 1 WHERE user_id = 1"]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match marker() {
                Some(m) if m != settled => break,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "{server:?}: the marker did not move after a write"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// A database that counts the statements run on it, and whose change marker the test sets.
struct Counting {
    inner: Box<dyn newapi_exporter::db::Database>,
    statements: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    marker: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl newapi_exporter::db::Database for Counting {
    fn dialect(&self) -> newapi_exporter::db::Dialect {
        self.inner.dialect()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn table_columns(&mut self, table: &str) -> anyhow::Result<Option<Vec<String>>> {
        self.inner.table_columns(table)
    }
    fn query(
        &mut self,
        sql: &str,
        params: &[newapi_exporter::db::Value],
    ) -> anyhow::Result<Vec<newapi_exporter::db::Row>> {
        self.statements.lock().unwrap().push(sql.to_string());
        self.inner.query(sql, params)
    }
    fn change_marker(&mut self, _table: &str) -> anyhow::Result<Option<String>> {
        Ok(self.marker.lock().unwrap().clone())
    }
    fn upsert_all(
        &mut self,
        sql: &newapi_exporter::db::UpsertSql,
        items: &[newapi_exporter::db::Upsert],
    ) -> anyhow::Result<Vec<usize>> {
        self.inner.upsert_all(sql, items)
    }
}

/// While the change marker stands, a poll runs no statement over quota_data's open hours (only
/// the look at its newest id); when it moves, the hours are read again and a flush shows. The
/// statements are counted on a SQLite gateway that reports a marker the test controls.
#[test]
fn quota_data_is_read_again_only_when_the_change_marker_moves() {
    use newapi_exporter::poll::Poller;
    use std::sync::{Arc, Mutex, atomic::AtomicBool};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    let gw = Gateway::create(&path, Tables::NewApiOlder).unwrap();
    let now = unix_now();
    let hour = now - now.rem_euclid(3600);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(&format!(
        "INSERT INTO quota_data (user_id, username, model_name, created_at, token_used, count, quota) \
         VALUES (1, 'u1', 'gpt-4o', {hour}, 100, 3, 1000), (2, 'u2', 'gpt-4o', {hour}, 100, 4, 1000);"
    ))
    .unwrap();
    drop(gw);
    let statements = Arc::new(Mutex::new(Vec::<String>::new()));
    let marker = Arc::new(Mutex::new(Some("1".to_string())));
    let (s, m, p) = (statements.clone(), marker.clone(), path.clone());
    let connector: newapi_exporter::poll::Connector = Box::new(move || {
        let inner = Box::new(newapi_exporter::db::sqlite::SqliteDb::open(&p)?);
        Ok(newapi_exporter::db::Sources::new(
            Box::new(Counting {
                inner,
                statements: s.clone(),
                marker: m.clone(),
            }),
            None,
        ))
    });
    let mut poller = Poller::new(
        connector,
        path.display().to_string(),
        Settings::default(),
        Arc::new(AtomicBool::new(false)),
    );
    let shared = newapi_exporter::snapshot::Shared::default();
    let mut poll = || {
        statements.lock().unwrap().clear();
        poller.poll_once(&shared);
        let samples = parse_metrics(&shared.snapshot().text);
        let read: Vec<String> = statements
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.contains("FROM quota_data") && !s.starts_with("SELECT MAX("))
            .cloned()
            .collect();
        let requests: f64 = series(&samples, "newapi_quota_data_requests_total")
            .values()
            .sum();
        (requests, read)
    };
    let (requests, read) = poll();
    assert_eq!(requests, 7.0);
    assert!(!read.is_empty());
    for _ in 0..3 {
        let (requests, read) = poll();
        assert_eq!(requests, 7.0);
        assert_eq!(read, Vec::<String>::new(), "an idle poll read quota_data");
    }
    // A node's flush the marker does not show yet stays unread; once it shows, it is read.
    conn.execute(
        "UPDATE quota_data SET count = count + 5 WHERE user_id = 1",
        [],
    )
    .unwrap();
    assert_eq!(poll().0, 7.0);
    *marker.lock().unwrap() = Some("2".to_string());
    let (requests, read) = poll();
    assert_eq!(requests, 12.0);
    assert!(!read.is_empty());
    // An engine that cannot tell reads the open hours at every poll.
    *marker.lock().unwrap() = None;
    assert!(!poll().1.is_empty());
    assert!(!poll().1.is_empty());
}
