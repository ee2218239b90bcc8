//! Recording health: the reconciliation of logs with quota_data over the window, as gauges
//! (missing, excess, unmirrored, duplicates, lag per model). The comparison itself is
//! `reconcile`'s; this collector runs it incrementally each poll and renders the result.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::Result;
use prometheus::proto::MetricFamily;

use super::{Admission, Collector, Context, OTHER};
use crate::db::Sources;
use crate::metrics::{self as m, Family};
use crate::reconcile::{
    ChannelReport, Comparison, IncrementalComparison, Range, Report, lag_seconds,
};

/// The recording-health gauges: the reconciliation of the logs and quota_data collectors'
/// recordings, which run before it.
#[derive(Default)]
pub struct RecordingHealthCollector {
    report: Option<Arc<Report>>,
    lag: i64,
    model_lag: BTreeMap<String, i64>,
    admission: Admission,
    /// The series each model is shown in (itself, or `__other__`).
    shown_as: HashMap<String, String>,
    /// Channels beyond the series cap share `channel_id="__other__"`.
    channel_admission: Admission,
    /// The channel id label each of the report's channels is shown under, in order.
    channel_ids: Vec<String>,
    comparison: IncrementalComparison,
    /// The comparison's last report, before its channels were named.
    compared: Option<Arc<Report>>,
    /// Hours before this were forgotten by the last prune.
    pruned_below: Option<i64>,
}

impl RecordingHealthCollector {
    pub fn new(max_series: Option<usize>) -> Self {
        RecordingHealthCollector {
            admission: Admission::new(max_series),
            channel_admission: Admission::new(max_series),
            ..RecordingHealthCollector::default()
        }
    }

    fn shown<'a>(&'a self, model: &'a str) -> &'a str {
        self.shown_as
            .get(model)
            .map(String::as_str)
            .unwrap_or(model)
    }
}

