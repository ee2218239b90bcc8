//! `newapi-exporter demo`: a simulated new-api gateway writing realistic traffic into a SQLite
//! database, with the exporter serving metrics on it.
//!
//! Traffic covers several models, channels and groups, errors and refunds, `quota_data` flushed
//! every `DataExportInterval` from an in-memory map, and async task settlement rows. By default
//! the gateway is of the current generation (quota_data per channel, token, group and node;
//! settlements mirrored) and the workflow channel's flushes never land, so its one async model
//! never reaches `quota_data`: the incident this exporter exists to reveal, named by channel.
//! With the older generation's tables, settlements are never mirrored and the workflow model's
//! path skips the map.

pub mod gateway;
pub mod generate;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::clock::unix_now;
use crate::schema::{CHANNEL_TEST_TOKEN_NAME, LOG_TYPE_CONSUME, LOG_TYPE_ERROR};
use gateway::{Gateway, LogRow, Tables};

/// The model the incident was about: its logs bypass the quota_data map.
pub const INCIDENT_MODEL: &str = "coze-workflow-async";
/// A video model whose async task settlement rows are unmirrored by design.
pub const TASK_MODEL: &str = "kling-v2-1";
/// The demo's `DataExportInterval`, in minutes (the gateway's default is 5).
pub const DEMO_EXPORT_INTERVAL_MINUTES: i64 = 1;

struct Model {
    name: &'static str,
    channels: &'static [i64],
    /// Quota per token, prompt side (completion costs 4x).
    ratio: f64,
    weight: u32,
}

const MODELS: &[Model] = &[
    Model {
        name: "gpt-4o",
        channels: &[1, 2],
        ratio: 1.25,
        weight: 30,
    },
    Model {
        name: "gpt-4o-mini",
        channels: &[1, 2],
        ratio: 0.075,
        weight: 40,
    },
    Model {
        name: "claude-sonnet-4-5",
        channels: &[3],
        ratio: 1.5,
        weight: 20,
    },
    Model {
        name: "gemini-2.5-pro",
        channels: &[4],
        ratio: 0.625,
        weight: 12,
    },
    Model {
        name: "deepseek-chat",
        channels: &[5],
        ratio: 0.135,
        weight: 15,
    },
    Model {
        name: INCIDENT_MODEL,
        channels: &[6],
        ratio: 0.0,
        weight: 4,
    },
    Model {
        name: TASK_MODEL,
        channels: &[7],
        ratio: 0.0,
        weight: 2,
    },
];

/// (id, type, name, group, models)
const CHANNELS: &[(i64, i64, &str, &str)] = &[
    (1, 1, "openai-primary", "default,vip"),
    (2, 3, "azure-eastus", "default,vip,svip"),
    (3, 14, "anthropic", "vip,svip"),
    (4, 24, "gemini", "default,vip"),
    (5, 43, "deepseek", "default"),
    (6, 49, "coze-workflows", "vip,svip"),
    (7, 50, "kling-video", "svip"),
];

const GROUPS: &[(&str, u32)] = &[("default", 70), ("vip", 25), ("svip", 5)];
const USERS: i64 = 12;

/// The traffic generator: what one request looks like.
pub struct Traffic {
    rng: SmallRng,
    next_request: u64,
}

impl Traffic {
    pub fn new(seed: u64) -> Self {
        Traffic {
            rng: SmallRng::seed_from_u64(seed),
            next_request: 1,
        }
    }

