//! Helpers shared by the integration tests: a parser for the Prometheus text format written
//! independently of the exporter's encoder, an in-process poll, and a launcher for the binary.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod engines;
pub mod proxy;

use newapi_exporter::collect::Settings;
use newapi_exporter::poll::Poller;
use newapi_exporter::poll::sqlite_connector;
use newapi_exporter::snapshot::Shared;

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Labels,
    pub value: f64,
}

/// Parses the text exposition format, undoing label-value escapes (`\\`, `\"`, `\n`).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        let mut name = String::new();
        while i < chars.len() && chars[i] != '{' && chars[i] != ' ' {
            name.push(chars[i]);
            i += 1;
        }
        let mut labels = Labels::new();
        if i < chars.len() && chars[i] == '{' {
            i += 1;
            loop {
                if chars[i] == '}' {
                    i += 1;
                    break;
                }
                if chars[i] == ',' {
                    i += 1;
                    continue;
                }
                let mut key = String::new();
                while chars[i] != '=' {
                    key.push(chars[i]);
                    i += 1;
                }
                i += 2; // ="
                let mut val = String::new();
                while chars[i] != '"' {
                    if chars[i] == '\\' {
                        i += 1;
                        val.push(match chars[i] {
                            'n' => '\n',
                            c => c,
                        });
                    } else {
                        val.push(chars[i]);
                    }
                    i += 1;
                }
                i += 1;
                labels.insert(key, val);
            }
        }
        let rest: String = chars[i..].iter().collect();
        let value: f64 = rest
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("no value on line {line:?}"))
            .parse()
            .unwrap_or_else(|e| panic!("bad value on line {line:?}: {e}"));
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// The series of one metric, by label set.
pub fn series(samples: &[Sample], name: &str) -> BTreeMap<Labels, f64> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| (s.labels.clone(), s.value))
        .collect()
}

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// An exporter driven in-process: each `poll` is one poll of the real poller.
pub struct InProcess {
    poller: Poller,
    pub shared: Shared,
}

impl InProcess {
    pub fn new(db: &Path) -> Self {
        Self::with_chunk(db, 1000)
    }

    pub fn with_chunk(db: &Path, chunk_rows: i64) -> Self {
        Self::with_settings(
            db,
            Settings {
                chunk_rows,
                ..Settings::default()
            },
        )
    }

    pub fn with_settings(db: &Path, settings: Settings) -> Self {
        let poller = Poller::new(
            sqlite_connector(db.to_path_buf()),
            db.display().to_string(),
            settings,
            Arc::new(AtomicBool::new(false)),
        );
        InProcess {
            poller,
            shared: Shared::default(),
        }
    }

    /// An exporter on the gateway's SQL_DSN (and LOG_SQL_DSN) values.
    pub fn with_dsn(dsn: &str, log_dsn: Option<&str>) -> Self {
        Self::with_dsn_settings(dsn, log_dsn, Settings::default())
    }

    pub fn with_dsn_settings(dsn: &str, log_dsn: Option<&str>, settings: Settings) -> Self {
        use newapi_exporter::db::dsn::DbConfig;
        let main = DbConfig::from_dsn(Some(dsn), Path::new("unused.db")).unwrap();
        let logs = log_dsn.map(|d| DbConfig::from_dsn(Some(d), Path::new("unused.db")).unwrap());
        let poller = Poller::new(
            Box::new(move || newapi_exporter::db::open(&main, &logs)),
            dsn.to_string(),
            settings,
            Arc::new(AtomicBool::new(false)),
        );
        InProcess {
            poller,
            shared: Shared::default(),
        }
    }

    /// Polls once and returns the parsed scrape.
    pub fn poll(&mut self) -> Vec<Sample> {
        self.poller.poll_once(&self.shared);
        parse_metrics(&self.shared.snapshot().text)
    }
}

/// True when this run is CI: there, a missing tool or service fails instead of skipping.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Whether `tool` can run. Missing in CI: panics. Missing elsewhere: prints why the test skips.
pub fn require_tool(tool: &str, test: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        if in_ci() {
            panic!("{tool} is required in CI (test {test}); .ci/run installs it");
        }
        eprintln!("SKIP {test}: {tool} is not installed (apt-get install prometheus); CI runs it");
    }
    found
}

/// The exporter binary running as a child process.
pub struct Running {
    pub child: Child,
    pub addr: String,
    pub stderr: mpsc::Receiver<String>,
    /// Lines printed before the listen line (the first poll may log before it).
    early: std::sync::Mutex<Vec<String>>,
}

impl Running {
    /// Starts `newapi-exporter ARGS --web.listen-address 127.0.0.1:0` and waits for it to listen.
    pub fn start(args: &[&str]) -> Running {
        Self::start_with_env(args, &[])
    }

    /// Like [`Running::start`], with extra environment variables.
    pub fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> Running {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"));
        cmd.args(args).envs(envs.iter().copied());
        Self::start_command(cmd)
    }

    /// Starts `cmd` (which runs the exporter, perhaps through a shell) with
    /// `--web.listen-address 127.0.0.1:0` appended, and waits for it to listen.
    pub fn start_command(mut cmd: Command) -> Running {
        let mut child = cmd
            .args(["--web.listen-address", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting newapi-exporter");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let rest = line
                        .split("listening on http://")
                        .nth(1)
                        .or_else(|| line.split("listening on https://").nth(1));
                    if let Some(rest) = rest {
                        let addr = rest.split('/').next().unwrap().to_string();
                        return Running {
                            child,
                            addr,
                            stderr: rx,
                            early: std::sync::Mutex::new(seen),
                        };
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("exporter did not start listening; stderr: {seen:#?}");
                }
            }
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let url = format!("http://{}{}", self.addr, path);
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent();
        let mut resp = agent.get(&url).call().expect("HTTP request");
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_to_string().unwrap())
    }

