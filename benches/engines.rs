//! The production engines: the exporter's cold start on MariaDB and PostgreSQL against the
//! engine's own client running the usage GROUP BY over the same table, and the rows the server
//! examines per idle poll, from the engine's own counters.
//!
//! The servers come from `NEWAPI_BENCH_MYSQL_DSN` (the gateway's form,
//! `root@tcp(127.0.0.1:3306)/test`) and `NEWAPI_BENCH_POSTGRES_DSN`
//! (`postgres://postgres@127.0.0.1:5432/test`); an engine without one is skipped with a
//! message. The 1M-row benchmark database is copied once into a database of its own on each
//! (`newapi_bench_1000000`), with the gateway's tables and indexes; `NEWAPI_BENCH_ENGINE_ROWS`
//! picks other sizes (comma-separated).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{Exporter, cold_start_against, cpu_seconds, database, which};

#[derive(Clone, Copy, PartialEq)]
enum Engine {
    Mysql,
    Postgres,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Mysql => "MariaDB",
            Engine::Postgres => "PostgreSQL",
        }
    }
}

/// A server as the bench reaches it: the gateway-form DSN of its admin database.
struct Server {
    engine: Engine,
    dsn: String,
}

impl Server {
    /// The DSN of `db` on the same server.
    fn dsn_of(&self, db: &str) -> String {
        // Both forms end in `/database`.
        let (base, _) = self.dsn.rsplit_once('/').expect("a DSN with a database");
        format!("{base}/{db}")
    }

    /// The engine's own client on `db`.
    fn client(&self, db: &str) -> Command {
        match self.engine {
            Engine::Mysql => {
                // user[:password]@tcp(host:port)/db
                let (auth, rest) = self
                    .dsn
                    .split_once("@tcp(")
                    .expect("user@tcp(host:port)/db");
                let (addr, _) = rest.split_once(')').unwrap();
                let (host, port) = addr.split_once(':').unwrap_or((addr, "3306"));
                let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
                let mut c = Command::new("mysql");
                c.args([
                    "-h",
                    host,
                    "-P",
                    port,
                    "-u",
                    user,
                    "--local-infile=1",
                    "-N",
                    "-B",
                ]);
                if !password.is_empty() {
                    c.arg(format!("-p{password}"));
                }
                c.arg(db);
                c
            }
            Engine::Postgres => {
                let mut c = Command::new("psql");
                c.args([
                    "-X",
                    "-q",
                    "-t",
                    "-A",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-d",
                    &self.dsn_of(db),
                ]);
                c
            }
        }
    }

    /// The client on `db` running `sql`.
    fn command(&self, db: &str, sql: &str) -> Command {
        let mut c = self.client(db);
        c.args([
            match self.engine {
                Engine::Mysql => "-e",
                Engine::Postgres => "-c",
            },
            sql,
        ]);
        c
    }

