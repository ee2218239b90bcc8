//! The incident's own figures, the landing page, and backfill, against the same oracle.

use super::*;

/// The incident: 105 workflow log rows with quota 265,766,280; 20 quota_data rows with
/// 56,317,943; newest log (2025-10-21 16:32) four days after the newest quota_data hour
/// (2025-10-17 15:00).
fn incident_db(db: &Path) {
    let mut gw = Gateway::create(db, Tables::NewApiOlder).unwrap();
    let first_hour = 1_760_644_800; // 2025-10-16T20:00:00Z
    let newest_qd_hour = 1_760_713_200; // 2025-10-17T15:00:00Z
    let newest_log = 1_761_064_320; // 2025-10-21T16:32:00Z
    let model = "coze-workflow-async";
    gw.conn.execute_batch("BEGIN").unwrap();
    let mut n = 0;
    let mut quota_left: i64 = 265_766_280;
    let mut log = |gw: &mut Gateway, t: i64| {
        n += 1;
        let q = if n == 105 { quota_left } else { 2_531_108 };
        quota_left -= q;
        gw.record(&consume(7, model, t, q), false, t).unwrap();
    };
    // Two logs in each of the 20 hours quota_data has, ending at its newest hour ...
    for h in 0..20 {
        let hour = first_hour + h * HOUR;
        log(&mut gw, hour + 300);
        log(&mut gw, hour + 2400);
    }
    assert_eq!(first_hour + 19 * HOUR, newest_qd_hour);
    // ... and 65 more over the next four days, the last at 2025-10-21 16:32.
    let step = (newest_log - (newest_qd_hour + HOUR)) / 64;
    for i in 0..65 {
        log(&mut gw, newest_qd_hour + HOUR + i * step);
    }
    let last: i64 = gw
        .conn
        .query_row("SELECT MAX(created_at) FROM logs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(last, newest_log);
    for h in 0..20 {
        let q = if h == 19 { 2_815_900 } else { 2_815_897 };
        gw.conn
            .execute(
                "INSERT INTO quota_data (user_id, username, model_name, created_at, token_used, count, quota)
                 VALUES (7, 'user7', ?1, ?2, 120, 1, ?3)",
                params![model, first_hour + h * HOUR, q],
            )
            .unwrap();
    }
    gw.conn.execute_batch("COMMIT").unwrap();
}

#[test]
fn the_incident_reports_the_209m_gap_and_the_four_day_lag() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    incident_db(&db);
    assert_eq!(sum_i64(&db, "SELECT COUNT(*) FROM logs"), 105);
    assert_eq!(sum_i64(&db, "SELECT SUM(quota) FROM logs"), 265_766_280);
    assert_eq!(sum_i64(&db, "SELECT COUNT(*) FROM quota_data"), 20);
    assert_eq!(
        sum_i64(&db, "SELECT SUM(quota) FROM quota_data"),
        56_317_943
    );
    let four_days_32_min = 4 * 86_400 + 32 * 60;

    let report = reconcile_json(&db, &[]);
    let t = &report["totals"];
    assert_eq!(t["logs"]["requests"].as_i64(), Some(105));
    assert_eq!(t["logs"]["quota"].as_i64(), Some(265_766_280));
    assert_eq!(t["quota_data"]["rows"].as_i64(), Some(20));
    assert_eq!(t["quota_data"]["quota"].as_i64(), Some(56_317_943));
    assert_eq!(t["missing"]["quota"].as_i64(), Some(209_448_337));
    assert_eq!(t["missing"]["requests"].as_i64(), Some(85));
    assert_eq!(t["logs"]["latest"].as_i64(), Some(1_761_064_320));
    assert_eq!(t["quota_data"]["latest"].as_i64(), Some(1_760_713_200));
    assert_eq!(report["lag_seconds"].as_i64(), Some(four_days_32_min));
    assert_eq!(report["models"][0]["model"], "coze-workflow-async");
    assert_eq!(
        report["models"][0]["lag_seconds"].as_i64(),
        Some(four_days_32_min)
    );

    // The gauge shows the full lag even though the incident is older than the window.
    let s = InProcess::new(&db).poll();
    assert_eq!(
        scalar(&s, "newapi_quota_data_lag_seconds") as i64,
        four_days_32_min
    );

    // A range in RFC 3339 with an offset selects the same hours.
    let r2 = reconcile_json(
        &db,
        &[
            "--since",
            "2025-10-17T04:00:00+08:00",
            "--until",
            "1761066000",
        ],
    );
    assert_eq!(r2["totals"]["missing"]["quota"].as_i64(), Some(209_448_337));

    // The table and CSV forms carry the same figures.
    for (format, needle) in [("table", "209448337"), ("csv", ",209448337,")] {
        let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
            .args([
                "reconcile",
                "--format",
                format,
                "--sqlite-path",
                db.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(needle), "{format}: {text}");
        assert!(text.contains("coze-workflow-async"));
    }
}

#[test]
fn the_landing_page_shows_the_comparison() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    build(&db, |gw, hour| {
        let t = hour + 100;
        gw.record(&consume(2, "<b>wf</b>", t, 9_999), false, t)
            .unwrap();
    });
    let exp = Running::start(&["--sqlite-path", db.to_str().unwrap()]);
    exp.wait_ready(Duration::from_secs(20));
    let (_, page) = exp.get("/");
    assert!(page.contains("Recording health"));
    assert!(
        page.contains("&lt;b&gt;wf&lt;/b&gt;"),
        "model names are escaped"
    );
    assert!(!page.contains("<b>wf</b>"));
    assert!(page.contains(&(HOURS * 9_999).to_string()));
    // The other models keep recording, so the overall lag is zero; the page names the model
    // that never did: its first and newest logs are HOURS - 1 hours apart.
    assert_eq!(HOURS, 16);
    assert!(page.contains("quota_data lag: 0s"), "{page}");
    assert!(
        page.contains("longest per model: &lt;b&gt;wf&lt;/b&gt; (15h)"),
        "{page}"
    );
}

