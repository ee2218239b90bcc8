//! An attacker on the network: clients that never finish their headers, and floods of wrong
//! passwords. A valid scrape stays fast, nothing tells which users exist, shutdown is prompt.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use newapi_exporter::web::server::raise_fd_limit;

use crate::common::*;
use crate::web_config::basic;

fn demo_db(dir: &std::path::Path) -> std::path::PathBuf {
    let db = dir.join("one-api.db");
    newapi_exporter::demo::create(&db, Duration::from_secs(3600), 1).unwrap();
    db
}

/// A client that sends half a request header and then nothing.
fn half_header(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: exporter\r\nX-Slow: ")
        .unwrap();
    s
}

fn timed_get(exp: &Running, path: &str) -> (u16, Duration) {
    let started = Instant::now();
    let (status, _) = exp.get(path);
    (status, started.elapsed())
}

/// 1,100 half-open clients under the common 1,024-file soft limit: the exporter raises its
/// limit, keeps serving, closes the slow clients after the header timeout, and stops on
/// SIGTERM within 5 s with slow clients still connected.
#[test]
fn clients_that_never_finish_their_headers_cannot_hold_the_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let db = demo_db(dir.path());
    // Room for this test's own 1,300 sockets.
    assert!(
        raise_fd_limit() > 1500,
        "the test needs more than 1,500 file descriptors"
    );
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "ulimit -Sn 1024 && exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_newapi-exporter"),
        "--sqlite-path",
        db.to_str().unwrap(),
    ]);
    let mut exp = Running::start_command(cmd);
    exp.wait_ready(Duration::from_secs(30));
    let slow: Vec<TcpStream> = (0..1100).map(|_| half_header(&exp.addr)).collect();
    for _ in 0..5 {
        let (status, took) = timed_get(&exp, "/metrics");
        assert_eq!(status, 200);
        assert!(
            took < Duration::from_secs(1),
            "a valid scrape took {took:?}"
        );
    }
    // The slow clients are closed once the header timeout (10 s) passes.
    let mut first = slow.into_iter().next().unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let waited = Instant::now();
    let mut buf = Vec::new();
    let _ = first.read_to_end(&mut buf);
    let after = waited.elapsed();
    assert!(
        after < Duration::from_secs(15),
        "a half-sent header held its connection for {after:?}"
    );
    // An idle keep-alive connection is closed too.
    let mut idle = TcpStream::connect(&exp.addr).unwrap();
    idle.write_all(b"GET /-/healthy HTTP/1.1\r\nHost: exporter\r\n\r\n")
        .unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let idle_since = Instant::now();
    let mut buf = Vec::new();
    let _ = idle.read_to_end(&mut buf);
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    assert!(
        idle_since.elapsed() < Duration::from_secs(15),
        "an idle keep-alive connection stayed open {:?}",
        idle_since.elapsed()
    );
    // SIGTERM with 200 slow clients connected.
    let _more: Vec<TcpStream> = (0..200).map(|_| half_header(&exp.addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let (took, status) = exp.sigterm();
    assert!(status.success(), "{status}");
    assert!(
        took < Duration::from_secs(5),
        "SIGTERM honoured after {took:?}"
    );
}

fn authed_get(addr: &str, auth: &str) -> (u16, Duration) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let started = Instant::now();
    let resp = agent
        .get(&format!("http://{addr}/metrics"))
        .header("Authorization", auth)
        .call()
        .expect("HTTP request");
    (resp.status().as_u16(), started.elapsed())
}

fn threads_of(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Threads:")
                    .map(|n| n.trim().parse().unwrap())
            })
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// With a cost-12 hash: a valid scrape stays under a second during 200 concurrent
/// wrong-password requests, the exporter's thread count stays bounded, and an unknown user is
/// answered as slowly as a known user with a wrong password.
#[test]
fn authentication_stays_cheap_under_attack_and_tells_no_user_names() {
    let dir = tempfile::tempdir().unwrap();
    let db = demo_db(dir.path());
    let hash = bcrypt::hash("correct horse", 12).unwrap();
    let config = dir.path().join("web.yml");
    std::fs::write(
        &config,
        format!("basic_auth_users:\n  prometheus: {hash}\n"),
    )
    .unwrap();
    let exp = Running::start(&[
        "--sqlite-path",
        db.to_str().unwrap(),
        "--web.config.file",
        config.to_str().unwrap(),
    ]);
    let good = basic("prometheus", "correct horse");
    // The scheme in lower case is accepted (RFC 7235).
    let lower = good.replacen("Basic", "basic", 1);
    assert_eq!(authed_get(&exp.addr, &lower).0, 200);
    assert_eq!(authed_get(&exp.addr, &basic("prometheus", "wrong")).0, 401);

    // Unknown user and wrong password take the same time (sequential, so nothing queues;
    // alternated, so that a change in the machine's load while the tests run in parallel
    // falls on both alike).
    let (mut unknown, mut wrong): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
    for i in 0..7 {
        unknown.push(authed_get(&exp.addr, &basic(&format!("nobody{i}"), "x")).1);
        wrong.push(authed_get(&exp.addr, &basic("prometheus", &format!("wrong{i}"))).1);
    }
    let (u, w) = (median(unknown), median(wrong));
    let ratio = u.as_secs_f64() / w.as_secs_f64();
    assert!(
        (0.8..1.25).contains(&ratio),
        "unknown user {u:?} vs wrong password {w:?}"
    );

    // 200 concurrent wrong passwords.
    let addr = exp.addr.clone();
    let attackers: Vec<_> = (0..200)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                authed_get(&addr, &basic("prometheus", &format!("guess{i}"))).0
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let pid = exp.child.id();
    let mut most_threads = 0;
    for _ in 0..5 {
        let (status, took) = authed_get(&exp.addr, &good);
        assert_eq!(status, 200);
        assert!(
            took < Duration::from_secs(1),
            "a valid scrape took {took:?}"
        );
        most_threads = most_threads.max(threads_of(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    let answers: Vec<u16> = attackers.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        answers.iter().all(|s| *s == 401 || *s == 503),
        "{answers:?}"
    );
    assert!(answers.contains(&503), "the flood was never turned away");
    assert!(
        most_threads < 40,
        "{most_threads} threads during the attack"
    );
}
