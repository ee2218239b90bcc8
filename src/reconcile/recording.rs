//! What the collectors fill for the reconciliation: per-hour aggregates of consume logs and of
//! quota_data, keyed alike, and the (user, model) pairs that changed since the last comparison.

use std::collections::{BTreeMap, HashMap, HashSet};

/// One hour of one (user, model). Fields in this order, so that one pass over a map keyed by it
/// visits each user's model hour by hour.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HourKey {
    pub user_id: i64,
    pub model: String,
    /// Start of the hour.
    pub hour: i64,
}

impl HourKey {
    pub fn new(user_id: i64, model: &str, hour: i64) -> Self {
        HourKey {
            user_id,
            model: model.to_string(),
            hour,
        }
    }

    /// The (user, model) pair this hour belongs to.
    pub fn pair(&self) -> PairKey {
        (self.user_id, self.model.clone())
    }
}

/// Oldest and newest `created_at` of some log rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeSpan {
    pub first: i64,
    pub last: i64,
}

impl TimeSpan {
    /// Widens the span to take in `other`.
    pub fn widen(&mut self, other: TimeSpan) {
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
    }
}
/// Consume log rows of one (hour, user, model).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogsHour {
    /// Rows the gateway mirrors into quota_data.
    pub requests: i64,
    pub quota: i64,
    pub tokens: i64,
    /// Newest and oldest `created_at` of those rows.
    pub latest: i64,
    pub first: i64,
    /// Async task settlement rows: billed, never mirrored by design.
    pub unmirrored_requests: i64,
    pub unmirrored_quota: i64,
}

impl LogsHour {
    pub fn add_mirrored(
        &mut self,
        requests: i64,
        quota: i64,
        tokens: i64,
        first: i64,
        latest: i64,
    ) {
        if self.requests == 0 {
            self.first = first;
            self.latest = latest;
        } else {
            self.first = self.first.min(first);
            self.latest = self.latest.max(latest);
        }
        self.requests += requests;
        self.quota += quota;
        self.tokens += tokens;
    }
}

/// quota_data rows of one (hour, user, model).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QdHour {
    pub rows: i64,
    /// Rows beyond the first for the same (hour, user_id, username, model): duplicates written
    /// by several gateway nodes flushing the same key.
    pub extra_rows: i64,
    pub requests: i64,
    pub quota: i64,
    pub tokens: i64,
}

/// (user_id, model_name): the unit the reconciliation compares, and caches between polls.
pub type PairKey = (i64, String);

/// Per-hour state shared by the logs and quota_data collectors and read here.
#[derive(Debug, Clone, Default)]
pub struct Recording {
    pub logs_hourly: BTreeMap<HourKey, LogsHour>,
    pub qd_hourly: BTreeMap<HourKey, QdHour>,
    /// Per model, over all history: oldest and newest mirrored consume log time.
    pub logs_model_times: HashMap<String, TimeSpan>,
    /// Per model, over all history: newest quota_data hour.
    pub qd_model_newest_hour: HashMap<String, i64>,
    /// Set by the quota_data collector when the table exists.
    pub has_quota_data: bool,
    /// (user, model) pairs whose hours changed since the reconciliation last compared them:
    /// a poll compares only these again while the window stays put.
    pub dirty: HashSet<PairKey>,
}

impl Recording {
    /// Adds consume log rows to one (user, model, hour).
    pub fn logs_hour(&mut self, user: i64, model: &str, hour: i64) -> &mut LogsHour {
        self.dirty.insert((user, model.to_string()));
        self.logs_hourly
            .entry(HourKey::new(user, model, hour))
            .or_default()
    }

    /// Replaces the quota_data side with a fresh read; pairs whose hours differ become dirty.
    pub fn replace_qd_hourly(&mut self, fresh: BTreeMap<HourKey, QdHour>) {
        let old = std::mem::replace(&mut self.qd_hourly, fresh);
        let changed = old
            .iter()
            .filter(|(k, v)| self.qd_hourly.get(*k) != Some(*v))
            .chain(self.qd_hourly.iter().filter(|(k, _)| !old.contains_key(*k)));
        for (key, _) in changed {
            self.dirty.insert(key.pair());
        }
    }

    /// Forgets hours before `from` (they left the window). They take part in no comparison
    /// (the collectors keep one hour more than the window for netting), so no pair becomes dirty.
    pub fn prune(&mut self, from: i64) {
        self.logs_hourly.retain(|k, _| k.hour >= from);
        self.qd_hourly.retain(|k, _| k.hour >= from);
    }
}
