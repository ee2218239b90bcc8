//! `reconcile`: logs against quota_data over a range, read once and printed.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Result, anyhow, bail, ensure};

use crate::cli::{DbArgs, RangeArgs, ReconcileArgs};
use crate::clock::{HOUR, hour_of, unix_now};
use crate::collect::Settings;
use crate::db::{self, Sources};
use crate::poll::Pipeline;
use crate::reconcile::Report;
use crate::reconcile::format::render;

/// Opens the databases the gateway's settings name.
pub fn open_db(args: &DbArgs) -> Result<Sources> {
    let (main, logs) = args.configs()?;
    db::open(&main, &logs)
}

/// Reads `[since, until)` once and reconciles it: the `reconcile` and `backfill` commands.
pub fn run_once(
    src: &mut Sources,
    since: i64,
    until: i64,
    settle_margin_secs: i64,
    chunk_rows: i64,
) -> Result<Report> {
    let settings = Settings {
        chunk_rows,
        window_secs: until - since,
        settle_margin_secs,
        fixed_range: Some((since, until)),
        ..Settings::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut p = Pipeline::build(src, settings, stop)?;
    if p.ctx.schema.quota_data.is_none() {
        bail!(
            "{} was written by one-api, which has no quota_data table: there is no dashboard view to reconcile",
            src.describe()
        );
    }
    p.poll(src, unix_now())?;
    p.ctx
        .report
        .take()
        .map(|r| Report::clone(&r))
        .ok_or_else(|| anyhow!("the reconciliation produced no report"))
}

/// Reconciles the requested range (default: all history up to the end of the current hour).
pub fn reconcile_range(src: &mut Sources, db: &DbArgs, range: &RangeArgs) -> Result<Report> {
    let since = range.since.unwrap_or(0);
    let until = range.until.unwrap_or_else(|| hour_of(unix_now()) + HOUR);
    ensure!(
        since < until,
        "--since ({since}) must be before --until ({until})"
    );
    run_once(
        src,
        since,
        until,
        range.settle.margin.as_secs() as i64,
        db.chunk_rows,
    )
}

pub fn run(args: &ReconcileArgs) -> Result<()> {
    let mut src = open_db(&args.db)?;
    let r = reconcile_range(&mut src, &args.db, &args.range)?;
    print!("{}", render(&r, args.format.into()));
    Ok(())
}
