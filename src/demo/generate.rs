//! `newapi-exporter generate`: a large, realistic gateway database for benchmarks, fast.
//!
//! Rows are produced inside SQLite by one recursive statement (no per-row round trips), with
//! proportions taken from the demo gateway: a skewed mix of models and users, several channels
//! per model, three groups, about 3% errors and 0.5% refunds, async task settlement rows, and
//! one async workflow model that never reaches quota_data. `quota_data` is then built from the
//! logs the way the gateway's hourly flush would have written it. Timestamps end now, spread
//! over `days`, so the newest hours fall inside the reconciliation window.
//!
//! Pseudo-random choices come from a multiplicative hash of the row number, so the same
//! arguments give the same database.

use std::path::Path;

use anyhow::{Context, Result, bail};

use super::LOST_CHANNEL;
use super::gateway::Gateway;
use super::gateway::Tables;
use crate::clock::unix_now;

/// (model, quota per token x1000, share of traffic in per mille, first channel, channels)
const MODELS: &[(&str, i64, i64, i64, i64)] = &[
    ("gpt-4o-mini", 75, 300, 1, 2),
    ("gpt-4o", 1250, 200, 1, 2),
    ("claude-sonnet-4-5", 1500, 150, 3, 1),
    ("deepseek-chat", 135, 120, 5, 1),
    ("gemini-2.5-pro", 625, 90, 4, 1),
    ("gemini-2.5-flash", 75, 60, 4, 1),
    ("o3-mini", 550, 30, 1, 2),
    ("qwen-max", 800, 20, 8, 1),
    ("text-embedding-3-small", 10, 20, 1, 2),
    ("coze-workflow-async", 0, 8, 6, 1),
    ("kling-v2-1", 0, 2, 7, 1),
];

const USERS: i64 = 300;

/// The model choice as SQL over the hash `h`.
fn model_case(column: usize) -> String {
    let mut case = String::from("CASE");
    let mut upto = 0;
    for m in MODELS {
        upto += m.2;
        let v = match column {
            0 => format!("'{}'", m.0),
            1 => m.1.to_string(),
            2 => m.3.to_string(),
            _ => m.4.to_string(),
        };
        case.push_str(&format!(" WHEN h % 1000 < {upto} THEN {v}"));
    }
    case.push_str(" END");
    case
}

