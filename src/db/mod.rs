//! Access to the gateway's database: one file per engine behind the [`Database`] trait.
//!
//! Collectors own their SQL (written once, with `?` placeholders and identifiers quoted through
//! [`Dialect`]); an engine only runs statements and turns rows into [`Value`]s. The trait is
//! synchronous: polling runs on its own thread, so a slow database never stalls a scrape.

pub mod clickhouse;
pub mod dialect;
pub mod dsn;
pub mod mysql;
pub mod postgres;
pub mod sqlite;
pub mod write;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Result;

pub use dialect::{Dialect, Engine};
use dsn::DbConfig;

/// A cell read from the database, decoded without assuming the column's declared type
/// (SQLite stores whatever the gateway wrote; older schemas differ).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

impl Value {
    /// Integer view: reals are truncated, numeric text is parsed, anything else is `None`.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Real(f) if f.is_finite() => Some(*f as i64),
            Value::Text(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Real(f) => Some(*f),
            Value::Text(s) => s.trim().parse().ok(),
            Value::Null => None,
        }
    }

    /// The value as a label: NULL becomes the empty string, numbers their decimal form.
    pub fn to_label(&self) -> String {
        match self {
            Value::Null => String::new(),
            Value::Int(i) => i.to_string(),
            Value::Real(f) => f.to_string(),
            Value::Text(s) => s.clone(),
        }
    }

    /// [`Value::to_label`] without a copy of text.
    pub fn label_ref(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Value::Text(s) => std::borrow::Cow::Borrowed(s),
            Value::Null => std::borrow::Cow::Borrowed(""),
            other => std::borrow::Cow::Owned(other.to_label()),
        }
    }
}

pub type Row = Vec<Value>;

/// One connection to one gateway database (the main one or the separate logs database).
pub trait Database: Send {
    fn dialect(&self) -> Dialect;

    /// Where the connection points, safe to show (passwords masked).
    fn describe(&self) -> String;

    /// Column names of `table`, or `None` when the table does not exist.
    fn table_columns(&mut self, table: &str) -> Result<Option<Vec<String>>>;

    /// Runs one read statement. `?` marks a parameter. Each call is its own short statement:
    /// no transaction is held open across calls.
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>>;

    /// Runs `sql` once for each parameter list; the results come in the order of `params`.
    /// Engines with [`Database::parallel_reads`] above one run them concurrently on separate
    /// connections, each its own short statement. All or nothing: one failure fails the call.
    fn query_each(&mut self, sql: &str, params: &[Vec<Value>]) -> Result<Vec<Vec<Row>>> {
        params.iter().map(|p| self.query(sql, p)).collect()
    }

    /// A value that changes whenever `table` is written, taken from the engine's own
    /// statistics without reading the table; `None` when the engine keeps none, or when it
    /// could not yet tell a write that is about to follow.
    fn change_marker(&mut self, table: &str) -> Result<Option<String>> {
        let _ = table;
        Ok(None)
    }

    /// How many statements of a long read (a cold start) may run at once. One on SQLite, where
    /// a reader holds the gateway's writers off, and on ClickHouse, whose single statement is
    /// already spread over the server's cores; MySQL and PostgreSQL read under MVCC, where a
    /// reader never makes a writer wait, and take one statement per pooled connection.
    fn parallel_reads(&self) -> usize {
        1
    }

    /// For a database in a file: what is at its path now, `Some(None)` when nothing readable
    /// is (device and inode otherwise). An open SQLite connection keeps reading the file it
    /// opened even after it was moved, deleted or replaced, so the path is what tells.
    fn file_at_path(&self) -> Option<Option<(u64, u64)>> {
        None
    }

    /// What an integrity check of `table` finds wrong (SQLite's `quick_check`); empty when
    /// nothing is, or when the engine has no such check.
    fn integrity_problems(&mut self, table: &str) -> Result<Vec<String>> {
        let _ = table;
        Ok(Vec::new())
    }

