//! `backfill`: the only code in the exporter that writes the gateway's database.
//!
//! It adds each settled hour's quota_data deficit (after adjacent-hour netting, exactly what
//! `reconcile` reports as missing) the way the gateway's own flush would: increment the row for
//! (user_id, username, model_name, hour) in place, or insert it. It writes quota_data only,
//! never logs; one transaction per hour; a dry run unless asked to apply. Hours that are not
//! settled are left alone, since the gateway may still flush them.

use std::collections::{BTreeSet, HashMap, HashSet};

use anyhow::Result;

use super::reconcile::{open_db, reconcile_range};
use crate::cli::BackfillArgs;
use crate::clock::{HOUR, rfc3339};
use crate::db::write::{BACKFILL_NODE_NAME, ChannelKey, QuotaDataAddition, add_to_quota_data};
use crate::db::{Sources, Value};
use crate::reconcile::Report;
use crate::schema::LOG_TYPE_CONSUME;

/// Turns the report's deficits into additions. On the current generation each deficit already
/// names its whole key (user, username, model, group, token, channel). On the older one the
/// username the gateway keys on is looked up: that of an existing quota_data row for the hour,
/// else that of the hour's newest consume log.
pub fn plan(
    src: &mut Sources,
    report: &Report,
    per_channel: bool,
) -> Result<Vec<QuotaDataAddition>> {
    let usernames = if per_channel {
        HashMap::new()
    } else {
        usernames(src, report)?
    };
    Ok(report
        .deficits
        .iter()
        .map(|deficit| {
            let p = &deficit.pair;
            let (username, channel_key) = if per_channel {
                let key = ChannelKey {
                    use_group: p.group.to_string(),
                    token_id: p.token_id,
                    channel_id: p.channel_id,
                };
                (p.username.to_string(), Some(key))
            } else {
                let key = (deficit.hour, p.user_id, p.model.to_string());
                (usernames.get(&key).cloned().unwrap_or_default(), None)
            };
            QuotaDataAddition {
                hour: deficit.hour,
                user_id: p.user_id,
                username,
                model: p.model.to_string(),
                requests: deficit.amount.requests,
                quota: deficit.amount.quota,
                tokens: deficit.tokens,
                channel_key,
                recorded: (deficit.recorded.requests, deficit.recorded.quota),
            }
        })
        .collect())
}

/// Hours one planning statement covers.
const PLAN_SPAN_HOURS: i64 = 24;

/// The username each (hour, user, model) with a deficit is keyed by on the older generation:
/// one grouped statement per table and span of hours that has deficits, never one per row.
fn usernames(src: &mut Sources, report: &Report) -> Result<HashMap<(i64, i64, String), String>> {
    let wanted: HashSet<(i64, i64, String)> = report
        .deficits
        .iter()
        .map(|d| (d.hour, d.pair.user_id, d.pair.model.to_string()))
        .collect();
    let hours: BTreeSet<i64> = wanted.iter().map(|k| k.0).collect();
    let mut spans: Vec<(i64, i64)> = Vec::new();
    for h in hours {
        match spans.last_mut() {
            Some((from, until)) if h < *from + PLAN_SPAN_HOURS * HOUR => *until = h + HOUR,
            _ => spans.push((h, h + HOUR)),
        }
    }
    let main = src.main();
    let d = main.dialect();
    // The oldest row of each key is the one the gateway's flush would have incremented.
    let qd_sql = format!(
        "SELECT {created}, {user}, {model}, {name}, MIN({id}) FROM quota_data \
         WHERE {created} >= ? AND {created} < ? GROUP BY 1, 2, 3, 4",
        created = d.ident("created_at"),
        user = d.ident("user_id"),
        model = d.text_key(&d.ident("model_name")),
        name = d.text_key(&d.ident("username")),
        id = d.ident("id"),
    );
    let mut found: HashMap<(i64, i64, String), (i64, String)> = HashMap::new();
    for (from, until) in &spans {
        for r in main.query(&qd_sql, &[Value::Int(*from), Value::Int(*until)])? {
            let key = (int(&r, 0), int(&r, 1), text(&r, 2));
            if !wanted.contains(&key) {
                continue;
            }
            let id = int(&r, 4);
            let e = found.entry(key).or_insert((id, text(&r, 3)));
            if id < e.0 {
                *e = (id, text(&r, 3));
            }
        }
    }
    let logs = src.logs();
    let d = logs.dialect();
    let created = d.ident("created_at");
    // Else the username of the hour's newest consume log.
    let logs_sql = format!(
        "SELECT {created} - {created} % 3600, {user}, {model}, {name}, MAX({id}) FROM logs \
         WHERE {ty} = ? AND {created} >= ? AND {created} < ? GROUP BY 1, 2, 3, 4",
        user = d.ident("user_id"),
        model = d.text_key(&d.ident("model_name")),
        name = d.text_key(&d.ident("username")),
        id = d.ident("id"),
        ty = d.ident("type"),
    );
    let mut from_logs: HashMap<(i64, i64, String), (i64, String)> = HashMap::new();
    for (from, until) in &spans {
        let params = [LOG_TYPE_CONSUME, *from, *until].map(Value::Int);
        for r in logs.query(&logs_sql, &params)? {
            let key = (int(&r, 0), int(&r, 1), text(&r, 2));
            if !wanted.contains(&key) || found.contains_key(&key) {
                continue;
            }
            let id = int(&r, 4);
            let e = from_logs.entry(key).or_insert((id, text(&r, 3)));
            if id > e.0 {
                *e = (id, text(&r, 3));
            }
        }
    }
    Ok(found
        .into_iter()
        .chain(from_logs)
        .map(|(k, (_, name))| (k, name))
        .collect())
}

