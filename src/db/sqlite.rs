//! SQLite, the gateway's default engine.
//!
//! The gateway writes with a rollback journal and a 30 s busy timeout: while any reader holds a
//! SHARED lock its commits wait. So the file is opened read-only, the journal mode is never
//! touched, and every statement runs in autocommit (its lock is released as soon as it ends).
//!
//! Some operators switch the file to WAL. A read-only connection to a WAL database creates the
//! `-wal` and `-shm` files when they are not there, cannot delete them when it closes, and fails
//! with "attempt to write a readonly database" where it cannot create them (a read-only mount).
//! They are there exactly while some connection has the database open: the last one to close
//! checkpoints and deletes them, and until then every change goes to `-wal`, none to the file
//! itself. So while `-wal` is absent nobody is writing the file, and it is read with
//! `immutable=1`, which touches nothing beside it; as soon as `-wal` appears (the gateway
//! started) each statement opens an ordinary read-only connection and closes it, so that the
//! gateway's last connection can still delete both files when it stops; a statement during
//! which `-wal` appeared is run again that way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, params_from_iter};

use super::{Database, Dialect, Engine, Row, Upsert, UpsertSql, Value};

/// The gateway's own busy timeout (`_busy_timeout=30000` in its SQLite DSN): how long its
/// writers wait for a lock, and how long backfill's write waits for theirs.
pub const GATEWAY_BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one of our statements waits for the gateway's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits for the gateway's write lock in 1 ms steps. SQLite's own handler backs off up to
/// 100 ms per try, which would leave the exporter asleep long after each commit ended; under a
/// steady write load that slows a cold start several times over.
fn retry_every_millisecond(attempt: i32) -> bool {
    if Duration::from_millis(attempt.max(0) as u64) >= BUSY_TIMEOUT {
        return false;
    }
    std::thread::sleep(Duration::from_millis(1));
    true
}

/// SQLite's extended code for a hot journal that a read-only connection cannot roll back.
const READONLY_ROLLBACK: std::ffi::c_int = 776;

/// An error reading the file, in words that say what to do about it.
fn read_error(path: &Path, e: rusqlite::Error) -> anyhow::Error {
    let extended = match &e {
        rusqlite::Error::SqliteFailure(f, _) => Some(f.extended_code),
        _ => None,
    };
    if extended == Some(READONLY_ROLLBACK) {
        return anyhow::anyhow!(
            "{p} has a hot journal ({p}-journal): a writer crashed in the middle of a \
             transaction, and the file cannot be read until that transaction is rolled back. The \
             gateway does it when it opens the database; so does `sqlite3 {p} 'PRAGMA \
             quick_check'` run by a user who may write it. The exporter only reads, so it waits",
            p = path.display()
        );
    }
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => {
            anyhow::anyhow!("{} is not a SQLite database", path.display())
        }
        _ => {
            anyhow::Error::new(e).context(format!("cannot read SQLite database {}", path.display()))
        }
    }
}

pub struct SqliteDb {
    path: PathBuf,
    /// How `conn` reads the file; `conn` is None between statements on a WAL database a
    /// gateway has open.
    mode: Mode,
    conn: Option<Connection>,
}

/// How the file is read.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// A rollback-journal database (the gateway's default): one read-only connection, kept.
    Journal,
    /// A WAL database that a gateway has open: a read-only connection per statement. A WAL
    /// connection holds a lock on the file while it is open, which would keep the gateway's
    /// last connection from checkpointing and deleting `-wal` and `-shm` when it stops.
    SharedWal,
    /// A WAL database nobody has open, read with `immutable=1`, and what the file looked like
    /// when it was opened: a change made since (a gateway that started, wrote and stopped
    /// between two statements) opens it afresh.
    IdleWal(FileStamp),
}

impl Mode {
    fn of(path: &Path) -> Mode {
        if !is_wal(path) {
            Mode::Journal
        } else if sidecar(path, "-wal").exists() {
            Mode::SharedWal
        } else {
            Mode::IdleWal(stamp(path))
        }
    }
}

/// A file's identity, size and modification time.
type FileStamp = (Option<(u64, u64)>, u64, Option<std::time::SystemTime>);

fn stamp(path: &Path) -> FileStamp {
    let meta = std::fs::metadata(path).ok();
    (
        identity(path),
        meta.as_ref().map_or(0, |m| m.len()),
        meta.and_then(|m| m.modified().ok()),
    )
}

