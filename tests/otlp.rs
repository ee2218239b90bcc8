//! OTLP export to in-process receivers (HTTP/protobuf and gRPC), decoded with the
//! OpenTelemetry protocol definitions and checked against SQL over the same database.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use newapi_exporter::clock::unix_now;
use newapi_exporter::demo::Traffic;
use newapi_exporter::demo::gateway::Gateway;
use newapi_exporter::demo::gateway::Tables;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use prost::Message;
use rusqlite::Connection;

pub(crate) type Received = Arc<Mutex<Vec<ExportMetricsServiceRequest>>>;

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kv: &[KeyValue]) -> BTreeMap<String, String> {
    kv.iter().map(|a| (a.key.clone(), text(&a.value))).collect()
}

/// The newest value of every (metric, attributes) in the received exports.
pub(crate) fn latest(received: &Received) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let mut out = BTreeMap::new();
    for req in received.lock().unwrap().iter() {
        for rm in &req.resource_metrics {
            for sm in &rm.scope_metrics {
                for m in &sm.metrics {
                    let points = match &m.data {
                        Some(metric::Data::Sum(s)) => &s.data_points,
                        Some(metric::Data::Gauge(g)) => &g.data_points,
                        _ => continue,
                    };
                    for p in points {
                        let v = match p.value {
                            Some(number_data_point::Value::AsDouble(d)) => d,
                            Some(number_data_point::Value::AsInt(i)) => i as f64,
                            None => continue,
                        };
                        out.insert((m.name.clone(), attrs(&p.attributes)), v);
                    }
                }
            }
        }
    }
    out
}

fn resource_attrs(received: &Received) -> BTreeMap<String, String> {
    let r = received.lock().unwrap();
    let rm = &r.last().expect("an export").resource_metrics[0];
    attrs(&rm.resource.as_ref().unwrap().attributes)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// An OTLP/HTTP receiver on `addr`; runs until the returned runtime is dropped.
fn http_receiver(addr: SocketAddr) -> (tokio::runtime::Runtime, Received) {
    let received: Received = Arc::default();
    let seen = received.clone();
    let rt = runtime();
    let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).unwrap();
    let app = axum::Router::new().route(
        "/v1/metrics",
        axum::routing::post(move |body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                let req = ExportMetricsServiceRequest::decode(body).expect("OTLP protobuf");
                seen.lock().unwrap().push(req);
                (
                    [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                    ExportMetricsServiceResponse::default().encode_to_vec(),
                )
            }
        }),
    );
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (rt, received)
}

struct Grpc(Received);

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

pub(crate) fn grpc_receiver() -> (tokio::runtime::Runtime, Received, SocketAddr) {
    let received: Received = Arc::default();
    let rt = runtime();
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let svc = MetricsServiceServer::new(Grpc(received.clone()));
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve(addr)
            .await
            .unwrap()
    });
    (rt, received, addr)
}

fn fixture(dir: &Path) -> std::path::PathBuf {
    let db = dir.join("one-api.db");
    let mut gw = Gateway::create(&db, Tables::NewApiOlder).unwrap();
    gw.add_channel(1, 1, "openai-primary", 1, 10.0, 200, "default", "m")
        .unwrap();
    gw.add_channel(2, 3, "azure", 1, 20.0, 300, "default", "m")
        .unwrap();
    gw.add_channel(3, 14, "anthropic", 3, 30.0, 400, "default", "m")
        .unwrap();
    for id in 4..=7 {
        gw.add_channel(id, 100 + id, &format!("c{id}"), 1, 1.0, 1, "default", "m")
            .unwrap();
    }
    let mut traffic = Traffic::new(5);
    let now = unix_now();
    gw.conn.execute_batch("BEGIN").unwrap();
    for i in 0..1500 {
        let t = now - 30 * 3600 + i * 60;
        let (row, feed) = traffic.request(t);
        gw.record(&row, feed, t).unwrap();
        if i % 5 == 0 {
            gw.flush().unwrap();
        }
    }
    gw.flush().unwrap();
    gw.conn.execute_batch("COMMIT").unwrap();
    db
}

pub(crate) fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sums of a metric's points by one attribute.
fn by(
    points: &BTreeMap<(String, BTreeMap<String, String>), f64>,
    metric: &str,
    key: &str,
    filter: impl Fn(&BTreeMap<String, String>) -> bool,
) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for ((name, a), v) in points {
        if name == metric && filter(a) {
            *out.entry(a.get(key).cloned().unwrap_or_default())
                .or_default() += v;
        }
    }
    out
}

