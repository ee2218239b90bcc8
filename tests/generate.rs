//! `newapi-exporter generate`: the benchmark databases look like a gateway's.

use std::process::Command;

use rusqlite::Connection;
use serde_json::Value as Json;

#[test]
fn generated_databases_are_realistic_and_reconcile_as_expected() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gen.db");
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args([
            "generate",
            "--generation",
            "older",
            "--rows",
            "30000",
            "--days",
            "2",
            "--db",
        ])
        .arg(&db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conn = Connection::open(&db).unwrap();
    let q = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(q("SELECT COUNT(*) FROM logs"), 30000);
    let errors = q("SELECT COUNT(*) FROM logs WHERE type = 5") as f64 / 30000.0;
    assert!((0.02..0.04).contains(&errors), "{errors}");
    assert!(q("SELECT COUNT(*) FROM logs WHERE type = 6") > 0);
    assert!(q("SELECT COUNT(DISTINCT model_name) FROM logs") >= 10);
    assert!(q("SELECT COUNT(DISTINCT user_id) FROM logs") > 100);
    let journal: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "delete", "left in the gateway's journal mode");
    // quota_data mirrors every consume row except the two models that never reach it.
    assert_eq!(
        q("SELECT SUM(count) FROM quota_data"),
        q(
            "SELECT COUNT(*) FROM logs WHERE type = 2 AND model_name NOT IN ('coze-workflow-async', 'kling-v2-1')"
        )
    );
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["reconcile", "--format", "json", "--sqlite-path"])
        .arg(&db)
        .output()
        .unwrap();
    let report: Json = serde_json::from_slice(&out.stdout).unwrap();
    for m in report["models"].as_array().unwrap() {
        let name = m["model"].as_str().unwrap();
        let missing = m["missing"]["requests"].as_i64().unwrap();
        let unmirrored = m["unmirrored"]["requests"].as_i64().unwrap();
        match name {
            "coze-workflow-async" => assert!(missing > 0, "{m}"),
            "kling-v2-1" => assert!(missing == 0 && unmirrored > 0, "{m}"),
            _ => assert_eq!(missing, 0, "{m}"),
        }
        assert_eq!(m["excess"]["requests"].as_i64(), Some(0), "{m}");
    }
    // A second run refuses to overwrite.
    let again = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["generate", "--rows", "10", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));
}

/// The current generation: quota_data per channel, token, group and node; settlements
/// mirrored; the workflow channel's flushes lost, and named as the channel that misses them.
#[test]
fn a_generated_current_gateway_misses_exactly_the_workflow_channel() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gen.db");
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["generate", "--rows", "30000", "--days", "2", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conn = Connection::open(&db).unwrap();
    let q = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        q("SELECT SUM(count) FROM quota_data"),
        q("SELECT COUNT(*) FROM logs WHERE type = 2 AND channel_id <> 6")
    );
    assert!(q("SELECT COUNT(DISTINCT node_name) FROM quota_data") == 2);
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["reconcile", "--format", "json", "--sqlite-path"])
        .arg(&db)
        .output()
        .unwrap();
    let report: Json = serde_json::from_slice(&out.stdout).unwrap();
    // Channel 6's logs over the settled hours the report counts are exactly what it misses.
    let settled = report["settled_until"].as_i64().unwrap();
    let lost: i64 = conn
        .query_row(
            "SELECT COALESCE(SUM(quota), 0) FROM logs WHERE type = 2 AND channel_id = 6
             AND created_at - created_at % 3600 + 3600 <= ?1",
            [settled],
            |r| r.get(0),
        )
        .unwrap();
    assert!(lost > 0);
    for c in report["channels"].as_array().unwrap() {
        let expected = if c["channel_id"] == 6 { lost } else { 0 };
        assert_eq!(c["missing"]["quota"].as_i64(), Some(expected), "{c}");
        assert_eq!(c["excess"]["quota"].as_i64(), Some(0), "{c}");
    }
    assert_eq!(report["totals"]["duplicate_rows"].as_i64(), Some(0));
    // Settlements are mirrored on this generation: nothing is left "unmirrored".
    assert_eq!(report["totals"]["unmirrored"]["requests"].as_i64(), Some(0));
}