    /// Runs `sql` with the client on `db`; returns its output.
    fn run(&self, db: &str, sql: &str) -> String {
        let out = self
            .command(db, sql)
            .output()
            .expect("the engine's client (mysql or psql) is installed");
        assert!(
            out.status.success(),
            "{}: {sql}: {}",
            self.engine.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The URL sqlx takes for `db`.
    fn url_of(&self, db: &str) -> String {
        match self.engine {
            Engine::Postgres => self.dsn_of(db),
            Engine::Mysql => {
                let (auth, rest) = self.dsn.split_once("@tcp(").unwrap();
                let (addr, _) = rest.split_once(')').unwrap();
                format!("mysql://{auth}@{addr}/{db}")
            }
        }
    }

    fn admin_db(&self) -> String {
        self.dsn.rsplit_once('/').unwrap().1.to_string()
    }
}

/// The gateway's tables as gorm creates them on each engine (logs with its indexes).
fn ddl(engine: Engine) -> &'static str {
    match engine {
        Engine::Mysql => {
            "CREATE TABLE logs (id bigint AUTO_INCREMENT PRIMARY KEY, user_id bigint, created_at bigint, \
             type bigint, content longtext, username varchar(191) DEFAULT '', token_name varchar(191) DEFAULT '', \
             model_name varchar(191) DEFAULT '', quota bigint DEFAULT 0, prompt_tokens bigint DEFAULT 0, \
             completion_tokens bigint DEFAULT 0, use_time bigint DEFAULT 0, is_stream tinyint(1), channel_id bigint, \
             channel_name longtext, token_id bigint DEFAULT 0, `group` varchar(191), ip varchar(191) DEFAULT '', \
             request_id varchar(64) DEFAULT '', upstream_request_id varchar(128) DEFAULT '', other longtext, \
             INDEX idx_created_at_type (created_at, type), INDEX idx_logs_model_name (model_name), \
             INDEX idx_logs_user_id (user_id), INDEX idx_logs_username (username), \
             INDEX idx_logs_token_name (token_name), INDEX idx_logs_channel_id (channel_id), \
             INDEX idx_logs_token_id (token_id), INDEX idx_logs_group (`group`), INDEX idx_logs_ip (ip), \
             INDEX idx_logs_request_id (request_id), INDEX idx_logs_upstream_request_id (upstream_request_id)); \
             CREATE TABLE quota_data (id bigint AUTO_INCREMENT PRIMARY KEY, user_id bigint, \
             username varchar(64) DEFAULT '', model_name varchar(64) DEFAULT '', created_at bigint, \
             token_used bigint DEFAULT 0, count bigint DEFAULT 0, quota bigint DEFAULT 0, \
             INDEX idx_qdt_created_at (created_at), INDEX idx_qdt_model_user_name (model_name, username));"
        }
        Engine::Postgres => {
            "CREATE TABLE logs (id bigserial PRIMARY KEY, user_id bigint, created_at bigint, type bigint, \
             content text, username text DEFAULT '', token_name text DEFAULT '', model_name text DEFAULT '', \
             quota bigint DEFAULT 0, prompt_tokens bigint DEFAULT 0, completion_tokens bigint DEFAULT 0, \
             use_time bigint DEFAULT 0, is_stream boolean, channel_id bigint, channel_name text, \
             token_id bigint DEFAULT 0, \"group\" text, ip text DEFAULT '', request_id varchar(64) DEFAULT '', \
             upstream_request_id varchar(128) DEFAULT '', other text); \
             CREATE INDEX idx_created_at_type ON logs (created_at, type); \
             CREATE INDEX idx_logs_model_name ON logs (model_name); \
             CREATE INDEX idx_logs_user_id ON logs (user_id); \
             CREATE INDEX idx_logs_username ON logs (username); \
             CREATE INDEX idx_logs_token_name ON logs (token_name); \
             CREATE INDEX idx_logs_channel_id ON logs (channel_id); \
             CREATE INDEX idx_logs_token_id ON logs (token_id); \
             CREATE INDEX idx_logs_group ON logs (\"group\"); \
             CREATE INDEX idx_logs_ip ON logs (ip); \
             CREATE INDEX idx_logs_request_id ON logs (request_id); \
             CREATE INDEX idx_logs_upstream_request_id ON logs (upstream_request_id); \
             CREATE TABLE quota_data (id bigserial PRIMARY KEY, user_id bigint, username varchar(64) DEFAULT '', \
             model_name varchar(64) DEFAULT '', created_at bigint, token_used bigint DEFAULT 0, \
             count bigint DEFAULT 0, quota bigint DEFAULT 0); \
             CREATE INDEX idx_qdt_created_at ON quota_data (created_at); \
             CREATE INDEX idx_qdt_model_user_name ON quota_data (model_name, username);"
        }
    }
}

const LOGS_COLUMNS: &str = "id, user_id, created_at, type, username, token_name, model_name, quota, \
     prompt_tokens, completion_tokens, use_time, channel_id, token_id, request_id, other";
const QUOTA_DATA_COLUMNS: &str =
    "id, user_id, username, model_name, created_at, token_used, count, quota";

/// The usage aggregate the exporter's cold start computes (as `EQUIVALENT_GROUP_BY` for
/// SQLite), in the engine's dialect.
fn usage_group_by(engine: Engine) -> String {
    let (group, now) = match engine {
        Engine::Mysql => ("`group`", "UNIX_TIMESTAMP()"),
        Engine::Postgres => ("\"group\"", "CAST(EXTRACT(EPOCH FROM now()) AS bigint)"),
    };
    format!(
        "SELECT type, model_name, channel_id, {group}, \
         CASE WHEN created_at >= {now} - 90000 THEN created_at - created_at % 3600 END, \
         CASE WHEN created_at >= {now} - 90000 THEN user_id END, \
         CASE WHEN type = 2 AND prompt_tokens = 0 AND completion_tokens = 0 AND COALESCE(request_id, '') = '' \
              AND other LIKE '%pre_consumed_quota%' THEN 1 ELSE 0 END, \
         COUNT(*), SUM(CASE WHEN quota > 0 THEN quota ELSE 0 END), SUM(CASE WHEN quota < 0 THEN -quota ELSE 0 END), \
         SUM(prompt_tokens), SUM(completion_tokens), SUM(use_time), SUM(quota), MIN(created_at), MAX(created_at), MIN(id) \
         FROM logs GROUP BY 1, 2, 3, 4, 5, 6, 7"
    )
}

/// Copies the SQLite benchmark database of `rows` into `db` on the server, unless it is there.
fn load(server: &Server, db: &str, rows: i64) {
    let count = match server.engine {
        Engine::Mysql => server.run(
            &server.admin_db(),
            &format!(
                "SELECT COALESCE((SELECT table_rows FROM information_schema.tables \
                 WHERE table_schema = '{db}' AND table_name = 'logs'), -1)"
            ),
        ),
        Engine::Postgres => {
            let exists = server.run(
                &server.admin_db(),
                &format!("SELECT COUNT(*) FROM pg_database WHERE datname = '{db}'"),
            );
            if exists == "1" {
                server.run(db, "SELECT COUNT(*) FROM logs")
            } else {
                "-1".to_string()
            }
        }
    };
    // InnoDB's table_rows is an estimate: within 10% is this copy.
    let present: i64 = count.parse().unwrap_or(-1);
    if present > 0 && (present - rows).abs() <= rows / 10 {
        return;
    }
    copy(server, db, rows);
    if server.engine == Engine::Postgres {
        // The copy gave the ids: the sequences go on after them, for the writer's inserts.
        for table in ["logs", "quota_data"] {
            server.run(
                db,
                &format!(
                    "SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT MAX(id) FROM {table}))"
                ),
            );
        }
    }
}

/// Copies the SQLite benchmark database of `rows` into a new database `db` on the server.
fn copy(server: &Server, db: &str, rows: i64) {
    let t = Instant::now();
    let sqlite = database(rows);
    let dir = tempfile::tempdir().unwrap();
    let export = |table: &str, columns: &str| {
        let file = dir.path().join(format!("{table}.csv"));
        let out = Command::new("sqlite3")
            .args(["-csv"])
            .arg(&sqlite)
            .arg(format!("SELECT {columns} FROM {table}"))
            .stdout(std::fs::File::create(&file).unwrap())
            .status()
            .unwrap();
        assert!(out.success());
        file
    };
    let logs = export("logs", LOGS_COLUMNS);
    let quota_data = export("quota_data", QUOTA_DATA_COLUMNS);
    let admin = server.admin_db();
    match server.engine {
        Engine::Mysql => {
            server.run(&admin, &format!("DROP DATABASE IF EXISTS {db}"));
            server.run(&admin, &format!("CREATE DATABASE {db}"));
            server.run(db, ddl(server.engine));
            let load = |file: &Path, table: &str, columns: &str| {
                format!(
                    "LOAD DATA LOCAL INFILE '{}' INTO TABLE {table} FIELDS TERMINATED BY ',' \
                     OPTIONALLY ENCLOSED BY '\"' ESCAPED BY '' LINES TERMINATED BY '\\n' ({columns})",
                    file.display()
                )
            };
            server.run(db, &load(&logs, "logs", LOGS_COLUMNS));
            server.run(db, &load(&quota_data, "quota_data", QUOTA_DATA_COLUMNS));
            server.run(db, "ANALYZE TABLE logs, quota_data");
        }
        Engine::Postgres => {
            server.run(&admin, &format!("DROP DATABASE IF EXISTS {db}"));
            server.run(&admin, &format!("CREATE DATABASE {db}"));
            server.run(db, ddl(server.engine));
            for (file, table, columns) in [
                (&logs, "logs", LOGS_COLUMNS),
                (&quota_data, "quota_data", QUOTA_DATA_COLUMNS),
            ] {
                server.run(
                    db,
                    &format!("\\copy {table} ({columns}) FROM '{}' CSV", file.display()),
                );
            }
            server.run(db, "VACUUM ANALYZE logs");
            server.run(db, "VACUUM ANALYZE quota_data");
        }
    }
    println!(
        "  copied {rows} rows into {} database {db} in {:.1?}",
        server.engine.name(),
        t.elapsed()
    );
}

/// Rows the server has read so far: MariaDB's `Handler_read_*` (global), PostgreSQL's rows
/// fetched by sequential and index scans of the database's tables.
fn rows_examined(server: &Server, db: &str) -> i64 {
    let out = match server.engine {
        Engine::Mysql => server.run(
            db,
            "SELECT SUM(VARIABLE_VALUE) FROM information_schema.GLOBAL_STATUS \
             WHERE VARIABLE_NAME LIKE 'HANDLER_READ%'",
        ),
        Engine::Postgres => server.run(
            db,
            "SELECT pg_stat_force_next_flush(); SELECT COALESCE(SUM(seq_tup_read), 0) + \
             COALESCE(SUM(idx_tup_fetch), 0) FROM pg_stat_user_tables",
        ),
    };
    out.lines()
        .last()
        .and_then(|l| l.trim().parse::<f64>().ok())
        .map_or(0, |v| v as i64)
}

/// Gives the current hour of quota_data the rows of its newest hour, as a gateway's nodes
/// would have flushed them by now, unless it has rows.
fn fill_open_hour(server: &Server, db: &str) {
    let hour = newapi_exporter::clock::hour_of(newapi_exporter::clock::unix_now());
    let present = server.run(
        db,
        &format!("SELECT COUNT(*) FROM quota_data WHERE created_at >= {hour}"),
    );
    if present.trim() != "0" {
        return;
    }
    server.run(
        db,
        &format!(
            "INSERT INTO quota_data (user_id, username, model_name, created_at, token_used, count, quota) \
             SELECT user_id, username, model_name, {hour}, token_used, count, quota FROM quota_data \
             WHERE created_at = (SELECT MAX(created_at) FROM quota_data)"
        ),
    );
}

/// A gateway-like writer on `db`: every 10 ms it inserts a consume log row and adds it to an
/// hour of quota_data (the statements the gateway runs per request and per flush), each in its
/// own transaction. Stopping it returns how long each write took.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Vec<Duration>, usize)>,
}

