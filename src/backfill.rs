//! `backfill`: the only code in the exporter that writes the gateway's database.
//!
//! It adds each settled hour's quota_data deficit (after adjacent-hour netting, exactly what
//! `reconcile` reports as missing) the way the gateway's own flush would: increment the row for
//! (user_id, username, model_name, hour) in place, or insert it. It writes quota_data only,
//! never logs; one transaction per hour; a dry run unless asked to apply. Hours that are not
//! settled are left alone, since the gateway may still flush them.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, Result};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::db::{Sources, Value};
use crate::demo::gateway::GATEWAY_BUSY_TIMEOUT;
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
                "SELECT {name} FROM quota_data WHERE {created} = ? AND {user} = ? AND {model} = ? ORDER BY {id} LIMIT 1",
                name = d.ident("username"),
                created = d.ident("created_at"),
                user = d.ident("user_id"),
                model = d.ident("model_name"),
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
                        "SELECT {name} FROM logs WHERE {ty} = 2 AND {user} = ? AND {model} = ? \
                         AND {created} >= ? AND {created} < ? ORDER BY {id} DESC LIMIT 1",
                        name = d.ident("username"),
                        ty = d.ident("type"),
                        user = d.ident("user_id"),
                        model = d.ident("model_name"),
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

/// Writes the additions into a SQLite gateway database, one transaction per hour. Returns the
/// number of rows written (updated or inserted).
pub fn apply_sqlite(path: &Path, fixes: &[Fix]) -> Result<usize> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
        .with_context(|| format!("opening {} for writing", path.display()))?;
    conn.busy_timeout(GATEWAY_BUSY_TIMEOUT)?;
    let mut by_hour: BTreeMap<i64, Vec<&Fix>> = BTreeMap::new();
    for f in fixes {
        by_hour.entry(f.hour).or_default().push(f);
    }
    let mut written = 0;
    for (hour, fixes) in by_hour {
        // IMMEDIATE takes the write lock up front, so the gateway's concurrent flush waits on
        // its busy timeout instead of either side failing on a lock upgrade.
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = (|| -> Result<()> {
            for f in fixes {
                let id: Option<i64> = conn
                    .query_row(
                        "SELECT id FROM quota_data WHERE user_id = ?1 AND username = ?2 AND model_name = ?3
                         AND created_at = ?4 ORDER BY id LIMIT 1",
                        params![f.user_id, f.username, f.model, hour],
                        |r| r.get(0),
                    )
                    .optional()?;
                match id {
                    Some(id) => conn.execute(
                        "UPDATE quota_data SET count = count + ?1, quota = quota + ?2,
                         token_used = token_used + ?3 WHERE id = ?4",
                        params![f.requests, f.quota, f.tokens, id],
                    )?,
                    None => conn.execute(
                        "INSERT INTO quota_data (user_id, username, model_name, created_at, token_used, count, quota)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        params![f.user_id, f.username, f.model, hour, f.tokens, f.requests, f.quota],
                    )?,
                };
                written += 1;
            }
            Ok(())
        })();
        match result {
            Ok(()) => conn.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e.context(format!(
                    "writing quota_data for hour {}",
                    crate::report::rfc3339(hour)
                )));
            }
        }
    }
    Ok(written)
}
