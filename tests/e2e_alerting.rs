//! End to end with real servers: the demo gateway (which plants a recording failure: one model
//! never reaches quota_data), the exporter on it, Prometheus scraping it with the shipped rules,
//! and Alertmanager with the shipped routing, paging a webhook served by this test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value as Json;

/// A server process killed when the test ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(name: &'static str, args: &[String], log: &Path) -> Server {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(name)
        .args(args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    Server(child)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Received webhook calls: (path, JSON body).
type Calls = Arc<Mutex<Vec<(String, Json)>>>;

/// A minimal HTTP server standing in for the pager and chat receivers.
fn webhook() -> (String, Calls) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let calls: Calls = Arc::default();
    let seen = calls.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .to_string();
            let mut length = 0;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_ok()
                && let Ok(json) = serde_json::from_slice(&body)
            {
                seen.lock().unwrap().push((path, json));
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (addr, calls)
}

fn prom_query(agent: &ureq::Agent, prom: &str, expr: &str) -> Json {
    let mut resp = agent
        .get(format!("http://{prom}/api/v1/query"))
        .query("query", expr)
        .call()
        .unwrap_or_else(|e| panic!("query {expr}: {e}"));
    let body = resp.body_mut().read_to_string().unwrap();
    let json: Json = serde_json::from_str(&body).unwrap();
    assert_eq!(json["status"], "success", "{expr}: {body}");
    json
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A dashboard query with Grafana's variables filled in as a user would see them.
fn as_prometheus_query(expr: &str) -> String {
    expr.replace("$__rate_interval", "20s")
        .replace("$__range", "5m")
        .replace("$job", "newapi")
        .replace("$instance", ".+")
        .replace("$model", ".*")
}

#[test]
fn the_missing_quota_page_reaches_the_pager_and_every_dashboard_query_has_data() {
    let test = "the_missing_quota_page_reaches_the_pager_and_every_dashboard_query_has_data";
    if !require_tool("prometheus", test) || !require_tool("prometheus-alertmanager", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));

    // The demo gateway: 30 h of history, live traffic, one model never recorded.
    let db = dir.path().join("demo.db");
    let exporter = Running::start(&[
        "demo",
        "--db",
        db.to_str().unwrap(),
        "--history",
        "30h",
        "--rate",
        "20",
        "--poll-interval",
        "1s",
        // Ledger windows that complete within the test, so that their panels have data.
        "--ledger.window",
        "2s",
    ]);
    exporter.wait_ready(Duration::from_secs(60));

    // Alertmanager with the shipped routing, its receivers pointed at this test.
    let (hook, calls) = webhook();
    let am_port = free_port();
    let shipped = std::fs::read_to_string(root.join("deploy/alertmanager.yml")).unwrap();
    let am_config = shipped
        .replace(
            "http://pager-webhook.example:9095/alerts",
            &format!("http://{hook}/pager"),
        )
        .replace(
            "http://chat-webhook.example:9096/alerts",
            &format!("http://{hook}/chat"),
        )
        .replace("group_wait: 30s", "group_wait: 1s")
        .replace("group_interval: 5m", "group_interval: 1s");
    assert!(am_config.contains("/pager") && am_config.contains("group_wait: 1s"));
    std::fs::write(dir.path().join("alertmanager.yml"), am_config).unwrap();
    let _am = start(
        "prometheus-alertmanager",
        &[
            format!("--config.file={}/alertmanager.yml", dir.path().display()),
            format!("--storage.path={}/am", dir.path().display()),
            format!("--web.listen-address=127.0.0.1:{am_port}"),
            "--cluster.listen-address=".into(),
        ],
        &dir.path().join("alertmanager.log"),
    );

    // Prometheus with the shipped rules, scraping every second. Their `for` delays (minutes,
    // checked by the promtool tests) are cut to nothing: this test is about the route to the
    // pager, in seconds.
    let rules_text = std::fs::read_to_string(root.join("alerts/newapi.rules.yml")).unwrap();
    let rules_now: String = rules_text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("for: ") {
                let indent = &l[..l.len() - l.trim_start().len()];
                format!("{indent}for: 0s\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let rules_file = dir.path().join("newapi.rules.yml");
    std::fs::write(&rules_file, rules_now).unwrap();
    let prom_port = free_port();
    let prom_config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {rules}\n\
         alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{am_port}']\n\
         scrape_configs:\n  - job_name: newapi\n    static_configs:\n      - targets: ['{exporter}']\n",
        rules = rules_file.display(),
        exporter = exporter.addr,
    );
    std::fs::write(dir.path().join("prometheus.yml"), prom_config).unwrap();
    let _prom = start(
        "prometheus",
        &[
            format!("--config.file={}/prometheus.yml", dir.path().display()),
            format!("--storage.tsdb.path={}/tsdb", dir.path().display()),
            format!("--web.listen-address=127.0.0.1:{prom_port}"),
        ],
        &dir.path().join("prometheus.log"),
    );
    let prom = format!("127.0.0.1:{prom_port}");
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    wait_for(
        "Prometheus to collect samples",
        Duration::from_secs(60),
        || {
            agent
                .get(format!("http://{prom}/api/v1/query"))
                .query("query", "count_over_time(newapi_up[1m]) >= 8")
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok())
                .and_then(|b| serde_json::from_str::<Json>(&b).ok())
                .is_some_and(|j| {
                    j["data"]["result"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty())
                })
        },
    );

    // Every dashboard query returns data.
    let mut checked = 0;
    for (file, d) in dashboards() {
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = as_prometheus_query(t["expr"].as_str().unwrap());
                let json = prom_query(&agent, &prom, &expr);
                let result = json["data"]["result"].as_array().unwrap();
                assert!(
                    !result.is_empty(),
                    "{file}: panel {:?}: no data for {expr}",
                    p["title"]
                );
                checked += 1;
            }
        }
        // Template variables resolve to values.
        for v in d["templating"]["list"].as_array().unwrap() {
            let Some(def) = v["definition"].as_str() else {
                continue;
            };
            let inner = def
                .trim_start_matches("label_values(")
                .trim_end_matches(')');
            let (selector, label) = inner.rsplit_once(',').unwrap();
            let expr = as_prometheus_query(&format!("count by ({}) ({selector})", label.trim()));
            let json = prom_query(&agent, &prom, &expr);
            assert!(
                !json["data"]["result"].as_array().unwrap().is_empty(),
                "{file}: variable {} has no values",
                v["name"]
            );
        }
    }
    assert!(checked >= 30, "only {checked} dashboard queries");

    // The critical missing-quota page arrives at the pager, naming the model.
    wait_for("the missing-quota page", Duration::from_secs(90), || {
        calls.lock().unwrap().iter().any(|(path, body)| {
            path == "/pager"
                && body["alerts"].as_array().is_some_and(|alerts| {
                    alerts.iter().any(|a| {
                        a["labels"]["alertname"] == "NewapiQuotaDataMissing"
                            && a["labels"]["severity"] == "critical"
                            && a["labels"]["model"] == "coze-workflow-async"
                            && a["status"] == "firing"
                    })
                })
        })
    });
    // No page for the models that record properly.
    for (path, body) in calls.lock().unwrap().iter() {
        for a in body["alerts"].as_array().into_iter().flatten() {
            if a["labels"]["alertname"] == "NewapiQuotaDataMissing" {
                assert_eq!(a["labels"]["model"], "coze-workflow-async", "{path}: {a}");
            }
        }
    }
}
