//! The second ledger checked against the logs: over each completed window, the quota each
//! channel's `used_quota` (and the users' total) rose by beyond what the logs billed on it
//! (unlogged), and the quota logged beyond what it rose by (uncharged).
//!
//! Each poll takes one reading: every channel's `used_quota`, the users' `used_quota` sum and
//! the newest `logs.id`, in one statement when `logs` lives in the main database, so that a
//! writer who commits a log row and its charge together is seen on both sides or on neither.
//! Between two readings, the rise of each ledger is compared with the billed quota of the log
//! rows with ids between the two newest ids (a primary-key range: only new rows are read).
//! Intervals add up into windows aligned on multiples of `--ledger.window` since the epoch,
//! each interval counted in the window its closing reading falls in; the gauges show the last
//! completed window, so a burst shows once, for one window.
//!
//! What the logs bill on a channel: consume rows (type 2) except channel tests, which are
//! never charged; task settlement rows carry the delta they charged; zero-usage rows carry 0.
//! Refunds (type 6) lower `used_quota` only on gateways from v1.0.0-rc.22 on (see
//! [`RefundRule`]).

use std::collections::{BTreeMap, HashMap};

use anyhow::Result;
use prometheus::proto::MetricFamily;

use super::plausible::MAX_AMOUNT;
use super::{Collector, Context};
use crate::db::{Engine, Sources, Value};
use crate::metrics::{self as m, Family};
use crate::schema::{LOG_TYPE_CONSUME, LOG_TYPE_REFUND, refunds_lower_used_quota};

/// Whether refunds lower `used_quota`: `--ledger.refunds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RefundRule {
    /// From the versions the live gateway nodes report in `system_instances.info`: lower when
    /// any node runs v1.0.0-rc.22 or later; keep when the table is absent (older gateways)
    /// or no version reads as a release.
    #[default]
    Auto,
    Lower,
    Keep,
}

/// Largest ledger value summed or compared (as the users collector bounds it).
const MAX_LEDGER_AMOUNT: i64 = 1 << 50;
/// Nodes that heartbeated within this many seconds count for the refund rule.
const NODE_SEEN_SECS: i64 = 86_400;

/// One reading of the ledger.
#[derive(Debug, Clone, Default)]
struct Reading {
    /// `channels.used_quota` by channel id.
    channels: HashMap<i64, i64>,
    /// Sum of `users.used_quota`.
    users: i64,
    /// The newest `logs.id` when the ledger was read; `None` for an empty table.
    logs_max_id: Option<i64>,
}

/// Charged (ledger rise) and logged quota over some span.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flow {
    pub charged: i64,
    pub logged: i64,
}

impl Flow {
    fn add(&mut self, o: Flow) {
        self.charged = self.charged.saturating_add(o.charged);
        self.logged = self.logged.saturating_add(o.logged);
    }

    /// Quota charged beyond what the logs billed.
    pub fn unlogged(&self) -> i64 {
        self.charged.saturating_sub(self.logged).max(0)
    }

    /// Quota the logs billed beyond what was charged.
    pub fn uncharged(&self) -> i64 {
        self.logged.saturating_sub(self.charged).max(0)
    }
}

/// The flows of one window.
#[derive(Debug, Clone, Default)]
struct Window {
    /// Index of the window: its start / window length.
    index: i64,
    channels: BTreeMap<i64, Flow>,
    users: Flow,
}

pub struct LedgerCollector {
    window_secs: i64,
    rule: RefundRule,
    /// The rule decided for the current window; `None` until decided (again).
    refunds_lower: Option<bool>,
    /// The rule the last comparison applied (what the gauge shows).
    applied_refunds_lower: bool,
    reading_sql: Option<String>,
    max_id_sql: String,
    next_id_sql: String,
    logged_sql: String,
    last: Option<Reading>,
    open: Option<Window>,
    completed: Option<Window>,
}

impl LedgerCollector {
    pub fn new(window_secs: i64, rule: RefundRule) -> Self {
        LedgerCollector {
            window_secs: window_secs.max(1),
            rule,
            refunds_lower: None,
            applied_refunds_lower: false,
            reading_sql: None,
            max_id_sql: String::new(),
            next_id_sql: String::new(),
            logged_sql: String::new(),
            last: None,
            open: None,
            completed: None,
        }
    }

