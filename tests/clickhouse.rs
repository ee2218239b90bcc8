//! `logs` in ClickHouse (`LOG_SQL_DSN`), against a real server: the same figures as the same
//! rows in SQLite, every row counted once although rows arrive out of `created_at` order, a
//! TTL that drops old partitions never lowers a counter, every DSN form the gateway accepts,
//! and each statement the exporter sends also runs on a current ClickHouse (chdb).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use newapi_exporter::clock::{HOUR, unix_now};
use newapi_exporter::db::dsn::DbConfig;
use newapi_exporter::demo::gateway::CLICKHOUSE_LOGS_DDL as LOGS_DDL;
use newapi_exporter::poll::Pipeline;
use rusqlite::Connection;

use crate::common::*;

/// The columns copied from the gateway's SQLite `logs` (all of the DDL's but `id`).
const COLUMNS: &str = "user_id, created_at, type, content, username, token_name, model_name, \
    quota, prompt_tokens, completion_tokens, use_time, is_stream, channel_id, token_id, `group`, \
    ip, request_id, upstream_request_id, other";

/// The server's HTTP address, or `None` (a skip, never in CI).
fn server(test: &str) -> Option<String> {
    match std::env::var("NEWAPI_TEST_CLICKHOUSE_URL") {
        Ok(url) if !url.is_empty() => Some(url.trim_end_matches('/').to_string()),
        _ if in_ci() => panic!("NEWAPI_TEST_CLICKHOUSE_URL is required in CI (test {test})"),
        _ => {
            eprintln!("SKIP {test}: NEWAPI_TEST_CLICKHOUSE_URL is not set (.ci/run starts one)");
            None
        }
    }
}

/// A database of its own on the server, dropped at the end.
struct Ch {
    url: String,
    db: String,
}

impl Ch {
    fn create(url: &str, tag: &str) -> Ch {
        let db = format!("newapi_{tag}_{}", std::process::id());
        let ch = Ch {
            url: url.to_string(),
            db,
        };
        ch.exec(&format!("DROP DATABASE IF EXISTS {}", ch.db));
        ch.exec(&format!("CREATE DATABASE {}", ch.db));
        ch.exec_in(LOGS_DDL);
        ch
    }

    fn post(&self, database: Option<&str>, sql: &str) -> String {
        let url = match database {
            Some(db) => format!("{}/?database={db}", self.url),
            None => format!("{}/", self.url),
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent();
        let mut resp = agent.post(&url).send(sql).expect("ClickHouse answers");
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_string().unwrap();
        assert_eq!(status, 200, "{sql}: {body}");
        body
    }

    fn exec(&self, sql: &str) -> String {
        self.post(None, sql)
    }

    fn exec_in(&self, sql: &str) -> String {
        self.post(Some(&self.db), sql)
    }

    /// One integer from a query over the test's database.
    fn int(&self, sql: &str) -> i64 {
        self.exec_in(sql).trim().parse().unwrap()
    }

    fn dsn(&self) -> String {
        format!("{}/{}", self.url, self.db)
    }

    /// Copies the SQLite database's log rows; `id` stays 0 as the gateway leaves it.
    fn copy_logs(&self, sqlite: &Path, filter: &str) {
        let conn = Connection::open(sqlite).unwrap();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM logs WHERE {filter} ORDER BY id"
            ))
            .unwrap();
        let width = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        let mut values = Vec::new();
        while let Some(r) = rows.next().unwrap() {
            let cells: Vec<String> = (0..width)
                .map(|i| match r.get_ref(i).unwrap() {
                    rusqlite::types::ValueRef::Null => "DEFAULT".to_string(),
                    rusqlite::types::ValueRef::Integer(n) => n.to_string(),
                    rusqlite::types::ValueRef::Real(f) => f.to_string(),
                    rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                        literal(&String::from_utf8_lossy(t))
                    }
                })
                .collect();
            values.push(format!("({})", cells.join(", ")));
        }
        for batch in values.chunks(2000) {
            self.insert(&batch.join(", "));
        }
    }

    fn insert(&self, values: &str) {
        self.exec_in(&format!("INSERT INTO logs ({COLUMNS}) VALUES {values}"));
    }
}

