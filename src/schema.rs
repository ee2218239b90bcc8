//! What the gateway's tables look like on this database, detected once at start-up.
//!
//! Columns came and went across one-api and new-api releases; a missing optional column only
//! degrades a label, a missing required one is an error that names it.

use std::collections::HashSet;
use std::fmt;

use anyhow::{Result, bail};

use crate::db::{Dialect, Sources};

/// `logs.type` of a billed request (consume).
pub const LOG_TYPE_CONSUME: i64 = 2;
/// `logs.type` of a failed channel attempt on new-api (with `ERROR_LOG_ENABLED`); "test" on
/// one-api.
pub const LOG_TYPE_ERROR: i64 = 5;
/// `logs.type` of a refund on new-api; unused on one-api.
pub const LOG_TYPE_REFUND: i64 = 6;

/// The token name the gateway logs channel tests under (`模型测试`, "model test"), with
/// `token_id` 0: consume rows that are mirrored into `quota_data` but never charged.
pub const CHANNEL_TEST_TOKEN_NAME: &str = "模型测试";

/// The first gateway release whose refunds lower `users.used_quota` and
/// `channels.used_quota` (new-api PR 6795, merged 2026-08-12: the old behaviour was still
/// reported on v1.0.0-rc.21). Before it, a refund gave the wallet back and left both alone.
pub const REFUNDS_LOWER_USED_QUOTA_SINCE: (u64, u64, u64, Option<u64>) = (1, 0, 0, Some(22));

/// Whether a gateway of this version lowers `used_quota` on refunds; `None` when the version
/// does not read as `vMAJOR.MINOR.PATCH[-rc.N]` (a development build).
pub fn refunds_lower_used_quota(version: &str) -> Option<bool> {
    let v = version.trim().trim_start_matches('v');
    let (release, pre) = match v.split_once('-') {
        Some((r, p)) => (r, Some(p)),
        None => (v, None),
    };
    let mut parts = release.split('.').map(|p| p.parse::<u64>().ok());
    let (major, minor, patch) = (parts.next()??, parts.next()??, parts.next()??);
    if parts.next().is_some() {
        return None;
    }
    // A release sorts after all of its release candidates.
    let rc = match pre {
        None => None,
        Some(p) => Some(
            p.strip_prefix("rc.")
                .or(p.strip_prefix("rc"))?
                .parse::<u64>()
                .ok()?,
        ),
    };
    let key = |(a, b, c, rc): (u64, u64, u64, Option<u64>)| (a, b, c, rc.unwrap_or(u64::MAX));
    Some(key((major, minor, patch, rc)) >= key(REFUNDS_LOWER_USED_QUOTA_SINCE))
}

/// Which generation of the gateway wrote the database: detected from its tables and columns,
/// never from a version string. Each generation records billing by its own rules
/// ([`Generation::rules`], the one place that holds them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// one-api: no `quota_data`; log type 5 means "test", and there are no refunds (type 6).
    OneApi,
    /// new-api before 2026-06-20: `quota_data` keyed by (user, username, model, hour).
    NewApiOlder,
    /// new-api since 2026-06-20: `quota_data` keyed by eight columns, with `channel_id`,
    /// `token_id`, `use_group` and `node_name`.
    NewApiCurrent,
}

/// How a generation writes `quota_data` from its logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationRules {
    /// The columns that make one `quota_data` row: rows beyond the first per key are duplicates.
    pub quota_data_key: &'static [&'static str],
    /// Whether async task settlement rows reach `quota_data` (from 2026-06-20 on).
    pub settlements_mirrored: bool,
    /// Whether the mirror takes the hour from a fresh clock reading, so a row logged at
    /// xx:59:59 can land in the next hour and adjacent hours must be netted.
    pub adjacent_hour_netting: bool,
    /// Whether `quota_data` carries the channel, so that the comparison is made per channel,
    /// token and group.
    pub per_channel: bool,
}

/// The eight-column key of the current generation.
pub const QUOTA_DATA_KEY_CURRENT: &[&str] = &[
    "user_id",
    "username",
    "model_name",
    "created_at",
    "use_group",
    "token_id",
    "channel_id",
    "node_name",
];
/// The key of the older generation.
pub const QUOTA_DATA_KEY_OLDER: &[&str] = &["user_id", "username", "model_name", "created_at"];

