//! Async jobs (video, music, images, workflows) from `tasks`: how many are in flight per
//! platform and status, how old the oldest is, and how long a job of the platform usually
//! takes. Jobs that stay unfinished far longer than usual mean the master's task poller stopped:
//! nothing is settled or refunded.
//!
//! Two short statements per poll, both through the gateway's indexes: the unfinished statuses
//! (an IN list on `status`) and the jobs submitted in the last day (`submit_time`). `platform`
//! and `status` take the gateway's own small sets of values.

use std::collections::BTreeMap;

use anyhow::Result;
use prometheus::proto::MetricFamily;

use super::{Collector, Context};
use crate::db::{Sources, Value};
use crate::metrics::{self as m, Family};

/// The gateway's statuses of a job not yet settled.
pub const UNFINISHED: [&str; 5] = ["NOT_START", "SUBMITTED", "QUEUED", "IN_PROGRESS", "UNKNOWN"];
/// Jobs finished within this span make the usual duration.
const USUAL_SPAN_SECS: i64 = 86_400;

#[derive(Debug, Default)]
pub struct TasksCollector {
    /// (platform, status) → jobs in flight.
    in_flight: BTreeMap<(String, String), i64>,
    /// platform → oldest submit time of a job in flight.
    oldest: BTreeMap<String, i64>,
    /// platform → mean seconds from submission to finish over the last day.
    usual: BTreeMap<String, f64>,
    read_at: i64,
}

impl Collector for TasksCollector {
    fn name(&self) -> &'static str {
        "tasks"
    }

    fn poll(&mut self, src: &mut Sources, ctx: &mut Context) -> Result<()> {
        let Some(cols) = &ctx.schema.tasks else {
            return Ok(());
        };
        if ![
            "platform",
            "status",
            "submit_time",
            "finish_time",
            "progress",
        ]
        .iter()
        .all(|c| cols.has(c))
        {
            return Ok(());
        }
        let db = src.main();
        let d = db.dialect();
        let (platform, status, submit, finish, progress) = (
            d.ident("platform"),
            d.ident("status"),
            d.ident("submit_time"),
            d.ident("finish_time"),
            d.ident("progress"),
        );
        let statuses: Vec<String> = UNFINISHED.iter().map(|s| format!("'{s}'")).collect();
        let flying = db.query(
            &format!(
                "SELECT {platform}, {status}, COUNT(*), MIN({submit}) FROM tasks \
                 WHERE {status} IN ({}) AND {progress} <> '100%' GROUP BY 1, 2",
                statuses.join(", ")
            ),
            &[],
        )?;
        let finished = db.query(
            &format!(
                "SELECT {platform}, COUNT(*), {} FROM tasks WHERE {submit} >= ? \
                 AND {status} IN ('SUCCESS', 'FAILURE') AND {finish} >= {submit} GROUP BY 1",
                d.sum_int(&format!("{finish} - {submit}"))
            ),
            &[Value::Int(ctx.now - USUAL_SPAN_SECS)],
        )?;
        let text = |r: &[Value], i: usize| r.get(i).map(Value::to_label).unwrap_or_default();
        let int = |r: &[Value], i: usize| r.get(i).and_then(Value::as_i64).unwrap_or(0);
        let mut in_flight = BTreeMap::new();
        let mut oldest: BTreeMap<String, i64> = BTreeMap::new();
        for r in &flying {
            let p = text(r, 0);
            in_flight.insert((p.clone(), text(r, 1)), int(r, 2));
            // A job without a submit time says nothing about its age.
            let submitted = int(r, 3);
            if submitted > 0 {
                let e = oldest.entry(p).or_insert(submitted);
                *e = (*e).min(submitted);
            }
        }
        let mut usual = BTreeMap::new();
        for r in &finished {
            let n = int(r, 1);
            if n > 0 {
                usual.insert(text(r, 0), int(r, 2) as f64 / n as f64);
            }
        }
        ctx.count_rows("tasks", (flying.len() + finished.len()) as u64);
        (self.in_flight, self.oldest, self.usual) = (in_flight, oldest, usual);
        self.read_at = ctx.now;
        Ok(())
    }

    fn render(&self, _ctx: &Context, out: &mut Vec<MetricFamily>) {
        let mut flying = Family::of(&m::TASKS_IN_FLIGHT);
        for ((platform, status), n) in &self.in_flight {
            flying.sample(&[("platform", platform), ("status", status)], *n as f64);
        }
        let mut oldest = Family::of(&m::TASKS_OLDEST_IN_FLIGHT_AGE_SECONDS);
        for (platform, t) in &self.oldest {
            oldest.sample(&[("platform", platform)], (self.read_at - t).max(0) as f64);
        }
        let mut usual = Family::of(&m::TASKS_USUAL_DURATION_SECONDS);
        for (platform, secs) in &self.usual {
            usual.sample(&[("platform", platform)], *secs);
        }
        for f in [flying, oldest, usual] {
            f.finish(out);
        }
    }
}
