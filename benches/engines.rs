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
use std::time::{Duration, Instant};

use super::{Exporter, cold_start_against, database};

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
            let (c, o) = cold_start_against(
                &mut server.command(&db, &sql),
                &["--sql-dsn", &server.dsn_of(&db)],
            );
            println!(
                "  {} {rows:>9} rows: client {c:.2} s, exporter {o:.2} s to ready, ratio {:.2} (target <= 1.5)",
                server.engine.name(),
                o / c
            );
            // Idle polls: nothing new to read; the server's own counters say what each costs.
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
