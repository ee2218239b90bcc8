//! Usage counters from `logs`: requests, quota, tokens, refunds and errors by model, channel
//! and group.
//!
//! The table is read by primary-key ranges of at most `chunk_rows` ids, each range one short
//! statement with the GROUP BY done in SQL, so the gateway's writers wait at most one chunk.
//! The cold start walks the whole table this way; later polls read only `id > cursor`.
//! Counters are the table's totals, so a restarted exporter reports the same values.

use std::collections::HashMap;

use anyhow::Result;
use prometheus::proto::MetricFamily;

use super::{Collector, Context, Family};
use crate::db::{Sources, Value};
use crate::schema::Schema;

pub const TYPE_CONSUME: i64 = 2;
pub const TYPE_ERROR: i64 = 5;
pub const TYPE_REFUND: i64 = 6;

/// Labels of every usage series, in order.
pub const USAGE_LABELS: [&str; 4] = ["model", "channel_id", "channel_name", "group"];

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct UsageKey {
    model: String,
    channel_id: String,
    group: String,
}

/// Running totals for one (model, channel, group).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub requests: u64,
    pub quota: u64,
    pub corrections: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub use_time_seconds: u64,
    pub refunds: u64,
    pub refund_quota: u64,
    pub errors: u64,
}

pub struct LogsCollector {
    /// One aggregate statement over `id BETWEEN ? AND ?`, built for this schema.
    range_sql: String,
    next_id_sql: String,
    max_id_sql: String,
    errors_and_refunds: bool,
    has_use_time: bool,
    cursor: i64,
    usage: HashMap<UsageKey, Usage>,
}

/// Columns of the aggregate statement, in order.
const C_TYPE: usize = 0;
const C_MODEL: usize = 1;
const C_CHANNEL: usize = 2;
const C_GROUP: usize = 3;
const C_ROWS: usize = 4;
const C_QUOTA_POS: usize = 5;
const C_QUOTA_NEG: usize = 6;
const C_PROMPT: usize = 7;
const C_COMPLETION: usize = 8;
const C_USE_TIME: usize = 9;

impl LogsCollector {
    pub fn new(schema: &Schema, dialect: crate::db::Dialect) -> Self {
        let cols = &schema.logs;
        let d = dialect;
        let model = d.ident("model_name");
        let channel = cols.or(d, "channel_id", "NULL");
        let group = cols.or(d, "group", "NULL");
        let use_time = cols.or(d, "use_time", "0");
        let quota = d.ident("quota");
        let mut group_by = vec![d.ident("type"), model.clone()];
        for c in ["channel_id", "group"] {
            if cols.has(c) {
                group_by.push(d.ident(c));
            }
        }
        let range_sql = format!(
            "SELECT {ty}, {model}, {channel}, {group}, COUNT(*), {pos}, {neg}, {prompt}, {completion}, {use_time} \
             FROM logs WHERE {id} BETWEEN ? AND ? GROUP BY {group_by}",
            ty = d.ident("type"),
            pos = d.sum_int(&format!("CASE WHEN {quota} > 0 THEN {quota} ELSE 0 END")),
            neg = d.sum_int(&format!("CASE WHEN {quota} < 0 THEN -{quota} ELSE 0 END")),
            prompt = d.sum_int(&d.ident("prompt_tokens")),
            completion = d.sum_int(&d.ident("completion_tokens")),
            use_time = d.sum_int(&use_time),
            id = d.ident("id"),
            group_by = group_by.join(", "),
        );
        LogsCollector {
            range_sql,
            next_id_sql: format!(
                "SELECT MIN({id}) FROM logs WHERE {id} > ?",
                id = d.ident("id")
            ),
            max_id_sql: format!("SELECT MAX({id}) FROM logs", id = d.ident("id")),
            errors_and_refunds: schema.flavor.has_error_and_refund_logs(),
            has_use_time: cols.has("use_time"),
            cursor: 0,
            usage: HashMap::new(),
        }
    }

    fn apply(&mut self, row: &[Value]) -> u64 {
        let int = |i: usize| row.get(i).and_then(Value::as_i64).unwrap_or(0);
        // Sums are never negative by construction; clamp anyway so bad data cannot wrap.
        let uint = |i: usize| int(i).max(0) as u64;
        let label = |i: usize| row.get(i).map(Value::to_label).unwrap_or_default();
        let rows = uint(C_ROWS);
        let ty = int(C_TYPE);
        let counted = ty == TYPE_CONSUME
            || (self.errors_and_refunds && (ty == TYPE_ERROR || ty == TYPE_REFUND));
        if !counted {
            return rows;
        }
        let key = UsageKey {
            model: label(C_MODEL),
            channel_id: label(C_CHANNEL),
            group: label(C_GROUP),
        };
        let u = self.usage.entry(key).or_default();
        match ty {
            TYPE_CONSUME => {
                u.requests = u.requests.saturating_add(rows);
                u.quota = u.quota.saturating_add(uint(C_QUOTA_POS));
                u.corrections = u.corrections.saturating_add(uint(C_QUOTA_NEG));
                u.prompt_tokens = u.prompt_tokens.saturating_add(uint(C_PROMPT));
                u.completion_tokens = u.completion_tokens.saturating_add(uint(C_COMPLETION));
                u.use_time_seconds = u.use_time_seconds.saturating_add(uint(C_USE_TIME));
            }
            TYPE_ERROR => u.errors = u.errors.saturating_add(rows),
            _ => {
                u.refunds = u.refunds.saturating_add(rows);
                u.refund_quota = u.refund_quota.saturating_add(uint(C_QUOTA_POS));
            }
        }
        rows
    }
}