/// Usage per model and the lag, against SQL over `db`'s logs and quota_data.
/// [`check_usage_against_sql`], and the fixture's channels.
fn check_against_sql(db: &Path, received: &Received) {
    check_usage_against_sql(db, received);
    let points = latest(received);
    // The provider comes from the channel type where the conventions name one.
    let providers = by(&points, "newapi.requests", "gen_ai.provider.name", |a| {
        a["newapi.channel.id"] == "1"
    });
    assert_eq!(providers.keys().collect::<Vec<_>>(), vec!["openai"]);
    let status = by(
        &points,
        "newapi.channel.status",
        "newapi.channel.name",
        |_| true,
    );
    assert_eq!(status.get("anthropic"), Some(&3.0));
}

pub(crate) fn check_usage_against_sql(db: &Path, received: &Received) {
    let points = latest(received);
    let conn = Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare(&format!(
            "SELECT model_name, SUM({BILLED_REQUEST}),
                    SUM(CASE WHEN {BILLED_REQUEST} THEN prompt_tokens ELSE 0 END),
                    SUM(CASE WHEN {BILLED_REQUEST} THEN completion_tokens ELSE 0 END),
                    SUM(CASE WHEN {BILLED_QUOTA} AND quota > 0 THEN quota ELSE 0 END)
             FROM logs WHERE {BILLED_QUOTA} GROUP BY model_name"
        ))
        .unwrap();
    let rows: Vec<(String, i64, i64, i64, i64)> = stmt
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(rows.len() >= 5);
    let requests = by(&points, "newapi.requests", "gen_ai.request.model", |_| true);
    let input = by(&points, "newapi.tokens", "gen_ai.request.model", |a| {
        a["gen_ai.token.type"] == "input"
    });
    let output = by(&points, "newapi.tokens", "gen_ai.request.model", |a| {
        a["gen_ai.token.type"] == "output"
    });
    let quota = by(&points, "newapi.quota", "gen_ai.request.model", |_| true);
    for (model, n, prompt, completion, q) in rows {
        assert_eq!(
            requests.get(&model),
            Some(&(n as f64)),
            "requests of {model}"
        );
        assert_eq!(
            input.get(&model),
            Some(&(prompt as f64)),
            "input tokens of {model}"
        );
        assert_eq!(
            output.get(&model),
            Some(&(completion as f64)),
            "output tokens of {model}"
        );
        assert_eq!(quota.get(&model), Some(&(q as f64)), "quota of {model}");
    }
    // The lag, against the same SQL as the recording-health oracle.
    let (newest_log, newest_hour): (i64, i64) = conn
        .query_row(
            "SELECT (SELECT MAX(created_at) FROM logs WHERE type = 2 AND NOT (prompt_tokens = 0
                     AND completion_tokens = 0 AND COALESCE(request_id, '') = ''
                     AND COALESCE(other, '') LIKE '%pre_consumed_quota%')),
                    (SELECT MAX(created_at) FROM quota_data)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let lag = (newest_log - (newest_hour + 3600)).max(0) as f64;
    let got = points
        .iter()
        .find(|((n, _), _)| n == "newapi.quota_data.lag")
        .map(|(_, v)| *v);
    assert_eq!(got, Some(lag));
}

#[test]
fn http_protobuf_export_matches_sql_and_carries_the_resource() {
    let h = http_export(
        &[],
        &[
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment.name=ci,team=llm-platform",
            ),
            ("OTEL_SERVICE_NAME", "gateway-exporter-test"),
        ],
    );
    let (received, exp, db) = (&h.received, &h.exp, &h.db);
    wait_for("an export with usage", || {
        latest(received).keys().any(|(n, _)| n == "newapi.requests")
    });
    std::thread::sleep(Duration::from_millis(700)); // one more export after readiness
    check_against_sql(db, received);
    let r = resource_attrs(received);
    assert_eq!(r["service.name"], "gateway-exporter-test");
    assert_eq!(r["deployment.environment.name"], "ci");
    assert_eq!(r["team"], "llm-platform");
    // Every counter the Prometheus side serves has its OTLP twin.
    let names: std::collections::BTreeSet<String> =
        exported_metrics(received).into_keys().collect();
    for def in newapi_exporter::metrics::ALL {
        let scraped = exp.scrape().iter().any(|s| s.name.starts_with(def.name));
        if scraped {
            assert!(
                names.contains(def.otel_name),
                "{} missing over OTLP",
                def.otel_name
            );
        }
    }
}