fn qd_snapshot(db: &Path) -> String {
    Connection::open(db)
        .unwrap()
        .query_row(
            "SELECT COALESCE(group_concat(id || ':' || user_id || ':' || username || ':' || model_name || ':' ||
                    created_at || ':' || count || ':' || quota || ':' || token_used, ';'), '')
             FROM (SELECT * FROM quota_data ORDER BY id)",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

fn logs_snapshot(db: &Path) -> (i64, i64, i64) {
    Connection::open(db)
        .unwrap()
        .query_row(
            "SELECT COUNT(*), SUM(quota), SUM(id * 7 + quota % 13) FROM logs",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
}

pub(super) fn backfill(db: &Path, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["backfill", "--sqlite-path"])
        .arg(db)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "backfill failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Each hour: part of the traffic flushed, the rest lost with the map (a restart), and an
/// async workflow model never fed at all.
fn drifted(db: &Path) -> Gateway {
    build(db, |gw, hour| {
        gw.flush().unwrap();
        for user in 1..=2 {
            let t = hour + 3000 + user;
            gw.record(&consume(user, "gpt-4o", t, 777 * user), true, t)
                .unwrap();
        }
        gw.lose_pending();
        let t = hour + 3100;
        gw.record(&consume(3, "coze-workflow-async", t, 2_000_000), false, t)
            .unwrap();
    })
}

#[test]
fn backfill_dry_run_apply_and_second_run() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let gw = drifted(&db);
    // Traffic in the current hour, not settled: backfill must leave it alone.
    let now = unix_now();
    let mut gw = gw;
    gw.record(&consume(2, "coze-workflow-async", now, 5_555), false, now)
        .unwrap();
    let before = oracle(&db);
    let settled_missing = before.values().map(|d| d.missing_quota).sum::<i64>() - 5_555;
    let settled_missing_requests = before.values().map(|d| d.missing_requests).sum::<i64>() - 1;
    let qd_before = qd_snapshot(&db);
    let logs_before = logs_snapshot(&db);

    let dry = backfill(&db, &[]);
    assert!(dry.contains("dry run"), "{dry}");
    assert!(dry.contains(&format!("{settled_missing} quota")), "{dry}");
    assert_eq!(qd_snapshot(&db), qd_before, "a dry run writes nothing");

    let until = (now + 2 * HOUR).to_string();
    let applied = backfill(&db, &["--apply", "--until", &until]);
    assert!(applied.contains("not settled"), "{applied}");
    assert!(
        applied.contains(&format!(
            "added {settled_missing_requests} requests and {settled_missing} quota"
        )),
        "{applied}"
    );
    assert_ne!(qd_snapshot(&db), qd_before);
    assert_eq!(
        logs_snapshot(&db),
        logs_before,
        "backfill never touches logs"
    );

    // Every settled gap is closed; the unsettled current-hour row is still unrecorded.
    let after = oracle(&db);
    assert_eq!(after.values().map(|d| d.missing_quota).sum::<i64>(), 5_555);
    assert_eq!(after.values().map(|d| d.excess_quota).sum::<i64>(), 0);
    let report = reconcile_json(&db, &[]);
    assert_eq!(report["totals"]["missing"]["quota"].as_i64(), Some(0));
    let s = InProcess::new(&db).poll();
    assert!(
        gauge_by_model(&s, "newapi_quota_data_missing_quota")
            .values()
            .all(|v| *v == 0)
    );

    // The rows look like the gateway's own: keyed by user, username, model and hour.
    let rows = sum_i64(
        &db,
        "SELECT COUNT(*) FROM quota_data WHERE model_name = 'coze-workflow-async' AND username = 'user3'",
    );
    assert_eq!(rows, HOURS);

    let qd_after = qd_snapshot(&db);
    let again = backfill(&db, &["--apply"]);
    assert!(again.contains("nothing to write"), "{again}");
    assert_eq!(qd_snapshot(&db), qd_after, "a second run writes nothing");
}

