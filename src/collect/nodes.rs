//! The gateway's nodes, from `system_instances` (2026-06-24 on): whether each heartbeats, when
//! it started, which version it runs. A node restart is the usual reason a quota_data flush
//! went missing; a node that stopped heartbeating is down.
//!
//! Node names change with every container, so the `node` label is bounded: only nodes seen
//! alive within `MAX_AGE_SECS` (a day) have series, and at most `MAX_NODES` of them. A stale
//! node keeps its row until an admin deletes it in the gateway's settings (the gateway does not
//! remove it by itself), so a node that went away shows as down for that day at most.

use anyhow::Result;
use prometheus::proto::MetricFamily;

use super::{Collector, Context};
use crate::db::{Sources, Value};
use crate::metrics::{self as m, Family};

/// A heartbeat older than this means the node is down (the gateway's own threshold).
pub const STALE_AFTER_SECS: i64 = 90;
/// Nodes last seen longer ago than this have no series.
pub const MAX_AGE_SECS: i64 = 86_400;
/// Most nodes with series, the most recently seen first.
pub const MAX_NODES: usize = 100;

#[derive(Debug, Clone, PartialEq)]
struct Node {
    name: String,
    started_at: i64,
    last_seen_at: i64,
    version: String,
    master: bool,
}

#[derive(Debug, Default)]
pub struct NodesCollector {
    nodes: Vec<Node>,
    /// The poll's time, against which heartbeats are judged.
    read_at: i64,
}

impl Collector for NodesCollector {
    fn name(&self) -> &'static str {
        "nodes"
    }

    fn poll(&mut self, src: &mut Sources, ctx: &mut Context) -> Result<()> {
        let Some(cols) = &ctx.schema.system_instances else {
            return Ok(());
        };
        if !["node_name", "started_at", "last_seen_at"]
            .iter()
            .all(|c| cols.has(c))
        {
            return Ok(());
        }
        let db = src.main();
        let d = db.dialect();
        let info = cols.or(d, "info", "NULL");
        let sql = format!(
            "SELECT {name}, {started}, {seen}, {info} FROM system_instances \
             WHERE {seen} >= ? ORDER BY {seen} DESC LIMIT {MAX_NODES}",
            name = d.ident("node_name"),
            started = d.ident("started_at"),
            seen = d.ident("last_seen_at"),
        );
        let rows = db.query(&sql, &[Value::Int(ctx.now - MAX_AGE_SECS)])?;
        ctx.count_rows("system_instances", rows.len() as u64);
        self.nodes = rows
            .iter()
            .map(|r| {
                let int = |i: usize| r.get(i).and_then(Value::as_i64).unwrap_or(0);
                let info: serde_json::Value = r
                    .get(3)
                    .map(Value::to_label)
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or_default();
                Node {
                    name: r.first().map(Value::to_label).unwrap_or_default(),
                    started_at: int(1),
                    last_seen_at: int(2),
                    version: info["version"].as_str().unwrap_or_default().to_string(),
                    master: info["is_master"].as_bool().unwrap_or(false),
                }
            })
            .collect();
        self.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        self.read_at = ctx.now;
        Ok(())
    }

    fn render(&self, _ctx: &Context, out: &mut Vec<MetricFamily>) {
        let mut up = Family::of(&m::GATEWAY_NODE_UP);
        let mut started = Family::of(&m::GATEWAY_NODE_START_TIME_SECONDS);
        let mut seen = Family::of(&m::GATEWAY_NODE_LAST_SEEN_TIMESTAMP_SECONDS);
        let mut info = Family::of(&m::GATEWAY_NODE_INFO);
        for n in &self.nodes {
            let l = [("node", n.name.as_str())];
            let fresh = self.read_at - n.last_seen_at <= STALE_AFTER_SECS;
            up.sample(&l, f64::from(u8::from(fresh)));
            started.sample(&l, n.started_at as f64);
            seen.sample(&l, n.last_seen_at as f64);
            let master = if n.master { "true" } else { "false" };
            info.sample(
                &[
                    ("node", n.name.as_str()),
                    ("version", n.version.as_str()),
                    ("master", master),
                ],
                1.0,
            );
        }
        for f in [up, started, seen, info] {
            f.finish(out);
        }
    }
}