impl Writer {
    fn start(server: &Server, db: &str) -> Writer {
        let (url, engine) = (server.url_of(db), server.engine);
        // The row a node's flush adds to, found once: the gateway's flush updates one row by
        // its key columns, through an index (a subquery for the newest id in every UPDATE made
        // MariaDB scan the whole table each time, which is no gateway's load).
        let newest: i64 = server
            .run(db, "SELECT COALESCE(MAX(id), 0) FROM quota_data")
            .parse()
            .unwrap_or(0);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            use sqlx::{AssertSqlSafe, Connection};
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let now = newapi_exporter::clock::unix_now();
            let insert = format!(
                "INSERT INTO logs (user_id, created_at, type, content, username, token_name, model_name, \
                 quota, prompt_tokens, completion_tokens, use_time, channel_id, token_id, {group}, request_id, other) \
                 VALUES (7, {now}, 2, 'model ratio 1.25', 'user7', 'default', 'gpt-4o', 1500, 500, 100, 3, 1, 7, \
                 'default', 'req-writer', '{{\"model_ratio\":1.25,\"frt\":420}}')",
                group = match engine {
                    Engine::Mysql => "`group`",
                    Engine::Postgres => "\"group\"",
                }
            );
            let flush = format!(
                "UPDATE quota_data SET count = count + 1, quota = quota + 1500, token_used = token_used + 600 \
                 WHERE id = {newest} AND created_at <= {now}"
            );
            let (mut took, mut lock_timeouts) = (Vec::new(), 0);
            macro_rules! write_until_stopped {
                ($conn:expr, $setup:expr) => {{
                    let mut conn = $conn;
                    for set in $setup {
                        rt.block_on(sqlx::query(set).execute(&mut conn)).unwrap();
                    }
                    let mut i = 0u64;
                    while !stopping.load(Ordering::Relaxed) {
                        let sql = if i % 10 == 9 { &flush } else { &insert };
                        let t = Instant::now();
                        match rt
                            .block_on(sqlx::query(AssertSqlSafe(sql.as_str())).execute(&mut conn))
                        {
                            Ok(_) => took.push(t.elapsed()),
                            // PostgreSQL's lock_timeout: a lock waited for beyond 100 ms.
                            Err(sqlx::Error::Database(e))
                                if e.code().as_deref() == Some("55P03") =>
                            {
                                lock_timeouts += 1
                            }
                            Err(e) => panic!("the writer's statement: {e}"),
                        }
                        i += 1;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }};
            }
            match engine {
                Engine::Mysql => write_until_stopped!(
                    rt.block_on(sqlx::MySqlConnection::connect(&url)).unwrap(),
                    [] as [&str; 0]
                ),
                // The commit does not wait for the disk: what is left of a write's time is
                // CPU and locks, which a reader could affect.
                Engine::Postgres => write_until_stopped!(
                    rt.block_on(sqlx::PgConnection::connect(&url)).unwrap(),
                    ["SET synchronous_commit = off", "SET lock_timeout = '100ms'"]
                ),
            }
            (took, lock_timeouts)
        });
        Writer { stop, thread }
    }

    /// Stops the writer: (writes, the 99th percentile, the longest, writes given up after
    /// waiting 100 ms for a lock).
    fn finish(self) -> (usize, Duration, Duration, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut took, lock_timeouts) = self.thread.join().unwrap();
        took.sort();
        let p99 = took
            .get((took.len() * 99 / 100).min(took.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default();
        let max = took.last().copied().unwrap_or_default();
        (took.len(), p99, max, lock_timeouts)
    }
}

