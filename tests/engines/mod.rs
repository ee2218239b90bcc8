//! The same gateway data on SQLite, MariaDB/MySQL and PostgreSQL gives the same metrics, the same
//! reconcile report and the same backfill; out-of-order commits and outages on the servers.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::engines::{SERVERS, Server, TestDb, admin_dsn};
use crate::common::proxy::Proxy;
use crate::common::*;
use crate::recording_health::current::build_current;
use newapi_exporter::clock::unix_now;
use newapi_exporter::collect::Settings;
use newapi_exporter::demo::Traffic;
use newapi_exporter::demo::gateway::Tables;
use newapi_exporter::demo::gateway::{Gateway, LogRow};
use serde_json::Value as Json;

const TABLES: [&str; 4] = ["logs", "quota_data", "channels", "options"];

/// Recent traffic from the simulated gateway (with the incident model, task settlements,
/// errors and refunds) plus rows that trip up engines: NULLs, unicode, escapes, negative quota,
/// model names that differ only in case or trailing space. The rows depend only on `now`, so a
/// test that builds the fixture twice passes the same `now` both times; the newest row is two
/// hours before it.
fn fixture(dir: &Path, now: i64) -> std::path::PathBuf {
    let db = dir.join("fixture.db");
    let mut gw = Gateway::create(&db, Tables::NewApiOlder).unwrap();
    gw.set_option("QuotaPerUnit", "500000").unwrap();
    gw.set_option("DataExportInterval", "5").unwrap();
    for (id, ty, name, status, balance) in [
        (1, 1, "openai-primary", 1, 12.5),
        (2, 3, "azure \"east\"", 3, 0.25),
        (3, 14, "anthropic", 2, 99.0),
        (4, 24, "gemini", 1, 7.0),
        (5, 43, "deepseek", 1, 3.5),
        (6, 49, "coze", 1, 1.0),
        (7, 50, "kling", 1, 2.0),
    ] {
        gw.add_channel(id, ty, name, status, balance, 100 * id, "default", "m")
            .unwrap();
    }
    let start = now - now.rem_euclid(3600) - 20 * 3600;
    let mut traffic = Traffic::new(99);
    gw.conn.execute_batch("BEGIN").unwrap();
    // Four days before: rows older than the reconciliation's hours.
    let mut t = start - 4 * 86_400;
    while t < start - 3 * 86_400 {
        let (row, feed) = traffic.request(t);
        gw.record(&row, feed, t).unwrap();
        t += 293;
    }
    gw.flush().unwrap();
    let mut t = start;
    let mut last_flush = t;
    while t < now - 2 * 3600 {
        let (row, feed) = traffic.request(t);
        gw.record(&row, feed, t).unwrap();
        if t - last_flush >= 300 {
            gw.flush().unwrap();
            last_flush = t;
        }
        t += 37;
    }
    gw.flush().unwrap();
    for (model, group, quota) in [
        ("GPT-4o", "vip", 100),
        ("gpt-4o ", "vip", 200),
        ("通义千问-max 🚀", "default", 300),
        ("we\"ird\\mo\ndel", "gr\"oup\\x", 400),
        ("gpt-4o", "default", -2_500),
    ] {
        let row = LogRow {
            user_id: 3,
            username: "user03".into(),
            created_at: start + 3600,
            log_type: 2,
            model_name: model.into(),
            quota,
            prompt_tokens: 5,
            completion_tokens: 6,
            channel_id: 1,
            group: group.into(),
            ..LogRow::default()
        };
        gw.record(&row, false, row.created_at).unwrap();
    }
    gw.conn
        .execute(
            "INSERT INTO logs (user_id, created_at, type, quota, prompt_tokens, completion_tokens)
             VALUES (4, ?1, 2, 10, 1, 1)",
            [start + 7200],
        )
        .unwrap();
    // Amounts that are NULL count as 0 on every engine (PostgreSQL's LEAST and GREATEST skip
    // a NULL instead of returning it), in `logs` and in an old hour of `quota_data`.
    gw.conn
        .execute(
            "INSERT INTO logs (user_id, created_at, type, model_name, quota, prompt_tokens,
             completion_tokens, channel_id, `group`) VALUES (4, ?1, 2, 'gpt-4o', NULL, NULL, 3, 1, 'default')",
            [start + 7300],
        )
        .unwrap();
    gw.conn
        .execute(
            "INSERT INTO quota_data (user_id, username, model_name, created_at, token_used, count, quota)
             VALUES (4, 'user04', 'gpt-4o', ?1, NULL, 1, NULL)",
            [start],
        )
        .unwrap();
    gw.conn.execute_batch("COMMIT").unwrap();
    db
}

