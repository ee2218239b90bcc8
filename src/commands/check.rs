//! `check`: what the exporter finds in the gateway's database, without serving anything.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Result, bail};

use super::reconcile::open_db;
use crate::cli::DbArgs;
use crate::clock::unix_now;
use crate::collect::Settings;
use crate::db::Engine;
use crate::poll::Pipeline;
use crate::schema::Schema;

pub fn run(args: &DbArgs) -> Result<()> {
    let mut src = open_db(args)?;
    let schema = Schema::detect(&mut src)?;
    println!("database: {}", src.describe());
    println!("gateway:  {}", schema.generation.describe());
    let optional = ["channel_id", "group", "use_time", "other", "request_id"];
    let missing: Vec<_> = optional.iter().filter(|c| !schema.logs.has(c)).collect();
    if !missing.is_empty() {
        println!("logs lacks optional columns (labels degrade): {missing:?}");
    }
    for (table, cols) in [
        ("quota_data", &schema.quota_data),
        ("channels", &schema.channels),
        ("options", &schema.options),
    ] {
        println!(
            "{table}: {}",
            if cols.is_some() { "present" } else { "absent" }
        );
    }
    // A damaged file reads as wrong figures or fails half way: say so, and fail.
    let mut problems = Vec::new();
    for (table, present) in [
        ("logs", true),
        ("quota_data", schema.quota_data.is_some()),
        ("channels", schema.channels.is_some()),
        ("options", schema.options.is_some()),
    ] {
        if !present {
            continue;
        }
        let db = if table == "logs" {
            src.logs()
        } else {
            src.main()
        };
        for p in db.integrity_problems(table)? {
            problems.push(format!("{table}: {p}"));
        }
    }
    if !problems.is_empty() {
        bail!(
            "{} is damaged (SQLite's quick_check):\n  {}",
            src.describe(),
            problems.join("\n  ")
        );
    }
    println!("integrity: ok");
    if src.logs().dialect().0 == Engine::Clickhouse {
        // ClickHouse rows carry no id: they are read by time.
        let created = src.logs().dialect().ident("created_at");
        let rows = src
            .logs()
            .query(&format!("SELECT COUNT(*), MAX({created}) FROM logs"), &[])?;
        let cell = |i: usize| {
            rows.first()
                .and_then(|r| r.get(i))
                .map(|v| v.to_label())
                .unwrap_or_default()
        };
        println!(
            "logs: {} rows in ClickHouse, newest created_at {}; read by time, rows arriving up to \
             {} s late are counted",
            cell(0),
            cell(1),
            crate::collect::logs::LATE_ROWS_SECS
        );
    } else {
        let top = src.logs().query("SELECT MAX(id) FROM logs", &[])?;
        println!(
            "highest logs.id: {}",
            top.first()
                .and_then(|r| r.first())
                .map(|v| v.to_label())
                .unwrap_or_default()
        );
    }
    // One full read, as a cold start makes it: what would be set aside.
    let settings = Settings {
        chunk_rows: args.chunk_rows,
        ..Settings::default()
    };
    let mut pipeline = Pipeline::build(&mut src, settings, Arc::new(AtomicBool::new(false)))?;
    pipeline.poll(&mut src, unix_now())?;
    let rejected = &pipeline.ctx.rows_rejected;
    if rejected.is_empty() {
        println!("implausible rows: none");
    } else {
        println!(
            "implausible rows (left out of the reconciliation; the first of each is logged with its id):"
        );
        for ((table, reason), n) in rejected {
            println!("  {table}: {n} {}", reason.as_str());
        }
    }
    Ok(())
}
