//! Gateway settings from `options` that change what the numbers mean: `QuotaPerUnit` (quota per
//! USD), whether billed requests are logged at all, and the switches and interval of the
//! dashboard export. A few rows, read each poll.

use anyhow::Result;
use prometheus::proto::MetricFamily;

use super::{Collector, Context, GatewayOptions};
use crate::db::{Sources, Value};
use crate::metrics::{self as m, Family};

const KEYS: [&str; 4] = [
    "QuotaPerUnit",
    "DataExportEnabled",
    "DataExportInterval",
    "LogConsumeEnabled",
];

#[derive(Default)]
pub struct OptionsCollector {
    /// Values already reported as invalid, so each is logged once.
    warned: Vec<(String, String)>,
}

impl OptionsCollector {
    fn warn_once(&mut self, key: &str, value: &str, expected: &str) {
        let entry = (key.to_string(), value.to_string());
        if !self.warned.contains(&entry) {
            tracing::warn!(
                option = key,
                value,
                "options.{key} = {value:?} is not {expected}; using the gateway's default"
            );
            self.warned.push(entry);
        }
    }

    /// Applies one `options` row; invalid values keep the default and are reported.
    fn apply(&mut self, opts: &mut GatewayOptions, key: &str, value: &str) {
        let v = value.trim();
        let as_bool = |v: &str| match v.to_ascii_lowercase().as_str() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        };
        match key {
            "QuotaPerUnit" => match v.parse::<f64>() {
                Ok(q) if q.is_finite() && q > 0.0 => opts.quota_per_unit = q,
                _ => self.warn_once(key, value, "a positive number"),
            },
            "DataExportEnabled" => match as_bool(v) {
                Some(b) => opts.data_export_enabled = b,
                None => self.warn_once(key, value, "true or false"),
            },
            "LogConsumeEnabled" => match as_bool(v) {
                Some(b) => opts.log_consume_enabled = b,
                None => self.warn_once(key, value, "true or false"),
            },
            "DataExportInterval" => match v.parse::<i64>() {
                Ok(m) if m > 0 => opts.data_export_interval_seconds = m * 60,
                _ => self.warn_once(key, value, "a positive number of minutes"),
            },
            _ => {}
        }
    }
}

impl Collector for OptionsCollector {
    fn name(&self) -> &'static str {
        "options"
    }

    fn poll(&mut self, src: &mut Sources, ctx: &mut Context) -> Result<()> {
        let mut opts = GatewayOptions::default();
        if ctx.schema.options.is_some() {
            let db = src.main();
            let d = db.dialect();
            let placeholders = vec!["?"; KEYS.len()].join(", ");
            let sql = format!(
                "SELECT {k}, {v} FROM options WHERE {k} IN ({placeholders})",
                k = d.ident("key"),
                v = d.ident("value"),
            );
            let params: Vec<_> = KEYS.iter().map(|k| Value::Text(k.to_string())).collect();
            let rows = db.query(&sql, &params)?;
            ctx.count_rows("options", rows.len() as u64);
            for r in rows {
                if let [k, v, ..] = r.as_slice() {
                    self.apply(&mut opts, &k.to_label(), &v.to_label());
                }
            }
        }
        ctx.options = opts;
        Ok(())
    }

    fn render(&self, ctx: &Context, out: &mut Vec<MetricFamily>) {
        // What the gateway is, beside what it is set to.
        let mut f = Family::of(&m::GATEWAY_INFO);
        f.sample(&[("generation", ctx.schema.generation.as_str())], 1.0);
        f.finish(out);
        let mut f = Family::of(&m::QUOTA_PER_UNIT);
        f.sample(&[], ctx.options.quota_per_unit);
        f.finish(out);
        let mut f = Family::of(&m::LOG_CONSUME_ENABLED);
        f.sample(
            &[],
            if ctx.options.log_consume_enabled {
                1.0
            } else {
                0.0
            },
        );
        f.finish(out);
        if ctx.schema.quota_data.is_none() {
            return; // one-api: no dashboard export to describe
        }
        let mut f = Family::of(&m::QUOTA_DATA_EXPORT_ENABLED);
        f.sample(
            &[],
            if ctx.options.data_export_enabled {
                1.0
            } else {
                0.0
            },
        );
        f.finish(out);
        let mut f = Family::of(&m::QUOTA_DATA_EXPORT_INTERVAL_SECONDS);
        f.sample(&[], ctx.options.data_export_interval_seconds as f64);
        f.finish(out);
    }
}
