//! MySQL (and MariaDB), through sqlx.

use std::time::Duration;

use anyhow::{Result, bail};
use sqlx::mysql::{
    MySql, MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlRow, MySqlSslMode,
};
// Statements are built only from constants and quoted identifiers; every value is bound as a
// parameter, so asserting them SQL-safe is sound.
use sqlx::{AssertSqlSafe, Connection as _, Decode, Row as _, TypeInfo, ValueRef};

use super::dsn::{MysqlDsn, MysqlNet};
use super::{Database, Dialect, Engine, Row, Upsert, UpsertSql, Value};

pub struct MysqlDb {
    rt: tokio::runtime::Runtime,
    pool: MySqlPool,
    describe: String,
    /// The binary NO PAD collation text keys group by, where the server has one.
    nopad_bin: Option<&'static str>,
}

/// go-sql-driver's `tls` parameter in sqlx's terms.
fn ssl_mode(dsn: &MysqlDsn) -> Result<Option<MySqlSslMode>> {
    Ok(match dsn.param("tls") {
        None => None,
        Some("true") => Some(MySqlSslMode::VerifyIdentity),
        Some("skip-verify") => Some(MySqlSslMode::Required),
        Some("preferred") => Some(MySqlSslMode::Preferred),
        Some("false") => Some(MySqlSslMode::Disabled),
        Some(other) => bail!(
            "SQL_DSN parameter tls={other:?} names a TLS config registered in Go code; \
             use true, skip-verify, preferred or false"
        ),
    })
}

impl MysqlDb {
    pub fn connect(dsn: &MysqlDsn) -> Result<Self> {
        let describe = super::dsn::DbConfig::Mysql(dsn.clone()).describe();
        let mut opts = MySqlConnectOptions::new()
            .username(&dsn.user)
            .database(&dsn.database);
        if let Some(p) = &dsn.password {
            opts = opts.password(p);
        }
        opts = match &dsn.net {
            MysqlNet::Tcp { host, port } => opts.host(host).port(*port),
            MysqlNet::Unix(path) => opts.socket(path),
        };
        if let Some(charset) = dsn.param("charset").and_then(|c| c.split(',').next()) {
            opts = opts.charset(charset);
        }
        if let Some(mode) = ssl_mode(dsn)? {
            opts = opts.ssl_mode(mode);
        }
        let rt = super::driver_runtime()?;
        let pool = rt
            .block_on(
                MySqlPoolOptions::new()
                    .max_connections(super::POOL_MAX_CONNECTIONS)
                    .min_connections(0)
                    .acquire_timeout(super::POOL_ACQUIRE_TIMEOUT)
                    .idle_timeout(super::POOL_IDLE_TIMEOUT)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // MariaDB and MySQL name their statement timeouts differently; each
                            // ignores the other's.
                            let secs = super::STATEMENT_TIMEOUT_SECS;
                            // MySQL 8 caches information_schema's table statistics for a
                            // day unless told not to: `UPDATE_TIME` is the change marker.
                            for set in [
                                format!("SET SESSION max_statement_time = {secs}"),
                                format!("SET SESSION max_execution_time = {}", secs * 1000),
                                "SET SESSION information_schema_stats_expiry = 0".to_string(),
                            ] {
                                let _ = sqlx::query(AssertSqlSafe(set)).execute(&mut *conn).await;
                            }
                            Ok(())
                        })
                    })
                    .connect_with(opts),
            )
            .map_err(|e| super::once(e, format!("cannot connect to {describe}")))?;
        // The server's version says which binary NO PAD collation it has, if any.
        let version: Option<String> = rt
            .block_on(sqlx::query_scalar::<_, String>("SELECT VERSION()").fetch_one(&pool))
            .ok();
        let nopad_bin = version.as_deref().and_then(nopad_bin_collation);
        super::open_second_connection(&rt, &pool);
        Ok(MysqlDb {
            rt,
            pool,
            describe,
            nopad_bin,
        })
    }
}

/// The binary collation without trailing-space padding a server of this `VERSION()` has:
/// MariaDB 10.2 on, MySQL 8.0.17 on; `None` before (5.7 pads spaces in every collation).
fn nopad_bin_collation(version: &str) -> Option<&'static str> {
    // MariaDB before 11 may put MySQL's 5.5.5 before its own version.
    let numbers: Vec<u32> = version
        .strip_prefix("5.5.5-")
        .unwrap_or(version)
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .map(|n| n.parse().unwrap_or(0))
        .collect();
    let at_least = |want: [u32; 3]| numbers.as_slice() >= want.as_slice();
    if version.contains("MariaDB") {
        at_least([10, 2, 2]).then_some("utf8mb4_nopad_bin")
    } else {
        at_least([8, 0, 17]).then_some("utf8mb4_0900_bin")
    }
}

