//! The same metrics over OTLP, for OpenTelemetry pipelines.
//!
//! One observable instrument per metric definition ([`crate::metrics::ALL`]); each callback
//! reads the snapshot that `/metrics` serves, so both outputs always show the same state. The
//! poll-time histogram is a histogram here too, recorded as each poll ends (OpenTelemetry has
//! no asynchronous histogram). The SDK's periodic reader exports from a thread of its own: a
//! collector that is down or slow delays nothing else.
//!
//! Names and units are chosen so that Prometheus' translation of OTLP metrics (dots to
//! underscores, the unit's suffix, `_total` on monotonic sums; `{...}` annotations add
//! nothing) gives back exactly the names `/metrics` serves.
//!
//! Configuration follows the OpenTelemetry environment variables; `--otlp.endpoint` acts like
//! `OTEL_EXPORTER_OTLP_ENDPOINT`. Nothing is exported when no endpoint is set.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use opentelemetry::KeyValue;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_otlp::{MetricExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use prometheus::proto::{LabelPair, Metric, MetricFamily};

use crate::metrics::{self, Kind, MetricDef};
use crate::poll::POLL_DURATION_BUCKETS;
use crate::snapshot::{Shared, Snapshot};

const DEFAULT_SERVICE_NAME: &str = "newapi-exporter";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    HttpProtobuf,
    Grpc,
}

/// Where and how to export, when OTLP is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The metrics endpoint from `--otlp.endpoint`; `None` leaves it to the environment.
    pub endpoint: Option<String>,
    pub protocol: Protocol,
    /// For messages: where the data goes.
    pub target: String,
    /// `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE` (cumulative by default).
    pub temporality: Temporality,
}

const TEMPORALITY_VAR: &str = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE";

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// OTLP settings from the flag and the standard variables, or `None` when no endpoint is set.
pub fn settings(flag: Option<&str>) -> Result<Option<Settings>> {
    let protocol_var = [
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .into_iter()
    .find_map(|v| env(v).map(|value| (v, value)));
    let protocol = match protocol_var {
        None => Protocol::HttpProtobuf,
        Some((_, p)) if p == "http/protobuf" => Protocol::HttpProtobuf,
        Some((_, p)) if p == "grpc" => Protocol::Grpc,
        Some((var, p)) => bail!("{var}={p:?} is not supported: use http/protobuf or grpc"),
    };
    let flag = flag.map(str::trim).filter(|f| !f.is_empty());
    let endpoint = match (flag, protocol) {
        // Like OTEL_EXPORTER_OTLP_ENDPOINT: a base URL, to which HTTP adds the signal's path.
        (Some(f), Protocol::HttpProtobuf) => {
            Some(format!("{}/v1/metrics", f.trim_end_matches('/')))
        }
        (Some(f), Protocol::Grpc) => Some(f.to_string()),
        (None, _) => None,
    };
    let target = match (
        &endpoint,
        env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
        env("OTEL_EXPORTER_OTLP_ENDPOINT"),
    ) {
        (Some(e), _, _) => e.clone(),
        (None, Some(e), _) => e,
        (None, None, Some(e)) => e,
        (None, None, None) => return Ok(None),
    };
    for url in [&target] {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("OTLP endpoint {url:?} must be an http:// or https:// URL");
        }
    }
    // The values the specification names, case-insensitively.
    let temporality = match env(TEMPORALITY_VAR).map(|v| v.trim().to_ascii_lowercase()) {
        None => Temporality::Cumulative,
        Some(v) if v == "cumulative" => Temporality::Cumulative,
        Some(v) if v == "delta" => Temporality::Delta,
        Some(v) if v == "lowmemory" => Temporality::LowMemory,
        Some(v) => {
            bail!("{TEMPORALITY_VAR}={v:?} is not supported: use cumulative, delta or lowmemory")
        }
    };
    Ok(Some(Settings {
        endpoint,
        protocol,
        target,
        temporality,
    }))
}

