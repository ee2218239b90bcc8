//! The shipped monitoring bundle: alert rules and their unit tests, Alertmanager and Prometheus
//! configs, the compose file and the Grafana dashboards.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{Running, dashboards, require_tool};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn run_ok(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    if !require_tool("promtool", "promtool_checks_and_unit_tests_the_rules") {
        return;
    }
    run_ok("promtool", &["check", "rules", "alerts/newapi.rules.yml"]);
    run_ok(
        "promtool",
        &["test", "rules", "alerts/tests/newapi.rules.test.yml"],
    );
    run_ok("promtool", &["check", "config", "deploy/prometheus.yml"]);
}

#[test]
fn amtool_accepts_the_alertmanager_config() {
    if !require_tool("amtool", "amtool_accepts_the_alertmanager_config") {
        return;
    }
    run_ok("amtool", &["check-config", "deploy/alertmanager.yml"]);
}

#[test]
fn the_compose_file_follows_the_compose_spec() {
    if !require_tool(
        "check-jsonschema",
        "the_compose_file_follows_the_compose_spec",
    ) {
        return;
    }
    run_ok(
        "check-jsonschema",
        &[
            "--builtin-schema",
            "vendor.compose-spec",
            "docker-compose.yml",
        ],
    );
    // Pinned images, ports on the loopback only, no password in the file, and time for the
    // gateway's shutdown flush.
    let compose: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(repo("docker-compose.yml")).unwrap())
            .unwrap();
    let services = compose["services"].as_mapping().unwrap();
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        let image = svc["image"].as_str().unwrap_or_default();
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or_default();
        assert!(
            !tag.is_empty() && tag != "latest",
            "{name}: image {image:?} is not pinned"
        );
        for port in svc["ports"].as_sequence().into_iter().flatten() {
            let port = port.as_str().unwrap();
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name}: {port} is published on every interface"
            );
        }
    }
    let grafana_password = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
        .as_str()
        .unwrap();
    assert!(
        grafana_password.starts_with("${GRAFANA_ADMIN_PASSWORD"),
        "{grafana_password}"
    );
    let grace = services["new-api"]["stop_grace_period"].as_str().unwrap();
    assert!(humantime::parse_duration(grace).unwrap() >= std::time::Duration::from_secs(30));
}

/// (alert name, the rule's lines) for every rule in the shipped rule file.
fn alert_rules() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo("alerts/newapi.rules.yml")).unwrap();
    let mut rules: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("- alert:") {
            rules.push((name.trim().to_string(), String::new()));
        } else if t.starts_with("- name:") || t.starts_with("- record:") {
            rules.push((String::new(), String::new()));
        } else if let Some(last) = rules.last_mut() {
            last.1.push_str(line);
            last.1.push('\n');
        }
    }
    rules.retain(|(n, _)| !n.is_empty());
    rules
}

/// The runbook in the project's repository, as Cargo.toml names the repository.
fn project_runbook() -> String {
    let manifest = std::fs::read_to_string(repo("Cargo.toml")).unwrap();
    let repository = manifest
        .lines()
        .find_map(|l| l.strip_prefix("repository = "))
        .expect("Cargo.toml names the repository")
        .trim_matches('"');
    format!("{repository}/blob/main/docs/runbook.md")
}

/// Every alert's link opens: the exporter serves the runbook at /runbook with each alert's
/// section under its anchor.
#[test]
fn the_runbook_links_of_the_alerts_open_on_the_exporter() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    newapi_exporter::demo::create(&db, std::time::Duration::from_secs(3600), 1).unwrap();
    let exp = Running::start(&["--sqlite-path", db.to_str().unwrap()]);
    let (status, page) = exp.get("/runbook");
    assert_eq!(status, 200);
    for (name, body) in alert_rules() {
        let anchor = body
            .lines()
            .find_map(|l| l.trim().strip_prefix("runbook_url: "))
            .and_then(|u| u.trim_matches('"').rsplit_once('#'))
            .map(|(_, a)| a.to_string())
            .unwrap_or_else(|| panic!("{name}: no runbook_url"));
        assert!(
            page.contains(&format!("<h2 id=\"{anchor}\">{name}</h2>")),
            "{name}: /runbook has no section #{anchor}"
        );
    }
}

