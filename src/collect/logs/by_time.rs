//! `logs` in ClickHouse: no id to follow (the gateway leaves `id` at 0), rows ordered by
//! `(created_at, request_id)`, and several nodes inserting rows dated a little in the past.
//!
//! So the read follows time instead. Hours that started more than [`LATE_ROWS_SECS`] before the
//! poll are settled: read once (the cold start reads all of them, a few million rows per
//! statement) and
//! folded into the counters for good. The hours after that are open: each poll aggregates
//! them again in ClickHouse (the table's order key makes that a range read) and replaces what
//! the last poll had for them. A row is therefore counted exactly once if it arrives while its
//! hour is open, that is at least [`LATE_ROWS_SECS`] after its `created_at`; a row arriving
//! later is not counted until the exporter next starts. Rows deleted by the table's TTL never
//! lower the counters.

use std::collections::HashMap;

use anyhow::Result;

use super::{Context, LogsCollector, first_int};
use crate::clock::{DAY, HOUR, hour_of};
use crate::db::{Database, Value};

/// How late a row may arrive and still be counted.
pub const LATE_ROWS_SECS: i64 = HOUR;

/// About how many rows one statement aggregates: few statements (each costs ClickHouse a
/// setup of its own) that still end well inside the statement time limit.
const ROWS_PER_STATEMENT: i64 = 4_000_000;

/// The state of a time-ordered read.
#[derive(Debug, Default)]
pub(super) struct ByTime {
    /// Hours before this are settled and counted.
    pub(super) settled_below: Option<i64>,
    /// What the open hours held at the last poll.
    pub(super) open: HashMap<super::UsageKey, super::Usage>,
}

impl LogsCollector {
    /// One poll of a table without usable ids. All or nothing: what a failed read had added
    /// for the reconciliation is taken out again, and the counters keep what they had.
    pub(super) fn poll_by_time(&mut self, db: &mut dyn Database, ctx: &mut Context) -> Result<()> {
        let boundary = hour_of(ctx.now - LATE_ROWS_SECS);
        let settled = self.by_time.settled_below.unwrap_or(i64::MIN);
        // The open hours of the last poll are read again below: forget what they held.
        ctx.recording.forget_logs_from(settled);
        let result = self.settle_and_reopen(db, ctx, settled, boundary);
        if result.is_err() || ctx.stopping() {
            let kept = self.by_time.settled_below.unwrap_or(i64::MIN);
            ctx.recording.forget_logs_from(kept);
        }
        result
    }

    fn settle_and_reopen(
        &mut self,
        db: &mut dyn Database,
        ctx: &mut Context,
        settled: i64,
        boundary: i64,
    ) -> Result<()> {
        if settled < boundary {
            let newly = self.read_apart(db, ctx, settled, boundary, true)?;
            if ctx.stopping() {
                return Ok(());
            }
            for (key, usage) in newly {
                self.usage.entry(key).or_default().add(&usage);
            }
            self.by_time.settled_below = Some(boundary);
        }
        // Open hours, and rows dated beyond them (counted as open until their hour settles).
        let from = settled.max(boundary);
        let open = self.read_apart(db, ctx, from, i64::MAX, false)?;
        if !ctx.stopping() {
            self.by_time.open = open;
        }
        Ok(())
    }

    /// Reads the rows with `from <= created_at < until` into counters of their own. With `settle`, rows set aside are counted
    /// as rejected (settled rows are read once).
    fn read_apart(
        &mut self,
        db: &mut dyn Database,
        ctx: &mut Context,
        from: i64,
        until: i64,
        settle: bool,
    ) -> Result<HashMap<super::UsageKey, super::Usage>> {
        let kept = std::mem::take(&mut self.usage);
        self.count_rejections = settle;
        let result = self.read_in_spans(db, ctx, from, until);
        self.count_rejections = true;
        let read = std::mem::replace(&mut self.usage, kept);
        result.map(|()| read)
    }

    /// Reads `[from, until)` in statements of about [`ROWS_PER_STATEMENT`] rows each (a time
    /// span sized from the range's row count), skipping spans without rows.
    fn read_in_spans(
        &mut self,
        db: &mut dyn Database,
        ctx: &mut Context,
        from: i64,
        until: i64,
    ) -> Result<()> {
        if from >= until {
            return Ok(());
        }
        let bounds = [Value::Int(from), Value::Int(until)];
        let stats = db.query(&self.time_stats_sql, &bounds)?;
        let cell = |i: usize| stats.first().and_then(|r| r.get(i)).and_then(Value::as_i64);
        // ClickHouse's MIN over no rows is 0: the count says whether there are any.
        let (Some(rows), Some(oldest), Some(newest)) = (cell(0), cell(1), cell(2)) else {
            return Ok(());
        };
        if rows <= 0 {
            return Ok(());
        }
        let span = (newest as i128 - oldest as i128 + 1).max(1);
        let step = (span * ROWS_PER_STATEMENT as i128 / rows as i128)
            .clamp(HOUR as i128, DAY as i128 * 366);
        let step = step as i64;
        let range = format!("{c} >= ? AND {c} < ?", c = self.created);
        let next_sql = self.next_time_sql.clone();
        let next_after = |db: &mut dyn Database, t: i64| -> Result<Option<i64>> {
            Ok(first_int(
                &db.query(&next_sql, &[Value::Int(t), Value::Int(until)])?,
            ))
        };
        let mut next = Some(oldest.max(from));
        let mut done = from;
        while let Some(lo) = next {
            // Every statement moves forward, whatever the table answers.
            if ctx.stopping() || lo < done {
                break;
            }
            let hi = lo.saturating_add(step).min(until);
            self.read(db, ctx, &range, &[Value::Int(lo), Value::Int(hi)], false)?;
            done = hi;
            next = if hi < until {
                next_after(db, hi)?
            } else {
                None
            };
        }
        Ok(())
    }
}