#[test]
fn grpc_export_matches_sql_with_the_default_service_name() {
    let dir = tempfile::tempdir().unwrap();
    let db = fixture(dir.path());
    let (_rt, received, addr) = grpc_receiver();
    let exp = Running::start_with_env(
        &[
            "--sqlite-path",
            db.to_str().unwrap(),
            "--otlp.endpoint",
            &format!("http://{addr}"),
        ],
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
        ],
    );
    exp.wait_ready(Duration::from_secs(30));
    wait_for("a gRPC export with usage", || {
        latest(&received)
            .keys()
            .any(|(n, _)| n == "newapi.requests")
    });
    std::thread::sleep(Duration::from_millis(700));
    check_against_sql(&db, &received);
    assert_eq!(resource_attrs(&received)["service.name"], "newapi-exporter");
}

#[test]
fn a_collector_that_is_down_then_back_receives_data_again() {
    let dir = tempfile::tempdir().unwrap();
    let db = fixture(dir.path());
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let exp = Running::start_with_env(
        &[
            "--sqlite-path",
            db.to_str().unwrap(),
            "--otlp.endpoint",
            &format!("http://{port}"),
        ],
        &[("OTEL_METRIC_EXPORT_INTERVAL", "200")],
    );
    exp.wait_ready(Duration::from_secs(30));
    // Scrapes stay fast and failures are counted while nothing listens.
    wait_for("failed exports to be counted", || {
        series(&exp.scrape(), "newapi_exporter_otlp_errors_total")
            .values()
            .next()
            .is_some_and(|v| *v >= 3.0)
    });
    let started = Instant::now();
    let (status, _) = exp.get("/metrics");
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a scrape waited on the collector"
    );
    let (_rt, received) = http_receiver(port);
    wait_for("data after the collector came back", || {
        latest(&received)
            .keys()
            .any(|(n, _)| n == "newapi.requests")
    });
    std::thread::sleep(Duration::from_millis(500));
    let lines = exp.stderr_lines();
    let errors: Vec<&String> = lines.iter().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one error per outage: {lines:#?}");
    assert!(errors[0].contains("OTLP export"), "{}", errors[0]);
    assert!(
        lines.iter().any(|l| l.contains("works again")),
        "{lines:#?}"
    );
    check_against_sql(&db, &received);
}

#[test]
fn bad_otlp_settings_are_named() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args([
            "--sqlite-path",
            "x.db",
            "--web.listen-address",
            "127.0.0.1:0",
        ])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{err}");
}

/// An exporter on the fixture pushing to an OTLP/HTTP receiver every 300 ms, with `args` and
/// `envs` besides; ready.
struct HttpExport {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    _rt: tokio::runtime::Runtime,
    received: Received,
    port: SocketAddr,
    exp: Running,
}

fn http_export(args: &[&str], envs: &[(&str, &str)]) -> HttpExport {
    let dir = tempfile::tempdir().unwrap();
    let db = fixture(dir.path());
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (rt, received) = http_receiver(port);
    let endpoint = format!("http://{port}");
    let mut all_args = vec!["--sqlite-path", db.to_str().unwrap()];
    all_args.extend_from_slice(args);
    let mut all_envs = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
    ];
    all_envs.extend_from_slice(envs);
    let exp = Running::start_with_env(&all_args, &all_envs);
    exp.wait_ready(Duration::from_secs(30));
    HttpExport {
        _dir: dir,
        db,
        _rt: rt,
        received,
        port,
        exp,
    }
}

