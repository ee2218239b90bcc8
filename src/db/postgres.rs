//! PostgreSQL, through sqlx.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Result, bail};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow, Postgres};
// Statements are built only from constants and quoted identifiers; every value is bound as a
// parameter, so asserting them SQL-safe is sound.
use sqlx::{AssertSqlSafe, Connection as _, Decode, Row as _, TypeInfo, ValueRef};

use super::{Database, Dialect, Engine, Row, Upsert, UpsertSql, Value, mask_password};

pub struct PostgresDb {
    rt: tokio::runtime::Runtime,
    pool: PgPool,
    describe: String,
}

impl PostgresDb {
    /// Connects with the gateway's URL; `sslmode` and the other libpq parameters apply.
    pub fn connect(url: &str) -> Result<Self> {
        let describe = mask_password(url);
        let opts = PgConnectOptions::from_str(url)
            .map_err(|e| {
                anyhow::anyhow!("SQL_DSN {describe:?} is not a valid PostgreSQL URL: {e}")
            })?
            .application_name("newapi-exporter")
            .options([(
                "statement_timeout",
                format!("{}s", super::STATEMENT_TIMEOUT_SECS),
            )]);
        let rt = super::driver_runtime()?;
        let pool = rt
            .block_on(
                PgPoolOptions::new()
                    .max_connections(super::POOL_MAX_CONNECTIONS)
                    .min_connections(0)
                    .acquire_timeout(super::POOL_ACQUIRE_TIMEOUT)
                    .idle_timeout(super::POOL_IDLE_TIMEOUT)
                    .connect_with(opts),
            )
            .map_err(|e| super::once(e, format!("cannot connect to {describe}")))?;
        super::open_second_connection(&rt, &pool);
        Ok(PostgresDb { rt, pool, describe })
    }
}