impl Collector for RecordingHealthCollector {
    fn name(&self) -> &'static str {
        "reconcile"
    }

    fn poll(&mut self, _src: &mut Sources, ctx: &mut Context) -> Result<()> {
        // A comparison of half-read inputs would publish false gauges: keep the last one (the
        // poll reports the failure through newapi_up and the collector's success gauge).
        if ctx.failed.contains("logs") || ctx.failed.contains("quota_data") {
            return Ok(());
        }
        let rec = &ctx.recording;
        if !rec.has_quota_data {
            self.report = None;
            ctx.report = None;
            return Ok(());
        }
        let (since, until) = ctx.window();
        let range = Range {
            since,
            until,
            settled_until: ctx.settled_until(),
        };
        let compared = self.comparison.update(&mut ctx.recording, range);
        let report = match (&self.compared, &self.report) {
            // The same comparison as last poll: keep the report already named.
            (Some(last), Some(named)) if Arc::ptr_eq(last, &compared) => named.clone(),
            _ if compared.channels.is_empty() => compared.clone(),
            _ => {
                let mut named = Report::clone(&compared);
                named.name_channels(|id| ctx.channel_name(&id.to_string()).to_string());
                Arc::new(named)
            }
        };
        self.compared = Some(compared);
        let rec = &ctx.recording;
        // Lag over all history (an outage longer than the window still shows in full).
        self.model_lag.clear();
        let mut newest_log = None;
        let mut oldest_log: Option<i64> = None;
        for (model, span) in &rec.logs_model_times {
            let q = rec.qd_model_newest_hour.get(model).copied();
            self.model_lag.insert(
                model.clone(),
                lag_seconds(Some(span.last), Some(span.first), q),
            );
            newest_log = newest_log.max(Some(span.last));
            oldest_log = Some(oldest_log.map_or(span.first, |o| o.min(span.first)));
        }
        let newest_qd = rec.qd_model_newest_hour.values().copied().max();
        self.lag = lag_seconds(newest_log, oldest_log, newest_qd);
        for model in report
            .models
            .iter()
            .map(|m| &m.model)
            .chain(self.model_lag.keys())
        {
            if !self.shown_as.contains_key(model) {
                let shown = if self.admission.admit(model) {
                    model.clone()
                } else {
                    OTHER.to_string()
                };
                self.shown_as.insert(model.clone(), shown);
            }
        }
        self.channel_ids = report
            .channels
            .iter()
            .map(|c| {
                let id = c.channel_id.to_string();
                if self.channel_admission.admit(&id) {
                    id
                } else {
                    OTHER.to_string()
                }
            })
            .collect();
        ctx.folded.insert(
            "reconcile",
            self.admission.folded() + self.channel_admission.folded(),
        );
        // Hours only leave the range the collectors keep when the window moves (once an hour).
        let keep_from = ctx.hourly_range().0;
        if self.pruned_below != Some(keep_from) {
            ctx.recording.prune(keep_from);
            self.pruned_below = Some(keep_from);
        }
        ctx.report = Some(report.clone());
        self.report = Some(report);
        Ok(())
    }

    fn render(&self, ctx: &Context, out: &mut Vec<MetricFamily>) {
        let Some(report) = &self.report else { return };
        let mut f = Family::of(&m::QUOTA_DATA_LAG_SECONDS);
        f.sample(&[], self.lag as f64);
        f.finish(out);
        let mut f = Family::of(&m::QUOTA_DATA_MODEL_LAG_SECONDS);
        let mut lags: BTreeMap<&str, i64> = BTreeMap::new();
        for (model, lag) in &self.model_lag {
            let e = lags.entry(self.shown(model)).or_default();
            *e = (*e).max(*lag);
        }
        for (model, lag) in lags {
            f.sample(&[("model", model)], lag as f64);
        }
        f.finish(out);
        type Field = fn(&Comparison) -> i64;
        let per_model: [(&m::MetricDef, Field); 5] = [
            (&m::QUOTA_DATA_MISSING_QUOTA, |c| c.missing.quota),
            (&m::QUOTA_DATA_MISSING_REQUESTS, |c| c.missing.requests),
            (&m::QUOTA_DATA_EXCESS_QUOTA, |c| c.excess.quota),
            (&m::QUOTA_DATA_EXCESS_REQUESTS, |c| c.excess.requests),
            (&m::QUOTA_DATA_UNMIRRORED_QUOTA, |c| c.unmirrored.quota),
        ];
        for (def, get) in per_model {
            let mut sums: BTreeMap<&str, i64> = BTreeMap::new();
            for model in &report.models {
                *sums.entry(self.shown(&model.model)).or_default() += get(&model.cmp);
            }
            let mut f = Family::of(def);
            for (model, v) in sums {
                f.sample(&[("model", model)], v as f64);
            }
            f.finish(out);
        }
        type ChannelField = fn(&ChannelReport) -> i64;
        let per_channel: [(&m::MetricDef, ChannelField); 3] = [
            (&m::QUOTA_DATA_CHANNEL_MISSING_QUOTA, |c| c.missing.quota),
            (&m::QUOTA_DATA_CHANNEL_MISSING_REQUESTS, |c| {
                c.missing.requests
            }),
            (&m::QUOTA_DATA_CHANNEL_EXCESS_QUOTA, |c| c.excess.quota),
        ];
        for (def, get) in per_channel {
            let mut sums: BTreeMap<(&str, &str), i64> = BTreeMap::new();
            for (c, id) in report.channels.iter().zip(&self.channel_ids) {
                let key = if id == OTHER {
                    (OTHER, "")
                } else {
                    (id.as_str(), c.channel_name.as_str())
                };
                *sums.entry(key).or_default() += get(c);
            }
            let mut f = Family::of(def);
            for ((id, name), v) in sums {
                f.sample(&[("channel_id", id), ("channel_name", name)], v as f64);
            }
            f.finish(out);
        }
        let mut f = Family::of(&m::QUOTA_DATA_DUPLICATE_ROWS);
        f.sample(&[], report.totals.duplicate_rows as f64);
        f.finish(out);
        let mut f = Family::of(&m::QUOTA_DATA_SETTLED_UNTIL_TIMESTAMP_SECONDS);
        f.sample(&[], ctx.settled_until() as f64);
        f.finish(out);
    }
}
