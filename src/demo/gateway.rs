//! A simulated gateway writer: the gateway's SQLite DDL, and the two writes new-api makes per
//! billed request (one `logs` row, plus an increment of an in-memory map that is flushed into
//! `quota_data` every `DataExportInterval`).
//!
//! It connects the way the gateway does (rollback journal, 30 s busy timeout) so that anything
//! built on it sees the same locking as production.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};

use crate::clock::hour_of;
use crate::db::sqlite::GATEWAY_BUSY_TIMEOUT;
use crate::schema::{Generation, LOG_TYPE_CONSUME};

/// Which of the gateway's table layouts the simulated gateway creates, and so by which
/// generation's rules it records billing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tables {
    /// new-api since 2026-06-20: `quota_data` keyed by eight columns.
    NewApiCurrent,
    /// new-api before 2026-06-20, with every `logs` column of 2026.
    NewApiOlder,
    /// new-api before `group`, `ip`, `request_id`, `other`, `use_time`, `is_stream` were added
    /// to `logs`.
    NewApiOlderLogs,
    OneApi,
}

impl Tables {
    pub fn generation(self) -> Generation {
        match self {
            Tables::NewApiCurrent => Generation::NewApiCurrent,
            Tables::NewApiOlder | Tables::NewApiOlderLogs => Generation::NewApiOlder,
            Tables::OneApi => Generation::OneApi,
        }
    }

    fn ddl(self) -> String {
        match self {
            Tables::NewApiCurrent => format!("{NEWAPI_LOGS_DDL}{NEWAPI_CURRENT_QUOTA_DATA_DDL}"),
            Tables::NewApiOlder => format!("{NEWAPI_LOGS_DDL}{NEWAPI_OLDER_QUOTA_DATA_DDL}"),
            Tables::NewApiOlderLogs => NEWAPI_LEGACY_DDL.to_string(),
            Tables::OneApi => ONEAPI_DDL.to_string(),
        }
    }

    /// Whether `logs` has the columns new-api added in 2025-2026.
    fn full_logs(self) -> bool {
        matches!(self, Tables::NewApiCurrent | Tables::NewApiOlder)
    }
}

/// `logs` as new-api (2026) creates it in SQLite.
pub const NEWAPI_LOGS_DDL: &str = r#"
CREATE TABLE `logs` (`id` integer,`user_id` integer,`created_at` integer,`type` integer,`content` text,
 `username` text DEFAULT "",`token_name` text DEFAULT "",`model_name` text DEFAULT "",`quota` integer DEFAULT 0,
 `prompt_tokens` integer DEFAULT 0,`completion_tokens` integer DEFAULT 0,`use_time` integer DEFAULT 0,
 `is_stream` numeric,`channel_id` integer,`channel_name` text,`token_id` integer DEFAULT 0,`group` text,
 `ip` text DEFAULT "",`request_id` varchar(64) DEFAULT "",`upstream_request_id` varchar(128) DEFAULT "",
 `other` text,PRIMARY KEY (`id`));
CREATE INDEX `idx_created_at_type` ON `logs`(`created_at`,`type`);
CREATE INDEX `idx_logs_model_name` ON `logs`(`model_name`);
"#;

/// `quota_data` of the current generation (2026-06-20 on), in SQLite.
pub const NEWAPI_CURRENT_QUOTA_DATA_DDL: &str = r#"
CREATE TABLE `quota_data` (`id` integer,`user_id` integer,`username` text DEFAULT "",`model_name` text DEFAULT "",
 `created_at` integer,`use_group` text DEFAULT "",`token_id` integer DEFAULT 0,`channel_id` integer DEFAULT 0,
 `node_name` text DEFAULT "",`token_used` integer DEFAULT 0,`count` integer DEFAULT 0,`quota` integer DEFAULT 0,
 PRIMARY KEY (`id`));
CREATE INDEX `idx_qdt_created_at` ON `quota_data`(`created_at`);
CREATE INDEX `idx_qdt_model_user_name` ON `quota_data`(`model_name`,`username`);
"#;

/// `quota_data` of the older generation, in SQLite.
pub const NEWAPI_OLDER_QUOTA_DATA_DDL: &str = r#"
CREATE TABLE `quota_data` (`id` integer,`user_id` integer,`username` text DEFAULT "",`model_name` text DEFAULT "",
 `created_at` integer,`token_used` integer DEFAULT 0,`count` integer DEFAULT 0,`quota` integer DEFAULT 0,PRIMARY KEY (`id`));