    /// Builds the statements for this schema; `None` when the tables lack the ledger.
    fn prepare(&mut self, src: &mut Sources, ctx: &Context) -> Option<()> {
        if self.reading_sql.is_some() {
            return Some(());
        }
        let channels = ctx.schema.channels.as_ref()?;
        let users = ctx.schema.users.as_ref()?;
        if !channels.has("used_quota") || !users.has("used_quota") {
            return None;
        }
        // Logs in ClickHouse have no ids to read between two readings.
        if src.logs().dialect().0 == Engine::Clickhouse {
            return None;
        }
        let together = src.logs_in_main();
        let d = src.main().dialect();
        let (id, used) = (d.ident("id"), d.ident("used_quota"));
        let sound = format!("{used} BETWEEN -{MAX_LEDGER_AMOUNT} AND {MAX_LEDGER_AMOUNT}");
        let logs_max = if together {
            format!("(SELECT MAX({id}) FROM logs)")
        } else {
            "NULL".to_string()
        };
        // One statement: the channels, the users' sum and (same database) the newest log id
        // come from one snapshot.
        self.reading_sql = Some(format!(
            "SELECT 0, NULL, {logs_max}, (SELECT {} FROM users) \
             UNION ALL SELECT 1, {id}, CASE WHEN {sound} THEN {used} ELSE 0 END, NULL FROM channels",
            d.sum_int(&format!("CASE WHEN {sound} THEN {used} ELSE 0 END")),
        ));
        let ld = src.logs().dialect();
        let lid = ld.ident("id");
        self.max_id_sql = format!("SELECT MAX({lid}) FROM logs");
        self.next_id_sql = format!("SELECT MIN({lid}) FROM logs WHERE {lid} > ? AND {lid} <= ?");
        let (ty, quota) = (ld.ident("type"), ld.ident("quota"));
        let bounded = |expr: &str| {
            ld.sum_int(&format!(
                "CASE WHEN {quota} BETWEEN -{MAX_AMOUNT} AND {MAX_AMOUNT} THEN {expr} ELSE 0 END"
            ))
        };
        let channel = ctx.schema.logs.or(ld, "channel_id", "0");
        self.logged_sql = format!(
            "SELECT {channel}, {}, {} FROM logs WHERE {lid} BETWEEN ? AND ? \
             AND {ty} IN ({LOG_TYPE_CONSUME}, {LOG_TYPE_REFUND}) AND NOT ({}) GROUP BY 1",
            bounded(&format!(
                "CASE WHEN {ty} = {LOG_TYPE_CONSUME} THEN {quota} ELSE 0 END"
            )),
            bounded(&format!(
                "CASE WHEN {ty} = {LOG_TYPE_REFUND} THEN {quota} ELSE 0 END"
            )),
            ctx.schema.channel_test_sql(ld),
        );
        Some(())
    }

    /// Decides once whether refunds lower `used_quota` on this gateway.
    fn decide_refunds(&mut self, src: &mut Sources, ctx: &Context) -> Result<bool> {
        if let Some(v) = self.refunds_lower {
            return Ok(v);
        }
        let lower = match self.rule {
            RefundRule::Lower => true,
            RefundRule::Keep => false,
            RefundRule::Auto => match &ctx.schema.system_instances {
                Some(cols) if cols.has("info") && cols.has("last_seen_at") => {
                    let db = src.main();
                    let d = db.dialect();
                    let rows = db.query(
                        &format!(
                            "SELECT {} FROM system_instances WHERE {} >= ?",
                            d.ident("info"),
                            d.ident("last_seen_at")
                        ),
                        &[Value::Int(ctx.now - NODE_SEEN_SECS)],
                    )?;
                    let versions: Vec<String> = rows
                        .iter()
                        .filter_map(|r| r.first())
                        .filter_map(|v| {
                            let info: serde_json::Value =
                                serde_json::from_str(&v.to_label()).ok()?;
                            Some(info.get("version")?.as_str()?.to_string())
                        })
                        .collect();
                    let lower = versions
                        .iter()
                        .any(|v| refunds_lower_used_quota(v) == Some(true));
                    tracing::info!(
                        ?versions,
                        refunds_lower_used_quota = lower,
                        "ledger: refund handling decided from the gateway nodes' versions \
                         (override with --ledger.refunds)"
                    );
                    lower
                }
                _ => false,
            },
        };
        self.refunds_lower = Some(lower);
        Ok(lower)
    }

    fn read(&self, src: &mut Sources) -> Result<Reading> {
        let sql = self.reading_sql.as_deref().unwrap_or_default();
        let rows = src.main().query(sql, &[])?;
        let int = |r: &[Value], i: usize| r.get(i).and_then(Value::as_i64);
        let mut reading = Reading::default();
        for r in &rows {
            if int(r, 0) == Some(0) {
                reading.logs_max_id = int(r, 2);
                reading.users = int(r, 3).unwrap_or(0);
            } else if let Some(id) = int(r, 1) {
                reading.channels.insert(id, int(r, 2).unwrap_or(0));
            }
        }
        if !src.logs_in_main() {
            // Another database: read right after, so rows written in between count as
            // logged ahead of their charge (a transient the alert's tolerance absorbs).
            let rows = src.logs().query(&self.max_id_sql, &[])?;
            reading.logs_max_id = rows.first().and_then(|r| int(r, 0));
        }
        Ok(reading)
    }