/// MariaDB's count of InnoDB row-lock waits so far (PostgreSQL's writer counts its own).
fn row_lock_waits(server: &Server, db: &str) -> i64 {
    match server.engine {
        Engine::Mysql => server
            .run(db, "SHOW GLOBAL STATUS LIKE 'Innodb_row_lock_waits'")
            .split_whitespace()
            .last()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        Engine::Postgres => 0,
    }
}

/// Runs `during` while the writer writes; reports what its writes took.
fn writes_during(server: &Server, db: &str, what: &str, during: impl FnOnce()) {
    let writer = Writer::start(server, db);
    // The writer's connection is up before the measured work starts.
    std::thread::sleep(Duration::from_millis(300));
    let waits_before = row_lock_waits(server, db);
    let started = Instant::now();
    during();
    let took = started.elapsed();
    let waits = row_lock_waits(server, db) - waits_before;
    let (n, p99, max, lock_timeouts) = writer.finish();
    let locks = match server.engine {
        Engine::Mysql => format!("{waits} InnoDB row-lock waits"),
        Engine::Postgres => format!("{lock_timeouts} writes waited over 100 ms for a lock"),
    };
    // The time of the work itself, under the writes: the client's aggregate and the cold
    // start compare as they would on a gateway in use.
    println!(
        "  {} writer during {what} ({:.2} s): {n} writes, p99 {:.1} ms, longest {:.1} ms; {locks}",
        server.engine.name(),
        took.as_secs_f64(),
        p99.as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0
    );
}

