//! The reconciliation's result: per model and in total, what logs billed, what quota_data
//! recorded, and what is missing or in excess. Its JSON form is the `reconcile --format json`
//! interface.

use serde::Serialize;

use super::recording::PairKey;

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct LogsSide {
    pub requests: i64,
    pub quota: i64,
    pub tokens: i64,
    pub latest: i64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct QdSide {
    pub rows: i64,
    pub requests: i64,
    pub quota: i64,
    pub tokens: i64,
    pub latest: i64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Amount {
    pub requests: i64,
    pub quota: i64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Comparison {
    pub logs: LogsSide,
    pub quota_data: QdSide,
    pub missing: Amount,
    pub excess: Amount,
    /// Async task settlement rows, never mirrored by design: not part of missing.
    pub unmirrored: Amount,
    /// Duplicate quota_data rows (beyond the first per key).
    pub duplicate_rows: i64,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ModelReport {
    pub model: String,
    pub lag_seconds: i64,
    #[serde(flatten)]
    pub cmp: Comparison,
}

/// The reconciliation of one time range; its JSON form is the `reconcile --format json`
/// interface.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Report {
    pub since: i64,
    pub until: i64,
    pub settled_until: i64,
    pub lag_seconds: i64,
    pub totals: Comparison,
    pub models: Vec<ModelReport>,
    /// Per channel, on gateways whose quota_data carries it (current generation); else empty.
    pub channels: Vec<ChannelReport>,
    /// Whether the pairs carry the channel, group, token and username (current generation).
    #[serde(skip)]
    pub per_channel: bool,
    /// Per (hour, user_id, model) deficits of settled hours after netting, ordered by hour:
    /// what backfill adds.
    #[serde(skip)]
    pub deficits: Vec<Deficit>,
}

/// What quota_data lacks or holds in excess for one channel, over settled hours.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ChannelReport {
    pub channel_id: i64,
    /// From `channels.name`, when the channel still exists.
    pub channel_name: String,
    pub missing: Amount,
    pub excess: Amount,
}

/// What quota_data lacks for one settled hour of one pair after netting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deficit {
    pub hour: i64,
    pub pair: PairKey,
    pub amount: Amount,
    /// Prompt plus completion tokens of the missing rows.
    pub tokens: i64,
    /// What quota_data held for the hour when compared: a write re-checks it, so that what
    /// changed since (another backfill, a late flush) is never added twice.
    pub recorded: Amount,
}

impl Amount {
    pub fn add(&mut self, o: &Amount) {
        self.requests += o.requests;
        self.quota += o.quota;
    }

    pub fn is_zero(&self) -> bool {
        self.requests == 0 && self.quota == 0
    }
}

impl Report {
    /// The channel missing the most quota, if any channel misses some.
    pub fn worst_channel(&self) -> Option<&ChannelReport> {
        self.channels
            .iter()
            .filter(|c| !c.missing.is_zero())
            .max_by_key(|c| (c.missing.quota, c.missing.requests))
    }

    /// Names the channels (the reconciliation itself knows only their ids).
    pub fn name_channels(&mut self, name: impl Fn(i64) -> String) {
        for c in &mut self.channels {
            c.channel_name = name(c.channel_id);
        }
    }

    /// The model lagging most, when it lags more than the whole: the overall lag stays low while
    /// other models keep recording, which is how one model that stopped can go unnoticed.
    pub fn worst_model_lag(&self) -> Option<&ModelReport> {
        self.models
            .iter()
            .filter(|m| m.lag_seconds > self.lag_seconds)
            .max_by_key(|m| m.lag_seconds)
    }
}

impl Comparison {
    /// Adds another comparison's figures to these (the newest times are kept).
    pub fn add(&mut self, c: &Comparison) {
        let t = self;
        t.logs.requests += c.logs.requests;
        t.logs.quota += c.logs.quota;
        t.logs.tokens += c.logs.tokens;
        t.logs.latest = t.logs.latest.max(c.logs.latest);
        t.quota_data.rows += c.quota_data.rows;
        t.quota_data.requests += c.quota_data.requests;
        t.quota_data.quota += c.quota_data.quota;
        t.quota_data.tokens += c.quota_data.tokens;
        t.quota_data.latest = t.quota_data.latest.max(c.quota_data.latest);
        t.missing.requests += c.missing.requests;
        t.missing.quota += c.missing.quota;
        t.excess.requests += c.excess.requests;
        t.excess.quota += c.excess.quota;
        t.unmirrored.requests += c.unmirrored.requests;
        t.unmirrored.quota += c.unmirrored.quota;
        t.duplicate_rows += c.duplicate_rows;
    }
}