    /// Billed quota per channel of the log rows with ids in `(after, upto]`, in primary-key
    /// chunks.
    fn logged(
        &self,
        src: &mut Sources,
        chunk_rows: i64,
        after: i64,
        upto: i64,
        refunds_lower: bool,
    ) -> Result<BTreeMap<i64, i64>> {
        let mut out = BTreeMap::new();
        let mut lo = after;
        while lo < upto {
            // Each chunk starts at the next row there is: ids may be sparse.
            let next = src
                .logs()
                .query(&self.next_id_sql, &[Value::Int(lo), Value::Int(upto)])?;
            let Some(first) = next.first().and_then(|r| r.first()).and_then(Value::as_i64) else {
                break;
            };
            let hi = first.saturating_add(chunk_rows - 1).min(upto);
            let rows = src
                .logs()
                .query(&self.logged_sql, &[Value::Int(first), Value::Int(hi)])?;
            for r in &rows {
                let int = |i: usize| r.get(i).and_then(Value::as_i64).unwrap_or(0);
                let refunded = if refunds_lower { int(2) } else { 0 };
                let e: &mut i64 = out.entry(int(0)).or_default();
                *e = e.saturating_add(int(1)).saturating_sub(refunded);
            }
            lo = hi;
        }
        Ok(out)
    }
}

impl Collector for LedgerCollector {
    fn name(&self) -> &'static str {
        "ledger"
    }

    fn poll(&mut self, src: &mut Sources, ctx: &mut Context) -> Result<()> {
        if self.prepare(src, ctx).is_none() {
            return Ok(()); // no used_quota columns, or logs without ids: nothing to compare
        }
        let refunds_lower = self.decide_refunds(src, ctx)?;
        self.applied_refunds_lower = refunds_lower;
        let now = self.read(src)?;
        let Some(last) = self.last.take() else {
            self.last = Some(now);
            return Ok(());
        };
        let (after, upto) = (last.logs_max_id, now.logs_max_id);
        // Log rows deleted or ids reused since the last reading: that interval cannot be
        // compared; start again from this reading.
        if upto < after {
            self.last = Some(now);
            return Ok(());
        }
        let logged = match (after, upto) {
            (_, None) => BTreeMap::new(),
            (a, Some(u)) => {
                match self.logged(
                    src,
                    ctx.chunk_rows(),
                    a.unwrap_or(i64::MIN),
                    u,
                    refunds_lower,
                ) {
                    Ok(l) => l,
                    Err(e) => {
                        // Keep the last reading: the next poll compares over the longer interval.
                        self.last = Some(last);
                        return Err(e);
                    }
                }
            }
        };
        let index = ctx.now.div_euclid(self.window_secs);
        if self.open.as_ref().is_some_and(|w| w.index != index) {
            self.completed = self.open.take();
            // Gateway nodes may have been upgraded: decide the refund rule again.
            self.refunds_lower = None;
        }
        let w = self.open.get_or_insert_with(|| Window {
            index,
            ..Window::default()
        });
        let mut logged_total = 0_i64;
        for (&channel, &q) in &logged {
            logged_total = logged_total.saturating_add(q);
            // A log row on a channel with no ledger row (deleted, or id 0) has nothing to
            // compare with.
            if now.channels.contains_key(&channel) {
                w.channels.entry(channel).or_default().add(Flow {
                    charged: 0,
                    logged: q,
                });
            }
        }
        for (&channel, &used) in &now.channels {
            // A channel created since the last reading started from 0.
            let before = last.channels.get(&channel).copied().unwrap_or(0);
            let rise = used.saturating_sub(before);
            if rise != 0 || w.channels.contains_key(&channel) {
                w.channels.entry(channel).or_default().add(Flow {
                    charged: rise,
                    logged: 0,
                });
            }
        }
        w.users.add(Flow {
            charged: now.users.saturating_sub(last.users),
            logged: logged_total,
        });
        self.last = Some(now);
        Ok(())
    }

    fn render(&self, ctx: &Context, out: &mut Vec<MetricFamily>) {
        let Some(w) = &self.completed else { return };
        let mut unlogged = Family::of(&m::LEDGER_UNLOGGED_QUOTA);
        let mut uncharged = Family::of(&m::LEDGER_UNCHARGED_QUOTA);
        let mut logged = Family::of(&m::LEDGER_LOGGED_QUOTA);
        for (channel, flow) in &w.channels {
            let id = channel.to_string();
            let l = [
                ("channel_id", id.as_str()),
                ("channel_name", ctx.channel_name(&id)),
            ];
            unlogged.sample(&l, flow.unlogged() as f64);
            uncharged.sample(&l, flow.uncharged() as f64);
            logged.sample(&l, flow.logged as f64);
        }
        unlogged.finish(out);
        uncharged.finish(out);
        logged.finish(out);
        let mut users_unlogged = Family::of(&m::LEDGER_USERS_UNLOGGED_QUOTA);
        let mut users_uncharged = Family::of(&m::LEDGER_USERS_UNCHARGED_QUOTA);
        users_unlogged.sample(&[], w.users.unlogged() as f64);
        users_uncharged.sample(&[], w.users.uncharged() as f64);
        users_unlogged.finish(out);
        users_uncharged.finish(out);
        let mut end = Family::of(&m::LEDGER_WINDOW_END_TIMESTAMP_SECONDS);
        end.sample(&[], ((w.index + 1) * self.window_secs) as f64);
        end.finish(out);
        let mut refunds = Family::of(&m::LEDGER_REFUNDS_LOWER_USED_QUOTA);
        refunds.sample(&[], f64::from(u8::from(self.applied_refunds_lower)));
        refunds.finish(out);
    }
}