#[test]
fn every_alert_is_documented_and_labeled() {
    let runbook = std::fs::read_to_string(repo("docs/runbook.md")).unwrap();
    let rules = alert_rules();
    assert!(rules.len() >= 9, "found {} alert rules", rules.len());
    for (name, body) in &rules {
        // `for:` on every alert: no page from one evaluation's blip.
        for key in ["severity:", "summary:", "description:", "for: "] {
            assert!(body.contains(key), "{name} lacks {key}");
        }
        assert!(
            body.contains("severity: critical") || body.contains("severity: warning"),
            "{name}: severity must be critical or warning"
        );
        // The runbook each exporter serves, on the instance the alert names; for the alerts
        // about a target that is gone, the project's own copy.
        let anchor = name.to_lowercase();
        let served = format!("runbook_url: \"http://{{{{ $labels.instance }}}}/runbook#{anchor}\"");
        let project = format!("runbook_url: {}#{anchor}", project_runbook());
        let target_gone = ["NewapiExporterDown", "NewapiExporterAbsent"].contains(&name.as_str());
        let expected = if target_gone { &project } else { &served };
        assert!(
            body.contains(expected.as_str()),
            "{name} lacks `{expected}`"
        );
        assert!(
            runbook.contains(&format!("\n## {name}\n")),
            "docs/runbook.md has no section for {name}"
        );
    }
    for expected in [
        "NewapiQuotaDataRecordingStalled",
        "NewapiQuotaDataMissing",
        "NewapiExporterDown",
        "NewapiDatabaseUnreachable",
        "NewapiQuotaDataExportDisabled",
        "NewapiChannelAutoDisabled",
        "NewapiChannelErrorRateHigh",
        "NewapiConsumeTrafficStopped",
        "NewapiExporterAbsent",
        "NewapiConsumeLoggingDisabled",
    ] {
        assert!(
            rules.iter().any(|(n, _)| n == expected),
            "no {expected} rule"
        );
    }
}

#[test]
fn every_alert_has_a_firing_and_a_silent_test_case() {
    let text = std::fs::read_to_string(repo("alerts/tests/newapi.rules.test.yml")).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut fires = std::collections::BTreeSet::new();
    let mut silent = std::collections::BTreeSet::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = line.strip_prefix("alertname:") {
            let next = lines[i + 1..].iter().find(|l| !l.is_empty()).unwrap();
            match *next {
                "exp_alerts: []" => silent.insert(name.trim().to_string()),
                "exp_alerts:" => fires.insert(name.trim().to_string()),
                other => panic!("unexpected line after alertname {name}: {other}"),
            };
        }
    }
    for (name, _) in alert_rules() {
        assert!(fires.contains(&name), "{name} has no case where it fires");
        assert!(
            silent.contains(&name),
            "{name} has no case where it stays silent"
        );
    }
}

/// Names of counter series (`*_total`, histogram `*_bucket`) in an expression, each with the
/// text before it.
fn counters_in(expr: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("newapi_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &expr[start..end];
        if name.ends_with("_total") || name.ends_with("_bucket") {
            out.push((name.to_string(), expr[..start].trim_end().to_string()));
        }
        i = end;
    }
    out
}

