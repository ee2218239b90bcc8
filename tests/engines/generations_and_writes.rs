//! On every engine: DSN forms, the current generation, concurrent backfills, and a database
//! that stops answering.

use super::*;

/// `user:@tcp(...)` is how the gateway's MySQL driver spells "no password": it connects as the
/// user without one. A refused login is said once, with the password masked.
#[test]
fn an_empty_mysql_password_connects_and_a_refused_login_is_said_once() {
    let Some(admin) = admin_dsn(Server::Mysql, "an_empty_mysql_password_connects") else {
        return;
    };
    let db = TestDb::create(Server::Mysql, &admin, "emptypw");
    let Some((user, rest)) = db.dsn.split_once('@') else {
        panic!("the test DSN {} has no user part", db.dsn);
    };
    let user = user.split(':').next().unwrap();
    let empty = format!("{user}:@{rest}");
    let (ok, stdout, stderr) = exporter(&["check", "--sql-dsn", &empty]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("gateway:"), "{stdout}");

    let refused = format!("nobody-{}:S3cr3tPw@{rest}", std::process::id());
    let (ok, _, stderr) = exporter(&["check", "--sql-dsn", &refused]);
    assert!(!ok);
    assert_eq!(stderr.matches("Access denied").count(), 1, "{stderr}");
    assert!(!stderr.contains("S3cr3tPw"), "{stderr}");
}

/// The current generation on every engine: quota_data keyed by eight columns, the same
/// per-channel gauges and report as on SQLite, and backfill writing its own rows the same way.
#[test]
fn the_current_generation_reads_and_backfills_the_same_on_all_three_engines() {
    let test = "the_current_generation_reads_and_backfills_the_same_on_all_three_engines";
    let dir = tempfile::tempdir().unwrap();
    fixture_time();
    let sqlite = dir.path().join("current.db");
    build_current(&sqlite, &[2]);
    let conn = rusqlite::Connection::open(&sqlite).unwrap();
    let newest: i64 = conn
        .query_row("SELECT MAX(created_at) FROM logs", [], |r| r.get(0))
        .unwrap();
    let until = newest - newest.rem_euclid(3600) + 3600;
    let channel_series = |samples: &[Sample]| -> BTreeMap<(String, Labels), f64> {
        gateway_series(samples)
            .into_iter()
            .filter(|((n, _), _)| n.starts_with("newapi_quota_data_") || n == "newapi_gateway_info")
            .collect()
    };
    let expected = channel_series(&InProcess::new(&sqlite).poll());
    assert!(
        expected
            .keys()
            .any(|(n, l)| n == "newapi_quota_data_channel_missing_quota" && l["channel_id"] == "2"),
        "{expected:?}"
    );
    let sqlite_args = ["--sqlite-path", sqlite.to_str().unwrap()];
    let before = report(&sqlite_args, until);
    let copy = dir.path().join("copy.db");
    std::fs::copy(&sqlite, &copy).unwrap();
    let (ok, out, err) = exporter(&[
        "backfill",
        "--apply",
        "--sqlite-path",
        sqlite.to_str().unwrap(),
    ]);
    assert!(ok, "{out}{err}");
    let after = report(&sqlite_args, until);
    assert_eq!(
        after["totals"]["missing"]["quota"].as_i64(),
        Some(0),
        "{after}"
    );

    for server in SERVERS {
        let Some(admin) = admin_dsn(server, test) else {
            continue;
        };
        let db = TestDb::create_with(server, &admin, "current", true);
        db.copy_from_sqlite(&copy, &TABLES);
        let got = channel_series(&InProcess::with_dsn(&db.dsn, None).poll());
        assert_eq!(got, expected, "{server:?}: gauges differ");
        let args = ["--sql-dsn", db.dsn.as_str()];
        assert_eq!(report(&args, until), before, "{server:?}: before");
        let (ok, out, err) = exporter(&["backfill", "--apply", "--sql-dsn", &db.dsn]);
        assert!(
            ok && out.contains("newapi-exporter-backfill"),
            "{server:?}: {out}{err}"
        );
        assert_eq!(report(&args, until), after, "{server:?}: after");
        let (ok, out, _) = exporter(&["backfill", "--apply", "--sql-dsn", &db.dsn]);
        assert!(ok && out.contains("nothing to write"), "{server:?}: {out}");
    }
}