/// Rewrites `?` placeholders as `$1`, `$2`, ... outside quoted text.
pub fn numbered_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let (mut n, mut quote) = (0, None);
    for c in sql.chars() {
        match (c, quote) {
            ('\'' | '"', None) => quote = Some(c),
            (c, Some(q)) if c == q => quote = None,
            ('?', None) => {
                n += 1;
                out.push_str(&format!("${n}"));
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

fn decode(row: &PgRow) -> Result<Row> {
    (0..row.len())
        .map(|i| {
            let v = row.try_get_raw(i)?;
            if v.is_null() {
                return Ok(Value::Null);
            }
            let ty = v.type_info().name().to_ascii_uppercase();
            let e = anyhow::Error::from_boxed;
            Ok(match ty.as_str() {
                "INT2" => Value::Int(<i16 as Decode<Postgres>>::decode(v).map_err(e)? as i64),
                "INT4" => Value::Int(<i32 as Decode<Postgres>>::decode(v).map_err(e)? as i64),
                "INT8" => Value::Int(<i64 as Decode<Postgres>>::decode(v).map_err(e)?),
                "BOOL" => Value::Int(<bool as Decode<Postgres>>::decode(v).map_err(e)? as i64),
                "FLOAT4" => Value::Real(<f32 as Decode<Postgres>>::decode(v).map_err(e)? as f64),
                "FLOAT8" => Value::Real(<f64 as Decode<Postgres>>::decode(v).map_err(e)?),
                "NUMERIC" => bail!(
                    "column {i} is NUMERIC; the exporter's statements cast numbers to BIGINT or DOUBLE PRECISION"
                ),
                _ => Value::Text(<&str as Decode<Postgres>>::decode(v).map_err(e)?.to_string()),
            })
        })
        .collect()
}

/// One read statement on `conn`.
async fn run(
    conn: &mut sqlx::PgConnection,
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

impl Database for PostgresDb {
    fn dialect(&self) -> Dialect {
        Dialect::of(Engine::Postgres)
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn table_columns(&mut self, table: &str) -> Result<Option<Vec<String>>> {
        super::information_schema_columns(self, "TEXT", table)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        let sql = numbered_placeholders(sql);
        super::query_once!(self, sql.as_str(), params, run)
    }

    fn query_each(&mut self, sql: &str, params: &[Vec<Value>]) -> Result<Vec<Vec<Row>>> {
        super::query_in_lanes!(self, numbered_placeholders(sql), params, run)
    }

    /// The table's insert, update and delete counts from the statistics system (with the
    /// database's reset time). A writer's counts arrive there after its commit: on PostgreSQL
    /// 15 and later within a second or, for a backend gone idle, ten (a minute at most under
    /// contention); a later poll sees them, and the collector's periodic full re-read bounds
    /// the rest. Nothing when `track_counts` is off, as the counts then stand still.
    fn change_marker(&mut self, table: &str) -> Result<Option<String>> {
        let rows = self.query(
            "SELECT CAST(n_tup_ins AS TEXT) || '/' || CAST(n_tup_upd AS TEXT) || '/' || \
             CAST(n_tup_del AS TEXT) || '/' || COALESCE(CAST(pg_stat_get_db_stat_reset_time(\
             (SELECT oid FROM pg_database WHERE datname = current_database())) AS TEXT), '') \
             FROM pg_stat_user_tables WHERE relid = to_regclass(?) \
             AND current_setting('track_counts') = 'on'",
            &[Value::Text(table.to_string())],
        )?;
        Ok(rows.first().and_then(|r| r.first()).map(Value::to_label))
    }

    fn parallel_reads(&self) -> usize {
        super::POOL_MAX_CONNECTIONS as usize
    }

    fn upsert_all(&mut self, sql: &UpsertSql, items: &[Upsert]) -> Result<Vec<usize>> {
        let (check, update, insert) = (
            numbered_placeholders(&sql.check),
            numbered_placeholders(&sql.update),
            numbered_placeholders(&sql.insert),
        );
        let pool = &self.pool;
        let describe = &self.describe;
        self.rt.block_on(super::with_deadlines(
            describe,
            pool.acquire(),
            |mut conn| async move {
                let mut tx = conn.begin().await?;
                // Held until the transaction ends, so that two backfills never interleave.
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                    .bind(super::WRITE_LOCK)
                    .execute(&mut *tx)
                    .await?;
                let mut written = Vec::new();
                for (at, item) in items.iter().enumerate() {
                    let row = super::bind_values!(
                        sqlx::query(AssertSqlSafe(check.as_str())),
                        &item.check
                    )
                    .fetch_optional(&mut *tx)
                    .await?;
                    let row = row.as_ref().map(decode).transpose()?;
                    if !super::check_passes(row.as_ref(), &item.expected) {
                        continue;
                    }
                    let done = super::bind_values!(
                        sqlx::query(AssertSqlSafe(update.as_str())),
                        &item.update
                    )
                    .execute(&mut *tx)
                    .await?;
                    if done.rows_affected() == 0 {
                        super::bind_values!(
                            sqlx::query(AssertSqlSafe(insert.as_str())),
                            &item.insert
                        )
                        .execute(&mut *tx)
                        .await?;
                    }
                    written.push(at);
                }
                tx.commit().await?;
                Ok(written)
            },
        ))
    }
}

impl Drop for PostgresDb {
    fn drop(&mut self) {
        let pool = self.pool.clone();
        let _ = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(1), pool.close()).await });
    }
}

#[cfg(test)]
mod tests {
    use super::numbered_placeholders;

    #[test]
    fn placeholders_are_numbered_outside_quotes() {
        assert_eq!(
            numbered_placeholders(
                "SELECT '?', \"a?\" FROM t WHERE a = ? AND b LIKE '%?%' AND c < ?"
            ),
            "SELECT '?', \"a?\" FROM t WHERE a = $1 AND b LIKE '%?%' AND c < $2"
        );
    }
}