impl Generation {
    pub fn as_str(self) -> &'static str {
        match self {
            Generation::OneApi => "one-api",
            Generation::NewApiOlder => "new-api-older",
            Generation::NewApiCurrent => "new-api-current",
        }
    }

    /// What the landing page and `check` say.
    pub fn describe(self) -> &'static str {
        match self {
            Generation::OneApi => "one-api (no quota_data: nothing to reconcile)",
            Generation::NewApiOlder => {
                "new-api, older generation (quota_data per user, model and hour; before 2026-06-20)"
            }
            Generation::NewApiCurrent => {
                "new-api, current generation (quota_data per user, model, hour, group, token, \
                 channel and node; 2026-06-20 on)"
            }
        }
    }

    /// Whether log types 5 (error) and 6 (refund) carry new-api's meaning.
    pub fn has_error_and_refund_logs(self) -> bool {
        self != Generation::OneApi
    }

    /// The generation's billing rules; `None` on one-api, which has no `quota_data`.
    pub fn rules(self) -> Option<GenerationRules> {
        match self {
            Generation::OneApi => None,
            Generation::NewApiOlder => Some(GenerationRules {
                quota_data_key: QUOTA_DATA_KEY_OLDER,
                settlements_mirrored: false,
                adjacent_hour_netting: true,
                per_channel: false,
            }),
            Generation::NewApiCurrent => Some(GenerationRules {
                quota_data_key: QUOTA_DATA_KEY_CURRENT,
                settlements_mirrored: true,
                adjacent_hour_netting: false,
                per_channel: true,
            }),
        }
    }

    /// The generation a database with these tables was written by.
    pub fn of(quota_data: Option<&Columns>) -> Generation {
        match quota_data {
            None => Generation::OneApi,
            Some(q) if q.has("channel_id") && q.has("node_name") => Generation::NewApiCurrent,
            Some(_) => Generation::NewApiOlder,
        }
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The columns of one table.
#[derive(Debug, Clone, Default)]
pub struct Columns(HashSet<String>);

impl Columns {
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        Columns(names.into_iter().map(|n| n.to_ascii_lowercase()).collect())
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.contains(name)
    }

    /// The quoted column when it exists, else `fallback` (an SQL literal such as `NULL`).
    pub fn or(&self, d: Dialect, name: &str, fallback: &str) -> String {
        if self.has(name) {
            d.ident(name)
        } else {
            fallback.to_string()
        }
    }
}

pub const LOGS_REQUIRED: &[&str] = &[
    "id",
    "created_at",
    "type",
    "model_name",
    "quota",
    "prompt_tokens",
    "completion_tokens",
];

#[derive(Debug, Clone)]
pub struct Schema {
    pub generation: Generation,
    pub logs: Columns,
    pub quota_data: Option<Columns>,
    pub channels: Option<Columns>,
    pub options: Option<Columns>,
    pub users: Option<Columns>,
    /// `system_instances` (2026-06-24 on): one row per gateway node.
    pub system_instances: Option<Columns>,
    /// `tasks`: the gateway's async jobs.
    pub tasks: Option<Columns>,
    /// `perf_metrics`: per (model, group, hour) request outcomes and latency, written by default.
    pub perf_metrics: Option<Columns>,
    /// `midjourneys`: the gateway's Midjourney jobs.
    pub midjourneys: Option<Columns>,
}

impl Schema {
    /// The condition that picks channel-test rows of `logs` (consume rows never charged).
    pub fn channel_test_sql(&self, d: Dialect) -> String {
        if !self.logs.has("token_name") {
            return "1 = 0".to_string();
        }
        let name = format!("{} = '{CHANNEL_TEST_TOKEN_NAME}'", d.ident("token_name"));
        // The whole number first: it settles nearly every row before the text comparison,
        // which MySQL makes in the column's collation.
        if self.logs.has("token_id") {
            format!("{} = 0 AND {name}", d.ident("token_id"))
        } else {
            name
        }
    }

    pub fn detect(src: &mut Sources) -> Result<Schema> {
        let logs_where = src.logs().describe();
        let Some(logs) = src.logs().table_columns("logs")? else {
            bail!(
                "table `logs` not found in {logs_where}: this is not a new-api or one-api database"
            );
        };
        let logs = Columns::new(logs);
        for col in LOGS_REQUIRED {
            if !logs.has(col) {
                bail!(
                    "table `logs` in {logs_where} has no column `{col}`, which the exporter needs"
                );
            }
        }
        let main = src.main();
        let quota_data = main.table_columns("quota_data")?.map(Columns::new);
        let channels = main.table_columns("channels")?.map(Columns::new);
        let options = main.table_columns("options")?.map(Columns::new);
        let users = main.table_columns("users")?.map(Columns::new);
        let system_instances = main.table_columns("system_instances")?.map(Columns::new);
        let tasks = main.table_columns("tasks")?.map(Columns::new);
        let perf_metrics = main.table_columns("perf_metrics")?.map(Columns::new);
        let midjourneys = main.table_columns("midjourneys")?.map(Columns::new);
        let generation = Generation::of(quota_data.as_ref());
        if let (Some(rules), Some(q)) = (generation.rules(), &quota_data) {
            for col in rules.quota_data_key {
                if !q.has(col) {
                    bail!(
                        "table `quota_data` in {} has no column `{col}`, which the {generation} \
                         gateway writes",
                        main.describe()
                    );
                }
            }
        }
        Ok(Schema {
            generation,
            logs,
            quota_data,
            channels,
            options,
            users,
            system_instances,
            tasks,
            perf_metrics,
            midjourneys,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::refunds_lower_used_quota;

    #[test]
    fn refund_handling_follows_the_release_that_changed_it() {
        for (version, lowers) in [
            ("v1.0.0-rc.21", Some(false)),
            ("v1.0.0-rc.22", Some(true)),
            ("v1.0.0-rc22", Some(true)),
            ("v1.0.0", Some(true)),
            ("1.0.1", Some(true)),
            ("v0.9.27", Some(false)),
            ("v0.10.0-rc.30", Some(false)),
            ("v2.0.0-beta.1", None),
            ("dev-3f2a1c", None),
            ("", None),
            ("v1.0", None),
        ] {
            assert_eq!(refunds_lower_used_quota(version), lowers, "{version:?}");
        }
    }
}
