//! `/metrics` in the OpenMetrics text format, for clients that ask for it (Prometheus lists it
//! first in its Accept header). The families of the snapshot are handed to the
//! `prometheus-client` crate's encoder; this module only maps each family's type, labels and
//! values onto it.

use std::str::FromStr;

use prometheus::proto::{MetricFamily, MetricType as ProtoType};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether the client's Accept header prefers OpenMetrics to the Prometheus text format (by
/// q-value; the first listed wins a tie).
pub fn preferred(accept: &str) -> bool {
    let mut best: Option<(f32, bool)> = None;
    for part in accept.split(',') {
        let Ok(m) = mime::Mime::from_str(part.trim()) else {
            continue;
        };
        let openmetrics = m.type_() == "application" && m.subtype() == "openmetrics-text";
        let text = m.type_() == mime::TEXT && m.subtype() == mime::PLAIN;
        if !openmetrics && !text {
            continue;
        }
        let q = m
            .get_param("q")
            .and_then(|q| q.as_str().parse::<f32>().ok())
            .unwrap_or(1.0);
        if q > 0.0 && best.is_none_or(|(b, _)| q > b) {
            best = Some((q, openmetrics));
        }
    }
    best.is_some_and(|(_, openmetrics)| openmetrics)
}

/// The families in the OpenMetrics text format (ending in `# EOF`).
pub fn encode(families: &[MetricFamily]) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Families(families.to_vec())));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::error!("encoding metrics as OpenMetrics failed: {e}");
    }
    out
}

#[derive(Debug)]
struct Families(Vec<MetricFamily>);

/// One sample's value, typed as its family.
struct Sample<'a>(&'a prometheus::proto::Metric, ProtoType);

impl EncodeMetric for Sample<'_> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let m = self.0;
        match self.1 {
            ProtoType::COUNTER => {
                encoder.encode_counter::<NoLabelSet, _, f64>(&m.get_counter().get_value(), None)
            }
            ProtoType::HISTOGRAM => {
                let h = m.get_histogram();
                // The protobuf buckets are cumulative; the encoder takes each bucket's own count
                // and adds the +Inf bucket itself only if given.
                let mut buckets = Vec::new();
                let mut below = 0;
                for b in h.get_bucket() {
                    buckets.push((b.upper_bound(), b.cumulative_count() - below));
                    below = b.cumulative_count();
                }
                buckets.push((f64::INFINITY, h.get_sample_count().saturating_sub(below)));
                encoder.encode_histogram::<NoLabelSet>(
                    h.get_sample_sum(),
                    h.get_sample_count(),
                    &buckets,
                    None,
                )
            }
            _ => encoder.encode_gauge(&m.get_gauge().get_value()),
        }
    }

    fn metric_type(&self) -> MetricType {
        match self.1 {
            ProtoType::COUNTER => MetricType::Counter,
            ProtoType::HISTOGRAM => MetricType::Histogram,
            _ => MetricType::Gauge,
        }
    }
}

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let ty = f.get_field_type();
            let (kind, name) = match ty {
                // OpenMetrics names the counter family without `_total`, which its samples add.
                ProtoType::COUNTER => (
                    MetricType::Counter,
                    f.name().strip_suffix("_total").unwrap_or(f.name()),
                ),
                ProtoType::HISTOGRAM => (MetricType::Histogram, f.name()),
                _ => (MetricType::Gauge, f.name()),
            };
            let mut family = encoder.encode_descriptor(name, f.help(), None, kind)?;
            for m in f.get_metric() {
                let labels: Vec<(String, String)> = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name().to_string(), l.value().to_string()))
                    .collect();
                let sample = family.encode_family(&labels)?;
                Sample(m, ty).encode(sample)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::preferred;

    #[test]
    fn openmetrics_is_served_to_clients_that_prefer_it() {
        // Prometheus 3's default scrape protocols.
        assert!(preferred(
            "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,\
             application/openmetrics-text;version=0.0.1;q=0.4,\
             text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,\
             text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
        ));
        assert!(!preferred(
            "text/plain;version=0.0.4;q=0.9,application/openmetrics-text;q=0.5"
        ));
        assert!(!preferred("*/*"));
        assert!(!preferred(""));
        assert!(!preferred("application/openmetrics-text;q=0"));
        assert!(preferred("application/openmetrics-text"));
    }
}