fn decode(row: &MySqlRow) -> Result<Row> {
    (0..row.len())
        .map(|i| {
            let v = row.try_get_raw(i)?;
            if v.is_null() {
                return Ok(Value::Null);
            }
            let ty = v.type_info().name().to_ascii_uppercase();
            let value = if ty.contains("INT") || ty == "BOOLEAN" || ty == "YEAR" {
                Value::Int(<i64 as Decode<MySql>>::decode(v).map_err(anyhow::Error::from_boxed)?)
            } else if ty == "FLOAT" {
                Value::Real(
                    <f32 as Decode<MySql>>::decode(v).map_err(anyhow::Error::from_boxed)? as f64,
                )
            } else if ty == "DOUBLE" {
                Value::Real(<f64 as Decode<MySql>>::decode(v).map_err(anyhow::Error::from_boxed)?)
            } else {
                let bytes =
                    <&[u8] as Decode<MySql>>::decode(v).map_err(anyhow::Error::from_boxed)?;
                let text = String::from_utf8_lossy(bytes).into_owned();
                if ty == "DECIMAL" || ty == "NEWDECIMAL" {
                    match text.parse::<i64>() {
                        Ok(n) => Value::Int(n),
                        Err(_) => text
                            .parse::<f64>()
                            .map(Value::Real)
                            .unwrap_or(Value::Text(text)),
                    }
                } else {
                    Value::Text(text)
                }
            };
            Ok(value)
        })
        .collect()
}

/// One read statement on `conn`.
async fn run(
    conn: &mut sqlx::MySqlConnection,
    describe: &str,
    sql: &str,
    params: &[Value],
) -> Result<Vec<Row>> {
    let rows = super::bind_values!(sqlx::query(AssertSqlSafe(sql)), params)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| super::once(e, format!("{describe}: {sql}")))?;
    rows.iter().map(decode).collect()
}

impl Database for MysqlDb {
    fn dialect(&self) -> Dialect {
        Dialect(Engine::Mysql, self.nopad_bin)
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn table_columns(&mut self, table: &str) -> Result<Option<Vec<String>>> {
        super::information_schema_columns(self, "CHAR", table)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        super::query_once!(self, sql, params, run)
    }

    fn query_each(&mut self, sql: &str, params: &[Vec<Value>]) -> Result<Vec<Vec<Row>>> {
        super::query_in_lanes!(self, sql.to_string(), params, run)
    }

    /// InnoDB's `UPDATE_TIME`: the time of the table's last committed write, kept in memory
    /// to the second (NULL until the first write after the server started). A second that has
    /// not ended yet may still see another write with the same time, so a marker of the
    /// current or last second tells nothing.
    fn change_marker(&mut self, table: &str) -> Result<Option<String>> {
        let rows = self.query(
            "SELECT CAST(UPDATE_TIME AS CHAR), UPDATE_TIME >= NOW() - INTERVAL 1 SECOND \
             FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = ?",
            &[Value::Text(table.to_string())],
        )?;
        Ok(match rows.first().map(Vec::as_slice) {
            Some([time, recent]) if recent.as_i64() != Some(1) => Some(time.to_label()),
            _ => None,
        })
    }

    fn parallel_reads(&self) -> usize {
        super::POOL_MAX_CONNECTIONS as usize
    }

    fn upsert_all(&mut self, sql: &UpsertSql, items: &[Upsert]) -> Result<Vec<usize>> {
        let pool = &self.pool;
        let describe = &self.describe;
        self.rt.block_on(super::with_deadlines(
            describe,
            pool.acquire(),
            |mut conn| async move {
                // A session lock, so that two backfills never interleave; released on every
                // path (the connection goes back to the pool).
                let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 60)")
                    .bind(super::WRITE_LOCK)
                    .fetch_one(&mut *conn)
                    .await?;
                if got != Some(1) {
                    bail!("another backfill has held the write lock for 60 s: try again later");
                }
                let written = async {
                    let mut tx = conn.begin().await?;
                    let mut written = Vec::new();
                    for (at, item) in items.iter().enumerate() {
                        let row = super::bind_values!(
                            sqlx::query(AssertSqlSafe(sql.check.as_str())),
                            &item.check
                        )
                        .fetch_optional(&mut *tx)
                        .await?;
                        let row = row.as_ref().map(decode).transpose()?;
                        if !super::check_passes(row.as_ref(), &item.expected) {
                            continue;
                        }
                        let done = super::bind_values!(
                            sqlx::query(AssertSqlSafe(sql.update.as_str())),
                            &item.update
                        )
                        .execute(&mut *tx)
                        .await?;
                        if done.rows_affected() == 0 {
                            super::bind_values!(
                                sqlx::query(AssertSqlSafe(sql.insert.as_str())),
                                &item.insert
                            )
                            .execute(&mut *tx)
                            .await?;
                        }
                        written.push(at);
                    }
                    tx.commit().await?;
                    anyhow::Ok(written)
                }
                .await;
                let _ = sqlx::query("SELECT RELEASE_LOCK(?)")
                    .bind(super::WRITE_LOCK)
                    .execute(&mut *conn)
                    .await;
                written
            },
        ))
    }
}

impl Drop for MysqlDb {
    fn drop(&mut self) {
        let pool = self.pool.clone();
        // Close politely, but never wait long on a database that went away.
        let _ = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(1), pool.close()).await });
    }
}

#[cfg(test)]
mod tests {
    use super::nopad_bin_collation;

    #[test]
    fn the_nopad_collation_follows_the_server_version() {
        for (version, want) in [
            ("10.11.19-MariaDB-0+deb12u1", Some("utf8mb4_nopad_bin")),
            ("5.5.5-10.6.12-MariaDB", Some("utf8mb4_nopad_bin")),
            ("10.1.48-MariaDB", None),
            ("8.0.36", Some("utf8mb4_0900_bin")),
            ("8.0.16", None),
            ("5.7.44-log", None),
            ("", None),
        ] {
            assert_eq!(nopad_bin_collation(version), want, "{version}");
        }
    }
}
