//! One database per known cause of drift, each checked against the oracle.

use super::*;

#[test]
fn healthy_gateway_shows_no_drift() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    build(&db, |_, _| {});
    let s = check_against_oracle(&db);
    assert!(
        gauge_by_model(&s, "newapi_quota_data_missing_quota")
            .values()
            .all(|v| *v == 0)
    );
    assert_eq!(scalar(&s, "newapi_quota_data_lag_seconds"), 0.0);
    assert_eq!(scalar(&s, "newapi_quota_data_export_enabled"), 1.0);
    assert_eq!(
        scalar(&s, "newapi_quota_data_export_interval_seconds"),
        300.0
    );
    // Settled: hour end + the default 5 min interval + the default 5 min margin has passed.
    let now = unix_now();
    let settled = scalar(&s, "newapi_quota_data_settled_until_timestamp_seconds") as i64;
    let expected = (now - 600) - (now - 600).rem_euclid(HOUR);
    assert!(
        settled == expected || settled == expected - HOUR,
        "{settled} vs {expected}"
    );
    // The dashboard-side counters equal quota_data's sums.
    let qd = gauge_by_model(&s, "newapi_quota_data_quota_total");
    for m in MODELS {
        let want = sum_i64(
            &db,
            &format!("SELECT SUM(quota) FROM quota_data WHERE model_name = '{m}'"),
        );
        assert_eq!(qd[m], want);
        let req = gauge_by_model(&s, "newapi_quota_data_requests_total")[m];
        assert_eq!(
            req,
            sum_i64(
                &db,
                &format!("SELECT SUM(count) FROM quota_data WHERE model_name = '{m}'")
            )
        );
        let tok = gauge_by_model(&s, "newapi_quota_data_tokens_total")[m];
        assert_eq!(
            tok,
            sum_i64(
                &db,
                &format!("SELECT SUM(token_used) FROM quota_data WHERE model_name = '{m}'")
            )
        );
    }
}

#[test]
fn a_model_whose_logs_never_feed_the_map_is_missing_and_lags() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    build(&db, |gw, hour| {
        for k in 0..2 {
            let t = hour + 100 + k * 1000;
            let mut row = consume(2, "coze-workflow-async", t, 2_531_108);
            row.other = r#"{"async":true}"#.into();
            gw.record(&row, false, t).unwrap();
        }
    });
    let s = check_against_oracle(&db);
    let missing = gauge_by_model(&s, "newapi_quota_data_missing_quota");
    assert_eq!(missing["coze-workflow-async"], 2 * HOURS * 2_531_108);
    assert_eq!(missing["gpt-4o"], 0);
    let lag = gauge_by_model(&s, "newapi_quota_data_model_lag_seconds");
    assert!(lag["coze-workflow-async"] > 14 * HOUR);
    assert_eq!(lag["gpt-4o"], 0);
    // The table's first line names the model beside the overall lag: its first log at the first
    // hour + 100 s, its newest at the last hour + 1,100 s, 15 hours later.
    assert_eq!(HOURS, 16);
    let table = reconcile_table(&db);
    let first = table.lines().next().unwrap_or_default();
    assert!(
        first.ends_with("; lag 0s; longest per model: coze-workflow-async (15h 16m 40s)"),
        "{first}"
    );
}

#[test]
fn a_flush_lost_to_a_restart_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let base = base_hour();
    build(&db, |gw, hour| {
        if hour == base + 5 * HOUR {
            gw.lose_pending();
        }
    });
    let s = check_against_oracle(&db);
    let lost: i64 = gauge_by_model(&s, "newapi_quota_data_missing_requests")
        .values()
        .sum();
    assert_eq!(lost, USERS * MODELS.len() as i64 * 3);
}

#[test]
fn refunds_and_task_settlements_are_not_missing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    build(&db, |gw, hour| {
        let mut refund = consume(1, "gpt-4o", hour + 2000, 5_000);
        refund.log_type = 6;
        gw.record(&refund, false, hour).unwrap();
        let mut task = consume(3, "kling-v2-1", hour + 2100, 400_000);
        task.prompt_tokens = 0;
        task.completion_tokens = 0;
        task.request_id.clear();
        task.other = r#"{"is_task":true,"pre_consumed_quota":400000}"#.into();
        gw.record(&task, false, hour).unwrap();
    });
    let s = check_against_oracle(&db);
    assert!(
        gauge_by_model(&s, "newapi_quota_data_missing_quota")
            .values()
            .all(|v| *v == 0)
    );
    assert_eq!(
        gauge_by_model(&s, "newapi_quota_data_unmirrored_quota")["kling-v2-1"],
        HOURS * 400_000
    );
    assert_eq!(scalar(&s, "newapi_quota_data_lag_seconds"), 0.0);
    let refunds: f64 = series(&s, "newapi_refund_quota_total").values().sum();
    assert_eq!(refunds, (HOURS * 5_000) as f64);
}