/// The database server's process, when it runs on this machine.
fn server_pid(engine: Engine) -> Option<u32> {
    let names: &[&str] = match engine {
        Engine::Mysql => &["mariadbd", "mysqld"],
        Engine::Postgres => &["postgres"],
    };
    names.iter().find_map(|name| {
        let out = Command::new("pgrep")
            .args(["-o", "-x", name])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    })
}

/// Steady-state CPU per hour on MariaDB: the exporter against query-exporter (on the PATH)
/// running the usage aggregate (sums by type, model, channel and group) as one query at the
/// exporter's default poll interval (15 s), each
/// measured for `BENCH_MINUTES` (4 by default) after its first read, on an idle gateway.
fn against_query_exporter(server: &Server, db: &str) {
    let Ok(qe) = which("query-exporter") else {
        println!("  skipping the query-exporter comparison: pip install query-exporter pymysql");
        return;
    };
    let Some(server_pid) = server_pid(server.engine) else {
        println!(
            "  skipping the query-exporter comparison: the MariaDB server is not on this machine"
        );
        return;
    };
    let minutes: u64 = std::env::var("BENCH_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(4);
    let measure = |pid: u32| {
        let (server0, own0) = (cpu_seconds(server_pid), cpu_seconds(pid));
        std::thread::sleep(Duration::from_secs(60 * minutes));
        let (server1, own1) = (cpu_seconds(server_pid), cpu_seconds(pid));
        let per_hour = 60.0 / minutes as f64;
        ((server1 - server0) * per_hour, (own1 - own0) * per_hour)
    };

    let e = Exporter::start_with(&["--sql-dsn", &server.dsn_of(db)]);
    e.wait_ready();
    let (db_ours, ours) = measure(e.pid());
    drop(e);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    let url = server
        .url_of(db)
        .replacen("mysql://", "mysql+pymysql://", 1);
    // The usage counters' aggregate (the labels the exporter's usage series carry), as an
    // operator would configure it: the whole table at every run.
    let sums = [
        ("requests", "COUNT(*)"),
        ("quota", "SUM(CASE WHEN quota > 0 THEN quota ELSE 0 END)"),
        (
            "corrections",
            "SUM(CASE WHEN quota < 0 THEN -quota ELSE 0 END)",
        ),
        ("prompt_tokens", "SUM(prompt_tokens)"),
        ("completion_tokens", "SUM(completion_tokens)"),
        ("use_time", "SUM(use_time)"),
    ];
    let labels = "[type, model, channel, grp]";
    let metrics: String = sums
        .iter()
        .map(|(m, _)| format!("  usage_{m}:\n    type: gauge\n    labels: {labels}\n"))
        .collect();
    let names: Vec<String> = sums.iter().map(|(m, _)| format!("usage_{m}")).collect();
    let select: Vec<String> = sums
        .iter()
        .map(|(m, expr)| format!("{expr} AS usage_{m}"))
        .collect();
    std::fs::write(
        &config,
        format!(
            "databases:\n  gateway:\n    dsn: {url}\nmetrics:\n{metrics}queries:\n  usage:\n    \
             interval: 15\n    timeout: 60\n    databases: [gateway]\n    metrics: [{}]\n    \
             sql: SELECT type, model_name AS model, channel_id AS channel, `group` AS grp, {} \
             FROM logs GROUP BY 1, 2, 3, 4\n",
            names.join(", "),
            select.join(", ")
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let port = port.as_str();
    let child = Command::new(&qe)
        .args([
            "--config",
            config.to_str().unwrap(),
            "-p",
            port,
            "-H",
            "127.0.0.1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("query-exporter.log")).unwrap())
        .spawn()
        .expect("query-exporter starts");
    // Stopped however this ends.
    struct Stopped(std::process::Child);
    impl Drop for Stopped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Stopped(child);
    let started = Instant::now();
    let read_once = || {
        ureq::get(format!("http://127.0.0.1:{port}/metrics"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .is_some_and(|b| b.contains("usage_requests{"))
    };
    while !read_once() {
        assert!(
            started.elapsed() < Duration::from_secs(300) && child.0.try_wait().unwrap().is_none(),
            "query-exporter did not read {db}: {}",
            std::fs::read_to_string(dir.path().join("query-exporter.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (db_theirs, theirs) = measure(child.0.id());
    drop(child);
    println!(
        "  MariaDB CPU per hour at a 15 s interval, idle gateway ({minutes} min each): \
         newapi-exporter {ours:.1} s + server {db_ours:.1} s; query-exporter {theirs:.1} s + server {db_theirs:.1} s"
    );
}

fn servers() -> Vec<Server> {
    let mut out = Vec::new();
    for (engine, var, example) in [
        (
            Engine::Mysql,
            "NEWAPI_BENCH_MYSQL_DSN",
            "root@tcp(127.0.0.1:3306)/test",
        ),
        (
            Engine::Postgres,
            "NEWAPI_BENCH_POSTGRES_DSN",
            "postgres://postgres@127.0.0.1:5432/test",
        ),
    ] {
        match std::env::var(var) {
            Ok(dsn) if !dsn.is_empty() => out.push(Server { engine, dsn }),
            _ => println!(
                "  skipping {}: {var} is not set (for example {var}='{example}')",
                engine.name()
            ),
        }
    }
    out
}

pub fn run() {
    println!(
        "\n== production engines: cold start to ready vs the engine's client running the usage GROUP BY"
    );
    let sizes: Vec<i64> = std::env::var("NEWAPI_BENCH_ENGINE_ROWS")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000_000]);
    for server in servers() {
        for &rows in &sizes {
            let db = format!("newapi_bench_{rows}");
            load(&server, &db, rows);
            let sql = usage_group_by(server.engine);
            // Five runs each: a server's own time moves by a fifth between runs on a small
            // machine.
            let (c, o) = cold_start_against(
                &mut server.command(&db, &sql),
                &["--sql-dsn", &server.dsn_of(&db)],
                5,
            );
            println!(
                "  {} {rows:>9} rows: client {c:.2} s, exporter {o:.2} s to ready, ratio {:.2} (target <= 1.5)",
                server.engine.name(),
                o / c
            );
            // What a gateway's writes take meanwhile: alone, during the client's GROUP BY, and
            // during the exporter's cold start.
            writes_during(&server, &db, "nothing else (3 s)", || {
                std::thread::sleep(Duration::from_secs(3))
            });
            writes_during(&server, &db, "the client's GROUP BY", || {
                server.run(&db, &sql);
            });
            writes_during(&server, &db, "the exporter's cold start", || {
                Exporter::start_with(&["--sql-dsn", &server.dsn_of(&db)]).wait_ready();
            });
            if server.engine == Engine::Mysql && rows == sizes[0] {
                against_query_exporter(&server, &db);
            }
            // Idle polls: nothing new to read; the server's own counters say what each costs.
            // A live gateway's open hours of quota_data hold rows; the copied data may have
            // none by now.
            fill_open_hour(&server, &db);
            let e =
                Exporter::start_with(&["--sql-dsn", &server.dsn_of(&db), "--poll-interval", "1s"]);
            e.wait_ready();
            std::thread::sleep(Duration::from_secs(3));
            let (before, polls_before) = (rows_examined(&server, &db), e.polls());
            std::thread::sleep(Duration::from_secs(10));
            let (after, polls_after) = (rows_examined(&server, &db), e.polls());
            let polls = (polls_after - polls_before).max(1.0);
            println!(
                "  {} {rows:>9} rows: idle poll examines {:.0} rows ({} polls measured)",
                server.engine.name(),
                (after - before) as f64 / polls,
                polls
            );
        }
    }
}
