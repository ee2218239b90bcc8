//! A gateway database switched to WAL: the exporter reads it without creating, writing or
//! leaving behind a `-wal` or `-shm` file, in a read-only directory too, and counts the rows a
//! running gateway holds in its `-wal`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use newapi_exporter::demo;
use rusqlite::{Connection, OpenFlags};

/// Consume rows and their quota in `logs` (what `reconcile` compares: channel tests and
/// settlements included), read without touching anything beside the file.
fn consume_oracle(db: &Path) -> (i64, i64) {
    oracle_where(db, "type = 2")
}

fn oracle_where(db: &Path, condition: &str) -> (i64, i64) {
    let uri = format!("file:{}?immutable=1", db.display());
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI;
    Connection::open_with_flags(uri, flags)
        .unwrap()
        .query_row(
            &format!("SELECT count(*), coalesce(sum(quota), 0) FROM logs WHERE {condition}"),
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
}

/// The demo gateway's database, switched to WAL and closed: no `-wal`, no `-shm`.
fn wal_database(dir: &Path) -> PathBuf {
    let db = dir.join("one-api.db");
    demo::create(&db, Duration::from_secs(6 * 3600), 3).unwrap();
    let conn = Connection::open(&db).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    drop(conn);
    assert_eq!(beside(&db), Vec::<String>::new());
    db
}

/// The names of the files in the database's directory other than the database itself.
fn beside(db: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(db.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "one-api.db")
        .collect();
    names.sort();
    names
}

/// The gateway, running in WAL mode: a connection that stays open while the test reads, with
/// `rows` billed requests of model `wal-model` committed into its `-wal`.
fn running_gateway(db: &Path, rows: i64) -> Connection {
    let conn = Connection::open(db).unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    let now = newapi_exporter::clock::unix_now();
    for i in 0..rows {
        conn.execute(
            "INSERT INTO logs (user_id, username, created_at, type, model_name, quota,
               prompt_tokens, completion_tokens, channel_id, `group`, token_id)
             VALUES (1, 'user01', ?1, 2, 'wal-model', 1000, 10, 5, 1, 'default', 1001)",
            [now - i],
        )
        .unwrap();
    }
    conn
}

/// Runs `cmd SUBCOMMAND --sqlite-path DB ...` and returns its standard output; fails the test,
/// with the exporter's error, when it does not succeed.
fn run_ok(mut cmd: Command, args: &[&str], db: &Path) -> Vec<u8> {
    let out = cmd
        .args(args)
        .arg("--sqlite-path")
        .arg(db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn reconcile_totals(cmd: Command, db: &Path) -> (i64, i64) {
    let stdout = run_ok(cmd, &["reconcile", "--format", "json"], db);
    let report: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    let logs = &report["totals"]["logs"];
    (
        logs["requests"].as_i64().unwrap(),
        logs["quota"].as_i64().unwrap(),
    )
}

fn exporter() -> Command {
    Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
}

#[test]
fn a_wal_database_is_read_without_leaving_files_behind() {
    let dir = tempfile::tempdir().unwrap();
    let db = wal_database(dir.path());
    let content = std::fs::read(&db).unwrap();
    let expected = consume_oracle(&db);

    run_ok(exporter(), &["check"], &db);
    assert_eq!(reconcile_totals(exporter(), &db), expected);
    assert_eq!(beside(&db), Vec::<String>::new(), "check and reconcile");
    assert!(
        std::fs::read(&db).unwrap() == content,
        "the file was written"
    );

    let mut exp = Running::start(&[
        "--sqlite-path",
        db.to_str().unwrap(),
        "--poll-interval",
        "200ms",
    ]);
    exp.wait_ready(Duration::from_secs(30));
    let total: f64 = series(&exp.scrape(), "newapi_requests_total")
        .values()
        .sum();
    assert_eq!(total, oracle_where(&db, BILLED_REQUEST).0 as f64);
    assert_eq!(beside(&db), Vec::<String>::new(), "serve");

    // The gateway starts: its rows sit in its -wal until it checkpoints.
    let gateway = running_gateway(&db, 7);
    wait_for(&exp, "wal-model", 7.0);
    // It writes more, then stops: the last connection checkpoints and deletes -wal and -shm.
    gateway
        .execute(
            "INSERT INTO logs (user_id, username, created_at, type, model_name, quota,
               prompt_tokens, completion_tokens, channel_id, `group`, token_id)
             VALUES (1, 'user01', ?1, 2, 'wal-model', 1000, 10, 5, 1, 'default', 1001)",
            [newapi_exporter::clock::unix_now()],
        )
        .unwrap();
    drop(gateway);
    // Once it is stopped, a row written by a short-lived writer goes straight into the file.
    drop(running_gateway(&db, 2));
    wait_for(&exp, "wal-model", 10.0);
    let (took, status) = exp.sigterm();
    assert!(status.success(), "{status:?} after {took:?}");
    assert_eq!(
        beside(&db),
        Vec::<String>::new(),
        "after the gateway stopped"
    );
    assert_eq!(consume_oracle(&db).0, expected.0 + 10);
}

fn wait_for(exp: &Running, model: &str, requests: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = model_requests(&exp.scrape(), model);
        if seen == requests {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{model}: {seen} requests counted, {requests} written"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The effective user id: the owner of this process's /proc entry.
fn euid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// A command that runs the exporter as a user who cannot write `dir`. Root ignores directory
/// permissions, so as root it runs as `nobody` (65534) through util-linux's `setpriv`.
fn exporter_unable_to_write(dir: &Path) -> Command {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    if euid() != 0 {
        return exporter();
    }
    let binary = Path::new(env!("CARGO_BIN_EXE_newapi-exporter"));
    for ancestor in binary.ancestors().skip(1).chain(dir.ancestors()) {
        let mode = std::fs::metadata(ancestor).unwrap().permissions().mode();
        assert!(
            mode & 0o001 != 0,
            "{} is not searchable by other users; the read-only test runs the exporter as nobody",
            ancestor.display()
        );
    }
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(binary);
    cmd
}

#[test]
fn a_wal_database_in_a_read_only_directory_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let db = wal_database(dir.path());
    let expected = consume_oracle(&db);

    // The gateway is stopped: neither -wal nor -shm exists, and none can be created.
    run_ok(exporter_unable_to_write(dir.path()), &["check"], &db);
    assert_eq!(
        reconcile_totals(exporter_unable_to_write(dir.path()), &db),
        expected
    );
    assert_eq!(beside(&db), Vec::<String>::new());

    // The gateway runs (as another user, with the directory writable to it): its -wal and -shm
    // are there, not writable by the exporter, and the rows in -wal are counted.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let gateway = running_gateway(&db, 4);
    assert_eq!(beside(&db), vec!["one-api.db-shm", "one-api.db-wal"]);
    let totals = reconcile_totals(exporter_unable_to_write(dir.path()), &db);
    assert_eq!(totals, (expected.0 + 4, expected.1 + 4000));
    drop(gateway);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}