/// Prometheus' translation of an OTLP metric name (its OTLP receiver and remote-write
/// translator, with the default suffixes): characters outside `[a-zA-Z0-9_:]` become `_`; the
/// unit, without `{...}` annotations, becomes a suffix (UCUM `s` → `seconds`, `ms` →
/// `milliseconds`, `By` → `bytes`, `1` → `ratio` on gauges, `a/b` → `a_per_b`) unless the name
/// already ends with it; monotonic sums end in `_total`; histograms keep the base name.
fn prometheus_name(otel: &str, unit: &str, kind: &str) -> String {
    let word = |u: &str| -> String {
        match u {
            "s" => "seconds",
            "ms" => "milliseconds",
            "min" => "minutes",
            "h" => "hours",
            "By" => "bytes",
            "KiBy" => "kibibytes",
            "%" => "percent",
            other => other,
        }
        .to_string()
    };
    let mut name: String = otel
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    while name.contains("__") {
        name = name.replace("__", "_");
    }
    // Annotations carry no unit.
    let mut bare = String::new();
    let mut depth = 0;
    for c in unit.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ if depth == 0 => bare.push(c),
            _ => {}
        }
    }
    let suffix = match bare.split_once('/') {
        _ if bare == "1" => (kind == "gauge").then(|| "ratio".to_string()),
        Some((a, b)) if !b.is_empty() => Some(if a.is_empty() {
            format!("per_{}", word(b))
        } else {
            format!("{}_per_{}", word(a), word(b))
        }),
        _ if bare.is_empty() => None,
        _ => Some(word(&bare)),
    };
    if let Some(suffix) = suffix
        && !name.ends_with(&format!("_{suffix}"))
    {
        name = format!("{name}_{suffix}");
    }
    if kind == "counter" && !name.ends_with("_total") {
        name.push_str("_total");
    }
    name
}

/// (name, unit, kind) of every metric in the exports; the temporality of each sum and
/// histogram.
fn exported_metrics(received: &Received) -> BTreeMap<String, (String, String, i32)> {
    let mut out = BTreeMap::new();
    for req in received.lock().unwrap().iter() {
        for rm in &req.resource_metrics {
            for sm in &rm.scope_metrics {
                for m in &sm.metrics {
                    let (kind, temporality) = match &m.data {
                        Some(metric::Data::Sum(s)) if s.is_monotonic => {
                            ("counter", s.aggregation_temporality)
                        }
                        Some(metric::Data::Sum(s)) => ("updown", s.aggregation_temporality),
                        Some(metric::Data::Gauge(_)) => ("gauge", 0),
                        Some(metric::Data::Histogram(h)) => {
                            ("histogram", h.aggregation_temporality)
                        }
                        other => panic!("{}: unexpected data {other:?}", m.name),
                    };
                    out.insert(
                        m.name.clone(),
                        (m.unit.clone(), kind.to_string(), temporality),
                    );
                }
            }
        }
    }
    out
}

/// What Prometheus makes of the OTLP stream is what /metrics serves, name for name; the
/// resource names the service's version and this instance; the poll time is a histogram.
#[test]
fn prometheus_translation_of_the_otlp_stream_gives_the_same_names() {
    // Bound whole: the receiver runs as long as the binding lives.
    let h = http_export(&["--poll-interval", "200ms"], &[]);
    let (received, exp) = (&h.received, &h.exp);
    wait_for("an export with the poll histogram", || {
        exported_metrics(received).contains_key("newapi.exporter.poll.duration")
    });
    std::thread::sleep(Duration::from_millis(700));
    let exported = exported_metrics(received);
    let translated: std::collections::BTreeSet<String> = exported
        .iter()
        .map(|(name, (unit, kind, _))| prometheus_name(name, unit, kind))
        .collect();
    let scraped: std::collections::BTreeSet<String> = exp
        .scrape()
        .iter()
        .filter(|s| s.name.starts_with("newapi_"))
        .map(|s| {
            // A histogram's series share its base name.
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|x| s.name.strip_suffix(x))
                .filter(|b| b.ends_with("_seconds"));
            base.unwrap_or(&s.name).to_string()
        })
        .collect();
    assert_eq!(translated, scraped);
    // The same for every definition, including the series this fixture has none of.
    for def in newapi_exporter::metrics::ALL {
        let kind = match def.kind {
            newapi_exporter::metrics::Kind::Counter => "counter",
            newapi_exporter::metrics::Kind::Gauge => "gauge",
            newapi_exporter::metrics::Kind::Histogram => "histogram",
        };
        assert_eq!(
            prometheus_name(def.otel_name, def.otel_unit, kind),
            def.name
        );
    }
    let (_, kind, temporality) = &exported["newapi.exporter.poll.duration"];
    assert_eq!(kind, "histogram");
    // Cumulative unless asked otherwise (OTLP's AGGREGATION_TEMPORALITY_CUMULATIVE is 2).
    assert_eq!(*temporality, 2);
    assert!(
        exported
            .values()
            .all(|(unit, _, _)| !unit.is_empty() && !unit.contains("USD") || unit.contains('{')),
        "units are UCUM (money as an annotation): {exported:?}"
    );
    let r = resource_attrs(received);
    assert_eq!(r["service.version"], env!("CARGO_PKG_VERSION"));
    let host = newapi_exporter::export::otlp::host_name();
    assert_eq!(
        r["service.instance.id"],
        format!("{host}:{}", exp.addr.rsplit(':').next().unwrap())
    );
}