impl Drop for Ch {
    fn drop(&mut self) {
        let _ =
            std::panic::catch_unwind(|| self.exec(&format!("DROP DATABASE IF EXISTS {}", self.db)));
    }
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A consume row as the gateway writes it to ClickHouse.
fn consume(model: &str, created_at: i64, quota: i64, request_id: &str) -> String {
    format!(
        "(7, {created_at}, 2, '', 'user07', 'key', '{model}', {quota}, 10, 5, 1, 0, 1, 1001, \
         'default', '', '{request_id}', '', '')"
    )
}

fn pipeline(sqlite: &Path, log_dsn: Option<&str>) -> (newapi_exporter::db::Sources, Pipeline) {
    let main = DbConfig::Sqlite(sqlite.to_path_buf());
    let logs = log_dsn.map(|d| DbConfig::from_dsn(Some(d), Path::new("unused.db")).unwrap());
    pipeline_on(&main, &logs)
}

fn scrape(p: &Pipeline) -> Vec<Sample> {
    scrape_pipeline(p)
}

/// The gateway's series (not the exporter's own health, nor the ledger comparison, which
/// needs log ids and is absent with logs in ClickHouse).
fn gateway_series(samples: &[Sample]) -> Vec<Sample> {
    let mut out: Vec<Sample> = samples
        .iter()
        .filter(|s| {
            !s.name.starts_with("newapi_exporter_") && !s.name.starts_with("newapi_ledger_")
        })
        .cloned()
        .collect();
    out.sort_by(|a, b| (&a.name, &a.labels).cmp(&(&b.name, &b.labels)));
    out
}

#[test]
fn logs_in_clickhouse_give_the_same_figures_as_in_sqlite() {
    let Some(url) = server("logs_in_clickhouse_give_the_same_figures_as_in_sqlite") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    newapi_exporter::demo::create(&db, Duration::from_secs(30 * HOUR as u64), 11).unwrap();
    let ch = Ch::create(&url, "same");
    ch.copy_logs(&db, "1 = 1");
    let count = |condition: &str| -> i64 {
        Connection::open(&db)
            .unwrap()
            .query_row(
                &format!("SELECT count(*) FROM logs WHERE {condition}"),
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!(
        ch.int("SELECT count() FROM logs WHERE type = 2"),
        count("type = 2")
    );
    let oracle = count(BILLED_REQUEST);

    let now = unix_now();
    let (mut sq_src, mut sq) = pipeline(&db, None);
    let (mut ch_src, mut chp) = pipeline(&db, Some(&ch.dsn()));
    sq.poll(&mut sq_src, now).unwrap();
    chp.poll(&mut ch_src, now).unwrap();
    let expected = gateway_series(&scrape(&sq));
    let total: f64 = series(&expected, "newapi_requests_total").values().sum();
    assert_eq!(total, oracle as f64);
    assert_eq!(gateway_series(&scrape(&chp)), expected);

    // The open hours settle as time passes: nothing is counted twice or lost.
    for later in [HOUR, 2 * HOUR, 5 * HOUR] {
        sq.poll(&mut sq_src, now + later).unwrap();
        chp.poll(&mut ch_src, now + later).unwrap();
        assert_eq!(
            gateway_series(&scrape(&chp)),
            gateway_series(&scrape(&sq)),
            "{later} s later"
        );
    }
    // Windows of the ledger comparison completed on SQLite; with logs in ClickHouse (no ids to
    // read between two readings) it is absent, as documented.
    let ledger = |p: &Pipeline| {
        scrape(p)
            .iter()
            .filter(|s| s.name == "newapi_ledger_window_end_timestamp_seconds")
            .count()
    };
    assert_eq!((ledger(&sq), ledger(&chp)), (1, 0));

    // `reconcile` prints the same report either way.
    let one_shot = |args: &[&str], log_dsn: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"));
        cmd.args(args)
            .arg("--until")
            .arg(((now / HOUR) * HOUR).to_string())
            .arg("--sqlite-path")
            .arg(&db)
            .env_remove("SQL_DSN")
            .env_remove("LOG_SQL_DSN");
        if let Some(d) = log_dsn {
            cmd.args(["--log-sql-dsn", d]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let reconcile = ["reconcile", "--format", "json"];
    let from_sqlite = one_shot(&reconcile, None);
    assert!(from_sqlite.contains("\"missing\""));
    assert_eq!(one_shot(&reconcile, Some(&ch.dsn())), from_sqlite);
    // `backfill` plans the same additions (a dry run).
    let planned = one_shot(&["backfill"], None);
    assert!(planned.contains("dry run: would add"), "{planned}");
    assert_eq!(one_shot(&["backfill"], Some(&ch.dsn())), planned);

    // The landing page names the same channel and figures.
    let landing = |log_dsn: Option<&str>| {
        let mut args = vec!["--sqlite-path", db.to_str().unwrap()];
        if let Some(d) = log_dsn {
            args.extend(["--log-sql-dsn", d]);
        }
        let exp = Running::start(&args);
        exp.wait_ready(Duration::from_secs(60));
        let page = exp.get("/").1;
        let start = page
            .find("<h2>Recording health")
            .expect("recording health section");
        let end = page[start..]
            .find("</table>")
            .map_or(page.len(), |e| start + e);
        page[start..end].to_string()
    };
    let section = landing(None);
    assert!(section.contains("missing on channel"), "{section}");
    assert_eq!(landing(Some(&ch.dsn())), section);
}

#[test]
fn rows_arriving_out_of_order_are_counted_once_and_a_ttl_never_lowers_a_counter() {
    let Some(url) = server("rows_arriving_out_of_order_are_counted_once") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    newapi_exporter::demo::create(&db, Duration::from_secs(6 * HOUR as u64), 12).unwrap();
    let ch = Ch::create(&url, "late");
    ch.copy_logs(&db, "1 = 1");
    let now = unix_now();
    // Rows of an old month, which a TTL will drop.
    let old = 1_790_000_000; // 2026-09-21
    ch.insert(
        &[1, 2, 3]
            .map(|i| consume("late-model", old + i, 100, &format!("old{i}")))
            .join(", "),
    );
    let (mut src, mut p) = pipeline(&db, Some(&ch.dsn()));
    p.poll(&mut src, now).unwrap();
    let count = |m: &str| {
        ch.int(&format!(
            "SELECT count() FROM logs WHERE type = 2 AND model_name = '{m}'"
        ))
    };
    assert_eq!(model_requests(&scrape(&p), "late-model"), 3.0);

    // Nodes insert rows dated a little in the past, older than rows already read.
    ch.insert(
        &[
            consume("late-model", now - 20 * 60, 100, "late1"),
            consume("late-model", now - 59 * 60, 100, "late2"),
            consume("late-model", now - 5, 100, "late3"),
        ]
        .join(", "),
    );
    for poll in 0..3 {
        p.poll(&mut src, now + 10 * poll).unwrap();
        assert_eq!(
            model_requests(&scrape(&p), "late-model"),
            count("late-model") as f64
        );
    }
    assert_eq!(count("late-model"), 6);
    // Later, once their hours settled, the same rows are still counted once.
    p.poll(&mut src, now + 3 * HOUR).unwrap();
    assert_eq!(model_requests(&scrape(&p), "late-model"), 6.0);

    // A row later than the open hours is not counted until a restart (documented).
    ch.insert(&consume("late-model", now - 4 * HOUR, 100, "too-late"));
    p.poll(&mut src, now + 3 * HOUR + 10).unwrap();
    assert_eq!(model_requests(&scrape(&p), "late-model"), 6.0);

    // The TTL drops the old month's partition: the counters keep what they counted.
    let before = gateway_series(&scrape(&p));
    ch.exec_in("ALTER TABLE logs DROP PARTITION 202609");
    assert_eq!(count("late-model"), 4);
    p.poll(&mut src, now + 3 * HOUR + 20).unwrap();
    let after = scrape(&p);
    assert_eq!(model_requests(&after, "late-model"), 6.0);
    for s in before.iter().filter(|s| s.name.ends_with("_total")) {
        let now_value = after
            .iter()
            .find(|a| a.name == s.name && a.labels == s.labels)
            .map_or(0.0, |a| a.value);
        assert!(now_value >= s.value, "{} {:?} went down", s.name, s.labels);
    }

    // A restarted exporter reads what is there now, the late row included.
    let (mut src, mut p) = pipeline(&db, Some(&ch.dsn()));
    p.poll(&mut src, now + 3 * HOUR + 30).unwrap();
    assert_eq!(model_requests(&scrape(&p), "late-model"), 4.0);
}

#[test]
fn every_dsn_form_reaches_the_server_and_no_password_is_shown() {
    let Some(url) = server("every_dsn_form_reaches_the_server") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    newapi_exporter::demo::create(&db, Duration::from_secs(2 * HOUR as u64), 13).unwrap();
    let ch = Ch::create(&url, "dsn");
    ch.copy_logs(&db, "1 = 1");
    let expected = ch.int(&format!("SELECT count() FROM logs WHERE {BILLED_REQUEST}")) as f64;
    let host = url
        .trim_start_matches("http://")
        .split(':')
        .next()
        .unwrap()
        .to_string();
    // The native forms are read over the same host's HTTP port (8123).
    for dsn in [
        format!("clickhouse://default@{host}:9000/{}", ch.db),
        format!("tcp://{host}:9000?username=default&database={}", ch.db),
        format!("http://default:@{host}:8123/{}", ch.db),
    ] {
        let (mut src, mut p) = pipeline(&db, Some(&dsn));
        p.poll(&mut src, unix_now()).unwrap();
        let total: f64 = series(&scrape(&p), "newapi_requests_total").values().sum();
        assert_eq!(total, expected, "{dsn}");
    }
    // A wrong password: the error names the DSN, masked.
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["check", "--sqlite-path"])
        .arg(&db)
        .args([
            "--log-sql-dsn",
            &format!("clickhouse://default:s3cr3t-pw@{host}:9000/{}", ch.db),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("clickhouse://default:***@"), "{stderr}");
    assert!(!stderr.contains("s3cr3t"), "{stderr}");
    // ClickHouse as the main database is refused with the reason.
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["check", "--sql-dsn", &ch.dsn()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("only takes as LOG_SQL_DSN"), "{stderr}");
}

/// Integers as numbers: releases differ in quoting 64-bit integers in JSON.
fn normalize(row: &serde_json::Value) -> serde_json::Value {
    let cells = row.as_array().unwrap().iter().map(|c| match c {
        serde_json::Value::String(s)
            if !s.is_empty()
                && s.trim_start_matches('-')
                    .bytes()
                    .all(|b| b.is_ascii_digit()) =>
        {
            s.parse::<i128>()
                .map_or(c.clone(), |n| serde_json::json!(n))
        }
        other => other.clone(),
    });
    serde_json::Value::Array(cells.collect())
}

#[test]
fn every_statement_sent_to_clickhouse_runs_alike_on_a_current_release() {
    let Some(url) = server("every_statement_sent_to_clickhouse_runs_alike") else {
        return;
    };
    let chdb = Command::new("python3")
        .args(["-c", "import chdb"])
        .status()
        .is_ok_and(|s| s.success());
    if !chdb {
        assert!(!in_ci(), "chdb (pip install chdb) is required in CI");
        eprintln!(
            "SKIP every_statement_sent_to_clickhouse_runs_alike: python3 -m pip install chdb"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    newapi_exporter::demo::create(&db, Duration::from_secs(8 * HOUR as u64), 14).unwrap();
    let ch = Ch::create(&url, "chdb");
    ch.copy_logs(&db, "1 = 1");
    // Every statement a cold start, a poll and `reconcile` send, as logged at debug level.
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
            .args(args)
            .arg("--sqlite-path")
            .arg(&db)
            .args([
                "--log-sql-dsn",
                &ch.dsn(),
                "--log.level",
                "debug",
                "--log.format",
                "json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let mut statements = Vec::new();
    for log in [run(&["check"]), run(&["reconcile"])] {
        for line in log.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if let Some(sql) = v["fields"]["statement"].as_str() {
                statements.push(sql.to_string());
            }
        }
    }
    statements.sort();
    statements.dedup();
    assert!(
        statements.iter().any(|s| s.contains("GROUP BY")),
        "the aggregate is among the statements: {statements:#?}"
    );
    // The old server's answers, then chdb's over the same rows.
    let old: Vec<String> = statements
        .iter()
        .map(|s| ch.exec_in(&format!("{s} FORMAT JSONCompact")))
        .map(|body| {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let mut rows: Vec<String> = v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| normalize(r).to_string())
                .collect();
            rows.sort();
            rows.join("\n")
        })
        .collect();
    let rows = ch.exec_in(&format!("SELECT {COLUMNS} FROM logs FORMAT TabSeparated"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/chdb_statements.py");
    let input = serde_json::json!({
        "ddl": LOGS_DDL,
        "database": ch.db,
        "columns": COLUMNS,
        "rows": rows,
        "statements": statements,
    });
    let mut child = Command::new("python3")
        .arg(&script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "chdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let current: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(current.len(), statements.len());
    for ((s, o), c) in statements.iter().zip(&old).zip(&current) {
        assert_eq!(o, c, "the two releases differ on {s}");
    }
}

#[test]
fn otlp_exports_the_same_figures_with_logs_in_clickhouse() {
    let Some(url) = server("otlp_exports_the_same_figures_with_logs_in_clickhouse") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    newapi_exporter::demo::create(&db, Duration::from_secs(4 * HOUR as u64), 15).unwrap();
    let ch = Ch::create(&url, "otlp");
    ch.copy_logs(&db, "1 = 1");
    let (_rt, received, addr) = crate::otlp::grpc_receiver();
    let exp = Running::start_with_env(
        &[
            "--sqlite-path",
            db.to_str().unwrap(),
            "--log-sql-dsn",
            &ch.dsn(),
            "--otlp.endpoint",
            &format!("http://{addr}"),
        ],
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
        ],
    );
    exp.wait_ready(Duration::from_secs(30));
    crate::otlp::wait_for("a gRPC export with usage", || {
        crate::otlp::latest(&received)
            .keys()
            .any(|(n, _)| n == "newapi.requests")
    });
    std::thread::sleep(Duration::from_millis(700));
    // The oracle reads the SQLite rows the ClickHouse table was copied from.
    crate::otlp::check_usage_against_sql(&db, &received);
}
