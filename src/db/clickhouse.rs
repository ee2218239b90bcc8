//! ClickHouse, where the largest gateways keep `logs` (`LOG_SQL_DSN`), through the
//! `clickhouse` crate (ClickHouse Inc.'s own Rust client) over the server's HTTP interface.
//!
//! Only reads: every statement is one HTTP request with the server's `max_execution_time` and a
//! client-side deadline; values are bound by the client's escaping. Results come back as
//! `JSONCompact`, which every server release since long before the gateway's minimum reads
//! and writes alike, with the column types alongside.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;

use super::dsn::ClickhouseDsn;
use super::{Database, Dialect, Engine, Row, Upsert, UpsertSql, Value};

pub struct ClickhouseDb {
    rt: tokio::runtime::Runtime,
    client: clickhouse::Client,
    database: String,
    describe: String,
}

/// A `JSONCompact` answer: column types, then rows of values.
#[derive(Deserialize)]
struct Answer {
    meta: Vec<Column>,
    data: Vec<Vec<serde_json::Value>>,
}

#[derive(Deserialize)]
struct Column {
    #[serde(rename = "type")]
    ty: String,
}

/// One JSON cell as a value: integer types (64-bit ones arrive quoted) as integers, floats as
/// reals, everything else as text.
fn cell(ty: &str, v: &serde_json::Value) -> Value {
    let base = ty
        .strip_prefix("Nullable(")
        .and_then(|t| t.strip_suffix(')'))
        .unwrap_or(ty);
    let integer = base.starts_with("Int") || base.starts_with("UInt");
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            // An unsigned value beyond i64 (a sum of UInt64): the most an i64 holds.
            None if n.is_u64() => Value::Int(i64::MAX),
            None => Value::Real(n.as_f64().unwrap_or(0.0)),
        },
        serde_json::Value::String(s) if integer => match s.parse::<i64>() {
            Ok(i) => Value::Int(i),
            Err(_) if s.parse::<u64>().is_ok() => Value::Int(i64::MAX),
            Err(_) => Value::Text(s.clone()),
        },
        serde_json::Value::String(s) => Value::Text(s.clone()),
        other => Value::Text(other.to_string()),
    }
}

fn parse_answer(body: &[u8]) -> Result<Vec<Row>> {
    let answer: Answer =
        serde_json::from_slice(body).context("reading ClickHouse's JSONCompact answer")?;
    Ok(answer
        .data
        .iter()
        .map(|row| {
            row.iter()
                .zip(&answer.meta)
                .map(|(v, c)| cell(&c.ty, v))
                .collect()
        })
        .collect())
}

impl ClickhouseDb {
    pub fn connect(dsn: &ClickhouseDsn) -> Result<Self> {
        let describe = super::dsn::DbConfig::Clickhouse(dsn.clone()).describe();
        if dsn.skip_verify {
            bail!(
                "{describe}: skip_verify=true is not supported; the exporter verifies the server's \
                 certificate against the system's CA store (add the server's CA there)"
            );
        }
        let mut client = clickhouse::Client::default()
            .with_url(&dsn.http_url)
            .with_database(&dsn.database)
            .with_compression(clickhouse::Compression::None);
        if let Some(user) = &dsn.user {
            client = client.with_user(user);
        }
        if let Some(password) = &dsn.password {
            client = client.with_password(password);
        }
        let mut db = ClickhouseDb {
            rt: super::driver_runtime()?,
            // The server stops a statement that runs longer, as on the other engines.
            client: client.clone().with_setting(
                "max_execution_time",
                super::STATEMENT_TIMEOUT_SECS.to_string(),
            ),
            database: dsn.database.clone(),
            describe,
        };
        if let Err(e) = db.query("SELECT 1", &[]) {
            // A user whose profile says readonly=1 may change no setting at all: it keeps the
            // server's own limit (and the client-side deadline still applies).
            if !format!("{e:#}").contains("readonly") {
                // The error starts with the (masked) DSN.
                bail!("cannot connect to {e:#}");
            }
            db.client = client;
            db.query("SELECT 1", &[])
                .map_err(|e| anyhow!("cannot connect to {e:#}"))?;
        }
        Ok(db)
    }
}

impl Database for ClickhouseDb {
    fn dialect(&self) -> Dialect {
        Dialect::of(Engine::Clickhouse)
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn table_columns(&mut self, table: &str) -> Result<Option<Vec<String>>> {
        let rows = self.query(
            "SELECT name FROM system.columns WHERE database = ? AND table = ?",
            &[
                Value::Text(self.database.clone()),
                Value::Text(table.to_string()),
            ],
        )?;
        let cols: Vec<String> = rows
            .iter()
            .filter_map(|r| r.first().map(Value::to_label))
            .collect();
        Ok((!cols.is_empty()).then_some(cols))
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        let mut q = self.client.query(sql);
        for p in params {
            q = match p {
                Value::Null => q.bind(None::<i64>),
                Value::Int(i) => q.bind(*i),
                Value::Real(f) => q.bind(*f),
                Value::Text(s) => q.bind(s.as_str()),
            };
        }
        // Each statement as sent, values bound: what an operator (or a test) runs elsewhere.
        tracing::debug!(statement = %q.sql_display(), "clickhouse statement");
        let limit = Duration::from_secs(super::STATEMENT_TIMEOUT_SECS + 5);
        let describe = &self.describe;
        let body = self
            .rt
            .block_on(async {
                tokio::time::timeout(limit, async {
                    let mut cursor = q.fetch_bytes("JSONCompact")?;
                    cursor.collect().await
                })
                .await
            })
            .map_err(|_| anyhow!("{describe} did not answer within {}s", limit.as_secs()))?
            .map_err(|e| anyhow!("{describe}: {e}"))?;
        parse_answer(&body)
    }

    fn upsert_all(&mut self, _sql: &UpsertSql, _items: &[Upsert]) -> Result<Vec<usize>> {
        bail!(
            "{}: ClickHouse holds only `logs`, which the exporter never writes",
            self.describe
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_with_their_types() {
        let body = br#"{"meta":[{"name":"a","type":"UInt64"},{"name":"b","type":"Nullable(Int64)"},
            {"name":"c","type":"String"},{"name":"d","type":"Int32"},{"name":"e","type":"Float64"}],
            "data":[["18446744073709551615",null,"42",-7,1.5],["12","-3","x",0,2]],"rows":2}"#;
        let rows = parse_answer(body).unwrap();
        assert_eq!(
            rows,
            vec![
                vec![
                    Value::Int(i64::MAX),
                    Value::Null,
                    Value::Text("42".into()),
                    Value::Int(-7),
                    Value::Real(1.5)
                ],
                vec![
                    Value::Int(12),
                    Value::Int(-3),
                    Value::Text("x".into()),
                    Value::Int(0),
                    Value::Int(2)
                ],
            ]
        );
        assert!(parse_answer(b"Code: 60. DB::Exception: Table doesn't exist").is_err());
    }
}
