//! The ClickHouse scenario: `logs` in ClickHouse (`NEWAPI_BENCH_CLICKHOUSE_URL`, default
//! http://127.0.0.1:8123), generated server-side once per size into a database of its own.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use newapi_exporter::clock::unix_now;
use newapi_exporter::collect::Settings;
use newapi_exporter::db::dsn::DbConfig;
use newapi_exporter::demo::gateway::CLICKHOUSE_LOGS_DDL as LOGS_DDL;
use newapi_exporter::poll::Pipeline;

use crate::{BIN, Exporter, data_dir, median};

/// The exporter's own aggregate, as it sends it, over the whole table in one statement: what
/// `clickhouse-client` runs for comparison.
fn equivalent_group_by(main: &Path, dsn: &str) -> String {
    let out = Command::new(BIN)
        .arg("check")
        .arg("--sqlite-path")
        .arg(main)
        .args([
            "--log-sql-dsn",
            dsn,
            "--log.level",
            "debug",
            "--log.format",
            "json",
        ])
        .output()
        .unwrap();
    let statement = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["fields"]["statement"].as_str().map(str::to_string))
        .find(|s| s.contains("GROUP BY"))
        .expect("the aggregate statement at debug level");
    let (head, rest) = statement.split_once(" WHERE ").unwrap();
    let group_by = &rest[rest.find(" GROUP BY").unwrap()..];
    format!("{head} WHERE 1 = 1{group_by} FORMAT Null")
}

fn url() -> String {
    std::env::var("NEWAPI_BENCH_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into())
}

fn post(database: Option<&str>, sql: &str) -> Result<String, String> {
    let target = match database {
        Some(db) => format!("{}/?database={db}", url()),
        None => format!("{}/", url()),
    };
    let mut resp = ureq::post(&target).send(sql).map_err(|e| e.to_string())?;
    resp.body_mut().read_to_string().map_err(|e| e.to_string())
}

/// Rows generated server-side: `rows` over `days` ending now, the traffic mix of the SQLite
/// benchmark databases (models, channels, groups, 300 users, some errors and refunds).
fn insert_sql(rows: u64, start: i64, span: i64, tag: &str) -> String {
    format!(
        "INSERT INTO logs (user_id, created_at, type, content, username, token_name, model_name, \
           quota, prompt_tokens, completion_tokens, use_time, is_stream, channel_id, token_id, \
           `group`, request_id, other) \
         SELECT number % 300, {start} + intDiv(number * {span}, {rows}), \
           multiIf(number % 97 = 0, 5, number % 89 = 0, 6, 2), 'model ratio 1.25', \
           concat('user', toString(number % 300)), 'key', \
           arrayElement(['gpt-4o', 'gpt-4o-mini', 'claude-3-5-sonnet', 'gemini-1.5-pro', \
             'deepseek-chat', 'qwen-max', 'o1-mini', 'llama-3-70b'], (number * number) % 8 + 1), \
           1000 + number % 5000, 500 + number % 700, 100 + number % 300, number % 20, number % 2, \
           1 + number % 12, 1000 + number % 300, arrayElement(['default', 'vip', 'svip'], number % 3 + 1), \
           concat('{tag}-', toString(number)), '{{\"model_ratio\":1.25}}' \
         FROM system.numbers LIMIT {rows}"
    )
}

/// The database holding `rows` log rows over `days`, made once.
fn logs_database(rows: u64, days: i64) -> String {
    let db = format!("newapi_bench_{rows}_{days}d");
    post(None, &format!("CREATE DATABASE IF NOT EXISTS {db}")).unwrap();
    post(Some(&db), LOGS_DDL).unwrap();
    let have: u64 = post(Some(&db), "SELECT count() FROM logs")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    if have != rows {
        post(Some(&db), "TRUNCATE TABLE logs").unwrap();
        let t = Instant::now();
        let span = days * 86_400;
        post(Some(&db), &insert_sql(rows, unix_now() - span, span, "req")).unwrap();
        println!("generated {rows} rows in ClickHouse in {:.1?}", t.elapsed());
    }
    db
}

/// The main database beside it: a small current-generation gateway (quota_data, channels).
fn main_database() -> PathBuf {
    let path = data_dir().join("main-current-1000.db");
    if !path.exists() {
        let ok = Command::new(BIN)
            .args([
                "generate",
                "--rows",
                "1000",
                "--generation",
                "current",
                "--db",
            ])
            .arg(&path)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success());
    }
    path
}

pub fn run() {
    println!("\n== logs in ClickHouse");
    if post(None, "SELECT 1").is_err() {
        println!(
            "skipped: no ClickHouse at {} (set NEWAPI_BENCH_CLICKHOUSE_URL)",
            url()
        );
        return;
    }
    let version = post(None, "SELECT version()").unwrap();
    println!("server {}", version.trim());
    let main = main_database();
    cold_start(&main);
    poll(&main);
}

fn cold_start(main: &Path) {
    println!(
        "cold start to ready vs clickhouse-client running the exporter's GROUP BY over the whole table"
    );
    let host = url()
        .trim_start_matches("http://")
        .split(':')
        .next()
        .unwrap()
        .to_string();
    for rows in [1_000_000, 10_000_000] {
        let db = logs_database(rows, 30);
        let dsn = format!("{}/{db}", url());
        let equivalent = equivalent_group_by(main, &dsn);
        let mut client = Vec::new();
        let mut ours = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let ok = Command::new("clickhouse-client")
                .args(["--host", &host, "--database", &db, "--query", &equivalent])
                .status()
                .unwrap();
            assert!(ok.success());
            client.push(t.elapsed().as_secs_f64());
            let started = Instant::now();
            let e = Exporter::start(main, &["--log-sql-dsn", &dsn]);
            e.wait_ready();
            ours.push(started.elapsed().as_secs_f64());
        }
        let (c, o) = (median(client), median(ours));
        println!(
            "{rows:>9} rows: clickhouse-client {c:.2} s, exporter {o:.2} s to ready, ratio {:.2} (target <= 1.5)",
            o / c
        );
    }
}

fn poll(main: &Path) {
    println!("one poll ingesting 10k new rows (same traffic per hour; 3 vs 30 days of history)");
    let mut results = Vec::new();
    for (rows, days) in [(1_000_000, 3), (10_000_000, 30)] {
        let db = logs_database(rows, days);
        let logs =
            Some(DbConfig::from_dsn(Some(&format!("{}/{db}", url())), Path::new("x")).unwrap());
        let mut src =
            newapi_exporter::db::open(&DbConfig::Sqlite(main.to_path_buf()), &logs).unwrap();
        let mut p = Pipeline::build(
            &mut src,
            Settings::default(),
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
        p.poll(&mut src, unix_now()).unwrap();
        let mut times = Vec::new();
        for round in 0..5 {
            // 10k rows dated over the last minute, as several nodes insert them.
            post(
                Some(&db),
                &insert_sql(10_000, unix_now() - 60, 60, &format!("new{round}")),
            )
            .unwrap();
            let t = Instant::now();
            p.poll(&mut src, unix_now()).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let m = median(times);
        println!(
            "{rows:>9} rows over {days:>2} days: {m:.1} ms per poll of 10k new rows (median of 5)"
        );
        results.push(m);
        // The inserted rows go, so that the next run starts from the same table.
        post(
            Some(&db),
            "ALTER TABLE logs DELETE WHERE request_id LIKE 'new%'",
        )
        .ok();
    }
    println!(
        "ratio 10M/1M {:.2} (target <= 1.5)",
        results[1] / results[0]
    );
}