/// Whether the file's header says WAL (bytes 18 and 19 are 2).
fn is_wal(path: &Path) -> bool {
    use std::io::Read;
    let mut header = [0u8; 20];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .is_ok()
        && header.starts_with(b"SQLite format 3\0")
        && header[18] == 2
        && header[19] == 2
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// `file:` URI for `path` with `immutable=1`. Only `%`, `?` and `#` have a meaning in the path
/// part of SQLite's URIs; an absolute path keeps a leading `//` from being read as a host.
fn immutable_uri(path: &Path) -> Result<PathBuf> {
    let absolute =
        std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let mut uri = std::ffi::OsString::from("file://");
    let text = absolute.as_os_str().to_string_lossy();
    if text.as_bytes() != absolute.as_os_str().as_encoded_bytes() {
        bail!(
            "SQLite database path {} is not valid UTF-8; a WAL database must have a UTF-8 path",
            path.display()
        );
    }
    for ch in text.chars() {
        match ch {
            '%' => uri.push("%25"),
            '?' => uri.push("%3f"),
            '#' => uri.push("%23"),
            c => uri.push(c.to_string()),
        }
    }
    uri.push("?immutable=1");
    Ok(PathBuf::from(uri))
}

/// A read-only connection: an ordinary one, or with `immutable=1` for an idle WAL database.
fn connect(path: &Path, immutable: bool) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = if immutable {
        Connection::open_with_flags(immutable_uri(path)?, flags | OpenFlags::SQLITE_OPEN_URI)
    } else {
        Connection::open_with_flags(path, flags)
    }
    .with_context(|| format!("cannot open SQLite database {}", path.display()))?;
    conn.busy_handler(Some(retry_every_millisecond))?;
    // Our GROUP BY sorts in memory rather than in temporary files; this changes nothing
    // for the gateway's own connections.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Reading the schema is the first access that looks at the file's content.
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))
        .map_err(|e| read_error(path, e))?;
    Ok(conn)
}

#[cfg(unix)]
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Without inodes, only whether the file is there.
#[cfg(not(unix))]
fn identity(path: &Path) -> Option<(u64, u64)> {
    path.exists().then_some((0, 0))
}

impl SqliteDb {
    /// Opens an existing gateway database read-only. Errors name the file and say what is wrong.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!(
                "SQLite database {} does not exist (set --sqlite-path or SQLITE_PATH to the gateway's one-api.db)",
                path.display()
            );
        }
        if path.is_dir() {
            bail!(
                "SQLite database {} is a directory, not a database file",
                path.display()
            );
        }
        let mode = Mode::of(path);
        let conn = connect(path, matches!(mode, Mode::IdleWal(_)))?;
        let keep = mode != Mode::SharedWal;
        Ok(SqliteDb {
            path: path.to_path_buf(),
            mode,
            conn: keep.then_some(conn),
        })
    }

    /// Runs one read on a connection suited to the file as it is now. A read made with
    /// `immutable=1` during which a writer opened the file is not trusted: it runs again on an
    /// ordinary connection.
    fn read<T>(&mut self, mut run: impl FnMut(&Connection, &Path) -> Result<T>) -> Result<T> {
        let mode = Mode::of(&self.path);
        let conn = match self.conn.take() {
            Some(conn) if mode == self.mode => conn,
            _ => connect(&self.path, matches!(mode, Mode::IdleWal(_)))?,
        };
        self.mode = mode;
        let mut result = run(&conn, &self.path);
        let mut conn = conn;
        if matches!(mode, Mode::IdleWal(_)) {
            let after = Mode::of(&self.path);
            if after != mode {
                drop(conn);
                conn = connect(&self.path, matches!(after, Mode::IdleWal(_)))?;
                self.mode = after;
                result = run(&conn, &self.path);
            }
        }
        if self.mode != Mode::SharedWal {
            self.conn = Some(conn);
        }
        result
    }
}

fn to_value(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(f) => Value::Real(f),
        // The gateway's text columns may hold bytes that are not UTF-8; keep what can be read.
        ValueRef::Text(t) | ValueRef::Blob(t) => {
            Value::Text(String::from_utf8_lossy(t).into_owned())
        }
    }
}

