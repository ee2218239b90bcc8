//! `backfill`: the only code in the exporter that writes the gateway's database.
//!
//! It adds each settled hour's quota_data deficit (after adjacent-hour netting, exactly what
//! `reconcile` reports as missing) the way the gateway's own flush would: increment the row for
//! (user_id, username, model_name, hour) in place, or insert it. It writes quota_data only,
//! never logs; one transaction per hour; a dry run unless asked to apply. Hours that are not
//! settled are left alone, since the gateway may still flush them.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};

use crate::db::{Database, Engine, Sources, Value};
use crate::reconcile::{HOUR, Report};

/// One addition to quota_data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fix {
    pub hour: i64,
    pub user_id: i64,
    pub username: String,
    pub model: String,
    pub requests: i64,
    pub quota: i64,
    pub tokens: i64,
}

/// Turns the report's deficits into additions, finding the username the gateway keys on: that
/// of an existing quota_data row for the hour, else that of the hour's logs.
pub fn plan(src: &mut Sources, report: &Report) -> Result<Vec<Fix>> {
    let mut fixes = Vec::new();
    for ((hour, user_id, model), add, tokens) in &report.deficits {
        let (h, u, m) = (
            Value::Int(*hour),
            Value::Int(*user_id),
            Value::Text(model.clone()),
        );
        let main = src.main();
        let d = main.dialect();
        let existing = main.query(
            &format!(
                "SELECT {name} FROM quota_data WHERE {created} = ? AND {user} = ? AND {model} ORDER BY {id} LIMIT 1",
                name = d.ident("username"),
                created = d.ident("created_at"),
                user = d.ident("user_id"),
                model = d.text_eq(&d.ident("model_name")),
                id = d.ident("id"),
            ),
            &[h.clone(), u.clone(), m.clone()],
        )?;
        let username = match existing.first().and_then(|r| r.first()) {
            Some(v) => v.to_label(),
            None => {
                let logs = src.logs();
                let d = logs.dialect();
                let rows = logs.query(
                    &format!(
                        "SELECT {name} FROM logs WHERE {ty} = 2 AND {user} = ? AND {model} \
                         AND {created} >= ? AND {created} < ? ORDER BY {id} DESC LIMIT 1",
                        name = d.ident("username"),
                        ty = d.ident("type"),
                        user = d.ident("user_id"),
                        model = d.text_eq(&d.ident("model_name")),
                        created = d.ident("created_at"),
                        id = d.ident("id"),
                    ),
                    &[u, m, h, Value::Int(hour + HOUR)],
                )?;
                rows.first()
                    .and_then(|r| r.first())
                    .map(Value::to_label)
                    .unwrap_or_default()
            }
        };
        fixes.push(Fix {
            hour: *hour,
            user_id: *user_id,
            username,
            model: model.clone(),
            requests: add.requests,
            quota: add.quota,
            tokens: *tokens,
        });
    }
    Ok(fixes)
}

/// Writes the additions into the gateway's main database (where quota_data lives), one
/// transaction per hour. Like the gateway's flush, an existing row is incremented in place
/// (the lowest id when several nodes created duplicates), otherwise a row is inserted. Returns
/// the number of rows written.
pub fn apply(db: &mut dyn Database, fixes: &[Fix]) -> Result<usize> {
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
    let key = format!(
        "{} = ? AND {} AND {} AND {} = ?",
        q("user_id"),
        d.text_eq(&q("username")),
        d.text_eq(&q("model_name")),
        q("created_at")
    );
    let update = match d.0 {
        // MySQL cannot select from the table it updates, but can order and limit the update.
        Engine::Mysql => format!(
            "UPDATE quota_data SET {set} WHERE {key} ORDER BY {} LIMIT 1",
            q("id")
        ),
        Engine::Sqlite | Engine::Postgres => format!(
            "UPDATE quota_data SET {set} WHERE {id} = (SELECT {id} FROM quota_data WHERE {key} ORDER BY {id} LIMIT 1)",
            id = q("id")
        ),
    };
    let insert = format!(
        "INSERT INTO quota_data ({}, {}, {}, {}, {}, {}, {}) VALUES (?, ?, ?, ?, ?, ?, ?)",
        q("user_id"),
        q("username"),
        q("model_name"),
        q("created_at"),
        q("token_used"),
        q("count"),
        q("quota"),
    );
    let mut by_hour: BTreeMap<i64, Vec<&Fix>> = BTreeMap::new();
    for f in fixes {
        by_hour.entry(f.hour).or_default().push(f);
    }
    let mut written = 0;
    for (hour, fixes) in by_hour {
        let items: Vec<(Vec<Value>, Vec<Value>)> = fixes
            .iter()
            .map(|f| {
                let key = [
                    Value::Int(f.user_id),
                    Value::Text(f.username.clone()),
                    Value::Text(f.model.clone()),
                    Value::Int(hour),
                ];
                let amounts = [
                    Value::Int(f.requests),
                    Value::Int(f.quota),
                    Value::Int(f.tokens),
                ];
                let mut update = amounts.to_vec();
                update.extend(key.iter().cloned());
                let mut insert = key.to_vec();
                insert.extend([
                    Value::Int(f.tokens),
                    Value::Int(f.requests),
                    Value::Int(f.quota),
                ]);
                (update, insert)
            })
            .collect();
        written += db.upsert_all(&update, &insert, &items).with_context(|| {
            format!(
                "writing quota_data for hour {}",
                crate::report::rfc3339(hour)
            )
        })?;
    }
    Ok(written)
}
