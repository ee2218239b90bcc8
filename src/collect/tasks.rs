//! Async jobs (video, music, images, workflows) from `tasks`: how many are in flight per
//! platform and status, how old the oldest is, and how long a job of the platform usually
//! takes. Jobs that stay unfinished far longer than usual mean the master's task poller stopped:
//! nothing is settled or refunded.
//!
//! Two short statements per poll and table, both through the gateway's indexes: the unfinished
//! statuses (an IN list on `status`) and the jobs submitted in the last day (`submit_time`).
//! `platform` and `status` take the gateway's own small sets of values. Midjourney jobs live in
//! a table of their own, `midjourneys`, without a platform column and with times in
//! milliseconds: they show as platform `midjourney`.

use std::collections::BTreeMap;

use anyhow::Result;
use prometheus::proto::MetricFamily;

use super::{Collector, Context};
use crate::db::{Sources, Value};
use crate::metrics::{self as m, Family};
use crate::schema::{Columns, Schema};

/// The gateway's statuses of a job not yet settled.
pub const UNFINISHED: [&str; 5] = ["NOT_START", "SUBMITTED", "QUEUED", "IN_PROGRESS", "UNKNOWN"];
/// The statuses of a Midjourney job not yet settled (`MODAL`: waiting for the user's input).
pub const MJ_UNFINISHED: [&str; 6] = [
    "NOT_START",
    "SUBMITTED",
    "MODAL",
    "IN_PROGRESS",
    "UNKNOWN",
    "",
];
/// The platform label of Midjourney jobs.
pub const MJ_PLATFORM: &str = "midjourney";
/// Jobs finished within this span make the usual duration.
const USUAL_SPAN_SECS: i64 = 86_400;
/// In a table of milliseconds, a time below this is taken as seconds.
const MS_FROM: i64 = 100_000_000_000;

fn quoted(values: &[&str]) -> String {
    values
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What one reading of the job tables found.
#[derive(Debug, Default)]
struct Jobs {
    /// (platform, status) → jobs in flight.
    in_flight: BTreeMap<(String, String), i64>,
    /// platform → oldest submit time of a job in flight.
    oldest: BTreeMap<String, i64>,
    /// platform → mean seconds from submission to finish over the last day.
    usual: BTreeMap<String, f64>,
}

#[derive(Debug, Default)]
pub struct TasksCollector {
    jobs: Jobs,
    read_at: i64,
}

/// One table of async jobs, as the gateway writes it.
struct JobTable {
    name: &'static str,
    /// The table's columns in the detected schema.
    columns: fn(&Schema) -> &Option<Columns>,
    /// The platform: a column, or one platform for the whole table.
    platform: Platform,
    unfinished: &'static [&'static str],
    /// Times in milliseconds rather than seconds.
    milliseconds: bool,
}