    /// The one write the exporter makes (`backfill`), in a single transaction that holds the
    /// exporter's write lock (SQLite's write lock; an advisory lock on MySQL and PostgreSQL), so
    /// that two runs never interleave. For each item: runs `sql.check`, and skips the item
    /// unless it returns the item's `expected` values (what was planned against has not
    /// changed); then runs `sql.update` and, when that changed no row, `sql.insert`. Returns
    /// the positions of the items written.
    fn upsert_all(&mut self, sql: &UpsertSql, items: &[Upsert]) -> Result<Vec<usize>>;
}

/// The statements of [`Database::upsert_all`].
pub struct UpsertSql {
    pub check: String,
    pub update: String,
    pub insert: String,
}

/// One conditional write of [`Database::upsert_all`].
#[derive(Debug, Clone)]
pub struct Upsert {
    pub check: Vec<Value>,
    /// The integers the check must return for the write to go ahead.
    pub expected: Vec<i64>,
    pub update: Vec<Value>,
    pub insert: Vec<Value>,
}

/// The name of the advisory lock a backfill holds on MySQL and PostgreSQL.
pub(crate) const WRITE_LOCK: &str = "newapi-exporter-backfill";

/// Whether a check's row holds the expected integers.
pub(crate) fn check_passes(row: Option<&Row>, expected: &[i64]) -> bool {
    let got: Vec<i64> = row
        .map(|r| r.iter().map(|v| v.as_i64().unwrap_or(0)).collect())
        .unwrap_or_default();
    got == expected
}

/// Column names of `table` in the connection's current schema, from `information_schema`
/// (MySQL and PostgreSQL); `text` is the engine's name for a text cast.
pub(crate) fn information_schema_columns(
    db: &mut dyn Database,
    text: &str,
    table: &str,
) -> Result<Option<Vec<String>>> {
    let schema = match db.dialect().0 {
        Engine::Postgres => "current_schema()",
        _ => "DATABASE()",
    };
    let rows = db.query(
        &format!(
            "SELECT CAST(column_name AS {text}) FROM information_schema.columns \
             WHERE table_schema = {schema} AND table_name = ? ORDER BY ordinal_position"
        ),
        &[Value::Text(table.to_string())],
    )?;
    let cols: Vec<String> = rows
        .iter()
        .filter_map(|r| r.first().map(Value::to_label))
        .collect();
    Ok((!cols.is_empty()).then_some(cols))
}

/// [`Database::query_each`] for an sqlx engine: the lists in [`in_lanes`], each lane on one
/// pooled connection, every statement within its deadline. `$run` runs one statement on a
/// connection (the engine's `run`); `$sql` is the statement as the engine takes it.
macro_rules! query_in_lanes {
    ($db:expr, $sql:expr, $params:expr, $run:path) => {{
        let (pool, describe) = ($db.pool.clone(), $db.describe.clone());
        let sql: std::sync::Arc<str> = $sql.into();
        $crate::db::in_lanes(&$db.rt, $db.parallel_reads(), $params, move |queue| {
            let (pool, describe, sql) = (pool.clone(), describe.clone(), sql.clone());
            async move {
                let mut conn = $crate::db::acquire_within(&describe, pool.acquire()).await?;
                let mut out = Vec::new();
                while let Some((i, p)) = queue.take() {
                    let rows = $run(&mut conn, &describe, &sql, p);
                    match $crate::db::within_deadline(&describe, rows).await {
                        Ok(rows) => out.push((i, rows)),
                        Err(e) => {
                            queue.stop();
                            return Err(e);
                        }
                    }
                }
                Ok(out)
            }
        })
    }};
}
pub(crate) use query_in_lanes;

/// [`Database::query`] for an sqlx engine: one statement on a pooled connection, within the
/// acquire and statement deadlines. `$run` runs it on the connection (the engine's `run`).
macro_rules! query_once {
    ($db:expr, $sql:expr, $params:expr, $run:path) => {{
        let (sql, params, describe) = ($sql, $params, &$db.describe);
        $db.rt.block_on($crate::db::with_deadlines(
            describe,
            $db.pool.acquire(),
            |mut conn| async move { $run(&mut conn, describe, sql, params).await },
        ))
    }};
}
pub(crate) use query_once;