/// The OTel attribute for a Prometheus label, following the GenAI semantic conventions where
/// they fit.
fn attribute(label: &str, value: &str) -> KeyValue {
    match label {
        "model" => KeyValue::new("gen_ai.request.model", value.to_string()),
        "token_type" => KeyValue::new(
            "gen_ai.token.type",
            match value {
                "prompt" => "input".to_string(),
                "completion" => "output".to_string(),
                other => other.to_string(),
            },
        ),
        "channel_id" => KeyValue::new("newapi.channel.id", value.to_string()),
        "channel_name" => KeyValue::new("newapi.channel.name", value.to_string()),
        "channel_type" => KeyValue::new("newapi.channel.type", value.to_string()),
        "group" => KeyValue::new("newapi.group", value.to_string()),
        "table" => KeyValue::new("newapi.table", value.to_string()),
        "version" => KeyValue::new("newapi.exporter.version", value.to_string()),
        other => KeyValue::new(format!("newapi.{other}"), value.to_string()),
    }
}

/// `gen_ai.provider.name` for the gateway's channel type names that have one.
pub fn provider_name(channel_type: &str) -> Option<&'static str> {
    Some(match channel_type {
        "OpenAI" => "openai",
        "Azure" => "azure.ai.openai",
        "Anthropic" => "anthropic",
        "Gemini" => "gcp.gemini",
        "VertexAI" => "gcp.vertex_ai",
        "AWS" => "aws.bedrock",
        "DeepSeek" => "deepseek",
        "xAI" => "x_ai",
        "Mistral" => "mistral_ai",
        "Cohere" => "cohere",
        "Perplexity" => "perplexity",
        _ => return None,
    })
}

fn label<'a>(labels: &'a [LabelPair], name: &str) -> Option<&'a str> {
    labels.iter().find(|l| l.name() == name).map(|l| l.value())
}

/// Attributes of one sample; `providers` maps channel ids to `gen_ai.provider.name`.
fn attributes(m: &Metric, providers: &HashMap<String, &'static str>) -> Vec<KeyValue> {
    let labels = m.get_label();
    let mut out: Vec<KeyValue> = labels
        .iter()
        .map(|l| attribute(l.name(), l.value()))
        .collect();
    let provider = match label(labels, "channel_type") {
        Some(t) => provider_name(t),
        None => label(labels, "channel_id").and_then(|id| providers.get(id).copied()),
    };
    if let Some(p) = provider {
        out.push(KeyValue::new("gen_ai.provider.name", p));
    }
    out
}

/// Channel id to provider, from the channel status series of a snapshot.
fn providers(snap: &Snapshot) -> HashMap<String, &'static str> {
    snap.families
        .iter()
        .filter(|f| f.name() == metrics::CHANNEL_STATUS.name)
        .flat_map(|f| f.get_metric())
        .filter_map(|m| {
            let labels = m.get_label();
            let id = label(labels, "channel_id")?;
            Some((
                id.to_string(),
                provider_name(label(labels, "channel_type")?)?,
            ))
        })
        .collect()
}

fn family<'a>(snap: &'a Snapshot, def: &MetricDef) -> Option<&'a MetricFamily> {
    snap.families.iter().find(|f| f.name() == def.name)
}

/// Counts failed exports and logs one error per outage.
struct CountingExporter {
    inner: MetricExporter,
    errors: prometheus::IntCounter,
    failing: AtomicBool,
    target: String,
}

impl PushMetricExporter for CountingExporter {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.inner.export(metrics).await;
        match &result {
            Err(e) => {
                self.errors.inc();
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!("OTLP export to {} failed: {e}", self.target);
                } else {
                    tracing::debug!("OTLP export to {} failed again: {e}", self.target);
                }
            }
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("OTLP export to {} works again", self.target);
                }
            }
        }
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// Whether `OTEL_RESOURCE_ATTRIBUTES` sets `key`.
fn resource_attribute_set(key: &str) -> bool {
    env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|a| {
        a.split(',')
            .any(|kv| kv.trim_start().starts_with(&format!("{key}=")))
    })
}