CREATE INDEX `idx_qdt_created_at` ON `quota_data`(`created_at`);
CREATE INDEX `idx_qdt_model_user_name` ON `quota_data`(`model_name`,`username`);
"#;

/// Older new-api: `logs` without the columns added later.
pub const NEWAPI_LEGACY_DDL: &str = r#"
CREATE TABLE `logs` (`id` integer,`user_id` integer,`created_at` integer,`type` integer,`content` text,
 `username` text DEFAULT "",`token_name` text DEFAULT "",`model_name` text DEFAULT "",`quota` integer DEFAULT 0,
 `prompt_tokens` integer DEFAULT 0,`completion_tokens` integer DEFAULT 0,`channel_id` integer,`token_id` integer DEFAULT 0,
 PRIMARY KEY (`id`));
CREATE TABLE `quota_data` (`id` integer,`user_id` integer,`username` text DEFAULT "",`model_name` text DEFAULT "",
 `created_at` integer,`token_used` integer DEFAULT 0,`count` integer DEFAULT 0,`quota` integer DEFAULT 0,PRIMARY KEY (`id`));
"#;

/// one-api: no `quota_data`.
pub const ONEAPI_DDL: &str = r#"
CREATE TABLE `logs` (`id` integer,`user_id` integer,`created_at` integer,`type` integer,`content` text,
 `username` text DEFAULT "",`token_name` text DEFAULT "",`model_name` text DEFAULT "",`quota` integer DEFAULT 0,
 `prompt_tokens` integer DEFAULT 0,`completion_tokens` integer DEFAULT 0,`channel_id` integer,PRIMARY KEY (`id`));
"#;

/// Tables every flavor has.
pub const COMMON_DDL: &str = r#"
CREATE TABLE `options` (`key` text,`value` text,PRIMARY KEY (`key`));
CREATE TABLE `channels` (`id` integer,`type` integer DEFAULT 0,`key` text NOT NULL,`open_ai_organization` text,
 `test_model` text,`status` integer DEFAULT 1,`name` text,`weight` integer DEFAULT 0,`created_time` integer,
 `test_time` integer,`response_time` integer,`base_url` text DEFAULT "",`other` text,`balance` real,
 `balance_updated_time` integer,`models` text,`group` varchar(64) DEFAULT "default",`used_quota` integer DEFAULT 0,
 `model_mapping` text,`status_code_mapping` varchar(1024) DEFAULT "",`priority` integer DEFAULT 0,
 `auto_ban` integer DEFAULT 1,`other_info` text,`tag` text,PRIMARY KEY (`id`));
CREATE TABLE `users` (`id` integer,`username` text,`password` text NOT NULL,`display_name` text,`role` integer DEFAULT 1,
 `status` integer DEFAULT 1,`email` text,`access_token` char(32),`quota` integer DEFAULT 0,`used_quota` integer DEFAULT 0,
 `request_count` integer DEFAULT 0,`group` varchar(64) DEFAULT "default",`aff_code` varchar(32),`inviter_id` integer,
 `deleted_at` datetime,PRIMARY KEY (`id`));
"#;

/// One `logs` row as the gateway writes it. Optional columns are skipped on schemas without them.
#[derive(Debug, Clone, Default)]
pub struct LogRow {
    pub user_id: i64,
    pub username: String,
    pub created_at: i64,
    pub log_type: i64,
    pub content: String,
    pub token_name: String,
    pub model_name: String,
    pub quota: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub use_time: i64,
    pub is_stream: bool,
    pub channel_id: i64,
    pub group: String,
    pub request_id: String,
    pub other: String,
    pub token_id: i64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Pending {
    count: i64,
    quota: i64,
    tokens: i64,
}

/// Key of the gateway's in-memory quota map. The older generation keys by user, username,
/// model and hour only (the other fields stay empty).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct MapKey {
    user_id: i64,
    username: String,
    model: String,
    hour: i64,
    group: String,
    token_id: i64,
    channel_id: i64,
}