/// Two `backfill --apply` at once write each deficit once, on every engine: the write lock
/// keeps them apart, and the second re-checks what it planned against.
#[test]
fn two_backfills_at_once_write_each_deficit_once() {
    let test = "two_backfills_at_once_write_each_deficit_once";
    let dir = tempfile::tempdir().unwrap();
    let now = fixture_time();
    let until = until(now);
    let sqlite = fixture(dir.path(), now);
    let mut targets: Vec<(String, Vec<String>, Option<TestDb>)> = vec![(
        "SQLite".into(),
        vec!["--sqlite-path".into(), sqlite.to_str().unwrap().into()],
        None,
    )];
    for server in SERVERS {
        let Some(admin) = admin_dsn(server, test) else {
            continue;
        };
        let db = TestDb::create(server, &admin, "twice");
        db.copy_from_sqlite(&sqlite, &TABLES);
        targets.push((
            format!("{server:?}"),
            vec!["--sql-dsn".into(), db.dsn.clone()],
            Some(db),
        ));
    }
    for (name, args, _db) in &targets {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let before = report(&args, until);
        let missing = before["totals"]["missing"]["quota"].as_i64().unwrap();
        assert!(missing > 0, "{name}");
        let runs: Vec<_> = (0..2)
            .map(|_| {
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"));
                cmd.args(["backfill", "--apply", "--until", &until.to_string()])
                    .args(&args);
                std::thread::spawn(move || cmd.output().unwrap())
            })
            .collect();
        for run in runs {
            let out = run.join().unwrap();
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let after = report(&args, until);
        assert_eq!(
            after["totals"]["missing"]["quota"].as_i64(),
            Some(0),
            "{name}"
        );
        assert_eq!(
            after["totals"]["excess"], before["totals"]["excess"],
            "{name}: nothing written twice"
        );
    }
}

/// A database that stops answering (connections stay open, nothing comes back): `newapi_up`
/// turns 0 within a poll interval plus the statement deadline, and SIGTERM is honoured within
/// 5 s though a poll is stuck waiting.
#[test]
fn a_database_that_stops_answering_never_holds_the_exporter() {
    let test = "a_database_that_stops_answering_never_holds_the_exporter";
    let dir = tempfile::tempdir().unwrap();
    let sqlite = fixture(dir.path(), unix_now());
    let server = Server::Mysql;
    let Some(admin) = admin_dsn(server, test) else {
        return;
    };
    let db = TestDb::create(server, &admin, "stall");
    db.copy_from_sqlite(&sqlite, &TABLES);
    let proxy = Proxy::start(&server_address(server, &db.dsn));
    let dsn = through_proxy(server, &db.dsn, &proxy);
    let mut exp = Running::start(&["--sql-dsn", &dsn, "--poll-interval", "1s"]);
    exp.wait_ready(Duration::from_secs(30));
    let up = |s: &[Sample]| series(s, "newapi_up").values().next().copied();
    proxy.stall();
    let stalled = Instant::now();
    wait_until_within(
        "newapi_up is 0",
        Duration::from_secs(1 + 35 + 5 + 5),
        || up(&exp.scrape()) == Some(0.0),
    );
    let took = stalled.elapsed();
    assert!(
        took <= Duration::from_secs(1 + 40),
        "newapi_up 0 after {took:?}"
    );
    // A poll is stuck again by now (every second); SIGTERM still ends the process promptly.
    std::thread::sleep(Duration::from_secs(2));
    let (took, status) = exp.sigterm();
    assert!(status.success(), "{status}");
    assert!(
        took < Duration::from_secs(5),
        "SIGTERM honoured after {took:?}"
    );
}

fn wait_until_within(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
