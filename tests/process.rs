//! The exporter as operators run it: the binary, over HTTP.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use newapi_exporter::demo;
use rusqlite::Connection;

fn demo_db(dir: &std::path::Path) -> std::path::PathBuf {
    let db = dir.join("one-api.db");
    demo::create(&db, Duration::from_secs(6 * 3600), 11).unwrap();
    db
}

fn usage_series(samples: &[Sample]) -> Vec<Sample> {
    let mut v: Vec<_> = samples
        .iter()
        .filter(|s| {
            // Ages follow the clock, not the data.
            s.name.starts_with("newapi_")
                && !s.name.starts_with("newapi_exporter_")
                && s.name != "newapi_up"
                && !s.name.ends_with("_age_seconds")
        })
        .cloned()
        .collect();
    v.sort_by(|a, b| (&a.name, &a.labels).cmp(&(&b.name, &b.labels)));
    v
}

#[test]
fn a_restarted_exporter_reports_the_same_totals() {
    let dir = tempfile::tempdir().unwrap();
    let db = demo_db(dir.path());
    let path = db.to_str().unwrap();
    let first = Running::start(&["--sqlite-path", path, "--poll-interval", "1h"]);
    first.wait_ready(Duration::from_secs(30));
    let a = usage_series(&first.scrape());
    drop(first);
    let second = Running::start(&["serve", "--sqlite-path", path, "--db.chunk-rows", "333"]);
    second.wait_ready(Duration::from_secs(30));
    let b = usage_series(&second.scrape());
    assert!(a.len() > 20, "expected many usage series, got {}", a.len());
    assert_eq!(a, b);
    let consume: i64 = Connection::open(&db)
        .unwrap()
        .query_row(
            &format!("SELECT count(*) FROM logs WHERE {BILLED_REQUEST}"),
            [],
            |r| r.get(0),
        )
        .unwrap();
    let total: f64 = a
        .iter()
        .filter(|s| s.name == "newapi_requests_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(total, consume as f64);
}

#[test]
fn promtool_accepts_a_real_scrape() {
    if !require_tool("promtool", "promtool_accepts_a_real_scrape") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = demo_db(dir.path());
    let exp = Running::start(&["--sqlite-path", db.to_str().unwrap()]);
    exp.wait_ready(Duration::from_secs(30));
    let (_, body) = exp.get("/metrics");
    assert!(body.contains("newapi_requests_total{"));
    let out = piped("promtool", &["check", "metrics"], &body);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool failed: {said}");
    assert_eq!(said.trim(), "", "promtool complained");
}

#[test]
fn probes_and_landing_page() {
    let dir = tempfile::tempdir().unwrap();
    let db = demo_db(dir.path());
    let exp = Running::start(&[
        "--sqlite-path",
        db.to_str().unwrap(),
        "--web.telemetry-path",
        "/prom",
    ]);
    assert_eq!(exp.get("/-/healthy").0, 200);
    exp.wait_ready(Duration::from_secs(30));
    let (status, body) = exp.get("/prom");
    assert_eq!(status, 200);
    assert!(body.contains("newapi_up 1"));
    let (status, page) = exp.get("/");
    assert_eq!(status, 200);
    assert!(page.contains(env!("CARGO_PKG_VERSION")));
    assert!(page.contains(&format!("sqlite:{}", db.display())));
    assert!(page.contains("href=\"/prom\""));
    assert!(page.contains("new-api"));
}

fn check(path: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["check", "--sqlite-path", path.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_clear_line(stderr: &str, must_contain: &[&str]) {
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got {stderr:?}");
    for s in must_contain {
        assert!(lines[0].contains(s), "{:?} lacks {s:?}", lines[0]);
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_input_gives_one_clear_line_and_no_panic() {
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("nope.db");
    let (ok, err) = check(&missing);
    assert!(!ok);
    assert_one_clear_line(&err, &["nope.db", "does not exist"]);

    let text = dir.path().join("notes.txt");
    std::fs::write(
        &text,
        "this is not a database, it is a text file\n".repeat(100),
    )
    .unwrap();
    let (ok, err) = check(&text);
    assert!(!ok);
    assert_one_clear_line(&err, &["notes.txt", "is not a SQLite database"]);

    let empty_db = dir.path().join("other.db");
    Connection::open(&empty_db)
        .unwrap()
        .execute_batch("CREATE TABLE users (id integer)")
        .unwrap();
    let (ok, err) = check(&empty_db);
    assert!(!ok);
    assert_one_clear_line(&err, &["other.db", "table `logs` not found"]);

    let no_quota = dir.path().join("broken.db");
    Connection::open(&no_quota)
        .unwrap()
        .execute_batch("CREATE TABLE logs (id integer primary key, created_at integer, type integer, model_name text, prompt_tokens integer, completion_tokens integer)")
        .unwrap();
    let (ok, err) = check(&no_quota);
    assert!(!ok);
    assert_one_clear_line(&err, &["broken.db", "no column `quota`"]);

    let good = demo_db(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["check", "--sqlite-path", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("gateway:  new-api"));
}

#[test]
fn serve_on_a_missing_database_keeps_serving_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("later.db");
    let exp = Running::start(&[
        "--sqlite-path",
        db.to_str().unwrap(),
        "--poll-interval",
        "200ms",
    ]);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(exp.get("/-/healthy").0, 200);
    assert_eq!(exp.get("/-/ready").0, 503);
    let s = exp.scrape();
    assert_eq!(series(&s, "newapi_up").values().next(), Some(&0.0));
    assert!(
        series(&s, "newapi_exporter_poll_errors_total")
            .values()
            .next()
            >= Some(&2.0)
    );
    let (_, page) = exp.get("/");
    assert!(page.contains("does not exist"), "{page}");
    let errors: Vec<_> = exp
        .stderr_lines()
        .into_iter()
        .filter(|l| l.contains("ERROR"))
        .collect();
    assert_eq!(errors.len(), 1, "one error per outage, got {errors:#?}");

    // The gateway creates its database: the exporter picks it up without a restart.
    demo::create(&db, Duration::from_secs(3600), 5).unwrap();
    exp.wait_ready(Duration::from_secs(10));
    let s = exp.scrape();
    assert_eq!(series(&s, "newapi_up").values().next(), Some(&1.0));
    assert!(!series(&s, "newapi_requests_total").is_empty());
}

#[test]
fn every_flag_in_help_is_in_the_readme() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    for sub in ["", "serve", "demo", "check", "reconcile", "backfill"] {
        let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
            .args(sub.split_whitespace())
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "`{sub} --help` failed: {out:?}");
        let help = String::from_utf8_lossy(&out.stdout);
        for word in help.split_whitespace() {
            let flag = word.trim_end_matches([',', '.']);
            let flag = flag.split('=').next().unwrap();
            let flag = flag.split('<').next().unwrap();
            if flag.starts_with("--") && flag.len() > 2 {
                assert!(
                    readme.contains(flag),
                    "{flag} (from `{sub} --help`) is not documented in README.md"
                );
            }
        }
    }
}

#[test]
fn passwords_never_appear_in_errors_or_help() {
    for (flag, dsn) in [
        (
            "--sql-dsn",
            "newapi:s3cr3t-pw@tcp(127.0.0.1:1)/newapi?tls=false",
        ),
        (
            "--sql-dsn",
            "postgres://newapi:s3cr3t-pw@127.0.0.1:1/newapi",
        ),
        (
            "--sql-dsn",
            "newapi:s3cr3t-pw@tcp(127.0.0.1:1)/newapi?tls=custom-cfg",
        ),
        (
            "--sql-dsn",
            "newapi:s3cr3t-pw@tcp(127.0.0.1:notaport)/newapi",
        ),
        (
            "--sql-dsn",
            "postgres://newapi@127.0.0.1:1/newapi?password=s3cr3t-pw",
        ),
        (
            "--sql-dsn",
            "postgresql://127.0.0.1:1/newapi?user=newapi&sslmode=disable&password=s3cr3t-pw",
        ),
        (
            "--sql-dsn",
            "postgres://newapi:s3cr3t-pw@127.0.0.1:1/logs?sslpassword=s3cr3t-pw",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
            .args(["check", "--log.level", "trace", flag, dsn])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{dsn}");
        assert!(!err.contains("s3cr3t"), "password leaked: {err}");
        assert!(
            err.contains("newapi:***@") || err.contains("password=***") || err.contains("SQL_DSN"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // --help shows where values come from, never the values themselves.
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .arg("--help")
        .env("SQL_DSN", "root:s3cr3t-pw@tcp(db:3306)/newapi")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("SQL_DSN") && !help.contains("s3cr3t"),
        "{help}"
    );
    // The landing page and the logs of a serving exporter mask it too, in every form.
    let exp = Running::start(&[
        "--log.level",
        "debug",
        "--sql-dsn",
        "postgres://newapi@127.0.0.1:1/newapi?password=s3cr3t-pw",
    ]);
    let (_, page) = exp.get("/");
    assert!(page.contains("newapi?password=***"), "{page}");
    std::thread::sleep(Duration::from_millis(500));
    let (_, page) = exp.get("/");
    assert!(!page.contains("s3cr3t"), "{page}");
    let logged = exp.stderr_lines().join("\n");
    assert!(!logged.contains("s3cr3t"), "{logged}");
    drop(exp);
    let exp = Running::start(&["--sql-dsn", "newapi:s3cr3t-pw@tcp(127.0.0.1:1)/newapi"]);
    let (_, page) = exp.get("/");
    assert!(
        page.contains("newapi:***@tcp(127.0.0.1:1)/newapi"),
        "{page}"
    );
    assert!(!page.contains("s3cr3t"));
    std::thread::sleep(Duration::from_millis(500));
    let (_, page) = exp.get("/");
    assert!(!page.contains("s3cr3t"), "{page}");
    let (_, metrics) = exp.get("/metrics");
    assert!(!metrics.contains("s3cr3t"));
}

/// `--web.telemetry-path` is a literal: route syntax is served as written, a non-ASCII path is
/// reachable in the percent-encoded form clients send, and nothing else matches it.
#[test]
fn any_valid_telemetry_path_is_served_exactly_there() {
    let dir = tempfile::tempdir().unwrap();
    let db = demo_db(dir.path());
    for (path, request) in [
        ("/:metrics", "/:metrics"),
        ("/{x}", "/%7Bx%7D"),
        ("/métriques", "/m%C3%A9triques"),
    ] {
        let exp = Running::start(&[
            "--sqlite-path",
            db.to_str().unwrap(),
            "--web.telemetry-path",
            path,
        ]);
        exp.wait_ready(Duration::from_secs(30));
        let (status, body) = exp.get(request);
        assert_eq!(status, 200, "{path}");
        assert!(body.contains("newapi_up 1"), "{path}");
        for other in ["/anything", "/metrics", "/x"] {
            assert_eq!(exp.get(other).0, 404, "{path}: {other}");
        }
        let (_, page) = exp.get("/");
        assert!(
            page.contains(&format!("href=\"{request}\"")),
            "{path}: {page}"
        );
    }
    for bad in ["metrics", "/", "/-/metrics", "/a?b", "/a#b"] {
        let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
            .args([
                "--sqlite-path",
                db.to_str().unwrap(),
                "--web.telemetry-path",
                bad,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad}");
        assert!(err.contains("--web.telemetry-path"), "{bad}: {err}");
        assert!(!err.contains("panicked"), "{bad}: {err}");
    }
}

#[test]
fn listen_addresses_are_taken_as_other_exporters_take_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = demo_db(dir.path());
    // `:port` (every interface) and a repeated flag: one listener each (the helper adds a third).
    let exp = Running::start(&[
        "--sqlite-path",
        db.to_str().unwrap(),
        "--web.listen-address",
        ":0",
        "--web.listen-address",
        "[::1]:0",
    ]);
    exp.wait_ready(Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(200));
    let mut addrs = vec![exp.addr.clone()];
    for line in exp.stderr_lines() {
        if let Some(rest) = line.split("listening on http://").nth(1) {
            addrs.push(rest.split('/').next().unwrap().to_string());
        }
    }
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 3, "{addrs:?}");
    assert!(addrs.iter().any(|a| a.starts_with("0.0.0.0:")), "{addrs:?}");
    assert!(addrs.iter().any(|a| a.starts_with("[::1]:")), "{addrs:?}");
    for addr in &addrs {
        let (status, _) = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent()
            .get(format!(
                "http://{}/-/healthy",
                addr.replace("0.0.0.0", "127.0.0.1")
            ))
            .call()
            .map(|r| (r.status().as_u16(), ()))
            .unwrap();
        assert_eq!(status, 200, "{addr}");
    }
    // A value that is no address is refused, naming the flag's value.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["--web.listen-address", "nonsense"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--web.listen-address") && stderr.contains("nonsense"),
        "{stderr}"
    );
}

#[test]
fn logs_can_be_written_in_logfmt() {
    let dir = tempfile::tempdir().unwrap();
    let db = demo_db(dir.path());
    let mut exp = Running::start(&[
        "--sqlite-path",
        db.to_str().unwrap(),
        "--log.format",
        "logfmt",
    ]);
    exp.wait_ready(Duration::from_secs(30));
    let _ = exp.sigterm();
    let lines = exp.stderr_lines();
    // key=value pairs, one event a line, from start to shutdown.
    assert!(lines.len() >= 2, "{lines:?}");
    for line in &lines {
        assert!(
            line.starts_with("ts=") && line.contains(" level="),
            "{line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("level=info") && l.contains("message=\"gateway schema detected\"")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("message=stopped")),
        "{lines:?}"
    );
}

#[test]
fn build_info_and_process_metrics_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let db = demo_db(dir.path());
    let exp = Running::start(&["--sqlite-path", db.to_str().unwrap()]);
    exp.wait_ready(Duration::from_secs(30));
    let samples = exp.scrape();
    let info = series(&samples, "newapi_exporter_build_info");
    assert_eq!(info.len(), 1);
    let (labels, value) = info.iter().next().unwrap();
    assert_eq!(*value, 1.0);
    assert_eq!(labels["version"], env!("CARGO_PKG_VERSION"));
    let run = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rustc = run("rustc", &["--version"]).unwrap();
    assert_eq!(
        rustc.split_whitespace().nth(1),
        Some(labels["rustversion"].as_str())
    );
    match run("git", &["rev-parse", "--short=12", "HEAD"]) {
        Some(head) => assert_eq!(labels["revision"], head),
        None => assert_eq!(labels["revision"], "unknown"),
    }
    // The standard process metrics, with plausible values for this very process.
    let one = |name: &str| {
        series(&samples, name)
            .values()
            .next()
            .copied()
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert!(one("process_resident_memory_bytes") > 1_000_000.0);
    assert!(one("process_open_fds") >= 3.0);
    let started = one("process_start_time_seconds");
    let now = newapi_exporter::clock::unix_now() as f64;
    assert!(started <= now && started > now - 120.0, "{started}");
}

/// One HTTP/1.0 GET (no chunking): the response's headers, lowercased, and its body.
fn raw_get(addr: &str, path: &str, accept_encoding: Option<&str>) -> (String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let extra = accept_encoding
        .map(|e| format!("Accept-Encoding: {e}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}\r\n").unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&all[..split]).to_ascii_lowercase();
    (head, all[split + 4..].to_vec())
}

#[test]
fn metrics_are_gzipped_for_clients_that_ask() {
    let dir = tempfile::tempdir().unwrap();
    let db = demo_db(dir.path());
    let exp = Running::start(&[
        "--sqlite-path",
        db.to_str().unwrap(),
        "--poll-interval",
        "1h",
    ]);
    exp.wait_ready(Duration::from_secs(30));
    let (plain_head, plain) = raw_get(&exp.addr, "/metrics", None);
    assert!(!plain_head.contains("content-encoding"), "{plain_head}");
    let (gz_head, gz) = raw_get(&exp.addr, "/metrics", Some("gzip"));
    assert!(gz_head.contains("content-encoding: gzip"), "{gz_head}");
    assert!(
        gz.len() * 4 < plain.len(),
        "{} vs {} bytes",
        gz.len(),
        plain.len()
    );
    let mut unzipped = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut unzipped).unwrap();
    assert_eq!(unzipped, plain);
    assert!(String::from_utf8_lossy(&plain).contains("newapi_requests_total{"));
}

/// `/metrics` negotiates: OpenMetrics for a client that prefers it (Prometheus' default Accept
/// header), read back by the reference OpenMetrics parser (Python `prometheus_client`) with the
/// same samples as the Prometheus text format; the text format otherwise.
#[test]
fn openmetrics_is_negotiated_and_parses_with_the_same_samples() {
    let test = "openmetrics_is_negotiated_and_parses_with_the_same_samples";
    if !require_tool("python3", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    newapi_exporter::demo::create(&db, Duration::from_secs(6 * 3600), 2).unwrap();
    let exp = Running::start(&["--sqlite-path", db.to_str().unwrap()]);
    exp.wait_ready(Duration::from_secs(30));
    let get = |accept: &str| {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent();
        let mut resp = agent
            .get(format!("http://{}/metrics", exp.addr))
            .header("Accept", accept)
            .call()
            .unwrap();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        (ct, resp.body_mut().read_to_string().unwrap())
    };
    let prometheus3 = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,\
        application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.2,*/*;q=0.1";
    let (ct, om) = get(prometheus3);
    assert!(
        ct.starts_with("application/openmetrics-text; version=1.0.0"),
        "{ct}"
    );
    assert!(om.ends_with("# EOF\n"));
    let (ct, text) = get("text/plain;version=0.0.4");
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");

    // The reference parser reads every sample (name, labels, value) back; the values of the
    // exporter's own timing metrics change between the two requests, so they are left out.
    let script = r#"
import sys, json
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    for s in f.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let out = piped("python3", &["-c", script], &om);
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the output: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Vec<(String, std::collections::BTreeMap<String, String>, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    let moving = |name: &str| {
        name.starts_with("process_") || name.starts_with("newapi_exporter_") || name == "newapi_up"
    };
    // OpenMetrics writes bucket bounds as canonical floats (`le="1.0"`), the text format as
    // the shortest form (`le="1"`): compared as numbers.
    let canonical = |mut l: std::collections::BTreeMap<String, String>| {
        if let Some(le) = l.get_mut("le")
            && let Ok(v) = le.parse::<f64>()
        {
            *le = v.to_string();
        }
        l
    };
    let from_openmetrics: std::collections::BTreeSet<String> = parsed
        .iter()
        .filter(|(n, _, _)| !moving(n) && !n.ends_with("_created"))
        .map(|(n, l, v)| format!("{n}{:?} {v}", canonical(l.clone())))
        .collect();
    let from_text: std::collections::BTreeSet<String> = parse_metrics(&text)
        .iter()
        .filter(|s| !moving(&s.name))
        .map(|s| {
            let l = canonical(s.labels.clone().into_iter().collect());
            format!("{}{l:?} {}", s.name, s.value)
        })
        .collect();
    assert!(from_text.len() > 100, "{}", from_text.len());
    assert_eq!(from_openmetrics, from_text);
}

/// Runs `cmd args` with `input` on its standard input.
fn piped(cmd: &str, args: &[&str], input: &str) -> std::process::Output {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}
