//! The collectors built for one database, run in order through one function that times and
//! counts each (postgres_exporter's pattern).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Result;

use crate::collect::{self, Collector, Context, Settings};
use crate::db::{Sources, Unreachable};
use crate::schema::Schema;

/// How one collector's run in the last poll went.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectorRun {
    pub collector: &'static str,
    pub success: bool,
    pub seconds: f64,
}

/// The collectors built for one database's schema, and the context they share.
pub struct Pipeline {
    pub collectors: Vec<Box<dyn Collector>>,
    pub ctx: Context,
    /// One entry per collector, from the last poll.
    pub runs: Vec<CollectorRun>,
}

impl Pipeline {
    /// Detects the schema and builds the collectors for it (the registration list).
    pub fn build(src: &mut Sources, settings: Settings, stop: Arc<AtomicBool>) -> Result<Pipeline> {
        let schema = Schema::detect(src)?;
        tracing::info!(
            database = %src.describe(),
            generation = %schema.generation,
            "gateway schema detected"
        );
        let collectors = collect::for_schema(src, &schema, &settings);
        Ok(Pipeline {
            collectors,
            ctx: Context::new(schema, settings, stop),
            runs: Vec::new(),
        })
    }

    /// One poll at time `now`: every collector runs even when another fails; the first error
    /// is returned.
    pub fn poll(&mut self, src: &mut Sources, now: i64) -> Result<()> {
        self.ctx.now = now;
        self.ctx.failed.clear();
        self.runs.clear();
        let mut first_err: Option<anyhow::Error> = None;
        for c in &mut self.collectors {
            // Once a server is unreachable, the remaining collectors would each wait out the
            // same deadline: they count as failed without trying.
            let unreachable = first_err
                .as_ref()
                .is_some_and(|e| e.chain().any(|c| c.is::<Unreachable>()));
            if unreachable {
                self.runs.push(CollectorRun {
                    collector: c.name(),
                    success: false,
                    seconds: 0.0,
                });
                self.ctx.failed.insert(c.name());
                continue;
            }
            let started = Instant::now();
            let result = c.poll(src, &mut self.ctx);
            let took = started.elapsed();
            tracing::debug!(collector = c.name(), ?took, "collector polled");
            self.runs.push(CollectorRun {
                collector: c.name(),
                success: result.is_ok(),
                seconds: took.as_secs_f64(),
            });
            if let Err(e) = result {
                self.ctx.failed.insert(c.name());
                let e = e.context(format!("collector {}", c.name()));
                if first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
