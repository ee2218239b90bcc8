//! What the collectors fill for the reconciliation: per-hour aggregates of consume logs and of
//! quota_data, keyed alike, and the pairs that changed since the last comparison.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// A hash map for keys that arrive by the hundred thousand (a full-history read holds about
/// one per log row). Its hasher is seeded per process, as the default one; it is not meant to
/// resist keys chosen to collide, which here are the gateway's own user, model and channel
/// values.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The series one comparison follows across hours: a (user, model) on the older generation; on
/// the current one also the channel, group, token and username that quota_data keys on (they
/// stay empty on the older generation).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PairKey {
    pub user_id: i64,
    pub model: Name,
    pub channel_id: i64,
    pub group: Name,
    pub token_id: i64,
    pub username: Name,
}

impl PairKey {
    /// A (user, model) pair of the older generation.
    pub fn user_model(user_id: i64, model: &Name) -> Self {
        PairKey {
            user_id,
            model: model.clone(),
            ..PairKey::default()
        }
    }
}

/// A text value of a key (a model, group, username or node name), shared by every key that
/// holds it: a full-history read makes a key per log row, from a few hundred distinct names.
pub type Name = Arc<str>;

/// The names met so far; each is stored once and handed out as a shared [`Name`].
#[derive(Debug, Clone, Default)]
pub struct Names(HashSet<Name, foldhash::fast::RandomState>);

impl Names {
    pub fn get(&mut self, text: &str) -> Name {
        if let Some(name) = self.0.get(text) {
            return name.clone();
        }
        let name: Name = Arc::from(text);
        self.0.insert(name.clone());
        name
    }
}

/// One hour of one pair. Fields in this order, so that one pass over a map keyed by it visits
/// each pair hour by hour.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HourKey {
    pub pair: PairKey,
    /// Start of the hour.
    pub hour: i64,
}

