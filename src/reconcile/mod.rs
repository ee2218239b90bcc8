//! Reconciliation of what the gateway billed (`logs`) with what its dashboard recorded
//! (`quota_data`), on (hour, user_id, model_name). Pure: no I/O, nothing but the clock helpers.
//!
//! The logs and quota_data collectors fill a [`Recording`] with per-hour aggregates for the
//! hours in range; this module compares them. One computation serves the gauges, the
//! `reconcile` command, the landing page and `backfill`, so all four always agree.
//!
//! Rules (see the schema notes on why the two tables drift):
//! - only consume rows (type 2) are compared; refunds never reach quota_data, and async task
//!   settlement rows are mirrored by no code path, so they are reported apart as "unmirrored";
//! - missing and excess count only settled hours: an hour is settled once its end plus
//!   `DataExportInterval` plus a margin is in the past (until then a flush may still come);
//! - a deficit in one hour matched by an excess in the adjacent hour, for the same user and
//!   model, nets out: the gateway takes the hour from a fresh clock reading, so a request at
//!   xx:59:59 can land in the next hour.
//!
//! Files: [`recording`] (what the collectors fill), [`compare`] (the rules and the incremental
//! re-comparison), [`report`] (the report model, which is the JSON interface), [`format`]
//! (table, JSON and CSV).

pub mod compare;
pub mod format;
pub mod recording;
pub mod report;

pub use compare::{IncrementalComparison, Range, lag_seconds, reconcile};
pub use recording::{
    FastMap, HourKey, Hourly, LogsHour, Name, Names, PairKey, QdHour, Recording, TimeSpan,
};
pub use report::{Amount, ChannelReport, Comparison, Deficit, ModelReport, Report};
