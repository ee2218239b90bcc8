//! Where the incremental read of `logs` stands, and how it stays right: ids that commit out of
//! order on MySQL and PostgreSQL, and rows deleted or ids given out again.

use anyhow::Result;

use super::{Context, LogsCollector, first_int};
use crate::db::{Database, Value};

/// The newest row counted, as it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct NewestRow {
    pub(super) id: i64,
    pub(super) created_at: i64,
    pub(super) quota: i64,
}

/// On MySQL and PostgreSQL, concurrent inserts can commit out of id order: a smaller id may
/// become visible after a larger one was read. The newest ids (this many below the top) are
/// therefore read with one group per row, which tells exactly which ids were seen; the ids
/// missing among them are looked for again each poll until they appear or expire.
pub(super) const GAP_WINDOW: i64 = 10_000;
/// How long a missing id is waited for (a rolled-back insert never appears).
const GAP_GRACE_SECS: i64 = 600;
/// Most missing ids remembered; the oldest are dropped beyond it.
pub(super) const GAP_MAX: usize = 20_000;
/// Ids per `IN (...)` list when looking for missing ids.
const GAP_BATCH: usize = 500;

impl LogsCollector {
    /// What the row with `id` holds now, if it exists.
    pub(super) fn row_at(&self, db: &mut dyn Database, id: i64) -> Result<Option<NewestRow>> {
        let rows = db.query(&self.row_sql, &[Value::Int(id)])?;
        Ok(rows.first().map(|r| NewestRow {
            id,
            created_at: r.first().and_then(Value::as_i64).unwrap_or(0),
            quota: r.get(1).and_then(Value::as_i64).unwrap_or(0),
        }))
    }

    /// The cursor assumes that the rows up to it are the ones already counted. When the newest
    /// of them is gone or holds something else (the table was purged, the newest rows deleted
    /// and their ids given out again), the count resumes after the last row that is still one
    /// of those: rows written later have a later `created_at`.
    pub(super) fn resume_after_deletions(
        &mut self,
        db: &mut dyn Database,
        top: Option<i64>,
    ) -> Result<()> {
        let Some(newest) = self.newest else {
            return Ok(());
        };
        let now_at_cursor = match top {
            Some(t) if t >= newest.id => self.row_at(db, newest.id)?,
            _ => None,
        };
        if now_at_cursor == Some(newest) {
            return Ok(());
        }
        let first_new =
            first_int(&db.query(&self.first_after_sql, &[Value::Int(newest.created_at)])?);
        let resume = match (first_new, top) {
            (Some(id), _) => id.saturating_sub(1),
            (None, Some(top)) => top.min(newest.id),
            (None, None) => i64::MIN,
        };
        tracing::warn!(
            cursor = self.cursor,
            max_id = ?top,
            resume_after = resume,
            "the newest log rows counted so far were deleted or replaced (a purge, or ids given \
             out again): counting on from the first row written after them"
        );
        self.cursor = resume;
        self.gaps.clear();
        self.newest = None;
        Ok(())
    }

    /// Looks again for ids that were missing below the cursor; counts those that appeared.
    pub(super) fn recheck_gaps(&mut self, db: &mut dyn Database, ctx: &mut Context) -> Result<()> {
        self.gaps.retain(|_, seen| ctx.now - *seen < GAP_GRACE_SECS);
        while self.gaps.len() > GAP_MAX {
            self.gaps.pop_first();
        }
        let pending: Vec<i64> = self.gaps.keys().copied().collect();
        for batch in pending.chunks(GAP_BATCH) {
            let list = vec!["?"; batch.len()].join(", ");
            let params: Vec<Value> = batch.iter().map(|i| Value::Int(*i)).collect();
            let cond = format!("{} IN ({list})", self.id);
            for id in self.read(db, ctx, &cond, &params, true)? {
                self.gaps.remove(&id);
            }
        }
        Ok(())
    }
}
