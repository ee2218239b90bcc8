//! `--web.config.file`: real TLS and basic authentication, right and wrong passwords, and
//! configuration mistakes named clearly.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use base64::Engine as _;

struct Tls {
    cert_pem: String,
}

/// A self-signed certificate for localhost, written next to the config file.
fn write_cert(dir: &Path) -> Tls {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::create_dir_all(dir.join("tls")).unwrap();
    std::fs::write(dir.join("tls/server.crt"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("tls/server.key"), ck.signing_key.serialize_pem()).unwrap();
    Tls {
        cert_pem: ck.cert.pem(),
    }
}

fn agent(tls: &Tls) -> ureq::Agent {
    let cert = ureq::tls::Certificate::from_pem(tls.cert_pem.as_bytes()).unwrap();
    let tls_config = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::new_with_certs(&[cert]))
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls_config)
        .http_status_as_error(false)
        .build()
        .new_agent()
}

pub(crate) fn basic(user: &str, password: &str) -> String {
    let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {b}")
}

#[test]
fn tls_and_basic_auth_protect_every_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    newapi_exporter::demo::create(&db, Duration::from_secs(3600), 1).unwrap();
    let tls = write_cert(dir.path());
    let hash = bcrypt::hash("correct horse", 6).unwrap();
    let config = dir.path().join("web.yml");
    std::fs::write(
        &config,
        format!(
            "tls_server_config:\n  cert_file: tls/server.crt\n  key_file: tls/server.key\n\
             basic_auth_users:\n  prometheus: {hash}\n"
        ),
    )
    .unwrap();
    let exp = Running::start(&[
        "--sqlite-path",
        db.to_str().unwrap(),
        "--web.config.file",
        config.to_str().unwrap(),
    ]);
    let https = |path: &str| {
        format!(
            "https://localhost:{}{path}",
            exp.addr.rsplit(':').next().unwrap()
        )
    };
    let a = agent(&tls);
    let status = |auth: Option<String>, path: &str| {
        let mut req = a.get(https(path));
        if let Some(h) = auth {
            req = req.header("Authorization", h);
        }
        let mut resp = req.call().expect("a TLS connection");
        (
            resp.status().as_u16(),
            resp.body_mut().read_to_string().unwrap(),
        )
    };
    for path in ["/metrics", "/", "/-/healthy", "/-/ready"] {
        let (code, _) = status(None, path);
        assert_eq!(code, 401, "{path} without credentials");
        let (code, _) = status(Some(basic("prometheus", "wrong")), path);
        assert_eq!(code, 401, "{path} with a wrong password");
        let (code, _) = status(Some(basic("intruder", "correct horse")), path);
        assert_eq!(code, 401, "{path} with an unknown user");
    }
    let mut ok = false;
    for _ in 0..100 {
        let (code, body) = status(Some(basic("prometheus", "correct horse")), "/metrics");
        assert_eq!(code, 200);
        if body.contains("newapi_requests_total") {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "metrics served over TLS with the right password");
    // Plain HTTP gets no answer from a TLS port.
    let plain = ureq::get(format!("http://{}/metrics", exp.addr)).call();
    assert!(plain.is_err() || plain.unwrap().status().as_u16() >= 400);
}

fn start_error(config: &str, dir: &Path) -> String {
    let path = dir.join("bad.yml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args([
            "--sqlite-path",
            "x.db",
            "--web.listen-address",
            "127.0.0.1:0",
        ])
        .args(["--web.config.file", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("bad.yml"), "the file is named: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn web_config_mistakes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path());
    let err = start_error(
        "basic_auth_users:\n  admin: plaintext-password\n",
        dir.path(),
    );
    assert!(
        err.contains("basic_auth_users.admin is not a bcrypt hash"),
        "{err}"
    );
    let err = start_error(
        "tls_server_config:\n  cert_file: nope.crt\n  key_file: tls/server.key\n",
        dir.path(),
    );
    assert!(
        err.contains("cert_file") && err.contains("does not exist"),
        "{err}"
    );
    let err = start_error(
        "tls_server_config:\n  cert_file: tls/server.crt\n  key_file: tls/server.key\n  client_auth_type: RequireAndVerifyClientCert\n",
        dir.path(),
    );
    assert!(err.contains("client_auth_type"), "{err}");
    let err = start_error("http_server_config:\n  headers: {}\n", dir.path());
    assert!(err.contains("http_server_config"), "{err}");
    // An empty user list would serve without authentication what was meant to be protected.
    for empty in [
        "basic_auth_users:\n",
        "basic_auth_users: {}\n",
        "basic_auth_users: ~\n",
    ] {
        let err = start_error(empty, dir.path());
        assert!(
            err.contains("basic_auth_users is empty"),
            "{empty:?}: {err}"
        );
    }
}
