//! Builds the exposition form of one metric family from its definition: collectors fill it
//! with samples and append it to the snapshot's families.

use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType,
};

use super::{Kind, MetricDef};

/// Builds one metric family; families without samples are left out (the text format has no
/// empty families).
pub struct Family(MetricFamily);

impl Family {
    /// An empty family for a definition.
    pub fn of(def: &MetricDef) -> Self {
        let t = match def.kind {
            Kind::Counter => MetricType::COUNTER,
            Kind::Histogram => MetricType::HISTOGRAM,
            _ => MetricType::GAUGE,
        };
        Self::with_type(def.name, def.help, t)
    }

    fn with_type(name: &str, help: &str, t: MetricType) -> Self {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(t);
        Family(mf)
    }

    fn metric(labels: &[(&str, &str)]) -> Metric {
        let pairs = labels
            .iter()
            .map(|(k, v)| {
                let mut p = LabelPair::default();
                p.set_name(k.to_string());
                p.set_value(v.to_string());
                p
            })
            .collect();
        Metric::from_label(pairs)
    }

    /// One histogram of a histogram family: `cumulative[i]` observations at most `bounds[i]`,
    /// `count` in all (the `+Inf` bucket) adding up to `sum`.
    pub fn histogram(
        &mut self,
        labels: &[(&str, &str)],
        bounds: &[f64],
        cumulative: &[u64],
        count: u64,
        sum: f64,
    ) -> &mut Self {
        let mut h = Histogram::default();
        h.set_sample_count(count);
        h.set_sample_sum(sum);
        let buckets = bounds
            .iter()
            .zip(cumulative)
            .map(|(le, n)| {
                let mut b = Bucket::default();
                b.set_upper_bound(*le);
                b.set_cumulative_count(*n);
                b
            })
            .collect();
        h.set_bucket(buckets);
        let mut m = Self::metric(labels);
        m.set_histogram(h);
        self.0.mut_metric().push(m);
        self
    }

    pub fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        let mut m = Self::metric(labels);
        if self.0.get_field_type() == MetricType::COUNTER {
            let mut c = Counter::default();
            c.set_value(value);
            m.set_counter(c);
        } else {
            let mut g = Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        }
        self.0.mut_metric().push(m);
        self
    }

    pub fn finish(self, out: &mut Vec<MetricFamily>) {
        if !self.0.get_metric().is_empty() {
            out.push(self.0);
        }
    }
}