/// Writes `rows` log rows (and the matching quota_data) into a new database at `path`.
/// On the current generation quota_data is keyed per channel, token, group and node (two nodes
/// share the traffic), settlements are mirrored, and the workflow channel's flushes never land;
/// on the older one it is keyed per user, model and hour and neither the workflow model nor
/// task settlements reach it.
pub fn generate(path: &Path, rows: i64, days: i64, tables: Tables) -> Result<()> {
    if rows < 1 || days < 1 {
        bail!("--rows and --days must be at least 1");
    }
    if path.exists() {
        bail!("{} exists; generate writes a new database", path.display());
    }
    let gw = Gateway::create(path, tables)?;
    gw.set_option("QuotaPerUnit", "500000")?;
    for (id, ty, name) in [
        (1, 1, "openai-1"),
        (2, 3, "azure-1"),
        (3, 14, "anthropic"),
        (4, 24, "gemini"),
        (5, 43, "deepseek"),
        (6, 49, "coze"),
        (7, 50, "kling"),
        (8, 17, "ali"),
    ] {
        gw.add_channel(id, ty, name, 1, 100.0, 500, "default", "")?;
    }
    let now = unix_now();
    let span = days * 86_400;
    let start = now - span;
    let conn = &gw.conn;
    // Bulk load: no rollback journal needed for a file nobody else uses yet.
    conn.execute_batch("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;")?;
    let sql = format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows}),
         r AS (SELECT i, (i * 2654435761) % 4294967296 AS h, (i * 40503 + 7) % 65536 AS g FROM n),
         m AS (SELECT i, h, g, {model} AS model, {ratio} AS ratio, {channel} AS ch0, {channels} AS chn,
                      1 + ((g * (h % 97)) % {USERS}) * ((h / 1000) % {USERS}) / {USERS} AS uid,
                      CASE WHEN g % 1000 < 30 THEN 5 WHEN g % 1000 < 35 THEN 6 ELSE 2 END AS ty,
                      50 + (h / 7) % 6000 AS pt, 10 + (h / 13) % 1500 AS ct
               FROM r)
         INSERT INTO logs (id, user_id, created_at, type, content, username, token_name, model_name, quota,
                           prompt_tokens, completion_tokens, use_time, is_stream, channel_id, `group`,
                           request_id, other, token_id)
         SELECT i, uid, {start} + i * {span} / {rows}, ty,
                CASE ty WHEN 5 THEN 'upstream error: status 429' WHEN 6 THEN 'task failed, quota refunded'
                        ELSE 'model ratio ' || ratio || ', group ratio 1' END,
                'user' || uid, 'key-' || (uid % 4), model,
                CASE WHEN ty = 5 THEN 0
                     WHEN ty = 6 THEN 1000 + h % 200000
                     WHEN model = 'coze-workflow-async' THEN 1500000 + h % 2000000
                     WHEN model = 'kling-v2-1' THEN 200000 + h % 600000
                     ELSE MAX(1, (pt + 4 * ct) * ratio / 1000) END,
                CASE WHEN ty = 2 AND model = 'kling-v2-1' THEN 0 WHEN ty = 2 THEN pt ELSE 0 END,
                CASE WHEN ty = 2 AND model = 'kling-v2-1' THEN 0 WHEN ty = 2 THEN ct ELSE 0 END,
                1 + h % 30, h % 2, ch0 + (g % chn),
                CASE WHEN g % 100 < 70 THEN 'default' WHEN g % 100 < 95 THEN 'vip' ELSE 'svip' END,
                CASE WHEN model = 'kling-v2-1' AND ty = 2 THEN '' ELSE printf('req-%012d', i) END,
                CASE WHEN model = 'kling-v2-1' AND ty = 2
                     THEN printf('{{\"is_task\":true,\"task_id\":\"task_%d\",\"pre_consumed_quota\":%d}}', i, 200000 + h % 600000)
                     ELSE printf('{{\"model_ratio\":%.3f,\"group_ratio\":1,\"frt\":%d}}', ratio / 1000.0, 200 + h % 3000) END,
                1000 + 2 * uid + (g % 2)
         FROM m",
        model = model_case(0),
        ratio = model_case(1),
        channel = model_case(2),
        channels = model_case(3),
    );
    conn.execute_batch(&sql)
        .with_context(|| format!("generating {rows} log rows"))?;
    // quota_data as the gateway's flush writes it.
    let mirror = match tables {
        // Every consume row, per the eight-column key, from the node that served it (by id);
        // the workflow channel's rows are lost at the flush.
        Tables::NewApiCurrent => format!(
            "INSERT INTO quota_data (user_id, username, model_name, created_at, use_group, token_id,
                                     channel_id, node_name, token_used, count, quota)
             SELECT user_id, username, model_name, created_at - created_at % 3600, `group`, token_id,
                    channel_id, 'node-' || (id % 2), SUM(prompt_tokens + completion_tokens), COUNT(*),
                    SUM(quota)
             FROM logs WHERE type = 2 AND channel_id <> {LOST_CHANNEL}
             GROUP BY 1, 2, 3, 4, 5, 6, 7, 8 ORDER BY 4"
        ),
        // Every consume row but those whose path skips the map (the async workflow) or that are
        // never mirrored (task settlements).
        _ => "INSERT INTO quota_data (user_id, username, model_name, created_at, token_used, count, quota)
              SELECT user_id, username, model_name, created_at - created_at % 3600,
                     SUM(prompt_tokens + completion_tokens), COUNT(*), SUM(quota)
              FROM logs WHERE type = 2 AND model_name NOT IN ('coze-workflow-async', 'kling-v2-1')
              GROUP BY user_id, username, model_name, created_at - created_at % 3600
              ORDER BY created_at - created_at % 3600"
            .to_string(),
    };
    conn.execute_batch(&format!("{mirror}; PRAGMA journal_mode = DELETE;"))
        .context("building quota_data")?;
    Ok(())
}