/// The gateway series of a scrape (the exporter's own timing metrics left out).
fn gateway_series(samples: &[Sample]) -> BTreeMap<(String, Labels), f64> {
    samples
        .iter()
        .filter(|s| s.name.starts_with("newapi_") && !s.name.starts_with("newapi_exporter_"))
        .map(|s| ((s.name.clone(), s.labels.clone()), s.value))
        .collect()
}

fn exporter(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn report(db_args: &[&str], until: i64) -> Json {
    let until = until.to_string();
    let mut args = vec!["reconcile", "--format", "json", "--until", until.as_str()];
    args.extend_from_slice(db_args);
    let (ok, out, err) = exporter(&args);
    assert!(ok, "reconcile {db_args:?} failed: {err}");
    serde_json::from_str(&out).unwrap()
}

/// The end of the reported range for a fixture built at `now`: after its newest row, and an hour
/// that has settled already, so the report does not change while the test runs.
fn until(now: i64) -> i64 {
    now - now.rem_euclid(3600) - 3600
}

/// The time a fixture is built for. The sliding-window gauges move when an hour settles (10
/// minutes past the hour with the fixture's 5-minute `DataExportInterval` and the default
/// margin); a test that compares scrapes taken a few seconds apart starts clear of that moment.
fn fixture_time() -> i64 {
    loop {
        let now = unix_now();
        let into_hour = now.rem_euclid(3600);
        if !(9 * 60..11 * 60).contains(&into_hour) {
            return now;
        }
        eprintln!("waiting for the hour to settle before building the fixture");
        std::thread::sleep(Duration::from_secs((11 * 60 - into_hour) as u64));
    }
}

#[test]
fn metrics_and_report_are_identical_on_all_three_engines() {
    let test = "metrics_and_report_are_identical_on_all_three_engines";
    let dir = tempfile::tempdir().unwrap();
    let now = fixture_time();
    let sqlite = fixture(dir.path(), now);
    let expected = gateway_series(&InProcess::new(&sqlite).poll());
    assert!(expected.len() > 100, "{} series", expected.len());
    // Distinct byte-wise, even where MySQL's collation folds case and trailing spaces.
    for m in ["GPT-4o", "gpt-4o ", "gpt-4o"] {
        assert!(
            expected
                .keys()
                .any(|(n, l)| n == "newapi_requests_total" && l["model"] == m),
            "{m:?}"
        );
    }
    let until = until(now);
    let expected_report = report(&["--sqlite-path", sqlite.to_str().unwrap()], until);
    assert!(
        expected_report["totals"]["missing"]["quota"]
            .as_i64()
            .unwrap()
            > 0
    );

    for server in SERVERS {
        let Some(admin) = admin_dsn(server, test) else {
            continue;
        };
        let db = TestDb::create(server, &admin, "same");
        db.copy_from_sqlite(&sqlite, &TABLES);
        let got = gateway_series(&InProcess::with_dsn(&db.dsn, None).poll());
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{server:?}: series differ"
        );
        assert_eq!(got, expected, "{server:?}: values differ");
        // Chunks of 7 ids: every id is among the newest 10,000, read row by row one chunk at
        // a time (`engines::reads` has the long reads of many chunks at once).
        let small_chunks = Settings {
            chunk_rows: 7,
            ..Settings::default()
        };
        let got = gateway_series(&InProcess::with_dsn_settings(&db.dsn, None, small_chunks).poll());
        assert_eq!(
            got, expected,
            "{server:?}: values differ when read in parallel chunks"
        );
        let got_report = report(&["--sql-dsn", &db.dsn], until);
        assert_eq!(
            got_report, expected_report,
            "{server:?}: reconcile report differs"
        );
    }
}

#[test]
fn logs_in_a_second_database_through_log_sql_dsn() {
    let test = "logs_in_a_second_database_through_log_sql_dsn";
    let dir = tempfile::tempdir().unwrap();
    let now = fixture_time();
    let sqlite = fixture(dir.path(), now);
    let expected = gateway_series(&InProcess::new(&sqlite).poll());
    let until = until(now);
    let expected_report = report(&["--sqlite-path", sqlite.to_str().unwrap()], until);
    for server in SERVERS {
        let Some(admin) = admin_dsn(server, test) else {
            continue;
        };
        let main = TestDb::create(server, &admin, "main");
        main.copy_from_sqlite(&sqlite, &["quota_data", "channels", "options"]);
        let logs = TestDb::create(server, &admin, "logs");
        logs.copy_from_sqlite(&sqlite, &["logs"]);
        let got = gateway_series(&InProcess::with_dsn(&main.dsn, Some(&logs.dsn)).poll());
        assert_eq!(got, expected, "{server:?}");
        let got_report = report(&["--sql-dsn", &main.dsn, "--log-sql-dsn", &logs.dsn], until);
        assert_eq!(got_report, expected_report, "{server:?}");
    }
}