impl HourKey {
    /// One hour of a (user, model) pair of the older generation.
    pub fn new(user_id: i64, model: &str, hour: i64) -> Self {
        HourKey {
            pair: PairKey::user_model(user_id, &Name::from(model)),
            hour,
        }
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

/// Hours per pair: each pair's hours in order, the pairs found by hash. A full-history read
/// holds about one entry per log row, and most pairs (a user's token on one channel) have one
/// or a few hours: each pair keeps its hours in a short vector ordered by hour, which costs far
/// less than a tree per pair or ordering every entry by its whole key.
#[derive(Debug, Clone, PartialEq)]
pub struct Hourly<V> {
    pairs: FastMap<PairKey, Hours<V>>,
}

/// One pair's hours, ordered by hour, each at most once.
pub type Hours<V> = Vec<(i64, V)>;

impl<V> Default for Hourly<V> {
    fn default() -> Self {
        Hourly {
            pairs: FastMap::default(),
        }
    }
}

/// The entry of `hour` in one pair's ordered hours, created empty.
fn hour_entry<V: Default>(hours: &mut Hours<V>, hour: i64) -> &mut V {
    // Reads go forward in time: the hour is usually the last one or a new last one.
    let at = match hours.last() {
        Some((h, _)) if *h < hour => hours.len(),
        _ => hours.partition_point(|(h, _)| *h < hour),
    };
    if hours.get(at).is_none_or(|(h, _)| *h != hour) {
        hours.insert(at, (hour, V::default()));
    }
    &mut hours[at].1
}

impl<V: Default> Hourly<V> {
    /// The entry of one hour of a pair, created empty; the key is cloned only when new.
    pub fn hour_mut(&mut self, pair: &PairKey, hour: i64) -> &mut V {
        if !self.pairs.contains_key(pair) {
            self.pairs.insert(pair.clone(), Vec::with_capacity(1));
        }
        hour_entry(self.pairs.get_mut(pair).expect("inserted above"), hour)
    }

    pub fn entry_or_default(&mut self, key: HourKey) -> &mut V {
        hour_entry(self.pairs.entry(key.pair).or_default(), key.hour)
    }

    pub fn insert(&mut self, key: HourKey, value: V) {
        *self.entry_or_default(key) = value;
    }
}

impl<V> Hourly<V> {
    pub fn remove(&mut self, key: &HourKey) -> Option<V> {
        let hours = self.pairs.get_mut(&key.pair)?;
        let at = hours.binary_search_by_key(&key.hour, |(h, _)| *h).ok()?;
        let (_, removed) = hours.remove(at);
        if hours.is_empty() {
            self.pairs.remove(&key.pair);
        }
        Some(removed)
    }

    pub fn get(&self, key: &HourKey) -> Option<&V> {
        let hours = self.pairs.get(&key.pair)?;
        let at = hours.binary_search_by_key(&key.hour, |(h, _)| *h).ok()?;
        Some(&hours[at].1)
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The pairs that have at least one hour.
    pub fn pairs(&self) -> impl Iterator<Item = &PairKey> {
        self.pairs.keys()
    }

    /// One pair's hours, in order.
    pub fn hours(&self, pair: &PairKey) -> Option<&[(i64, V)]> {
        self.pairs.get(pair).map(Vec::as_slice)
    }

    /// Removes the hours at or after `from`; returns the pairs that had any.
    pub fn remove_from(&mut self, from: i64) -> Vec<PairKey> {
        let mut touched = Vec::new();
        self.pairs.retain(|pair, hours| {
            if hours.last().is_some_and(|(h, _)| *h >= from) {
                touched.push(pair.clone());
                hours.retain(|(h, _)| *h < from);
            }
            !hours.is_empty()
        });
        touched
    }

    /// Keeps only hours at or after `from`.
    pub fn retain_from(&mut self, from: i64) {
        self.pairs.retain(|_, hours| {
            hours.retain(|(h, _)| *h >= from);
            !hours.is_empty()
        });
    }
}

/// Per-hour state shared by the logs and quota_data collectors and read here.
#[derive(Debug, Clone, Default)]
pub struct Recording {
    /// The names the keys below hold.
    pub names: Names,
    pub logs_hourly: Hourly<LogsHour>,
    pub qd_hourly: Hourly<QdHour>,
    /// Per model, over all history: oldest and newest mirrored consume log time.
    pub logs_model_times: HashMap<String, TimeSpan>,
    /// Per model, over all history: newest quota_data hour.
    pub qd_model_newest_hour: HashMap<String, i64>,
    /// Set by the quota_data collector when the table exists.
    pub has_quota_data: bool,
    /// The gateway takes each mirrored row's hour from the log row itself (current
    /// generation), so hours are compared exactly; otherwise adjacent hours are netted.
    pub hour_from_log_row: bool,
    /// Pairs carry the channel (current generation): the report is also made per channel.
    pub per_channel: bool,
    /// (user, model) pairs whose hours changed since the reconciliation last compared them:
    /// a poll compares only these again while the window stays put.
    pub dirty: HashSet<PairKey>,
    /// Whether the reconciliation has compared every pair once. Until then every pair will be
    /// compared, and none is marked dirty (a cold start touches them all).
    pub compared: bool,
}

impl Recording {
    /// Adds consume log rows to one hour of a pair.
    pub fn logs_hour(&mut self, pair: PairKey, hour: i64) -> &mut LogsHour {
        if self.compared && !self.dirty.contains(&pair) {
            self.dirty.insert(pair.clone());
        }
        self.logs_hourly.hour_mut(&pair, hour)
    }

    /// Forgets the consume logs of hours at or after `from`, which are about to be read again.
    pub fn forget_logs_from(&mut self, from: i64) {
        let touched = self.logs_hourly.remove_from(from);
        if self.compared {
            self.dirty.extend(touched);
        }
    }

    /// Replaces the quota_data side with a fresh read; pairs whose hours differ become dirty.
    pub fn replace_qd_hourly(&mut self, fresh: Hourly<QdHour>) {
        let old = std::mem::replace(&mut self.qd_hourly, fresh);
        if !self.compared {
            return;
        }
        let changed = old
            .pairs
            .iter()
            .filter(|(k, v)| self.qd_hourly.pairs.get(*k) != Some(*v))
            .chain(
                self.qd_hourly
                    .pairs
                    .iter()
                    .filter(|(k, _)| !old.pairs.contains_key(*k)),
            );
        for (pair, _) in changed {
            self.dirty.insert(pair.clone());
        }
    }

    /// Forgets hours before `from` (they left the window). They take part in no comparison
    /// (the collectors keep one hour more than the window for netting), so no pair becomes dirty.
    pub fn prune(&mut self, from: i64) {
        self.logs_hourly.retain_from(from);
        self.qd_hourly.retain_from(from);
    }
}
