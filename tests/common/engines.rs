//! MariaDB/MySQL and PostgreSQL for the tests: a fresh database per test, the gateway's tables
//! as gorm creates them there, and a copy of a SQLite fixture into them.
//!
//! DSNs come from `NEWAPI_TEST_MYSQL_DSN` (go-sql-driver form) and `NEWAPI_TEST_POSTGRES_DSN`;
//! CI sets both and fails when a server is unreachable.

use std::path::Path;

use sqlx::{AssertSqlSafe, Connection};

use super::in_ci;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Mysql,
    Postgres,
}

pub const SERVERS: [Server; 2] = [Server::Mysql, Server::Postgres];

/// new-api's tables on MySQL (gorm, utf8mb4; a case-insensitive collation as is common).
pub const MYSQL_DDL: &[&str] = &[
    "CREATE TABLE logs (id bigint AUTO_INCREMENT PRIMARY KEY, user_id bigint, created_at bigint, type bigint,
      content longtext, username varchar(191) DEFAULT '', token_name varchar(191) DEFAULT '',
      model_name varchar(191) DEFAULT '', quota bigint DEFAULT 0, prompt_tokens bigint DEFAULT 0,
      completion_tokens bigint DEFAULT 0, use_time bigint DEFAULT 0, is_stream tinyint(1), channel_id bigint,
      channel_name longtext, token_id bigint DEFAULT 0, `group` varchar(191), ip varchar(191) DEFAULT '',
      request_id varchar(64) DEFAULT '', upstream_request_id varchar(128) DEFAULT '', other longtext,
      INDEX idx_created_at_type (created_at, type), INDEX idx_logs_model_name (model_name))",
    "CREATE TABLE quota_data (id bigint AUTO_INCREMENT PRIMARY KEY, user_id bigint, username varchar(64) DEFAULT '',
      model_name varchar(64) DEFAULT '', created_at bigint, token_used bigint DEFAULT 0, count bigint DEFAULT 0,
      quota bigint DEFAULT 0, INDEX idx_qdt_created_at (created_at))",
    "CREATE TABLE channels (id bigint AUTO_INCREMENT PRIMARY KEY, type bigint DEFAULT 0, `key` longtext NOT NULL,
      status bigint DEFAULT 1, name varchar(191), balance double, response_time bigint, `group` varchar(64) DEFAULT 'default',
      models longtext, used_quota bigint DEFAULT 0)",
    "CREATE TABLE options (`key` varchar(191) PRIMARY KEY, value longtext)",
    "CREATE TABLE users (id bigint AUTO_INCREMENT PRIMARY KEY, username varchar(191), password longtext NOT NULL,
      role int DEFAULT 1, status int DEFAULT 1, quota int DEFAULT 0, used_quota int DEFAULT 0, request_count int DEFAULT 0,
      `group` varchar(64) DEFAULT 'default')",
];

/// `quota_data` of the current generation (2026-06-20 on) on MySQL.
pub const MYSQL_QUOTA_DATA_CURRENT: &str = "CREATE TABLE quota_data (id bigint AUTO_INCREMENT PRIMARY KEY,
      user_id bigint, username varchar(64) DEFAULT '', model_name varchar(64) DEFAULT '', created_at bigint,
      use_group varchar(64) DEFAULT '', token_id bigint DEFAULT 0, channel_id bigint DEFAULT 0,
      node_name varchar(64) DEFAULT '', token_used bigint DEFAULT 0, count bigint DEFAULT 0, quota bigint DEFAULT 0,
      INDEX idx_qdt_created_at (created_at))";

/// `quota_data` of the current generation on PostgreSQL.
pub const POSTGRES_QUOTA_DATA_CURRENT: &str = "CREATE TABLE quota_data (id bigserial PRIMARY KEY, user_id bigint,
      username varchar(64) DEFAULT '', model_name varchar(64) DEFAULT '', created_at bigint,
      use_group varchar(64) DEFAULT '', token_id bigint DEFAULT 0, channel_id bigint DEFAULT 0,
      node_name varchar(64) DEFAULT '', token_used bigint DEFAULT 0, count bigint DEFAULT 0, quota bigint DEFAULT 0)";