    fn pick<'a, T>(&mut self, items: &'a [T], weight: impl Fn(&T) -> u32) -> &'a T {
        let total: u32 = items.iter().map(&weight).sum();
        let mut x = self.rng.random_range(0..total);
        for it in items {
            let w = weight(it);
            if x < w {
                return it;
            }
            x -= w;
        }
        &items[items.len() - 1]
    }

    /// One log row at time `t`, and whether the gateway feeds it to the quota_data map.
    pub fn request(&mut self, t: i64) -> (LogRow, bool) {
        let model = self.pick(MODELS, |m| m.weight);
        let channel_id = model.channels[self.rng.random_range(0..model.channels.len())];
        let user_id = self.rng.random_range(1..=USERS);
        let group = self.pick(GROUPS, |g| g.1).0;
        let request_id = format!("req-{:012}", self.next_request);
        self.next_request += 1;
        let mut row = LogRow {
            user_id,
            username: format!("user{user_id:02}"),
            created_at: t,
            token_name: format!("key-{}", user_id % 4),
            token_id: 1000 + user_id,
            model_name: model.name.to_string(),
            channel_id,
            group: group.to_string(),
            request_id,
            ..LogRow::default()
        };
        let roll: f64 = self.rng.random();
        if roll < 0.03 {
            row.log_type = 5;
            row.content = "upstream error: status 429, rate limit reached".into();
            row.use_time = self.rng.random_range(0..5);
            return (row, false);
        }
        if roll < 0.04 {
            row.log_type = 6;
            row.quota = self.rng.random_range(1_000..200_000);
            row.content = "task failed, quota refunded".into();
            row.other = r#"{"reason":"task_failed"}"#.into();
            return (row, false);
        }
        row.log_type = 2;
        row.use_time = self.rng.random_range(1..30);
        row.is_stream = self.rng.random_bool(0.6);
        match model.name {
            INCIDENT_MODEL => {
                // Per-call billing of an async workflow, logged by a path that skips the map.
                row.quota = self.rng.random_range(1_500_000..3_500_000);
                row.prompt_tokens = self.rng.random_range(100..2_000);
                row.completion_tokens = self.rng.random_range(50..800);
                row.other = r#"{"async":true,"model_price":5}"#.into();
                row.content = "workflow run (async)".into();
                (row, false)
            }
            TASK_MODEL => {
                // Settlement of an async task: no tokens, no request id, never mirrored.
                let pre = self.rng.random_range(200_000..800_000);
                row.quota = pre;
                row.request_id.clear();
                row.other = format!(
                    r#"{{"is_task":true,"task_id":"task_{}","pre_consumed_quota":{pre},"actual_quota":{pre}}}"#,
                    self.next_request
                );
                row.content = "task settlement".into();
                (row, false)
            }
            // About 1 in 200 requests the upstream returns no usage: served, nothing billed.
            _ if roll > 0.995 => {
                row.content = "上游没有返回计费信息，无法扣费".into();
                (row, true)
            }
            _ => {
                if roll > 0.99 {
                    // A scheduled channel test, run by the gateway itself under its test token.
                    row.token_name = gateway::CHANNEL_TEST_TOKEN_NAME.into();
                    row.token_id = 0;
                    row.user_id = 1;
                    row.username = "user01".into();
                }
                row.prompt_tokens = self.rng.random_range(50..6_000);
                row.completion_tokens = self.rng.random_range(10..1_500);
                let cost =
                    (row.prompt_tokens as f64 + 4.0 * row.completion_tokens as f64) * model.ratio;
                row.quota = cost.round().max(1.0) as i64;
                row.other = if row.is_stream {
                    // Time to the first streamed byte (ms), within the request's duration.
                    let frt = 150 + (row.completion_tokens * 37) % (row.use_time * 1000);
                    format!(
                        r#"{{"model_ratio":{},"group_ratio":1,"frt":{frt}}}"#,
                        model.ratio
                    )
                } else {
                    format!(r#"{{"model_ratio":{},"group_ratio":1}}"#, model.ratio)
                };
                row.content = format!("model ratio {}, group ratio 1", model.ratio);
                (row, true)
            }
        }
    }
}

/// The channel whose flushes never land on the current generation: the async workflow
/// channel, so its one model goes missing from quota_data entirely (the incident's shape).
pub const LOST_CHANNEL: i64 = 6;

/// A gateway of `tables` with the demo's planted failure: on the current generation the
/// workflow channel's flushes never land; on the older one its model never feeds the map.
fn demo_gateway(gw: Gateway) -> Gateway {
    let mut gw = gw;
    gw.lost_channels = vec![LOST_CHANNEL];
    gw
}

/// Writes one request the way the demo's generation records it. The older generation never
/// mirrors settlements and the incident path skips the map (`feed`); the current one feeds
/// every consume row and loses the workflow channel's at the flush.
fn record(gw: &mut Gateway, tables: Tables, row: &LogRow, feed: bool, t: i64) -> Result<i64> {
    let feed = match tables {
        Tables::NewApiCurrent => row.log_type == LOG_TYPE_CONSUME,
        _ => feed,
    };
    if tables == Tables::NewApiCurrent
        && row.model_name == TASK_MODEL
        && row.log_type == LOG_TYPE_CONSUME
    {
        gw.next_task("kling", row.user_id, row.channel_id, t)?;
    }
    // perf_metrics counts every relayed request, failed ones too (error log rows stand for
    // them); channel tests are not relayed.
    let relayed = row.log_type == LOG_TYPE_ERROR
        || (row.log_type == LOG_TYPE_CONSUME && row.token_name != CHANNEL_TEST_TOKEN_NAME);
    if tables == Tables::NewApiCurrent && relayed {
        gw.perf_sample(row, row.log_type == LOG_TYPE_CONSUME)?;
    }
    gw.record(row, feed, t)
}

/// Creates a current-generation demo database with `history` of past traffic (one request
/// every ~10 s), flushed into quota_data the way the gateway would have.
pub fn create(path: &Path, history: Duration, seed: u64) -> Result<()> {
    create_with(path, history, seed, Tables::NewApiCurrent)
}