/// The resource: the SDK reads `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME`; unless they
/// say otherwise the service is newapi-exporter, its version this build's, and its instance
/// `instance` (host and port: two exporters pushing to one collector stay apart, and one
/// keeps its identity across restarts).
fn resource(instance: &str) -> Resource {
    let named = env("OTEL_SERVICE_NAME").is_some() || resource_attribute_set("service.name");
    let mut builder = Resource::builder();
    if !named {
        builder = builder.with_service_name(DEFAULT_SERVICE_NAME);
    }
    if !resource_attribute_set("service.version") {
        builder =
            builder.with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    }
    if !resource_attribute_set("service.instance.id") {
        builder =
            builder.with_attribute(KeyValue::new("service.instance.id", instance.to_string()));
    }
    builder.build()
}

/// This host's name, for the instance id.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

/// A running OTLP export; dropping it stops the exports.
pub struct Otlp {
    provider: SdkMeterProvider,
    poll_duration: Option<opentelemetry::metrics::Histogram<f64>>,
    data: Arc<DataHistograms>,
}

/// The histograms built from the gateway's rows (request duration, time to first response).
/// OpenTelemetry has no asynchronous histogram: after each poll, what each bucket gained since
/// the last poll is recorded into a histogram with the same boundaries, at the middle of the
/// bucket. Bucket counts and `count` are exact; `sum` is that of the bucket middles.
struct DataHistograms {
    shared: Arc<Shared>,
    instruments: Vec<(&'static MetricDef, opentelemetry::metrics::Histogram<f64>)>,
    /// Per metric and label set, the cumulative bucket counts and count last recorded.
    recorded: std::sync::Mutex<HashMap<SeriesKey, Vec<u64>>>,
}

/// A metric's name and one label set of it.
type SeriesKey = (&'static str, Vec<(String, String)>);

impl DataHistograms {
    fn record_new(&self) {
        let snap = self.shared.snapshot();
        let p = providers(&snap);
        let mut recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        for (def, instrument) in &self.instruments {
            for m in family(&snap, def).into_iter().flat_map(|f| f.get_metric()) {
                let h = m.get_histogram();
                let key: Vec<(String, String)> = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name().to_string(), l.value().to_string()))
                    .collect();
                let mut now: Vec<u64> = h
                    .get_bucket()
                    .iter()
                    .map(|b| b.cumulative_count())
                    .collect();
                now.push(h.get_sample_count());
                let before = recorded
                    .get(&(def.name, key.clone()))
                    .filter(|b| b.len() == now.len() && b.iter().zip(&now).all(|(b, n)| b <= n))
                    .cloned()
                    .unwrap_or_else(|| vec![0; now.len()]);
                let attributes = attributes(m, &p);
                let bounds: Vec<f64> = h.get_bucket().iter().map(|b| b.upper_bound()).collect();
                for i in 0..now.len() {
                    let gained = (now[i] - before[i]).saturating_sub(if i == 0 {
                        0
                    } else {
                        now[i - 1] - before[i - 1]
                    });
                    let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
                    let middle = match bounds.get(i) {
                        Some(upper) => (lower + upper) / 2.0,
                        None => lower * 1.5,
                    };
                    for _ in 0..gained {
                        instrument.record(middle, &attributes);
                    }
                }
                recorded.insert((def.name, key), now);
            }
        }
    }
}

impl Otlp {
    /// Starts exporting. Must run inside the tokio runtime (the gRPC client lives there).
    /// `instance` identifies this exporter (`service.instance.id`).
    pub fn start(
        settings: &Settings,
        shared: Arc<Shared>,
        errors: prometheus::IntCounter,
        instance: &str,
    ) -> Result<Otlp> {
        let exporter = match settings.protocol {
            Protocol::HttpProtobuf => {
                let b = MetricExporter::builder()
                    .with_http()
                    .with_temporality(settings.temporality);
                match &settings.endpoint {
                    Some(e) => b.with_endpoint(e.clone()).build(),
                    None => b.build(),
                }
            }
            Protocol::Grpc => {
                let b = MetricExporter::builder()
                    .with_tonic()
                    .with_temporality(settings.temporality);
                match &settings.endpoint {
                    Some(e) => b.with_endpoint(e.clone()).build(),
                    None => b.build(),
                }
            }
        }
        .map_err(|e| anyhow::anyhow!("cannot set up OTLP export to {}: {e}", settings.target))?;
        let reader = PeriodicReader::builder(CountingExporter {
            inner: exporter,
            errors,
            failing: AtomicBool::new(false),
            target: settings.target.clone(),
        })
        .build();
        let provider = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource(instance))
            .build();
        let (poll_duration, instruments) = register_instruments(&provider, shared.clone());
        let data = Arc::new(DataHistograms {
            shared,
            instruments,
            recorded: std::sync::Mutex::new(HashMap::new()),
        });
        tracing::info!(
            "exporting metrics over OTLP ({:?}) to {}",
            settings.protocol,
            settings.target
        );
        Ok(Otlp {
            provider,
            poll_duration,
            data,
        })
    }

    /// Records one poll's duration, and what the data histograms gained, into the OTLP
    /// histograms (called as each poll's snapshot is published).
    pub fn poll_duration_recorder(&self) -> Box<dyn Fn(f64) + Send> {
        let h = self.poll_duration.clone();
        let data = self.data.clone();
        Box::new(move |secs| {
            if let Some(h) = &h {
                h.record(secs, &[]);
            }
            data.record_new();
        })
    }

    /// Stops exporting without waiting on a collector that does not answer.
    pub fn shutdown(self) {
        let _ = self
            .provider
            .shutdown_with_timeout(Duration::from_millis(500));
    }
}

