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
                            for set in [
                                format!("SET SESSION max_statement_time = {secs}"),
                                format!("SET SESSION max_execution_time = {}", secs * 1000),
                            ] {
                                let _ = sqlx::query(AssertSqlSafe(set)).execute(&mut *conn).await;
                            }
                            Ok(())
                        })
                    })
                    .connect_with(opts),
            )
            .map_err(|e| super::once(e, format!("cannot connect to {describe}")))?;
        Ok(MysqlDb { rt, pool, describe })
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

impl Database for MysqlDb {
    fn dialect(&self) -> Dialect {
        Dialect(Engine::Mysql)
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn table_columns(&mut self, table: &str) -> Result<Option<Vec<String>>> {
        super::information_schema_columns(self, "CHAR", table)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        let (pool, describe) = (&self.pool, &self.describe);
        self.rt.block_on(super::with_deadlines(
            describe,
            pool.acquire(),
            |mut conn| async move {
                let rows = super::bind_values!(sqlx::query(AssertSqlSafe(sql)), params)
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(|e| super::once(e, format!("{describe}: {sql}")))?;
                rows.iter().map(decode).collect()
            },
        ))
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