fn to_sql(v: &Value) -> rusqlite::types::Value {
    use rusqlite::types::Value as S;
    match v {
        Value::Null => S::Null,
        Value::Int(i) => S::Integer(*i),
        Value::Real(f) => S::Real(*f),
        Value::Text(s) => S::Text(s.clone()),
    }
}

impl Database for SqliteDb {
    fn dialect(&self) -> Dialect {
        Dialect::of(Engine::Sqlite)
    }

    fn describe(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    fn file_at_path(&self) -> Option<Option<(u64, u64)>> {
        // Unreadable counts as gone: the exporter could not open it again.
        let readable = std::fs::File::open(&self.path).is_ok();
        Some(identity(&self.path).filter(|_| readable))
    }

    fn integrity_problems(&mut self, table: &str) -> Result<Vec<String>> {
        let sql = format!("PRAGMA quick_check(\"{}\")", table.replace('"', "\"\""));
        self.read(|conn, path| {
            let found: rusqlite::Result<Vec<String>> = conn
                .prepare(&sql)
                .and_then(|mut stmt| stmt.query_map([], |r| r.get::<_, String>(0))?.collect());
            match found {
                Ok(messages) => Ok(messages.into_iter().filter(|m| m != "ok").collect()),
                // So damaged that the check itself cannot read it.
                Err(rusqlite::Error::SqliteFailure(e, msg))
                    if matches!(
                        e.code,
                        rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase
                    ) =>
                {
                    Ok(vec![msg.unwrap_or_else(|| e.to_string())])
                }
                Err(e) => Err(e).with_context(|| {
                    format!("checking the integrity of {table} in {}", path.display())
                }),
            }
        })
    }

    fn table_columns(&mut self, table: &str) -> Result<Option<Vec<String>>> {
        self.read(|conn, _| {
            let mut stmt = conn.prepare_cached("SELECT name FROM pragma_table_info(?1)")?;
            let cols = stmt
                .query_map([table], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()
                .with_context(|| format!("reading the columns of table {table}"))?;
            Ok((!cols.is_empty()).then_some(cols))
        })
    }

    fn upsert_all(&mut self, sql: &UpsertSql, items: &[Upsert]) -> Result<Vec<usize>> {
        // The reading connection is read-only; writing takes a connection of its own, with the
        // gateway's busy timeout. IMMEDIATE takes the write lock up front, so the gateway's own
        // flush waits on its busy timeout instead of either side failing on a lock upgrade.
        let mut conn = Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_WRITE)
            .with_context(|| format!("opening {} for writing", self.path.display()))?;
        conn.busy_timeout(GATEWAY_BUSY_TIMEOUT)?;
        // The write lock held from the start is also what keeps two backfills apart.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut written = Vec::new();
        for (at, item) in items.iter().enumerate() {
            let check: Option<Row> = {
                let mut stmt = tx.prepare_cached(&sql.check)?;
                let width = stmt.column_count();
                let mut rows = stmt.query(params_from_iter(item.check.iter().map(to_sql)))?;
                match rows.next()? {
                    Some(r) => Some(
                        (0..width)
                            .map(|i| r.get_ref(i).map(to_value))
                            .collect::<rusqlite::Result<Row>>()?,
                    ),
                    None => None,
                }
            };
            if !super::check_passes(check.as_ref(), &item.expected) {
                continue;
            }
            let changed = tx.execute(
                &sql.update,
                params_from_iter(item.update.iter().map(to_sql)),
            )?;
            if changed == 0 {
                tx.execute(
                    &sql.insert,
                    params_from_iter(item.insert.iter().map(to_sql)),
                )?;
            }
            written.push(at);
        }
        tx.commit()?;
        Ok(written)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        self.read(|conn, path| {
            let mut stmt = conn
                .prepare_cached(sql)
                .with_context(|| format!("preparing: {sql}"))?;
            let width = stmt.column_count();
            let mut rows = stmt
                .query(params_from_iter(params.iter().map(to_sql)))
                .map_err(|e| read_error(path, e))?;
            let mut out = Vec::new();
            while let Some(row) = rows.next().map_err(|e| read_error(path, e))? {
                let cells = (0..width)
                    .map(|i| row.get_ref(i).map(to_value))
                    .collect::<rusqlite::Result<Row>>()?;
                out.push(cells);
            }
            Ok(out)
        })
    }
}