/// The gateway's `logs` table in ClickHouse (`LOG_SQL_DSN`), without the optional TTL clause.
pub const CLICKHOUSE_LOGS_DDL: &str = "CREATE TABLE IF NOT EXISTS logs (id Int64 DEFAULT 0, \
    user_id Int32 DEFAULT 0, created_at Int64 DEFAULT 0, type Int32 DEFAULT 0, \
    content String DEFAULT '', username String DEFAULT '', token_name String DEFAULT '', \
    model_name String DEFAULT '', quota Int32 DEFAULT 0, prompt_tokens Int32 DEFAULT 0, \
    completion_tokens Int32 DEFAULT 0, use_time Int32 DEFAULT 0, is_stream UInt8 DEFAULT 0, \
    channel_id Int32 DEFAULT 0, token_id Int32 DEFAULT 0, `group` String DEFAULT '', \
    ip String DEFAULT '', request_id String DEFAULT '', upstream_request_id String DEFAULT '', \
    other String DEFAULT '') ENGINE = MergeTree() PARTITION BY toYYYYMM(toDateTime(created_at)) \
    ORDER BY (created_at, request_id)";

pub use crate::schema::CHANNEL_TEST_TOKEN_NAME;

/// The gateway's `tasks` table (async jobs: video, music, images) as gorm creates it on SQLite.
pub const TASKS_DDL: &str = "CREATE TABLE `tasks` (`id` integer PRIMARY KEY AUTOINCREMENT,\
    `created_at` integer,`updated_at` integer,`task_id` varchar(191),`platform` varchar(30),\
    `user_id` integer,`group` varchar(50),`channel_id` integer,`quota` integer,`action` varchar(40),\
    `status` varchar(20),`fail_reason` text,`submit_time` integer,`start_time` integer,\
    `finish_time` integer,`progress` varchar(20),`properties` json,`private_data` json,`data` json);\
    CREATE INDEX `idx_tasks_created_at` ON `tasks`(`created_at`);\
    CREATE INDEX `idx_tasks_task_id` ON `tasks`(`task_id`);\
    CREATE INDEX `idx_tasks_platform` ON `tasks`(`platform`);\
    CREATE INDEX `idx_tasks_user_id` ON `tasks`(`user_id`);\
    CREATE INDEX `idx_tasks_channel_id` ON `tasks`(`channel_id`);\
    CREATE INDEX `idx_tasks_action` ON `tasks`(`action`);\
    CREATE INDEX `idx_tasks_status` ON `tasks`(`status`);\
    CREATE INDEX `idx_tasks_submit_time` ON `tasks`(`submit_time`);\
    CREATE INDEX `idx_tasks_start_time` ON `tasks`(`start_time`);\
    CREATE INDEX `idx_tasks_finish_time` ON `tasks`(`finish_time`);\
    CREATE INDEX `idx_tasks_progress` ON `tasks`(`progress`);";

/// The gateway's `midjourneys` table as gorm creates it on SQLite (times in milliseconds).
pub const MIDJOURNEYS_DDL: &str = "CREATE TABLE `midjourneys` (`id` integer PRIMARY KEY AUTOINCREMENT,\
    `code` integer,`user_id` integer,`action` varchar(40),`mj_id` text,`prompt` text,`prompt_en` text,\
    `description` text,`state` text,`submit_time` integer,`start_time` integer,`finish_time` integer,\
    `image_url` text,`video_url` text,`video_urls` text,`status` varchar(20),`progress` varchar(30),\
    `fail_reason` text,`channel_id` integer,`quota` integer,`token_id` integer DEFAULT 0,\
    `billing_channel_id` integer DEFAULT 0,`buttons` text,`properties` text);\
    CREATE INDEX `idx_midjourneys_user_id` ON `midjourneys`(`user_id`);\
    CREATE INDEX `idx_midjourneys_action` ON `midjourneys`(`action`);\
    CREATE INDEX `idx_midjourneys_mj_id` ON `midjourneys`(`mj_id`);\
    CREATE INDEX `idx_midjourneys_submit_time` ON `midjourneys`(`submit_time`);\
    CREATE INDEX `idx_midjourneys_start_time` ON `midjourneys`(`start_time`);\
    CREATE INDEX `idx_midjourneys_finish_time` ON `midjourneys`(`finish_time`);\
    CREATE INDEX `idx_midjourneys_status` ON `midjourneys`(`status`);\
    CREATE INDEX `idx_midjourneys_progress` ON `midjourneys`(`progress`);";