/// `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE` is honoured; a value it does not take is
/// named.
#[test]
fn the_temporality_preference_is_honoured() {
    let h = http_export(
        &[],
        &[("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "Delta")],
    );
    let (received, db, port) = (&h.received, &h.db, h.port);
    wait_for("an export with usage", || {
        exported_metrics(received).contains_key("newapi.requests")
    });
    // AGGREGATION_TEMPORALITY_DELTA is 1.
    assert_eq!(exported_metrics(received)["newapi.requests"].2, 1);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["--sqlite-path", db.to_str().unwrap()])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{port}"))
        .env(
            "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
            "sometimes",
        )
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE=\"sometimes\""),
        "{said}"
    );
}

/// A metric's name and attributes (or labels).
type Series = (String, BTreeMap<String, String>);

/// The newest data point of every (histogram, attributes): cumulative bucket counts (the last
/// is `+Inf`) and the count.
fn latest_histograms(received: &Received) -> BTreeMap<Series, (Vec<u64>, u64)> {
    let mut out = BTreeMap::new();
    for req in received.lock().unwrap().iter() {
        for rm in &req.resource_metrics {
            for sm in &rm.scope_metrics {
                for m in &sm.metrics {
                    let Some(metric::Data::Histogram(h)) = &m.data else {
                        continue;
                    };
                    for p in &h.data_points {
                        let mut attributes = attrs(&p.attributes);
                        attributes.remove("gen_ai.provider.name");
                        let cumulative = p
                            .bucket_counts
                            .iter()
                            .scan(0, |sum, n| {
                                *sum += n;
                                Some(*sum)
                            })
                            .collect();
                        out.insert((m.name.clone(), attributes), (cumulative, p.count));
                    }
                }
            }
        }
    }
    out
}

/// The latency histograms built from the logs reach OTLP with the bucket counts and counts
/// that /metrics serves, series for series.
#[test]
fn the_latency_histograms_carry_the_same_bucket_counts_over_otlp() {
    let h = http_export(&["--poll-interval", "200ms"], &[]);
    let (received, exp) = (&h.received, &h.exp);
    let otel = "newapi.request.duration";
    wait_for("an export of the request-duration histogram", || {
        latest_histograms(received).keys().any(|(n, _)| n == otel)
    });
    std::thread::sleep(Duration::from_millis(700));
    let scraped = exp.scrape();
    let name = "newapi_request_duration_seconds";
    // Labels to (le, cumulative count) and the count.
    type Buckets = (Vec<(f64, u64)>, u64);
    let mut want: BTreeMap<BTreeMap<String, String>, Buckets> = BTreeMap::new();
    for s in &scraped {
        let mut labels: BTreeMap<String, String> = s.labels.clone().into_iter().collect();
        if s.name == format!("{name}_bucket") {
            let le = labels.remove("le").unwrap();
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            want.entry(labels).or_default().0.push((le, s.value as u64));
        } else if s.name == format!("{name}_count") {
            want.entry(labels).or_default().1 = s.value as u64;
        }
    }
    assert!(want.len() >= 3, "{want:?}");
    let got = latest_histograms(received);
    for (labels, (mut buckets, count)) in want {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let cumulative: Vec<u64> = buckets.iter().map(|b| b.1).collect();
        // The attributes' OpenTelemetry names.
        let attributes: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| {
                let k = match k.as_str() {
                    "model" => "gen_ai.request.model",
                    "channel_id" => "newapi.channel.id",
                    "channel_name" => "newapi.channel.name",
                    "group" => "newapi.group",
                    other => other,
                };
                (k.to_string(), v.clone())
            })
            .collect();
        let (otlp_buckets, otlp_count) = got
            .get(&(otel.to_string(), attributes))
            .unwrap_or_else(|| panic!("{labels:?} not exported: {:?}", got.keys()));
        assert_eq!(*otlp_count, count, "{labels:?}");
        assert_eq!(*otlp_buckets, cumulative, "{labels:?}");
    }
}