#[test]
fn backfill_alongside_a_gateway_flush_loses_no_increment() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    drop(drifted(&db));
    let sums = |db: &Path| {
        (
            sum_i64(db, "SELECT SUM(count) FROM quota_data"),
            sum_i64(db, "SELECT SUM(quota) FROM quota_data"),
        )
    };
    let (count0, quota0) = sums(&db);

    // A gateway node keeps flushing late increments into the very rows backfill increments.
    let stop = Arc::new(AtomicBool::new(false));
    let flusher = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut gw = Gateway::open(&db, Tables::NewApiOlder).unwrap();
            let base = base_hour();
            let (mut count, mut quota, mut i) = (0i64, 0i64, 0i64);
            while !stop.load(Ordering::Relaxed) || i < 20 {
                let hour = base + (i % HOURS) * HOUR;
                let user = 1 + i % 2;
                gw.feed(user, &format!("user{user}"), "gpt-4o", hour, 1, 3, 1);
                gw.flush().unwrap();
                count += 1;
                quota += 3;
                i += 1;
                // Back-to-back commits with no pause would starve every reader (SQLite has no
                // lock fairness); a real node flushes every few minutes.
                std::thread::sleep(Duration::from_millis(1));
            }
            (count, quota)
        })
    };
    let out = backfill(&db, &["--apply"]);
    stop.store(true, Ordering::Relaxed);
    let (flushed_count, flushed_quota) = flusher.join().unwrap();
    // "wrote N quota_data rows: added R requests and Q quota"
    let summary: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("wrote "))
        .unwrap_or_else(|| panic!("{out}"))
        .split_whitespace()
        .collect();
    let added = |what: &str| -> i64 {
        let at = summary.iter().position(|w| *w == what).unwrap();
        summary[at - 1].parse().unwrap()
    };
    let (count1, quota1) = sums(&db);
    assert!(added("requests") > 0, "{out}");
    assert_eq!(count1, count0 + added("requests") + flushed_count, "{out}");
    assert_eq!(quota1, quota0 + added("quota") + flushed_quota, "{out}");
}