/// The gateway's `perf_metrics` table as gorm creates it on SQLite: per (model, channel, group,
/// hour) request, success and latency sums, added to by each node's flush (rows written before
/// the channel column came have it NULL).
pub const PERF_METRICS_DDL: &str = "CREATE TABLE `perf_metrics` (`id` integer PRIMARY KEY AUTOINCREMENT,\
    `model_name` text,`channel_id` integer,`group` text,`bucket_ts` integer,\
    `request_count` integer DEFAULT 0,`success_count` integer DEFAULT 0,\
    `total_latency_ms` integer DEFAULT 0,`ttft_sum_ms` integer DEFAULT 0,`ttft_count` integer DEFAULT 0,\
    `output_tokens` integer DEFAULT 0,`generation_ms` integer DEFAULT 0);\
    CREATE UNIQUE INDEX `idx_perf_model_channel_group_bucket` ON `perf_metrics`(`model_name`,`channel_id`,`group`,`bucket_ts`);\
    CREATE INDEX `idx_perf_bucket_ts` ON `perf_metrics`(`bucket_ts`);";

/// The gateway's `system_instances` table (2026-06-24 on) as gorm creates it on SQLite: one row
/// per node, upserted at every heartbeat (30 s).
pub const SYSTEM_INSTANCES_DDL: &str = "CREATE TABLE `system_instances` (`node_name` varchar(128),\
    `info` text,`started_at` bigint,`last_seen_at` bigint,`created_at` bigint,`updated_at` bigint,\
    PRIMARY KEY (`node_name`));\
    CREATE INDEX `idx_system_instances_updated_at` ON `system_instances`(`updated_at`);\
    CREATE INDEX `idx_system_instances_created_at` ON `system_instances`(`created_at`);\
    CREATE INDEX `idx_system_instances_last_seen_at` ON `system_instances`(`last_seen_at`);\
    CREATE INDEX `idx_system_instances_started_at` ON `system_instances`(`started_at`);";

pub struct Gateway {
    pub conn: Connection,
    tables: Tables,
    map: BTreeMap<MapKey, Pending>,
    /// The node's `NODE_NAME` (current generation: part of each quota_data row's key).
    pub node_name: String,
    /// Channels whose map entries are dropped at every flush: a silent insert failure.
    pub lost_channels: Vec<i64>,
}

/// Opens a connection with the gateway's own settings.
pub fn gateway_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(GATEWAY_BUSY_TIMEOUT)?;
    Ok(conn)
}

impl Gateway {
    /// Creates the gateway's tables in a new database file.
    pub fn create(path: &Path, tables: Tables) -> Result<Self> {
        let conn = gateway_connection(path)?;
        conn.execute_batch(&tables.ddl())?;
        conn.execute_batch(COMMON_DDL)?;
        if tables == Tables::NewApiCurrent {
            conn.execute_batch(SYSTEM_INSTANCES_DDL)?;
            conn.execute_batch(TASKS_DDL)?;
            conn.execute_batch(PERF_METRICS_DDL)?;
            conn.execute_batch(MIDJOURNEYS_DDL)?;
        }
        Ok(Self::on(conn, tables))
    }

    fn on(conn: Connection, tables: Tables) -> Self {
        Gateway {
            conn,
            tables,
            map: BTreeMap::new(),
            node_name: "node-1".to_string(),
            lost_channels: Vec::new(),
        }
    }

    /// Opens an existing database that [`Gateway::create`] made.
    pub fn open(path: &Path, tables: Tables) -> Result<Self> {
        Ok(Self::on(gateway_connection(path)?, tables))
    }

