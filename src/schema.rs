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

/// Which gateway wrote the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Current new-api: `logs` has `group`, `other`, `request_id`, ...
    NewApi,
    /// Older new-api: `quota_data` exists but `logs` lacks some of the newer columns.
    NewApiLegacy,
    /// one-api: no `quota_data`; log type 5 means "test", and there are no refunds (type 6).
    OneApi,
}

impl Flavor {
    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::NewApi => "new-api",
            Flavor::NewApiLegacy => "new-api (legacy schema)",
            Flavor::OneApi => "one-api",
        }
    }

    /// Whether log types 5 (error) and 6 (refund) carry new-api's meaning.
    pub fn has_error_and_refund_logs(self) -> bool {
        self != Flavor::OneApi
    }
}

impl fmt::Display for Flavor {
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

/// Columns whose absence marks an older new-api schema.
const LOGS_NEWER: &[&str] = &["group", "other", "request_id"];

#[derive(Debug, Clone)]
pub struct Schema {
    pub flavor: Flavor,
    pub logs: Columns,
    pub quota_data: Option<Columns>,
    pub channels: Option<Columns>,
    pub options: Option<Columns>,
}

impl Schema {
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
        let flavor = match &quota_data {
            None => Flavor::OneApi,
            Some(_) if LOGS_NEWER.iter().all(|c| logs.has(c)) => Flavor::NewApi,
            Some(_) => Flavor::NewApiLegacy,
        };
        Ok(Schema {
            flavor,
            logs,
            quota_data,
            channels,
            options,
        })
    }
}