/// new-api's tables on PostgreSQL (gorm: bigint, text, numeric balance).
pub const POSTGRES_DDL: &[&str] = &[
    "CREATE TABLE logs (id bigserial PRIMARY KEY, user_id bigint, created_at bigint, type bigint, content text,
      username text DEFAULT '', token_name text DEFAULT '', model_name text DEFAULT '', quota bigint DEFAULT 0,
      prompt_tokens bigint DEFAULT 0, completion_tokens bigint DEFAULT 0, use_time bigint DEFAULT 0, is_stream boolean,
      channel_id bigint, channel_name text, token_id bigint DEFAULT 0, \"group\" text, ip text DEFAULT '',
      request_id varchar(64) DEFAULT '', upstream_request_id varchar(128) DEFAULT '', other text)",
    "CREATE INDEX idx_created_at_type ON logs (created_at, type)",
    "CREATE TABLE quota_data (id bigserial PRIMARY KEY, user_id bigint, username varchar(64) DEFAULT '',
      model_name varchar(64) DEFAULT '', created_at bigint, token_used bigint DEFAULT 0, count bigint DEFAULT 0,
      quota bigint DEFAULT 0)",
    "CREATE INDEX idx_qdt_created_at ON quota_data (created_at)",
    "CREATE TABLE channels (id bigserial PRIMARY KEY, type bigint DEFAULT 0, \"key\" text NOT NULL, status bigint DEFAULT 1,
      name text, balance numeric, response_time bigint, \"group\" varchar(64) DEFAULT 'default', models text,
      used_quota bigint DEFAULT 0)",
    "CREATE TABLE options (\"key\" text PRIMARY KEY, value text)",
    "CREATE TABLE users (id bigserial PRIMARY KEY, username text, password text NOT NULL, role integer DEFAULT 1,
      status integer DEFAULT 1, quota integer DEFAULT 0, used_quota integer DEFAULT 0, request_count integer DEFAULT 0,
      \"group\" varchar(64) DEFAULT 'default')",
];

/// The admin DSN of a server, or `None` (with the reason printed) when it is not configured
/// outside CI. In CI a missing setting fails the test.
pub fn admin_dsn(server: Server, test: &str) -> Option<String> {
    let var = match server {
        Server::Mysql => "NEWAPI_TEST_MYSQL_DSN",
        Server::Postgres => "NEWAPI_TEST_POSTGRES_DSN",
    };
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if in_ci() => panic!("{var} must be set in CI (test {test}); .ci/run sets it"),
        _ => {
            eprintln!("SKIP {test} on {server:?}: {var} is not set");
            None
        }
    }
}

/// A database created for one test and dropped afterwards.
pub struct TestDb {
    pub server: Server,
    pub name: String,
    /// The DSN of this database, in the form the gateway's SQL_DSN takes.
    pub dsn: String,
    admin: String,
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The sqlx URL for a go-sql-driver or postgres DSN.
fn sqlx_url(server: Server, dsn: &str) -> String {
    match server {
        Server::Postgres => dsn.to_string(),
        Server::Mysql => {
            // user[:pass]@tcp(host:port)/db
            let (creds, rest) = dsn.rsplit_once('@').unwrap_or(("root", dsn));
            let addr = rest
                .split_once('(')
                .and_then(|(_, r)| r.split_once(')'))
                .map(|(a, _)| a)
                .unwrap_or("127.0.0.1:3306");
            let db = rest.rsplit_once('/').map(|(_, d)| d).unwrap_or("test");
            let db = db.split('?').next().unwrap();
            format!("mysql://{creds}@{addr}/{db}")
        }
    }
}

fn with_database(server: Server, dsn: &str, db: &str) -> String {
    match server {
        Server::Mysql => {
            let (head, tail) = dsn.rsplit_once('/').unwrap();
            let params = tail
                .split_once('?')
                .map(|(_, p)| format!("?{p}"))
                .unwrap_or_default();
            format!("{head}/{db}{params}")
        }
        Server::Postgres => {
            let (head, tail) = dsn.rsplit_once('/').unwrap();
            let params = tail
                .split_once('?')
                .map(|(_, p)| format!("?{p}"))
                .unwrap_or_default();
            format!("{head}/{db}{params}")
        }
    }
}

pub async fn exec(server: Server, dsn: &str, statements: &[String]) {
    let url = sqlx_url(server, dsn);
    match server {
        Server::Mysql => {
            let mut c = sqlx::MySqlConnection::connect(&url)
                .await
                .unwrap_or_else(|e| panic!("connecting to MySQL {url}: {e}"));
            for s in statements {
                sqlx::query(AssertSqlSafe(s.as_str()))
                    .execute(&mut c)
                    .await
                    .unwrap_or_else(|e| panic!("{s}: {e}"));
            }
        }
        Server::Postgres => {
            let mut c = sqlx::PgConnection::connect(&url)
                .await
                .unwrap_or_else(|e| panic!("connecting to PostgreSQL {url}: {e}"));
            for s in statements {
                sqlx::query(AssertSqlSafe(s.as_str()))
                    .execute(&mut c)
                    .await
                    .unwrap_or_else(|e| panic!("{s}: {e}"));
            }
        }
    }
}

impl TestDb {
    /// Creates an empty database with the gateway's tables (older generation's quota_data).
    pub fn create(server: Server, admin: &str, tag: &str) -> TestDb {
        Self::create_with(server, admin, tag, false)
    }