fn int(r: &[Value], i: usize) -> i64 {
    r.get(i).and_then(Value::as_i64).unwrap_or(0)
}

fn text(r: &[Value], i: usize) -> String {
    r.get(i).map(Value::to_label).unwrap_or_default()
}

/// `backfill`: prints the additions the settled deficits call for, and writes them with
/// `--apply`.
pub fn run(args: &BackfillArgs) -> Result<()> {
    let mut src = open_db(&args.db)?;
    let r = reconcile_range(&mut src, &args.db, &args.range)?;
    if r.until > r.settled_until {
        println!(
            "hours from {} on are not settled yet (the gateway may still flush them until hour end + \
             DataExportInterval + the margin): left alone",
            rfc3339(r.settled_until)
        );
    }
    let fixes = plan(&mut src, &r, r.per_channel)?;
    if fixes.is_empty() {
        println!("nothing to write: quota_data has no deficit in the settled hours of this range");
        return Ok(());
    }
    println!(
        "hour                  user_id  username  model  {}+requests  +quota  +tokens",
        if r.per_channel {
            "group  token_id  channel_id  "
        } else {
            ""
        }
    );
    for f in &fixes {
        let channel = f
            .channel_key
            .as_ref()
            .map(|c| format!("{:?}  {}  {}  ", c.use_group, c.token_id, c.channel_id))
            .unwrap_or_default();
        println!(
            "{}  {}  {:?}  {:?}  {channel}+{}  +{}  +{}",
            rfc3339(f.hour),
            f.user_id,
            f.username,
            f.model,
            f.requests,
            f.quota,
            f.tokens
        );
    }
    let (req, quota): (i64, i64) = fixes
        .iter()
        .fold((0, 0), |a, f| (a.0 + f.requests, a.1 + f.quota));
    if !args.apply {
        println!(
            "dry run: would add {req} requests and {quota} quota in {} rows; run again with --apply to write",
            fixes.len()
        );
        return Ok(());
    }
    let written = add_to_quota_data(src.main(), &fixes)?;
    let (req, quota): (i64, i64) = written
        .iter()
        .fold((0, 0), |a, f| (a.0 + f.requests, a.1 + f.quota));
    println!(
        "wrote {} quota_data rows: added {req} requests and {quota} quota",
        written.len()
    );
    if written.len() < fixes.len() {
        println!(
            "{} rows left alone: their quota_data changed since this run compared it (another \
             backfill, or a late flush); run again to see what is still missing",
            fixes.len() - written.len()
        );
    }
    if r.per_channel {
        println!(
            "(rows written with node_name {BACKFILL_NODE_NAME:?}: no gateway node ever updates them)"
        );
    }
    Ok(())
}
