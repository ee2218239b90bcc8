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
/// Midjourney times are milliseconds; a value below this is taken as seconds.
const MS_FROM: i64 = 100_000_000_000;

fn quoted(values: &[&str]) -> String {
    values
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

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

impl TasksCollector {
    /// Jobs of `tasks`, by their platform.
    fn read_tasks(
        &self,
        src: &mut Sources,
        ctx: &mut Context,
        in_flight: &mut BTreeMap<(String, String), i64>,
        oldest: &mut BTreeMap<String, i64>,
        usual: &mut BTreeMap<String, f64>,
    ) -> Result<()> {
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
        let flying = db.query(
            &format!(
                "SELECT {platform}, {status}, COUNT(*), MIN({submit}) FROM tasks \
                 WHERE {status} IN ({}) AND {progress} <> '100%' GROUP BY 1, 2",
                quoted(&UNFINISHED)
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
        for r in &flying {
            let p = text(r, 0);
            *in_flight.entry((p.clone(), text(r, 1))).or_default() += int(r, 2);
            // A job without a submit time says nothing about its age.
            let submitted = int(r, 3);
            if submitted > 0 {
                let e = oldest.entry(p).or_insert(submitted);
                *e = (*e).min(submitted);
            }
        }
        for r in &finished {
            let n = int(r, 1);
            if n > 0 {
                usual.insert(text(r, 0), int(r, 2) as f64 / n as f64);
            }
        }
        ctx.count_rows("tasks", (flying.len() + finished.len()) as u64);
        Ok(())
    }

    /// Midjourney jobs, as platform `midjourney`, added to what `tasks` gave.
    fn read_midjourneys(
        &self,
        src: &mut Sources,
        ctx: &mut Context,
        in_flight: &mut BTreeMap<(String, String), i64>,
        oldest: &mut BTreeMap<String, i64>,
        usual: &mut BTreeMap<String, f64>,
    ) -> Result<()> {
        let Some(cols) = &ctx.schema.midjourneys else {
            return Ok(());
        };
        if !["status", "progress", "submit_time", "finish_time"]
            .iter()
            .all(|c| cols.has(c))
        {
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
        let flying = db.query(
            &format!(
                "SELECT {status}, COUNT(*), MIN({submit}) FROM midjourneys \
                 WHERE {status} IN ({}) AND {progress} <> '100%' GROUP BY 1",
                quoted(&MJ_UNFINISHED)
            ),
            &[],
        )?;
        let finished = db.query(
            &format!(
                "SELECT COUNT(*), {} FROM midjourneys WHERE {submit} >= ? \
                 AND {status} IN ('SUCCESS', 'FAILURE') AND {finish} >= {submit}",
                d.sum_int(&format!("{finish} - {submit}"))
            ),
            &[Value::Int((ctx.now - USUAL_SPAN_SECS).saturating_mul(1000))],
        )?;
        ctx.count_rows("midjourneys", (flying.len() + finished.len()) as u64);
        let text = |r: &[Value], i: usize| r.get(i).map(Value::to_label).unwrap_or_default();
        let int = |r: &[Value], i: usize| r.get(i).and_then(Value::as_i64).unwrap_or(0);
        let seconds = |t: i64| if t >= MS_FROM { t / 1000 } else { t };
        for r in &flying {
            *in_flight
                .entry((MJ_PLATFORM.to_string(), text(r, 0)))
                .or_default() += int(r, 1);
            let submitted = seconds(int(r, 2));
            if submitted > 0 {
                let e = oldest.entry(MJ_PLATFORM.to_string()).or_insert(submitted);
                *e = (*e).min(submitted);
            }
        }
        if let Some(r) = finished.first()
            && int(r, 0) > 0
        {
            usual.insert(
                MJ_PLATFORM.to_string(),
                int(r, 1) as f64 / 1000.0 / int(r, 0) as f64,
            );
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
        let mut in_flight = BTreeMap::new();
        let mut oldest = BTreeMap::new();
        let mut usual = BTreeMap::new();
        self.read_tasks(src, ctx, &mut in_flight, &mut oldest, &mut usual)?;
        self.read_midjourneys(src, ctx, &mut in_flight, &mut oldest, &mut usual)?;
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
