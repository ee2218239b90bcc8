//! `backfill`: the only code in the exporter that writes the gateway's database.
//!
//! It adds each settled hour's quota_data deficit (after adjacent-hour netting, exactly what
//! `reconcile` reports as missing) the way the gateway's own flush would: increment the row for
//! (user_id, username, model_name, hour) in place, or insert it. It writes quota_data only,
//! never logs; one transaction per hour; a dry run unless asked to apply. Hours that are not
//! settled are left alone, since the gateway may still flush them.

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
/// else that of the hour's logs.
pub fn plan(
    src: &mut Sources,
    report: &Report,
    per_channel: bool,
) -> Result<Vec<QuotaDataAddition>> {
    let mut fixes = Vec::new();
    for deficit in &report.deficits {
        if per_channel {
            let p = &deficit.pair;
            fixes.push(QuotaDataAddition {
                hour: deficit.hour,
                user_id: p.user_id,
                username: p.username.clone(),
                model: p.model.clone(),
                requests: deficit.amount.requests,
                quota: deficit.amount.quota,
                tokens: deficit.tokens,
                channel_key: Some(ChannelKey {
                    use_group: p.group.clone(),
                    token_id: p.token_id,
                    channel_id: p.channel_id,
                }),
                recorded: (deficit.recorded.requests, deficit.recorded.quota),
            });
            continue;
        }
        let (h, u, m) = (
            Value::Int(deficit.hour),
            Value::Int(deficit.pair.user_id),
            Value::Text(deficit.pair.model.clone()),
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
                        "SELECT {name} FROM logs WHERE {ty} = ? AND {user} = ? AND {model} \
                         AND {created} >= ? AND {created} < ? ORDER BY {id} DESC LIMIT 1",
                        name = d.ident("username"),
                        ty = d.ident("type"),
                        user = d.ident("user_id"),
                        model = d.text_eq(&d.ident("model_name")),
                        created = d.ident("created_at"),
                        id = d.ident("id"),
                    ),
                    &[
                        Value::Int(LOG_TYPE_CONSUME),
                        u,
                        m,
                        h,
                        Value::Int(deficit.hour + HOUR),
                    ],
                )?;
                rows.first()
                    .and_then(|r| r.first())
                    .map(Value::to_label)
                    .unwrap_or_default()
            }
        };
        fixes.push(QuotaDataAddition {
            hour: deficit.hour,
            user_id: deficit.pair.user_id,
            username,
            model: deficit.pair.model.clone(),
            requests: deficit.amount.requests,
            quota: deficit.amount.quota,
            tokens: deficit.tokens,
            channel_key: None,
            recorded: (deficit.recorded.requests, deficit.recorded.quota),
        });
    }
    Ok(fixes)
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