fn first_int(rows: &[Vec<Value>]) -> Option<i64> {
    rows.first()?.first()?.as_i64()
}

impl Collector for LogsCollector {
    fn name(&self) -> &'static str {
        "logs"
    }

    fn poll(&mut self, src: &mut Sources, ctx: &mut Context) -> Result<()> {
        let db = src.logs();
        let Some(top) = first_int(&db.query(&self.max_id_sql, &[])?) else {
            return Ok(()); // empty table
        };
        if top < self.cursor {
            // Only the newest rows being deleted (or the file being replaced) moves the top
            // down; counters stay monotonic, so carry on from the new top.
            tracing::warn!(
                cursor = self.cursor,
                max_id = top,
                "logs.id went backwards: newest log rows were deleted; continuing from the new maximum"
            );
            self.cursor = top;
            ctx.logs_cursor = top;
            return Ok(());
        }
        while self.cursor < top && !ctx.stopping() {
            let Some(lo) = first_int(&db.query(&self.next_id_sql, &[Value::Int(self.cursor)])?)
            else {
                break;
            };
            if lo > top {
                break;
            }
            let hi = lo.saturating_add(ctx.chunk_rows - 1).min(top);
            let groups = db.query(&self.range_sql, &[Value::Int(lo), Value::Int(hi)])?;
            let mut read = 0;
            for g in &groups {
                read += self.apply(g);
            }
            ctx.count_rows("logs", read);
            self.cursor = hi;
        }
        if !ctx.stopping() {
            self.cursor = self.cursor.max(top);
        }
        ctx.logs_cursor = self.cursor;
        Ok(())
    }

    fn render(&self, ctx: &Context, out: &mut Vec<MetricFamily>) {
        let mut requests = Family::counter(
            "newapi_requests_total",
            "Billed requests: consume log rows (type 2).",
        );
        let mut quota = Family::counter(
            "newapi_quota_total",
            "Quota billed: sum of quota over consume log rows with quota >= 0 (divide by newapi_quota_per_unit for USD).",
        );
        let mut corrections = Family::counter(
            "newapi_quota_corrections_total",
            "Absolute sum of negative quota on consume log rows (corrections).",
        );
        let mut tokens = Family::counter(
            "newapi_tokens_total",
            "Tokens on consume log rows, by token_type (prompt, completion).",
        );
        let mut use_time = Family::counter(
            "newapi_use_time_seconds_total",
            "Sum of use_time (whole seconds) over consume log rows.",
        );
        let mut refunds = Family::counter(
            "newapi_refunds_total",
            "Refund log rows (type 6, new-api only).",
        );
        let mut refund_quota = Family::counter(
            "newapi_refund_quota_total",
            "Quota given back by refund log rows (type 6, new-api only).",
        );
        let mut errors = Family::counter(
            "newapi_errors_total",
            "Error log rows (type 5, new-api only; written when the gateway runs with ERROR_LOG_ENABLED).",
        );
        let mut keys: Vec<_> = self.usage.keys().collect();
        keys.sort();
        for key in keys {
            let u = &self.usage[key];
            let name = ctx.channel_name(&key.channel_id);
            let l = [
                (USAGE_LABELS[0], key.model.as_str()),
                (USAGE_LABELS[1], key.channel_id.as_str()),
                (USAGE_LABELS[2], name),
                (USAGE_LABELS[3], key.group.as_str()),
            ];
            if u.requests > 0 {
                requests.sample(&l, u.requests as f64);
                quota.sample(&l, u.quota as f64);
                corrections.sample(&l, u.corrections as f64);
                let mut lt = l.to_vec();
                lt.push(("token_type", "prompt"));
                tokens.sample(&lt, u.prompt_tokens as f64);
                lt[4].1 = "completion";
                tokens.sample(&lt, u.completion_tokens as f64);
                if self.has_use_time {
                    use_time.sample(&l, u.use_time_seconds as f64);
                }
            }
            if self.errors_and_refunds {
                if u.refunds > 0 {
                    refunds.sample(&l, u.refunds as f64);
                    refund_quota.sample(&l, u.refund_quota as f64);
                }
                if u.errors > 0 {
                    errors.sample(&l, u.errors as f64);
                }
            }
        }
        for f in [
            requests,
            quota,
            corrections,
            tokens,
            use_time,
            refunds,
            refund_quota,
            errors,
        ] {
            f.finish(out);
        }
    }
}