/// Binds [`Value`]s to an sqlx query, in order.
macro_rules! bind_values {
    ($query:expr, $params:expr) => {{
        let mut q = $query;
        for p in $params {
            q = match p {
                $crate::db::Value::Null => q.bind(None::<i64>),
                $crate::db::Value::Int(i) => q.bind(*i),
                $crate::db::Value::Real(f) => q.bind(*f),
                $crate::db::Value::Text(s) => q.bind(s.as_str()),
            };
        }
        q
    }};
}
pub(crate) use bind_values;

/// Opens one of the gateway's databases.
pub fn connect(cfg: &DbConfig) -> Result<Box<dyn Database>> {
    Ok(match cfg {
        DbConfig::Sqlite(path) => Box::new(sqlite::SqliteDb::open(path)?),
        DbConfig::Mysql(m) => Box::new(mysql::MysqlDb::connect(m)?),
        DbConfig::Postgres(url) => Box::new(postgres::PostgresDb::connect(url)?),
        DbConfig::Clickhouse(c) => Box::new(clickhouse::ClickhouseDb::connect(c)?),
    })
}

/// Opens the gateway's main database and, with `LOG_SQL_DSN`, its logs database.
pub fn open(main: &DbConfig, logs: &Option<DbConfig>) -> Result<Sources> {
    if let DbConfig::Clickhouse(c) = main {
        anyhow::bail!(
            "SQL_DSN {} is ClickHouse, which the gateway only takes as LOG_SQL_DSN (quota_data, \
             channels and users live in MySQL, PostgreSQL or SQLite)",
            mask_password(&c.raw)
        );
    }
    let m = connect(main)?;
    let l = logs.as_ref().map(connect).transpose()?;
    Ok(Sources::new(m, l))
}

/// Where the exporter reads, passwords masked.
pub fn describe(main: &DbConfig, logs: &Option<DbConfig>) -> String {
    match logs {
        Some(l) => format!("{} (logs: {})", main.describe(), l.describe()),
        None => main.describe(),
    }
}

/// A runtime of its own for an async driver behind the synchronous [`Database`] trait; the
/// poll thread and the one-shot commands run outside any other runtime.
pub(crate) fn driver_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Pool settings shared by MySQL and PostgreSQL: the exporter is a light client of a shared
/// database, so at most two connections, released when idle. A cold start reads on both at once
/// (two of the server's cores for its few seconds); every later poll uses one.
pub(crate) const POOL_MAX_CONNECTIONS: u32 = 2;
pub(crate) const POOL_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest a single statement may run on the server.
pub(crate) const STATEMENT_TIMEOUT_SECS: u64 = 30;

/// Runs one database call with client-side deadlines: getting a connection, then the call
/// itself (the server's statement timeout plus a margin). A server that stops answering
/// without closing the connection (a network partition) fails the poll instead of hanging it.
pub(crate) async fn with_deadlines<C, T, F, Fut>(
    describe: &str,
    acquire: impl Future<Output = Result<C, sqlx::Error>>,
    call: F,
) -> Result<T>
where
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let conn = acquire_within(describe, acquire).await?;
    within_deadline(describe, call(conn)).await
}

/// Opens the pool's second connection in the background, while the first one works: a cold
/// start reads on both, and a connection's set-up (TLS, where the server offers it) takes the
/// better part of 100 ms.
pub(crate) fn open_second_connection<DB: sqlx::Database>(
    rt: &tokio::runtime::Runtime,
    pool: &sqlx::Pool<DB>,
) {
    let pool = pool.clone();
    rt.spawn(async move {
        let _ = pool.acquire().await;
    });
}

/// A pooled connection, or [`Unreachable`] when none comes within the acquire timeout.
pub(crate) async fn acquire_within<C>(
    describe: &str,
    acquire: impl Future<Output = Result<C, sqlx::Error>>,
) -> Result<C> {
    Ok(tokio::time::timeout(POOL_ACQUIRE_TIMEOUT, acquire)
        .await
        .map_err(|_| {
            Unreachable(format!(
                "no connection to {describe} within {}s",
                POOL_ACQUIRE_TIMEOUT.as_secs()
            ))
        })?
        // sqlx's database error repeats its own text as its source: show it once.
        .map_err(|e| Unreachable(format!("cannot connect to {describe}: {e}")))?)
}