#[test]
fn backfill_works_the_same_on_mysql_and_postgres() {
    let test = "backfill_works_the_same_on_mysql_and_postgres";
    let dir = tempfile::tempdir().unwrap();
    let now = fixture_time();
    let sqlite = fixture(dir.path(), now);
    let until = until(now);
    let sqlite_args = ["--sqlite-path", sqlite.to_str().unwrap()];
    let before = report(&sqlite_args, until);
    let missing = before["totals"]["missing"]["requests"].as_i64().unwrap();
    assert!(missing > 0);
    let (ok, _, err) = exporter(&[
        "backfill",
        "--apply",
        "--sqlite-path",
        sqlite.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let after_sqlite = report(&sqlite_args, until);
    assert_eq!(
        after_sqlite["totals"]["missing"]["requests"].as_i64(),
        Some(0)
    );

    for server in SERVERS {
        let Some(admin) = admin_dsn(server, test) else {
            continue;
        };
        let db = TestDb::create(server, &admin, "backfill");
        // The fixture as it was before the SQLite backfill.
        let fresh = fixture(&dir.path().join(format!("{server:?}")).tap_mkdir(), now);
        db.copy_from_sqlite(&fresh, &TABLES);
        let args = ["--sql-dsn", db.dsn.as_str()];
        assert_eq!(report(&args, until), before, "{server:?}: before");
        let (ok, out, err) = exporter(&["backfill", "--sql-dsn", &db.dsn]);
        assert!(ok && out.contains("dry run"), "{server:?}: {out}{err}");
        assert_eq!(
            report(&args, until),
            before,
            "{server:?}: a dry run writes nothing"
        );
        let (ok, out, err) = exporter(&["backfill", "--apply", "--sql-dsn", &db.dsn]);
        assert!(ok, "{server:?}: {out}{err}");
        assert!(
            out.contains(&format!("added {missing} requests")),
            "{server:?}: {out}"
        );
        assert_eq!(report(&args, until), after_sqlite, "{server:?}: after");
        let (ok, out, _) = exporter(&["backfill", "--apply", "--sql-dsn", &db.dsn]);
        assert!(ok && out.contains("nothing to write"), "{server:?}: {out}");
    }
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn requests_total(samples: &[Sample]) -> f64 {
    series(samples, "newapi_requests_total").values().sum()
}

/// Two connections insert; the one holding the smaller id commits after a poll has read the
/// larger one. Both rows are counted, each once.
#[test]
fn out_of_order_commits_are_counted_once() {
    use sqlx::{AssertSqlSafe, Connection};
    let test = "out_of_order_commits_are_counted_once";
    for server in SERVERS {
        let Some(admin) = admin_dsn(server, test) else {
            continue;
        };
        let db = TestDb::create(server, &admin, "order");
        let insert = "INSERT INTO logs (user_id, created_at, type, model_name, quota, prompt_tokens, completion_tokens, channel_id) \
                      VALUES (1, 1767225600, 2, 'gpt-4o', 10, 1, 1, 1)";
        db.exec(&[insert, insert]);
        let rt = rt();
        let url = db.url();
        let mut exp = InProcess::with_dsn(&db.dsn, None);
        assert_eq!(requests_total(&exp.poll()), 2.0);
        macro_rules! run {
            ($conn:expr, $sql:expr) => {
                rt.block_on(sqlx::query(AssertSqlSafe($sql)).execute(&mut $conn))
                    .unwrap()
            };
        }
        match server {
            Server::Mysql => {
                let mut a = rt.block_on(sqlx::MySqlConnection::connect(&url)).unwrap();
                let mut b = rt.block_on(sqlx::MySqlConnection::connect(&url)).unwrap();
                run!(a, "BEGIN");
                run!(a, insert); // takes id 3
                run!(b, "BEGIN");
                run!(b, insert); // takes id 4
                run!(b, "COMMIT");
                assert_eq!(requests_total(&exp.poll()), 3.0, "{server:?}: id 4 read");
                run!(a, "COMMIT");
            }
            Server::Postgres => {
                let mut a = rt.block_on(sqlx::PgConnection::connect(&url)).unwrap();
                let mut b = rt.block_on(sqlx::PgConnection::connect(&url)).unwrap();
                run!(a, "BEGIN");
                run!(a, insert);
                run!(b, "BEGIN");
                run!(b, insert);
                run!(b, "COMMIT");
                assert_eq!(requests_total(&exp.poll()), 3.0, "{server:?}: id 4 read");
                run!(a, "COMMIT");
            }
        }
        assert_eq!(
            requests_total(&exp.poll()),
            4.0,
            "{server:?}: late id 3 counted"
        );
        assert_eq!(
            requests_total(&exp.poll()),
            4.0,
            "{server:?}: and only once"
        );
        db.exec(&[insert]);
        assert_eq!(requests_total(&exp.poll()), 5.0, "{server:?}");
    }
}

fn through_proxy(server: Server, dsn: &str, proxy: &Proxy) -> String {
    match server {
        Server::Mysql => {
            let (head, rest) = dsn.split_once("tcp(").unwrap();
            let (_, tail) = rest.split_once(')').unwrap();
            format!("{head}tcp({}){tail}", proxy.addr)
        }
        Server::Postgres => {
            let (scheme, rest) = dsn.split_once("://").unwrap();
            let (auth_host, path) = rest.split_once('/').unwrap();
            let auth = auth_host
                .rsplit_once('@')
                .map(|(a, _)| format!("{a}@"))
                .unwrap_or_default();
            format!("{scheme}://{auth}{}/{path}", proxy.addr)
        }
    }
}

fn server_address(server: Server, dsn: &str) -> String {
    match server {
        Server::Mysql => dsn
            .split_once("tcp(")
            .and_then(|(_, r)| r.split_once(')'))
            .map(|(a, _)| a.to_string())
            .unwrap_or_else(|| "127.0.0.1:3306".into()),
        Server::Postgres => {
            let rest = dsn.split_once("://").unwrap().1;
            let host = rest.split('/').next().unwrap();
            let host = host.rsplit_once('@').map(|(_, h)| h).unwrap_or(host);
            if host.contains(':') {
                host.to_string()
            } else {
                format!("{host}:5432")
            }
        }
    }
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The database goes away (a proxy the test controls is cut) and comes back.
#[test]
fn an_outage_keeps_the_last_state_and_recovers_without_a_restart() {
    let test = "an_outage_keeps_the_last_state_and_recovers_without_a_restart";
    let dir = tempfile::tempdir().unwrap();
    let now = unix_now(); // compares nothing across the hour
    let sqlite = fixture(dir.path(), now);
    for server in SERVERS {
        let Some(admin) = admin_dsn(server, test) else {
            continue;
        };
        let db = TestDb::create(server, &admin, "outage");
        db.copy_from_sqlite(&sqlite, &TABLES);
        let proxy = Proxy::start(&server_address(server, &db.dsn));
        let dsn = through_proxy(server, &db.dsn, &proxy);
        let exp = Running::start(&["--sql-dsn", &dsn, "--poll-interval", "200ms"]);
        exp.wait_ready(Duration::from_secs(30));
        let up = |s: &[Sample]| series(s, "newapi_up").values().next().copied();
        let before = exp.scrape();
        assert_eq!(up(&before), Some(1.0));
        let usage = gateway_series(&before);
        exp.stderr_lines();

        proxy.cut();
        wait_until("newapi_up is 0", || up(&exp.scrape()) == Some(0.0));
        std::thread::sleep(Duration::from_secs(2)); // several failed polls
        let during = exp.scrape();
        let mut still = gateway_series(&during);
        still.retain(|(n, _), _| n != "newapi_up");
        let mut was = usage.clone();
        was.retain(|(n, _), _| n != "newapi_up");
        assert_eq!(still, was, "{server:?}: the last state keeps being served");
        let (_, page) = exp.get("/");
        assert!(page.contains("failed"), "{server:?}: {page}");
        assert!(
            !page.contains(&admin) || !admin.contains(':'),
            "no password on the page"
        );

        proxy.restore();
        wait_until("newapi_up is 1 again", || up(&exp.scrape()) == Some(1.0));
        let lines = exp.stderr_lines();
        let errors: Vec<&String> = lines.iter().filter(|l| l.contains("ERROR")).collect();
        assert_eq!(
            errors.len(),
            1,
            "{server:?}: one error per outage: {lines:#?}"
        );
        assert!(
            !lines.iter().any(|l| l.contains("WARN")),
            "{server:?}: no noise per poll: {lines:#?}"
        );
        assert!(errors[0].contains("poll failed"), "{}", errors[0]);
        let before_total = requests_total(&before);
        db.exec(&["INSERT INTO logs (user_id, created_at, type, model_name, quota, prompt_tokens, completion_tokens, channel_id) \
                   VALUES (1, 1767225600, 2, 'after-outage', 10, 1, 1, 1)"]);
        wait_until("the new row is counted", || {
            requests_total(&exp.scrape()) == before_total + 1.0
        });
    }
}

mod generations_and_writes;
mod reads;