    /// Creates an empty database with the gateway's tables; with `current`, quota_data as the
    /// current generation creates it.
    pub fn create_with(server: Server, admin: &str, tag: &str, current: bool) -> TestDb {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "newapi_{tag}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let create = match server {
            Server::Mysql => {
                format!("CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
            }
            Server::Postgres => format!("CREATE DATABASE {name}"),
        };
        let rt = rt();
        rt.block_on(exec(server, admin, &[create]));
        let dsn = with_database(server, admin, &name);
        let ddl = match server {
            Server::Mysql => MYSQL_DDL,
            Server::Postgres => POSTGRES_DDL,
        };
        let current_qd = match server {
            Server::Mysql => MYSQL_QUOTA_DATA_CURRENT,
            Server::Postgres => POSTGRES_QUOTA_DATA_CURRENT,
        };
        let ddl: Vec<String> = ddl
            .iter()
            .map(|s| {
                if current && s.starts_with("CREATE TABLE quota_data") {
                    current_qd.to_string()
                } else {
                    s.to_string()
                }
            })
            .collect();
        rt.block_on(exec(server, &dsn, &ddl));
        TestDb {
            server,
            name,
            dsn,
            admin: admin.to_string(),
        }
    }

    pub fn exec(&self, statements: &[&str]) {
        let s: Vec<String> = statements.iter().map(|s| s.to_string()).collect();
        rt().block_on(exec(self.server, &self.dsn, &s));
    }

    pub fn url(&self) -> String {
        sqlx_url(self.server, &self.dsn)
    }

    /// Copies `tables` of a SQLite database into this one, row for row, ids included.
    pub fn copy_from_sqlite(&self, sqlite: &Path, tables: &[&str]) {
        let src = rusqlite::Connection::open(sqlite).unwrap();
        let q = |c: &str| match self.server {
            Server::Mysql => format!("`{c}`"),
            Server::Postgres => format!("\"{c}\""),
        };
        let mut statements = Vec::new();
        for table in tables {
            let target_cols: Vec<String> = match table {
                &"channels" => [
                    "id",
                    "type",
                    "key",
                    "status",
                    "name",
                    "balance",
                    "response_time",
                    "group",
                    "models",
                    "used_quota",
                ]
                .map(String::from)
                .to_vec(),
                _ => {
                    let mut stmt = src
                        .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
                        .unwrap();
                    stmt.query_map([], |r| r.get::<_, String>(0))
                        .unwrap()
                        .map(Result::unwrap)
                        .collect()
                }
            };
            let select = target_cols
                .iter()
                .map(|c| format!("`{c}`"))
                .collect::<Vec<_>>()
                .join(", ");
            let mut stmt = src
                .prepare(&format!("SELECT {select} FROM {table}"))
                .unwrap();
            let mut rows = stmt.query([]).unwrap();
            let mut values = Vec::new();
            while let Some(r) = rows.next().unwrap() {
                let cells: Vec<String> = (0..target_cols.len())
                    .map(|i| {
                        let v = literal(self.server, r.get_ref(i).unwrap());
                        // gorm makes Go bools `boolean` on PostgreSQL.
                        if self.server == Server::Postgres && target_cols[i] == "is_stream" {
                            format!("CAST({v} AS BOOLEAN)")
                        } else {
                            v
                        }
                    })
                    .collect();
                values.push(format!("({})", cells.join(", ")));
            }
            let cols = target_cols
                .iter()
                .map(|c| q(c))
                .collect::<Vec<_>>()
                .join(", ");
            for chunk in values.chunks(500) {
                statements.push(format!(
                    "INSERT INTO {table} ({cols}) VALUES {}",
                    chunk.join(", ")
                ));
            }
            if self.server == Server::Postgres && *table != "options" {
                statements.push(format!(
                    "SELECT setval(pg_get_serial_sequence('{table}', 'id'), GREATEST((SELECT MAX(id) FROM {table}), 1))"
                ));
            }
        }
        rt().block_on(exec(self.server, &self.dsn, &statements));
    }
}

/// An SQL literal for a SQLite value, escaped for the target server.
fn literal(server: Server, v: rusqlite::types::ValueRef<'_>) -> String {
    use rusqlite::types::ValueRef::*;
    match v {
        Null => "NULL".into(),
        Integer(i) => i.to_string(),
        Real(f) => format!("{f:?}"),
        Text(t) | Blob(t) => {
            let s = String::from_utf8_lossy(t);
            match server {
                Server::Mysql => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''")),
                Server::Postgres => format!("'{}'", s.replace('\'', "''")),
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let drop = match self.server {
            Server::Mysql => format!("DROP DATABASE IF EXISTS {}", self.name),
            Server::Postgres => format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        };
        let (server, admin) = (self.server, self.admin.clone());
        // Runs on a thread of its own: Drop may run inside a test's runtime.
        let _ = std::thread::spawn(move || rt().block_on(exec(server, &admin, &[drop]))).join();
    }
}