/// One call on a connection, or [`Unreachable`] past the statement timeout and a margin.
pub(crate) async fn within_deadline<T>(
    describe: &str,
    call: impl Future<Output = Result<T>>,
) -> Result<T> {
    let limit = Duration::from_secs(STATEMENT_TIMEOUT_SECS + 5);
    tokio::time::timeout(limit, call).await.map_err(|_| {
        Unreachable(format!(
            "{describe} did not answer within {}s",
            limit.as_secs()
        ))
    })?
}

/// The parameter lists of one [`in_lanes`] read, handed out one at a time to whichever lane
/// is free: a lane that drew slow statements (the newest rows, which keep their hour and user,
/// cost more than old ones) leaves the rest to the others instead of holding a fixed share.
pub(crate) struct LaneQueue {
    params: Vec<Vec<Value>>,
    next: AtomicUsize,
}

impl LaneQueue {
    /// The next list not yet taken, with its place in the read.
    pub(crate) fn take(&self) -> Option<(usize, &[Value])> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.params.get(i).map(|p| (i, p.as_slice()))
    }

    /// Hands out nothing more: a lane failed, and the read fails whatever the others find.
    pub(crate) fn stop(&self) {
        self.next.store(self.params.len(), Ordering::Relaxed);
    }
}

/// Runs the parameter lists on `lanes` tasks, each running lists from one shared
/// [`LaneQueue`] one after another on one connection of its own (`run_lane` returns each
/// list's rows with its place): at most `lanes` statements are in flight, no lane waits for
/// another's connection, and none idles while lists are left. Results come in the order of
/// `params`; the first failure stops the other lanes.
pub(crate) fn in_lanes<F, Fut>(
    rt: &tokio::runtime::Runtime,
    lanes: usize,
    params: &[Vec<Value>],
    run_lane: F,
) -> Result<Vec<Vec<Row>>>
where
    F: Fn(Arc<LaneQueue>) -> Fut,
    Fut: Future<Output = Result<Vec<(usize, Vec<Row>)>>> + Send + 'static,
{
    let lanes = lanes.clamp(1, params.len().max(1));
    let queue = Arc::new(LaneQueue {
        params: params.to_vec(),
        next: AtomicUsize::new(0),
    });
    let tasks: Vec<_> = (0..lanes)
        .map(|_| rt.spawn(run_lane(queue.clone())))
        .collect();
    rt.block_on(async {
        let mut results: Vec<Vec<Row>> = vec![Vec::new(); params.len()];
        let mut tasks = tasks.into_iter();
        while let Some(task) = tasks.next() {
            let done = task
                .await
                .map_err(|e| anyhow::anyhow!("a read stopped: {e}"))
                .and_then(|r| r);
            match done {
                Ok(rows) => {
                    for (i, r) in rows {
                        results[i] = r;
                    }
                }
                Err(e) => {
                    queue.stop();
                    tasks.for_each(|t| t.abort());
                    return Err(e);
                }
            }
        }
        Ok(results)
    })
}

