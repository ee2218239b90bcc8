//! The ways of installing: the container image's Dockerfile, the systemd unit, the Kubernetes
//! manifests (validated against the Kubernetes and prometheus-operator schemas), and the
//! binary's own health check that the image uses.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

/// Multi-stage, non-root, minimal base, a health check the image can run, OCI labels, and every
/// file the build reads copied in (a file the build reads at compile time and the image lacks
/// breaks the build only where images are built).
#[test]
fn the_dockerfile_builds_what_cargo_builds_and_runs_unprivileged() {
    let d = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let froms: Vec<&str> = d.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms[1].contains("distroless") && froms[1].contains(":nonroot"));
    assert!(froms.iter().all(|f| !f.contains(":latest")));
    assert!(d.contains("\nUSER nonroot"));
    assert!(d.contains("HEALTHCHECK") && d.contains("\"healthcheck\"") && d.contains("/-/healthy"));
    for label in ["title", "version", "revision", "source", "licenses"] {
        assert!(
            d.contains(&format!("org.opencontainers.image.{label}=")),
            "{label}"
        );
    }
    let copied: Vec<&str> = d
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[..parts.len() - 1].to_vec()
        })
        .collect();
    let covered = |p: &str| {
        copied
            .iter()
            .any(|c| p == *c || p.starts_with(&format!("{c}/")))
    };
    for needed in ["Cargo.toml", "Cargo.lock", "build.rs", "src"] {
        assert!(covered(needed), "the Dockerfile does not copy {needed}");
    }
    // Files the sources include at compile time, outside src/ (tests excepted).
    for entry in walk(&repo("src")) {
        let text = std::fs::read_to_string(&entry).unwrap();
        for (i, _) in text.match_indices("include_str!(\"") {
            let rel = text[i + 14..].split('"').next().unwrap();
            let target = entry.parent().unwrap().join(rel);
            let target = std::fs::canonicalize(&target).unwrap();
            let target = target
                .strip_prefix(repo(""))
                .unwrap()
                .to_string_lossy()
                .to_string();
            let in_test = text[..i].rfind("#[cfg(test)]").is_some();
            if !in_test {
                assert!(
                    covered(&target),
                    "{} includes {target}, which the Dockerfile does not copy",
                    entry.display()
                );
            }
        }
    }
    // The bench target Cargo.toml declares must exist in the build context too.
    assert!(covered("benches"));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// The image's health check: exit 0 against a running exporter, non-zero (naming the URL)
/// against nothing.
#[test]
fn the_healthcheck_command_asks_the_probe() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    newapi_exporter::demo::create(&db, Duration::from_secs(3600), 1).unwrap();
    let exp = Running::start(&["--sqlite-path", db.to_str().unwrap()]);
    let bin = env!("CARGO_BIN_EXE_newapi-exporter");
    let url = format!("http://{}/-/healthy", exp.addr);
    let (ok, said) = run(Command::new(bin).args(["healthcheck", "--url", &url]));
    assert!(ok, "{said}");
    drop(exp);
    let (ok, said) = run(Command::new(bin).args(["healthcheck", "--url", &url]));
    assert!(!ok);
    assert!(said.contains(&url), "{said}");
}