#[test]
fn duplicate_rows_from_two_nodes_are_counted_and_later_increments_show_as_excess() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let gw = build(&db, |_, _| {});
    let hour = base_hour() + 3 * HOUR;
    // Node B inserted its own row for a key node A had already inserted; each holds part.
    let (id, count, quota): (i64, i64, i64) = gw
        .conn
        .query_row(
            "SELECT id, count, quota FROM quota_data WHERE created_at = ?1 AND user_id = 1 AND model_name = 'gpt-4o'",
            [hour],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    gw.conn
        .execute(
            "UPDATE quota_data SET count = 1, quota = 1000, token_used = 0 WHERE id = ?1",
            [id],
        )
        .unwrap();
    gw.conn
        .execute(
            "INSERT INTO quota_data (user_id, username, model_name, created_at, token_used, count, quota)
             VALUES (1, 'user1', 'gpt-4o', ?1, 0, ?2, ?3)",
            params![hour, count - 1, quota - 1000],
        )
        .unwrap();
    let s = check_against_oracle(&db);
    assert_eq!(scalar(&s, "newapi_quota_data_duplicate_rows"), 1.0);
    assert_eq!(
        gauge_by_model(&s, "newapi_quota_data_excess_quota")["gpt-4o"],
        0
    );
    // A later flush increments both rows: the second increment is excess.
    gw.conn
        .execute(
            "UPDATE quota_data SET count = count + 1, quota = quota + 250
             WHERE created_at = ?1 AND user_id = 1 AND model_name = 'gpt-4o'",
            [hour],
        )
        .unwrap();
    let s = check_against_oracle(&db);
    assert_eq!(
        gauge_by_model(&s, "newapi_quota_data_excess_quota")["gpt-4o"],
        500
    );
}

#[test]
fn hour_boundary_skew_nets_out() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    build(&db, |gw, hour| {
        // A request logged at xx:59:59 whose map entry took the next hour's clock reading.
        let t = hour + HOUR - 1;
        gw.record(&consume(4, "gpt-4o", t, 4_444), true, t + 2)
            .unwrap();
    });
    // Without netting, every hour but the first would show a deficit and an excess.
    let raw = oracle(&db);
    assert!(raw["gpt-4o"].missing_quota > 0 && raw["gpt-4o"].excess_quota > 0);
    let s = InProcess::new(&db).poll();
    for metric in [
        "newapi_quota_data_missing_quota",
        "newapi_quota_data_missing_requests",
        "newapi_quota_data_excess_quota",
        "newapi_quota_data_excess_requests",
    ] {
        assert!(
            gauge_by_model(&s, metric).values().all(|v| *v == 0),
            "{metric}: {:?}",
            gauge_by_model(&s, metric)
        );
    }
    let report = reconcile_json(&db, &[]);
    assert_eq!(report["totals"]["missing"]["quota"].as_i64(), Some(0));
    assert_eq!(report["totals"]["excess"]["quota"].as_i64(), Some(0));
}

#[test]
fn deleted_old_logs_show_as_excess_not_missing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let gw = build(&db, |_, _| {});
    let deleted = gw
        .conn
        .execute(
            "DELETE FROM logs WHERE created_at < ?1",
            [base_hour() + 3 * HOUR],
        )
        .unwrap();
    assert!(deleted > 0);
    let s = check_against_oracle(&db);
    assert!(
        gauge_by_model(&s, "newapi_quota_data_missing_quota")
            .values()
            .all(|v| *v == 0)
    );
    let excess: i64 = gauge_by_model(&s, "newapi_quota_data_excess_requests")
        .values()
        .sum();
    assert_eq!(excess, deleted as i64);
}

#[test]
fn export_switched_off_is_visible_and_missing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let base = base_hour();
    build(&db, |gw, hour| {
        if hour >= base + 10 * HOUR {
            gw.lose_pending(); // the gateway stopped feeding the map
        }
    });
    Gateway::open(&db, Tables::NewApiOlder)
        .unwrap()
        .set_option("DataExportEnabled", "false")
        .unwrap();
    let s = check_against_oracle(&db);
    assert_eq!(scalar(&s, "newapi_quota_data_export_enabled"), 0.0);
    let missing: i64 = gauge_by_model(&s, "newapi_quota_data_missing_requests")
        .values()
        .sum();
    assert_eq!(missing, 6 * USERS * MODELS.len() as i64 * 3);
    assert!(scalar(&s, "newapi_quota_data_lag_seconds") >= (5 * HOUR) as f64);
}

#[test]
fn one_api_has_no_recording_metrics_and_the_page_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let mut gw = Gateway::create(&db, Tables::OneApi).unwrap();
    gw.record(&consume(1, "gpt-4o", 1_767_225_600, 10), true, 0)
        .unwrap();
    let s = InProcess::new(&db).poll();
    assert!(s.iter().all(|x| !x.name.starts_with("newapi_quota_data_")));
    let exp = Running::start(&["--sqlite-path", db.to_str().unwrap()]);
    exp.wait_ready(Duration::from_secs(20));
    let (_, page) = exp.get("/");
    assert!(
        page.contains("one-api, which has no quota_data table"),
        "{page}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["reconcile", "--sqlite-path", db.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no quota_data table"));
}

/// On one-api there is nothing to compare, so the per-hour aggregates of recent logs are not
/// kept: a long-running exporter's memory does not grow by an hour of them every hour.
#[test]
fn one_api_keeps_no_hourly_state() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let mut gw = Gateway::create(&db, Tables::OneApi).unwrap();
    let now = unix_now();
    for (k, model) in ["gpt-4o", "claude"].iter().enumerate() {
        let t = now - 3 * HOUR + k as i64 * 60;
        gw.record(&consume(1 + k as i64, model, t, 10), true, t)
            .unwrap();
    }
    let mut src = newapi_exporter::poll::sqlite_connector(db.clone())().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut p = newapi_exporter::poll::Pipeline::build(
        &mut src,
        newapi_exporter::collect::Settings::default(),
        stop,
    )
    .unwrap();
    for _ in 0..2 {
        p.poll(&mut src, unix_now()).unwrap();
        assert!(p.ctx.recording.logs_hourly.is_empty());
        assert!(p.ctx.recording.dirty.is_empty());
    }
    assert_eq!(p.ctx.logs_cursor, 2, "both rows were read");
}