/// A server that cannot be reached or stopped answering: every further statement of the same
/// poll would wait out the same deadline, so the poll stops at the first one.
#[derive(Debug)]
pub struct Unreachable(pub String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// A driver error with what it was doing. sqlx's database errors name their own text again as
/// their source, so the chain would print it twice: only the error's own text is kept.
pub(crate) fn once(e: sqlx::Error, doing: String) -> anyhow::Error {
    anyhow::anyhow!("{doing}: {e}")
}

/// Query parameters that carry a secret in a connection string (libpq's `password` and
/// `sslpassword`; the short forms some drivers take).
const SECRET_PARAMS: &[&str] = &["password", "sslpassword", "pass", "pwd"];

/// Masks every password in a connection string for display: the one in the credentials
/// (`user:***@host`), and the value of every secret query parameter (`?password=***`). Both the
/// URL form (`postgres://`, `clickhouse://`, ...) and go-sql-driver's MySQL form are read the way
/// their drivers read them. A URL password holding `?` must be percent-encoded (libpq and the URL
/// parsers require it too).
pub fn mask_password(dsn: &str) -> String {
    let (start, at, query) = match dsn.find("://").map(|i| i + 3) {
        Some(body) => {
            // The credentials end at the last `@` before the query (a password may hold a raw
            // `@`, `:` or `/`).
            let query = dsn[body..].find('?').map_or(dsn.len(), |q| body + q);
            (body, dsn[body..query].rfind('@').map(|a| body + a), query)
        }
        None => {
            // go-sql-driver: the last `/` ends the address, the last `@` before it the
            // credentials; the query follows the database name.
            let slash = dsn.rfind('/');
            let at = dsn[..slash.unwrap_or(dsn.len())].rfind('@');
            let query = slash
                .and_then(|s| dsn[s..].find('?').map(|q| s + q))
                .unwrap_or(dsn.len());
            (0, at, query)
        }
    };
    let mut out = String::with_capacity(dsn.len());
    match at {
        Some(at) => {
            let creds = &dsn[start..at];
            out.push_str(&dsn[..start]);
            match creds.find(':') {
                Some(colon) => {
                    out.push_str(&creds[..colon]);
                    out.push_str(":***");
                }
                None => out.push_str(creds),
            }
            out.push_str(&dsn[at..query]);
        }
        None => out.push_str(&dsn[..query]),
    }
    out.push_str(&mask_secret_params(&dsn[query..]));
    out
}

/// Masks the value of every secret parameter in a query string (`?a=1&password=x`): each
/// `key=value` that follows a `?` or `&`, up to the next `&`.
fn mask_secret_params(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    let mut rest = query;
    while let Some(sep) = rest.find(['?', '&']) {
        out.push_str(&rest[..=sep]);
        rest = &rest[sep + 1..];
        let end = rest.find('&').unwrap_or(rest.len());
        let param = &rest[..end];
        match param.split_once('=') {
            Some((k, _)) if SECRET_PARAMS.iter().any(|s| k.eq_ignore_ascii_case(s)) => {
                out.push_str(k);
                out.push_str("=***");
                rest = &rest[end..];
            }
            // Not a secret: copy up to the next separator (a `?` inside a value starts a scan
            // of its own).
            _ => {
                let next = rest.find(['?', '&']).unwrap_or(rest.len());
                out.push_str(&rest[..next]);
                rest = &rest[next..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The gateway's databases: the main one, and the one holding `logs` when the gateway runs with
/// `LOG_SQL_DSN` (otherwise `logs` lives in the main one too).
pub struct Sources {
    main: Box<dyn Database>,
    logs: Option<Box<dyn Database>>,
}

impl Sources {
    pub fn new(main: Box<dyn Database>, logs: Option<Box<dyn Database>>) -> Self {
        Sources { main, logs }
    }

    pub fn main(&mut self) -> &mut dyn Database {
        self.main.as_mut()
    }

    pub fn logs(&mut self) -> &mut dyn Database {
        match &mut self.logs {
            Some(db) => db.as_mut(),
            None => self.main.as_mut(),
        }
    }

    /// Whether `logs` is in the main database, so that one statement sees both consistently.
    pub fn logs_in_main(&self) -> bool {
        self.logs.is_none()
    }

    /// What is at the path of each database in a file (see [`Database::file_at_path`]).
    pub fn files(&self) -> Vec<Option<(u64, u64)>> {
        std::iter::once(&self.main)
            .chain(&self.logs)
            .filter_map(|d| d.file_at_path())
            .collect()
    }

    /// Human-readable description of every database in use, passwords masked.
    pub fn describe(&self) -> String {
        match &self.logs {
            Some(logs) => format!("{} (logs: {})", self.main.describe(), logs.describe()),
            None => self.main.describe(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords_in_both_dsn_forms() {
        assert_eq!(
            mask_password("root:s3cr:et@tcp(db:3306)/newapi"),
            "root:***@tcp(db:3306)/newapi"
        );
        assert_eq!(
            mask_password("postgres://u:pw@host:5432/db?sslmode=require"),
            "postgres://u:***@host:5432/db?sslmode=require"
        );
        assert_eq!(
            mask_password("postgres://u@host/db"),
            "postgres://u@host/db"
        );
        assert_eq!(mask_password("/data/one-api.db"), "/data/one-api.db");
        assert_eq!(
            mask_password("postgres://u@db:5432/newapi?password=S3cr3t"),
            "postgres://u@db:5432/newapi?password=***"
        );
        assert_eq!(
            mask_password("postgresql://db/newapi?user=u&Password=S3cr3t&sslmode=require"),
            "postgresql://db/newapi?user=u&Password=***&sslmode=require"
        );
        assert_eq!(
            mask_password("postgres://u:p@s/s@db/newapi?sslpassword=k3y&options=a@b"),
            "postgres://u:***@db/newapi?sslpassword=***&options=a@b"
        );
        assert_eq!(
            mask_password("postgresql://db/newapi?application_name=a@b&password=S3cr3t"),
            "postgresql://db/newapi?application_name=a@b&password=***"
        );
        assert_eq!(
            mask_password("clickhouse://default:pw@clickhouse:9000/new_api_logs"),
            "clickhouse://default:***@clickhouse:9000/new_api_logs"
        );
        assert_eq!(
            mask_password("root:p/a@ss@tcp(db:3306)/newapi?tls=true"),
            "root:***@tcp(db:3306)/newapi?tls=true"
        );
    }

    #[test]
    fn values_convert_without_panicking() {
        assert_eq!(Value::Text(" 42 ".into()).as_i64(), Some(42));
        assert_eq!(Value::Text("x".into()).as_i64(), None);
        assert_eq!(Value::Real(f64::NAN).as_i64(), None);
        assert_eq!(Value::Null.to_label(), "");
        assert_eq!(Value::Int(7).to_label(), "7");
    }

    /// Lists that finish out of order (the later ones sooner) come back in order, never more
    /// than `lanes` run at once, and a lane held up by one slow list leaves the rest to the
    /// other.
    #[test]
    fn reads_in_lanes_come_back_in_order_two_at_a_time_and_from_one_queue() {
        use std::sync::Mutex;
        let rt = driver_runtime().unwrap();
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let lane_of = Arc::new(Mutex::new(vec![usize::MAX; 9]));
        let lane_ids = Arc::new(AtomicUsize::new(0));
        let params: Vec<Vec<Value>> = (0..9).map(|i| vec![Value::Int(i)]).collect();
        let got = in_lanes(&rt, 2, &params, |queue| {
            let (r, m, lanes) = (running.clone(), most.clone(), lane_of.clone());
            let lane = lane_ids.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut out = Vec::new();
                while let Some((at, p)) = queue.take() {
                    let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(now, Ordering::SeqCst);
                    let i = p[0].as_i64().unwrap();
                    lanes.lock().unwrap()[at] = lane;
                    // List 0 takes far longer than all the others together.
                    let ms = if i == 0 { 400 } else { 20 - 2 * i as u64 };
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    r.fetch_sub(1, Ordering::SeqCst);
                    out.push((at, vec![vec![Value::Int(i * 10)]]));
                }
                Ok(out)
            }
        })
        .unwrap();
        let firsts: Vec<i64> = got
            .iter()
            .map(|rows| rows[0][0].as_i64().unwrap())
            .collect();
        assert_eq!(firsts, (0..9).map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(most.load(Ordering::SeqCst), 2);
        let lanes = lane_of.lock().unwrap().clone();
        assert!(
            lanes[1..].iter().all(|&l| l != lanes[0]),
            "the lane held up by list 0 took no other list: {lanes:?}"
        );

        // One failing list fails the whole read.
        let failed = in_lanes(&rt, 2, &params, |queue| async move {
            let mut out = Vec::new();
            while let Some((at, p)) = queue.take() {
                match p[0].as_i64() {
                    Some(5) => anyhow::bail!("list 5 failed"),
                    _ => out.push((at, Vec::new())),
                }
            }
            Ok(out)
        });
        assert_eq!(failed.unwrap_err().to_string(), "list 5 failed");
    }
}