/// [`create`] with the tables of a given generation.
pub fn create_with(path: &Path, history: Duration, seed: u64, tables: Tables) -> Result<()> {
    let mut gw = demo_gateway(Gateway::create(path, tables)?);
    gw.set_option("QuotaPerUnit", "500000")?;
    gw.set_option("DataExportEnabled", "true")?;
    gw.set_option(
        "DataExportInterval",
        &DEMO_EXPORT_INTERVAL_MINUTES.to_string(),
    )?;
    for &(id, ty, name, group) in CHANNELS {
        let models: Vec<_> = MODELS
            .iter()
            .filter(|m| m.channels.contains(&id))
            .map(|m| m.name)
            .collect();
        let balance = 50.0 + 40.0 * id as f64;
        gw.add_channel(
            id,
            ty,
            name,
            1,
            balance,
            300 + 90 * id,
            group,
            &models.join(","),
        )?;
    }
    for u in 1..=USERS {
        gw.conn.execute(
            "INSERT INTO users (id, username, password, quota, `group`) VALUES (?1, ?2, 'x', 50000000, 'default')",
            rusqlite::params![u, format!("user{u:02}")],
        )?;
    }
    let mut traffic = Traffic::new(seed);
    let now = unix_now();
    let flush_every = DEMO_EXPORT_INTERVAL_MINUTES * 60;
    let mut t = now - history.as_secs() as i64;
    let mut next_flush = t + flush_every;
    gw.conn.execute_batch("BEGIN")?;
    while t < now {
        let (row, feed) = traffic.request(t);
        record(&mut gw, tables, &row, feed, t)?;
        if t >= next_flush {
            gw.flush()?;
            next_flush += flush_every;
        }
        t += traffic.rng.random_range(1..20);
    }
    gw.flush()?;
    if tables == Tables::NewApiCurrent {
        gw.heartbeat(
            &gw.node_name,
            now - history.as_secs() as i64,
            now,
            DEMO_VERSION,
        )?;
    }
    gw.conn.execute_batch("COMMIT")?;
    Ok(())
}

/// The version the demo gateway's node reports.
pub const DEMO_VERSION: &str = "v1.0.0-rc.21";

/// Writes live traffic at `rate` requests per second until `stop` is set, one short
/// transaction per statement as the gateway does, flushing quota_data every interval.
pub fn write_live(path: &Path, rate: f64, stop: Arc<AtomicBool>, seed: u64) -> Result<()> {
    let tables = tables_of(path)?;
    let mut gw = demo_gateway(Gateway::open(path, tables)?);
    let mut traffic = Traffic::new(seed);
    let flush_every = Duration::from_secs(DEMO_EXPORT_INTERVAL_MINUTES as u64 * 60);
    let mut last_flush = Instant::now();
    let mut last_channel_event = Instant::now();
    let mut last_heartbeat: Option<Instant> = None;
    let started_at = unix_now();
    let mean_gap = 1.0 / rate.max(0.01);
    while !stop.load(Ordering::Relaxed) {
        let u: f64 = traffic.rng.random_range(f64::EPSILON..1.0);
        std::thread::sleep(Duration::from_secs_f64((-u.ln() * mean_gap).min(5.0)));
        let t = unix_now();
        let (row, feed) = traffic.request(t);
        if let Err(e) = record(&mut gw, tables, &row, feed, t) {
            tracing::warn!("demo gateway: writing a log row failed: {e:#}");
        }
        // The node's heartbeat, every 30 s as the gateway's.
        if tables == Tables::NewApiCurrent
            && last_heartbeat.is_none_or(|h| h.elapsed() >= Duration::from_secs(30))
        {
            let _ = gw.heartbeat(&gw.node_name, started_at, t, DEMO_VERSION);
            last_heartbeat = Some(Instant::now());
        }
        if last_flush.elapsed() >= flush_every {
            if let Err(e) = gw.flush() {
                tracing::warn!("demo gateway: flushing quota_data failed: {e:#}");
            }
            last_flush = Instant::now();
        }
        if last_channel_event.elapsed() >= Duration::from_secs(90) {
            // Now and then the gateway auto-disables a failing channel and re-enables it later;
            // balances drift down with use.
            let id = traffic.rng.random_range(1..=CHANNELS.len() as i64);
            let status = if traffic.rng.random_bool(0.5) { 3 } else { 1 };
            let _ = gw.conn.execute(
                "UPDATE channels SET status = ?1, balance = balance - 0.37, response_time = ?2 WHERE id = ?3",
                rusqlite::params![status, traffic.rng.random_range(200..4000), id],
            );
            last_channel_event = Instant::now();
        }
    }
    gw.flush()
}

/// The tables an existing demo database was created with (the demo continues either).
fn tables_of(path: &Path) -> Result<Tables> {
    let conn = rusqlite::Connection::open(path)?;
    let current: i64 = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('quota_data') WHERE name = 'node_name'",
        [],
        |r| r.get(0),
    )?;
    Ok(if current > 0 {
        Tables::NewApiCurrent
    } else {
        Tables::NewApiOlder
    })
}

/// Prepares the demo database (creating it with `tables` when missing).
pub fn prepare(path: &Path, history: Duration, tables: Tables) -> Result<()> {
    if path.exists() {
        tracing::info!(db = %path.display(), "continuing the existing demo database");
        return Ok(());
    }
    tracing::info!(db = %path.display(), history = %humantime::format_duration(history), "creating the demo gateway database");
    create_with(path, history, unix_now() as u64, tables)
        .with_context(|| format!("creating the demo database {}", path.display()))
}