    /// The async job a task settlement row closes: the jobs in flight finish at `t` and the
    /// next one is submitted, as the gateway's task poller moves them.
    pub fn next_task(&self, platform: &str, user_id: i64, channel_id: i64, t: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE tasks SET status = 'SUCCESS', progress = '100%', finish_time = ?1, updated_at = ?1
             WHERE status = 'IN_PROGRESS' AND platform = ?2",
            params![t, platform],
        )?;
        self.conn.execute(
            "INSERT INTO tasks (created_at, updated_at, task_id, platform, user_id, `group`, channel_id,
               quota, action, status, submit_time, start_time, finish_time, progress)
             VALUES (?1, ?1, 'task_' || ?1 || '_' || ?2, ?3, ?2, 'default', ?4, 0, 'generate',
               'IN_PROGRESS', ?1, ?1, 0, '30%')",
            params![t, user_id, platform, channel_id],
        )?;
        Ok(())
    }

    /// One request's outcome and latency, added to its hour's `perf_metrics` row the way a
    /// node's flush upserts it.
    pub fn perf_sample(&self, row: &LogRow, success: bool) -> Result<()> {
        self.conn.execute(
            "INSERT INTO perf_metrics (model_name, channel_id, `group`, bucket_ts, request_count,
               success_count, total_latency_ms)
             VALUES (?1, ?2, ?3, ?4, 1, ?5, ?6)
             ON CONFLICT(model_name, channel_id, `group`, bucket_ts) DO UPDATE SET
               request_count = perf_metrics.request_count + 1,
               success_count = perf_metrics.success_count + excluded.success_count,
               total_latency_ms = perf_metrics.total_latency_ms + excluded.total_latency_ms",
            params![
                row.model_name,
                row.channel_id,
                row.group,
                hour_of(row.created_at),
                i64::from(success),
                row.use_time * 1000
            ],
        )?;
        Ok(())
    }

    /// One heartbeat of a node, as the gateway upserts it every 30 s.
    pub fn heartbeat(&self, node: &str, started_at: i64, now: i64, version: &str) -> Result<()> {
        let info = format!(r#"{{"version":"{version}","is_master":true}}"#);
        self.conn.execute(
            "INSERT INTO system_instances (node_name, info, started_at, last_seen_at, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?4, ?4)
             ON CONFLICT(node_name) DO UPDATE SET info = excluded.info, started_at = excluded.started_at,
               last_seen_at = excluded.last_seen_at, updated_at = excluded.updated_at",
            params![node, info, started_at, now],
        )?;
        Ok(())
    }

    pub fn set_option(&self, key: &str, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO options (`key`, `value`) VALUES (?1, ?2)
             ON CONFLICT(`key`) DO UPDATE SET `value` = excluded.`value`",
            params![key, value],
        )?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn add_channel(
        &self,
        id: i64,
        channel_type: i64,
        name: &str,
        status: i64,
        balance: f64,
        response_ms: i64,
        group: &str,
        models: &str,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO channels (id, type, `key`, status, name, balance, response_time, `group`, models)
             VALUES (?1, ?2, 'sk-secret-never-read', ?3, ?4, ?5, ?6, ?7, ?8)",
            params![id, channel_type, status, name, balance, response_ms, group, models],
        )?;
        Ok(())
    }

    /// Writes one log row. With `feed_quota_data`, a consume row also goes into the map the way
    /// the gateway's `LogQuotaData` does; `hour_of` is the clock reading the gateway would take
    /// (normally the row's own time); the current generation always takes the row's own hour.
    pub fn record(&mut self, row: &LogRow, feed_quota_data: bool, hour_of: i64) -> Result<i64> {
        let id = match self.tables.full_logs() {
            true => {
                self.conn.execute(
                    "INSERT INTO logs (user_id, created_at, type, content, username, token_name, model_name,
                       quota, prompt_tokens, completion_tokens, use_time, is_stream, channel_id, `group`,
                       request_id, other, token_id)
                     VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17)",
                    params![
                        row.user_id, row.created_at, row.log_type, row.content, row.username,
                        row.token_name, row.model_name, row.quota, row.prompt_tokens,
                        row.completion_tokens, row.use_time, row.is_stream, row.channel_id,
                        row.group, row.request_id, row.other, row.token_id
                    ],
                )?;
                self.conn.last_insert_rowid()
            }
            false => {
                self.conn.execute(
                    "INSERT INTO logs (user_id, created_at, type, content, username, token_name, model_name,
                       quota, prompt_tokens, completion_tokens, channel_id)
                     VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11)",
                    params![
                        row.user_id, row.created_at, row.log_type, row.content, row.username,
                        row.token_name, row.model_name, row.quota, row.prompt_tokens,
                        row.completion_tokens, row.channel_id
                    ],
                )?;
                self.conn.last_insert_rowid()
            }
        };
        if feed_quota_data && row.log_type == LOG_TYPE_CONSUME && self.tables != Tables::OneApi {
            self.feed_row(row, hour_of);
        }
        if row.log_type == LOG_TYPE_CONSUME {
            self.charge(row)?;
        }
        Ok(id)
    }

    /// The second ledger, as the gateway moves it for a billed request: the channel's and the
    /// user's `used_quota` and the user's `request_count`. Channel tests (token 0) are never
    /// charged; a zero-usage row charges nothing.
    pub fn charge(&self, row: &LogRow) -> Result<()> {
        let test = row.token_id == 0 && row.token_name == CHANNEL_TEST_TOKEN_NAME;
        let zero_usage = row.quota == 0 && row.prompt_tokens == 0 && row.completion_tokens == 0;
        if test || zero_usage {
            return Ok(());
        }
        self.conn.execute(
            "UPDATE channels SET used_quota = used_quota + ?1 WHERE id = ?2",
            params![row.quota, row.channel_id],
        )?;
        self.conn.execute(
            "UPDATE users SET used_quota = used_quota + ?1, request_count = request_count + 1 \
             WHERE id = ?2",
            params![row.quota, row.user_id],
        )?;
        Ok(())
    }

    /// Adds one consume row to the in-memory map: keyed by the generation's columns, in the
    /// hour of `t` (older generation: a clock reading) or of the row itself (current).
    pub fn feed_row(&mut self, row: &LogRow, t: i64) {
        let current = self.tables == Tables::NewApiCurrent;
        let key = MapKey {
            user_id: row.user_id,
            username: row.username.clone(),
            model: row.model_name.clone(),
            hour: hour_of(if current { row.created_at } else { t }),
            group: if current {
                row.group.clone()
            } else {
                String::new()
            },
            token_id: if current { row.token_id } else { 0 },
            channel_id: if current { row.channel_id } else { 0 },
        };
        let p = self.map.entry(key).or_default();
        p.count += 1;
        p.quota += row.quota;
        p.tokens += row.prompt_tokens + row.completion_tokens;
    }

    /// Adds to the in-memory quota map (the gateway's `LogQuotaData`); `t` is the clock reading.
    /// On the current generation the entry has no group, token or channel.
    #[allow(clippy::too_many_arguments)]
    pub fn feed(
        &mut self,
        user_id: i64,
        username: &str,
        model: &str,
        t: i64,
        count: i64,
        quota: i64,
        tokens: i64,
    ) {
        let key = MapKey {
            user_id,
            username: username.to_string(),
            model: model.to_string(),
            hour: hour_of(t),
            group: String::new(),
            token_id: 0,
            channel_id: 0,
        };
        let p = self.map.entry(key).or_default();
        p.count += count;
        p.quota += quota;
        p.tokens += tokens;
    }

    /// Drops the in-memory map without writing it, as a gateway restart does.
    pub fn lose_pending(&mut self) {
        self.map.clear();
    }

    /// Flushes the map into `quota_data` like the gateway's `SaveQuotaDataCache`: increment the
    /// row for the key in place, or insert a new one. Entries of `lost_channels` are dropped.
    pub fn flush(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.map);
        for (k, p) in pending {
            if self.lost_channels.contains(&k.channel_id) {
                continue;
            }
            let existing: Option<i64> = if self.tables == Tables::NewApiCurrent {
                self.conn
                    .query_row(
                        "SELECT id FROM quota_data WHERE user_id = ?1 AND username = ?2 AND model_name = ?3
                         AND created_at = ?4 AND use_group = ?5 AND token_id = ?6 AND channel_id = ?7
                         AND node_name = ?8 LIMIT 1",
                        params![
                            k.user_id, k.username, k.model, k.hour, k.group, k.token_id,
                            k.channel_id, self.node_name
                        ],
                        |r| r.get(0),
                    )
                    .optional()?
            } else {
                self.conn
                    .query_row(
                        "SELECT id FROM quota_data WHERE user_id = ?1 AND username = ?2 AND model_name = ?3
                         AND created_at = ?4 LIMIT 1",
                        params![k.user_id, k.username, k.model, k.hour],
                        |r| r.get(0),
                    )
                    .optional()?
            };
            match existing {
                Some(id) => self.conn.execute(
                    "UPDATE quota_data SET count = count + ?1, quota = quota + ?2, token_used = token_used + ?3
                     WHERE id = ?4",
                    params![p.count, p.quota, p.tokens, id],
                )?,
                None if self.tables == Tables::NewApiCurrent => self.conn.execute(
                    "INSERT INTO quota_data (user_id, username, model_name, created_at, use_group, token_id,
                       channel_id, node_name, token_used, count, quota)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                    params![
                        k.user_id, k.username, k.model, k.hour, k.group, k.token_id, k.channel_id,
                        self.node_name, p.tokens, p.count, p.quota
                    ],
                )?,
                None => self.conn.execute(
                    "INSERT INTO quota_data (user_id, username, model_name, created_at, token_used, count, quota)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![k.user_id, k.username, k.model, k.hour, p.tokens, p.count, p.quota],
                )?,
            };
        }
        Ok(())
    }
}