/// A callback observing every sample of `def` in the current snapshot.
fn observe(
    shared: Arc<Shared>,
    def: &'static MetricDef,
    value: fn(&Metric) -> f64,
) -> impl Fn(&dyn opentelemetry::metrics::AsyncInstrument<f64>) + Send + Sync + 'static {
    move |o| {
        let snap = shared.snapshot();
        let p = providers(&snap);
        for m in family(&snap, def).into_iter().flat_map(|f| f.get_metric()) {
            o.observe(value(m), &attributes(m, &p));
        }
    }
}

/// The histograms that are recorded rather than observed: the poll time, and those built from
/// the gateway's rows.
type Recorded = (
    Option<opentelemetry::metrics::Histogram<f64>>,
    Vec<(&'static MetricDef, opentelemetry::metrics::Histogram<f64>)>,
);

/// The bucket boundaries of a histogram built from the gateway's rows.
fn data_boundaries(def: &MetricDef) -> Vec<f64> {
    use crate::collect::logs::{DURATION_BUCKETS, FIRST_RESPONSE_BUCKETS_MS};
    if def.name == metrics::TIME_TO_FIRST_RESPONSE_SECONDS.name {
        FIRST_RESPONSE_BUCKETS_MS
            .map(|ms| ms as f64 / 1000.0)
            .to_vec()
    } else {
        DURATION_BUCKETS.map(|s| s as f64).to_vec()
    }
}

/// Registers one instrument per metric; returns the histograms, which are recorded rather
/// than observed.
fn register_instruments(provider: &SdkMeterProvider, shared: Arc<Shared>) -> Recorded {
    let meter = provider.meter("newapi-exporter");
    let mut histogram = None;
    let mut data = Vec::new();
    for def in metrics::ALL {
        let def: &'static MetricDef = def;
        let shared = shared.clone();
        match def.kind {
            Kind::Counter => {
                meter
                    .f64_observable_counter(def.otel_name)
                    .with_description(def.help)
                    .with_unit(def.otel_unit)
                    .with_callback(observe(shared, def, |m| m.get_counter().get_value()))
                    .build();
            }
            Kind::Gauge => {
                meter
                    .f64_observable_gauge(def.otel_name)
                    .with_description(def.help)
                    .with_unit(def.otel_unit)
                    .with_callback(observe(shared, def, |m| m.get_gauge().get_value()))
                    .build();
            }
            Kind::Histogram if def.name == metrics::EXPORTER_POLL_DURATION_SECONDS.name => {
                histogram = Some(
                    meter
                        .f64_histogram(def.otel_name)
                        .with_description(def.help)
                        .with_unit(def.otel_unit)
                        .with_boundaries(POLL_DURATION_BUCKETS.to_vec())
                        .build(),
                );
            }
            Kind::Histogram => {
                let h = meter
                    .f64_histogram(def.otel_name)
                    .with_description(def.help)
                    .with_unit(def.otel_unit)
                    .with_boundaries(data_boundaries(def))
                    .build();
                data.push((def, h));
            }
        }
    }
    (histogram, data)
}
