//! The only write the exporter makes to the gateway's database (`backfill --apply`): adding
//! rows' worth of requests, quota and tokens to `quota_data` the way the gateway's own flush
//! does.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};

use super::{Database, Engine, Upsert, UpsertSql, Value};
use crate::clock::rfc3339;

/// One addition to quota_data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaDataAddition {
    pub hour: i64,
    pub user_id: i64,
    pub username: String,
    pub model: String,
    pub requests: i64,
    pub quota: i64,
    pub tokens: i64,
    /// The rest of the key on the current generation; `None` on the older one.
    pub channel_key: Option<ChannelKey>,
    /// What quota_data held for the compared key and hour when the deficit was found
    /// (requests, quota): the write goes ahead only if it still does.
    pub recorded: (i64, i64),
}

/// The key columns the current generation adds: the exporter's rows carry their own node name,
/// so no gateway node's flush ever updates them, and they never change a row a node wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelKey {
    pub use_group: String,
    pub token_id: i64,
    pub channel_id: i64,
}

/// The `node_name` of every row backfill writes on the current generation.
pub const BACKFILL_NODE_NAME: &str = "newapi-exporter-backfill";

/// Writes the additions into the gateway's main database (where quota_data lives), one
/// transaction per hour. Like the gateway's flush, an existing row is incremented in place
/// (the lowest id when several nodes created duplicates), otherwise a row is inserted; on the
/// current generation only rows of [`BACKFILL_NODE_NAME`] are ever incremented. An addition
/// whose quota_data changed since it was planned is left alone. Returns the additions written.
pub fn add_to_quota_data(
    db: &mut dyn Database,
    additions: &[QuotaDataAddition],
) -> Result<Vec<QuotaDataAddition>> {
    let per_channel = additions.iter().any(|a| a.channel_key.is_some());
    let d = db.dialect();
    let q = |c: &str| d.ident(c);
    let set = format!(
        "{count} = {count} + ?, {quota} = {quota} + ?, {tokens} = {tokens} + ?",
        count = q("count"),
        quota = q("quota"),
        tokens = q("token_used"),
    );
    // Text compared byte for byte, as the reconciliation groups them (MySQL's usual
    // collations would otherwise match `GPT-4o` to a `gpt-4o` row).
    let mut key = format!(
        "{} = ? AND {} AND {} AND {} = ?",
        q("user_id"),
        d.text_eq(&q("username")),
        d.text_eq(&q("model_name")),
        q("created_at")
    );
    let mut columns = vec!["user_id", "username", "model_name", "created_at"];
    if per_channel {
        key.push_str(&format!(
            " AND {} AND {} = ? AND {} = ? AND {}",
            d.text_eq(&q("use_group")),
            q("token_id"),
            q("channel_id"),
            d.text_eq(&q("node_name")),
        ));
        columns.extend(["use_group", "token_id", "channel_id", "node_name"]);
    }
    columns.extend(["token_used", "count", "quota"]);
    // What the deficit was found against: the compared key (user and model on the older
    // generation; with username, group, token and channel on the current one), every node.
    let mut compared = format!(
        "{} = ? AND {} AND {} = ?",
        q("user_id"),
        d.text_eq(&q("model_name")),
        q("created_at")
    );
    if per_channel {
        compared.push_str(&format!(
            " AND {} AND {} AND {} = ? AND {} = ?",
            d.text_eq(&q("username")),
            d.text_eq(&q("use_group")),
            q("token_id"),
            q("channel_id"),
        ));
    }
    let check = format!(
        "SELECT {}, {} FROM quota_data WHERE {compared}",
        d.sum_int(&format!("COALESCE({}, 0)", q("count"))),
        d.sum_int(&format!("COALESCE({}, 0)", q("quota"))),
    );
    let update = match d.0 {
        // MySQL cannot select from the table it updates, but can order and limit the update.
        Engine::Mysql => format!(
            "UPDATE quota_data SET {set} WHERE {key} ORDER BY {} LIMIT 1",
            q("id")
        ),
        // ClickHouse never holds quota_data (`db::open` refuses it as SQL_DSN).
        Engine::Sqlite | Engine::Postgres | Engine::Clickhouse => format!(
            "UPDATE quota_data SET {set} WHERE {id} = (SELECT {id} FROM quota_data WHERE {key} ORDER BY {id} LIMIT 1)",
            id = q("id")
        ),
    };
    let insert = format!(
        "INSERT INTO quota_data ({}) VALUES ({})",
        columns.iter().map(|c| q(c)).collect::<Vec<_>>().join(", "),
        vec!["?"; columns.len()].join(", "),
    );
    let mut by_hour: BTreeMap<i64, Vec<&QuotaDataAddition>> = BTreeMap::new();
    for f in additions {
        by_hour.entry(f.hour).or_default().push(f);
    }
    let sql = UpsertSql {
        check,
        update,
        insert,
    };
    let mut written = Vec::new();
    for (hour, fixes) in by_hour {
        let items: Vec<Upsert> = fixes
            .iter()
            .map(|f| {
                let mut check = vec![
                    Value::Int(f.user_id),
                    Value::Text(f.model.clone()),
                    Value::Int(hour),
                ];
                if let Some(c) = &f.channel_key {
                    check.extend([
                        Value::Text(f.username.clone()),
                        Value::Text(c.use_group.clone()),
                        Value::Int(c.token_id),
                        Value::Int(c.channel_id),
                    ]);
                }
                let mut key = vec![
                    Value::Int(f.user_id),
                    Value::Text(f.username.clone()),
                    Value::Text(f.model.clone()),
                    Value::Int(hour),
                ];
                if let Some(c) = &f.channel_key {
                    key.extend([
                        Value::Text(c.use_group.clone()),
                        Value::Int(c.token_id),
                        Value::Int(c.channel_id),
                        Value::Text(BACKFILL_NODE_NAME.to_string()),
                    ]);
                }
                let amounts = [
                    Value::Int(f.requests),
                    Value::Int(f.quota),
                    Value::Int(f.tokens),
                ];
                let mut update = amounts.to_vec();
                update.extend(key.iter().cloned());
                let mut insert = key;
                insert.extend([
                    Value::Int(f.tokens),
                    Value::Int(f.requests),
                    Value::Int(f.quota),
                ]);
                Upsert {
                    check,
                    expected: vec![f.recorded.0, f.recorded.1],
                    update,
                    insert,
                }
            })
            .collect();
        let done = db
            .upsert_all(&sql, &items)
            .with_context(|| format!("writing quota_data for hour {}", rfc3339(hour)))?;
        written.extend(done.into_iter().map(|at| fixes[at].clone()));
    }
    Ok(written)
}