/// `systemd-analyze verify` accepts the unit (with the binary at the path it names, here the
/// one just built), and the unit carries the usual hardening.
#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let test = "the_systemd_unit_verifies_and_is_hardened";
    if !require_tool("systemd-analyze", test) {
        return;
    }
    let unit = std::fs::read_to_string(repo("deploy/systemd/newapi-exporter.service")).unwrap();
    for key in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "ReadOnlyPaths=/data",
        "NoNewPrivileges=yes",
        "EnvironmentFile=/etc/newapi-exporter.env",
    ] {
        assert!(unit.contains(key), "the unit lacks {key}");
    }
    let env = std::fs::read_to_string(repo("deploy/systemd/newapi-exporter.env")).unwrap();
    for var in [
        "SQLITE_PATH=",
        "#SQL_DSN=",
        "#LOG_SQL_DSN=",
        "LISTEN_ADDRESS=",
    ] {
        assert!(env.contains(var), "the environment example lacks {var}");
    }
    let dir = tempfile::tempdir().unwrap();
    let env_file = repo("deploy/systemd/newapi-exporter.env");
    let local = unit
        .replace(
            "/usr/local/bin/newapi-exporter",
            env!("CARGO_BIN_EXE_newapi-exporter"),
        )
        .replace("/etc/newapi-exporter.env", env_file.to_str().unwrap());
    let path = dir.path().join("newapi-exporter.service");
    std::fs::write(&path, local).unwrap();
    let (ok, said) = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}

/// The Deployment, Service and Secret against the Kubernetes schemas (kubernetes-validate),
/// the ServiceMonitor and PrometheusRule against the prometheus-operator CRDs' schemas (as
/// packaged by @kubernetes-models/prometheus-operator, installed by CI into
/// NEWAPI_TEST_K8S_NODE_MODULES). A manifest broken on purpose is refused by both.
#[test]
fn the_kubernetes_manifests_validate_against_their_schemas() {
    let test = "the_kubernetes_manifests_validate_against_their_schemas";
    if !require_tool("kubernetes-validate", test) || !require_tool("node", test) {
        return;
    }
    let Some(modules) = std::env::var_os("NEWAPI_TEST_K8S_NODE_MODULES") else {
        assert!(!in_ci(), "CI sets NEWAPI_TEST_K8S_NODE_MODULES");
        eprintln!("SKIP {test}: NEWAPI_TEST_K8S_NODE_MODULES is not set");
        return;
    };
    let k8s = |files: &[PathBuf]| {
        run(Command::new("kubernetes-validate")
            .arg("--strict")
            .args(files))
    };
    let crds = |files: &[PathBuf]| {
        run(Command::new("node")
            .arg(repo("tests/support/validate-crds.mjs"))
            .arg(&modules)
            .args(files))
    };
    let core: Vec<PathBuf> = ["deployment.yaml", "service.yaml", "secret.example.yaml"]
        .iter()
        .map(|f| repo(&format!("deploy/kubernetes/{f}")))
        .collect();
    let operator: Vec<PathBuf> = ["servicemonitor.yaml", "prometheusrule.yaml"]
        .iter()
        .map(|f| repo(&format!("deploy/kubernetes/{f}")))
        .collect();
    let (ok, said) = k8s(&core);
    assert!(ok, "{said}");
    let (ok, said) = crds(&operator);
    assert!(ok, "{said}");
    assert_eq!(said.matches(" valid").count(), 2, "{said}");

    // Broken on purpose: both validators notice.
    let dir = tempfile::tempdir().unwrap();
    let bad_deployment = dir.path().join("deployment.yaml");
    let d = std::fs::read_to_string(&core[0]).unwrap();
    std::fs::write(
        &bad_deployment,
        d.replace("containerPort: 10160", "containerPort: \"http\""),
    )
    .unwrap();
    assert!(!k8s(&[bad_deployment]).0);
    let bad_monitor = dir.path().join("servicemonitor.yaml");
    let m = std::fs::read_to_string(&operator[0]).unwrap();
    std::fs::write(
        &bad_monitor,
        m.replace("interval: 30s", "interval: half a minute"),
    )
    .unwrap();
    assert!(!crds(&[bad_monitor]).0);

    // The Deployment's probes and hardening, and the DSN from a Secret.
    for key in [
        "path: /-/healthy",
        "path: /-/ready",
        "readOnlyRootFilesystem: true",
        "runAsNonRoot: true",
        "secretKeyRef:",
        "resources:",
    ] {
        assert!(d.contains(key), "deployment.yaml lacks {key}");
    }
}