#[test]
fn dashboards_follow_the_conventions() {
    let mut uids = std::collections::BTreeSet::new();
    for (file, d) in dashboards() {
        let uid = d["uid"]
            .as_str()
            .unwrap_or_else(|| panic!("{file}: no uid"));
        assert!(uids.insert(uid.to_string()), "{file}: duplicate uid {uid}");
        assert!(
            d["schemaVersion"].as_i64().unwrap() >= 39,
            "{file}: old schemaVersion"
        );
        let vars = d["templating"]["list"].as_array().unwrap();
        let var = |name: &str| vars.iter().find(|v| v["name"] == name);
        assert_eq!(var("datasource").unwrap()["type"], "datasource", "{file}");
        assert!(var("job").is_some() && var("instance").is_some(), "{file}");
        // Shipped dashboards are provisioned: edits belong in the file, not in Grafana.
        assert_eq!(d["editable"], false, "{file}: editable");
        // Each links to the other.
        let links = d["links"].as_array().unwrap();
        assert!(
            dashboards()
                .iter()
                .filter(|(other, _)| *other != file)
                .all(|(_, o)| {
                    let target = format!("/d/{}", o["uid"].as_str().unwrap());
                    links
                        .iter()
                        .any(|l| l["url"].as_str().unwrap_or("").starts_with(&target))
                }),
            "{file}: does not link to every other dashboard"
        );
        let mut targets = 0;
        for p in d["panels"].as_array().unwrap() {
            if p["type"] == "row" {
                continue;
            }
            assert!(
                p["description"].as_str().is_some_and(|t| t.len() > 20),
                "{file}: panel {} has no description",
                p["title"]
            );
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{file}: {}",
                p["title"]
            );
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap();
                targets += 1;
                assert!(
                    expr.contains("job=~\"$job\"") && expr.contains("instance=~\"$instance\""),
                    "{file}: `{expr}` ignores the job/instance variables"
                );
                for (name, before) in counters_in(expr) {
                    assert!(
                        before.ends_with("rate(") || before.ends_with("increase("),
                        "{file}: counter {name} not wrapped in rate()/increase(): {expr}"
                    );
                }
                if expr.contains("rate(") {
                    assert!(expr.contains("[$__rate_interval]"), "{file}: {expr}");
                }
            }
        }
        assert!(targets >= 10, "{file}: only {targets} queries");
    }
}

/// The PrometheusRule the Kubernetes manifests ship: alerts/newapi.rules.yml inside the
/// prometheus-operator's envelope, nothing else. `NEWAPI_REGENERATE=1 cargo test
/// the_prometheusrule_is_the_rules_file` writes it; CI fails when the two drift.
fn prometheusrule() -> String {
    use serde_yaml_ng::{Mapping, Value};
    let rules: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(repo("alerts/newapi.rules.yml")).unwrap())
            .unwrap();
    let mut labels = Mapping::new();
    labels.insert("app.kubernetes.io/name".into(), "newapi-exporter".into());
    let mut metadata = Mapping::new();
    metadata.insert("name".into(), "newapi-exporter".into());
    metadata.insert("labels".into(), Value::Mapping(labels));
    let mut spec = Mapping::new();
    spec.insert("groups".into(), rules["groups"].clone());
    let mut doc = Mapping::new();
    doc.insert("apiVersion".into(), "monitoring.coreos.com/v1".into());
    doc.insert("kind".into(), "PrometheusRule".into());
    doc.insert("metadata".into(), Value::Mapping(metadata));
    doc.insert("spec".into(), Value::Mapping(spec));
    format!(
        "# Generated from alerts/newapi.rules.yml: do not edit; change the rules file and run\n\
         # NEWAPI_REGENERATE=1 cargo test the_prometheusrule_is_the_rules_file\n{}",
        serde_yaml_ng::to_string(&Value::Mapping(doc)).unwrap()
    )
}

#[test]
fn the_prometheusrule_is_the_rules_file() {
    let path = repo("deploy/kubernetes/prometheusrule.yaml");
    let expected = prometheusrule();
    if std::env::var_os("NEWAPI_REGENERATE").is_some() {
        std::fs::write(&path, &expected).unwrap();
    }
    let shipped = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        shipped == expected,
        "deploy/kubernetes/prometheusrule.yaml differs from alerts/newapi.rules.yml: run \
         NEWAPI_REGENERATE=1 cargo test the_prometheusrule_is_the_rules_file"
    );
}