    /// Sends SIGTERM and waits for the exit (10 s at most): how long it took, and the status.
    pub fn sigterm(&mut self) -> (Duration, std::process::ExitStatus) {
        let started = Instant::now();
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (started.elapsed(), status);
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `/-/ready` answers 200.
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.get("/-/ready").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "exporter not ready in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn scrape(&self) -> Vec<Sample> {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200);
        parse_metrics(&body)
    }

    /// Stderr lines printed so far.
    /// The stderr lines not returned before, from the start on.
    pub fn stderr_lines(&self) -> Vec<String> {
        let mut lines = std::mem::take(&mut *self.early.lock().unwrap());
        lines.extend(self.stderr.try_iter());
        lines
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `newapi_requests_total` of one model, summed over its other labels.
pub fn model_requests(samples: &[Sample], model: &str) -> f64 {
    series(samples, "newapi_requests_total")
        .iter()
        .filter(|(l, _)| l.get("model").map(String::as_str) == Some(model))
        .map(|(_, v)| v)
        .sum()
}

/// The usage counters, each as (metric name, oracle value column).
pub const USAGE_COUNTERS: &[&str] = &[
    "newapi_requests_total",
    "newapi_quota_total",
    "newapi_quota_corrections_total",
    "newapi_use_time_seconds_total",
    "newapi_refunds_total",
    "newapi_refund_quota_total",
    "newapi_errors_total",
];

/// The shipped Grafana dashboards: (file, JSON).
pub fn dashboards() -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for entry in
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards")).unwrap()
    {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            out.push((path.display().to_string(), json));
        }
    }
    assert!(
        out.len() >= 2,
        "expected the usage and recording-health dashboards"
    );
    out
}

/// Consume rows that are billed requests, written from the schema reference for the oracles
/// (logs with new-api's full columns): not channel tests (token name 模型测试, token 0), not task
/// settlement rows (zero tokens, `pre_consumed_quota` in `other`), not zero-usage rows.
pub const BILLED_REQUEST: &str = "type = 2 AND NOT (token_name = '模型测试' AND token_id = 0) \
     AND NOT (prompt_tokens = 0 AND completion_tokens = 0 \
     AND (quota = 0 OR COALESCE(other, '') LIKE '%pre_consumed_quota%'))";

/// Consume rows whose quota counts in `newapi_quota_total`: billed requests and settlements.
pub const BILLED_QUOTA: &str = "type = 2 AND NOT (token_name = '模型测试' AND token_id = 0) \
     AND NOT (prompt_tokens = 0 AND completion_tokens = 0 AND quota = 0 \
     AND COALESCE(other, '') NOT LIKE '%pre_consumed_quota%')";

/// Renders a pipeline's collectors the way a scrape does.
pub fn scrape_pipeline(p: &newapi_exporter::poll::Pipeline) -> Vec<Sample> {
    let mut families = Vec::new();
    for c in &p.collectors {
        c.render(&p.ctx, &mut families);
    }
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&families)
        .unwrap();
    parse_metrics(&text)
}

/// A pipeline with the default settings on the databases `main` and `logs` name, and their
/// connections: tests drive its polls at the times they choose.
pub fn pipeline_on(
    main: &newapi_exporter::db::dsn::DbConfig,
    logs: &Option<newapi_exporter::db::dsn::DbConfig>,
) -> (
    newapi_exporter::db::Sources,
    newapi_exporter::poll::Pipeline,
) {
    let mut src = newapi_exporter::db::open(main, logs).unwrap();
    let p = newapi_exporter::poll::Pipeline::build(
        &mut src,
        newapi_exporter::collect::Settings::default(),
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    )
    .unwrap();
    (src, p)
}

/// One poll at time `now` of a fresh pipeline on the database `config` names, rendered.
pub fn poll_at(config: &newapi_exporter::db::dsn::DbConfig, now: i64) -> Vec<Sample> {
    let (mut src, mut p) = pipeline_on(config, &None);
    p.poll(&mut src, now).unwrap();
    scrape_pipeline(&p)
}

/// Runs `check` on a current-generation SQLite gateway, then on MariaDB and PostgreSQL (when
/// configured), each with `rows` inserted after the tables `ddl` creates on that server.
pub fn on_every_engine(
    test: &str,
    ddl: fn(engines::Server) -> Vec<&'static str>,
    rows: &[String],
    check: impl Fn(&newapi_exporter::db::dsn::DbConfig, &str),
) {
    use newapi_exporter::db::dsn::DbConfig;
    use newapi_exporter::demo::gateway::{Gateway, Tables};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let gw = Gateway::create(&db, Tables::NewApiCurrent).unwrap();
    for r in rows {
        gw.conn.execute(r, []).unwrap();
    }
    check(&DbConfig::Sqlite(db.clone()), "sqlite");
    for server in engines::SERVERS {
        let Some(admin) = engines::admin_dsn(server, test) else {
            continue;
        };
        let t = engines::TestDb::create_with(server, &admin, "engine", true);
        let mut statements: Vec<String> = ddl(server).iter().map(|s| s.to_string()).collect();
        statements.extend(rows.iter().cloned());
        let refs: Vec<&str> = statements.iter().map(String::as_str).collect();
        t.exec(&refs);
        let config = DbConfig::from_dsn(Some(&t.dsn), std::path::Path::new("unused.db")).unwrap();
        check(&config, &format!("{server:?}"));
    }
}