enum Platform {
    Column,
    All(&'static str),
}

/// The gateway's tables of async jobs: `tasks` (video, music, ...) and `midjourneys`.
const JOB_TABLES: [JobTable; 2] = [
    JobTable {
        name: "tasks",
        columns: |s| &s.tasks,
        platform: Platform::Column,
        unfinished: &UNFINISHED,
        milliseconds: false,
    },
    JobTable {
        name: "midjourneys",
        columns: |s| &s.midjourneys,
        platform: Platform::All(MJ_PLATFORM),
        unfinished: &MJ_UNFINISHED,
        milliseconds: true,
    },
];

impl TasksCollector {
    /// The jobs of one table, added to what the tables before it gave.
    fn read_table(
        &self,
        src: &mut Sources,
        ctx: &mut Context,
        table: &JobTable,
        jobs: &mut Jobs,
    ) -> Result<()> {
        let Some(cols) = (table.columns)(&ctx.schema) else {
            return Ok(());
        };
        let mut needed = vec!["status", "submit_time", "finish_time", "progress"];
        if matches!(table.platform, Platform::Column) {
            needed.push("platform");
        }
        if !needed.iter().all(|c| cols.has(c)) {
            return Ok(());
        }
        let db = src.main();
        let d = db.dialect();
        let (status, submit, finish, progress) = (
            d.ident("status"),
            d.ident("submit_time"),
            d.ident("finish_time"),
            d.ident("progress"),
        );
        let platform = match table.platform {
            Platform::Column => d.ident("platform"),
            Platform::All(name) => format!("'{name}'"),
        };
        let name = table.name;
        let flying = db.query(
            &format!(
                "SELECT {platform}, {status}, COUNT(*), MIN({submit}) FROM {name} \
                 WHERE {status} IN ({}) AND {progress} <> '100%' GROUP BY 1, 2",
                quoted(table.unfinished)
            ),
            &[],
        )?;
        let unit = if table.milliseconds { 1000 } else { 1 };
        let finished = db.query(
            &format!(
                "SELECT {platform}, COUNT(*), {} FROM {name} WHERE {submit} >= ? \
                 AND {status} IN ('SUCCESS', 'FAILURE') AND {finish} >= {submit} GROUP BY 1",
                d.sum_int(&format!("{finish} - {submit}"))
            ),
            &[Value::Int((ctx.now - USUAL_SPAN_SECS).saturating_mul(unit))],
        )?;
        ctx.count_rows(name, (flying.len() + finished.len()) as u64);
        let text = |r: &[Value], i: usize| r.get(i).map(Value::to_label).unwrap_or_default();
        let int = |r: &[Value], i: usize| r.get(i).and_then(Value::as_i64).unwrap_or(0);
        // A table in milliseconds may still hold a row in seconds (an import).
        let seconds = |t: i64| {
            if table.milliseconds && t >= MS_FROM {
                t / 1000
            } else {
                t
            }
        };
        for r in &flying {
            let p = text(r, 0);
            *jobs.in_flight.entry((p.clone(), text(r, 1))).or_default() += int(r, 2);
            // A job without a submit time says nothing about its age.
            let submitted = seconds(int(r, 3));
            if submitted > 0 {
                let e = jobs.oldest.entry(p).or_insert(submitted);
                *e = (*e).min(submitted);
            }
        }
        for r in &finished {
            let n = int(r, 1);
            if n > 0 {
                let secs = int(r, 2) as f64 / unit as f64;
                jobs.usual.insert(text(r, 0), secs / n as f64);
            }
        }
        Ok(())
    }
}

impl Collector for TasksCollector {
    fn name(&self) -> &'static str {
        "tasks"
    }

    fn poll(&mut self, src: &mut Sources, ctx: &mut Context) -> Result<()> {
        // All or nothing: the state changes once both tables are read.
        let mut jobs = Jobs::default();
        for table in &JOB_TABLES {
            self.read_table(src, ctx, table, &mut jobs)?;
        }
        self.jobs = jobs;
        self.read_at = ctx.now;
        Ok(())
    }

    fn render(&self, _ctx: &Context, out: &mut Vec<MetricFamily>) {
        let mut flying = Family::of(&m::TASKS_IN_FLIGHT);
        for ((platform, status), n) in &self.jobs.in_flight {
            flying.sample(&[("platform", platform), ("status", status)], *n as f64);
        }
        let mut oldest = Family::of(&m::TASKS_OLDEST_IN_FLIGHT_AGE_SECONDS);
        for (platform, t) in &self.jobs.oldest {
            oldest.sample(&[("platform", platform)], (self.read_at - t).max(0) as f64);
        }
        let mut usual = Family::of(&m::TASKS_USUAL_DURATION_SECONDS);
        for (platform, secs) in &self.jobs.usual {
            usual.sample(&[("platform", platform)], *secs);
        }
        for f in [flying, oldest, usual] {
            f.finish(out);
        }
    }
}
