//! Series bounds: the opt-in user label, excluded labels and the per-metric series limit.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::*;
use newapi_exporter::clock::unix_now;
use newapi_exporter::collect::{LabelSettings, Settings};
use newapi_exporter::demo::gateway::Tables;
use newapi_exporter::demo::gateway::{Gateway, LogRow};
use rusqlite::Connection;

/// Twelve models, three channels, two groups, four users, recent enough for the window.
fn fixture(dir: &Path) -> std::path::PathBuf {
    let db = dir.join("one-api.db");
    let mut gw = Gateway::create(&db, Tables::NewApiOlder).unwrap();
    for id in 1..=3 {
        gw.add_channel(id, 1, &format!("ch{id}"), 1, 1.0, 100, "default", "m")
            .unwrap();
    }
    let base = unix_now() - 10 * 3600;
    gw.conn.execute_batch("BEGIN").unwrap();
    for i in 0..1200i64 {
        let row = LogRow {
            user_id: 1 + i % 4,
            username: format!("user{}", 1 + i % 4),
            created_at: base + i * 20,
            log_type: 2,
            model_name: format!("model-{:02}", i % 12),
            quota: 100 + i % 7,
            prompt_tokens: 10,
            completion_tokens: 5,
            channel_id: 1 + i % 3,
            group: if i % 5 == 0 { "vip" } else { "default" }.into(),
            ..LogRow::default()
        };
        gw.record(&row, i % 12 != 11, row.created_at).unwrap();
    }
    gw.flush().unwrap();
    gw.conn.execute_batch("COMMIT").unwrap();
    db
}

fn with_labels(db: &Path, labels: LabelSettings) -> InProcess {
    InProcess::with_settings(
        db,
        Settings {
            labels,
            ..Settings::default()
        },
    )
}

/// SQL: requests per tuple of the given columns.
fn sql_requests(db: &Path, columns: &str) -> BTreeMap<Vec<String>, f64> {
    let conn = Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {columns}, COUNT(*) FROM logs l LEFT JOIN channels c ON c.id = l.channel_id
             WHERE l.type = 2 GROUP BY {columns}"
        ))
        .unwrap();
    let n = columns.split(',').count();
    stmt.query_map([], |r| {
        let key = (0..n)
            .map(|i| {
                r.get::<_, rusqlite::types::Value>(i).map(|v| match v {
                    rusqlite::types::Value::Integer(i) => i.to_string(),
                    rusqlite::types::Value::Text(t) => t,
                    _ => String::new(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((key, r.get::<_, i64>(n)? as f64))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

fn scraped(samples: &[Sample], labels: &[&str]) -> BTreeMap<Vec<String>, f64> {
    series(samples, "newapi_requests_total")
        .into_iter()
        .map(|(l, v)| {
            let mut names: Vec<&String> = l.keys().collect();
            names.sort();
            let mut want: Vec<&str> = labels.to_vec();
            want.sort();
            assert_eq!(names, want, "label names");
            (labels.iter().map(|n| l[*n].clone()).collect(), v)
        })
        .collect()
}

#[test]
fn the_user_label_is_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let db = fixture(dir.path());
    let plain = InProcess::new(&db).poll();
    assert!(
        series(&plain, "newapi_requests_total")
            .keys()
            .all(|l| !l.contains_key("user"))
    );
    let s = with_labels(
        &db,
        LabelSettings {
            user: true,
            ..LabelSettings::default()
        },
    )
    .poll();
    assert_eq!(
        scraped(
            &s,
            &["model", "channel_id", "channel_name", "group", "user"]
        ),
        sql_requests(
            &db,
            "l.model_name, l.channel_id, c.name, l.`group`, l.username"
        )
    );
}

#[test]
fn excluded_labels_are_summed_away() {
    let dir = tempfile::tempdir().unwrap();
    let db = fixture(dir.path());
    let s = with_labels(
        &db,
        LabelSettings {
            exclude: ["group".to_string(), "channel_id".to_string()].into(),
            ..LabelSettings::default()
        },
    )
    .poll();
    // Without channel_id there is no channel_name either.
    assert_eq!(scraped(&s, &["model"]), sql_requests(&db, "l.model_name"));
}

#[test]
fn series_beyond_the_limit_fold_into_other_and_stay_monotonic() {
    let dir = tempfile::tempdir().unwrap();
    let db = fixture(dir.path());
    let limit = 5;
    let mut exp = with_labels(
        &db,
        LabelSettings {
            max_series: Some(limit),
            ..LabelSettings::default()
        },
    );
    let s = exp.poll();
    let req = series(&s, "newapi_requests_total");
    assert_eq!(req.len(), limit + 1);
    let total_sql: f64 = sql_requests(&db, "l.model_name").values().sum();
    assert_eq!(req.values().sum::<f64>(), total_sql, "nothing is lost");
    let other = labels(&[
        ("model", "__other__"),
        ("channel_id", ""),
        ("channel_name", ""),
        ("group", ""),
    ]);
    let distinct = sql_requests(&db, "l.model_name, l.channel_id, l.`group`").len();
    let folded = series(&s, "newapi_exporter_series_folded_total");
    assert_eq!(
        folded[&labels(&[("family", "usage")])],
        (distinct - limit) as f64
    );
    // Per-model families are bounded too.
    for name in [
        "newapi_quota_data_requests_total",
        "newapi_quota_data_missing_quota",
    ] {
        let f = series(&s, name);
        assert!(f.len() <= limit + 1, "{name}: {} series", f.len());
        assert!(f.keys().any(|l| l["model"] == "__other__"), "{name}");
    }
    let qd_sql: f64 = Connection::open(&db)
        .unwrap()
        .query_row("SELECT SUM(count) FROM quota_data", [], |r| {
            r.get::<_, i64>(0)
        })
        .unwrap() as f64;
    assert_eq!(
        series(&s, "newapi_quota_data_requests_total")
            .values()
            .sum::<f64>(),
        qd_sql
    );

    // A new model later: folded, the kept series unchanged, __other__ grows.
    let gw = Gateway::open(&db, Tables::NewApiOlder).unwrap();
    gw.conn
        .execute(
            "INSERT INTO logs (user_id, created_at, type, model_name, quota, prompt_tokens, completion_tokens, channel_id, `group`)
             VALUES (1, ?1, 2, 'brand-new-model', 1, 1, 1, 1, 'default')",
            [unix_now()],
        )
        .unwrap();
    let s2 = exp.poll();
    let req2 = series(&s2, "newapi_requests_total");
    assert_eq!(req2.len(), limit + 1);
    for (l, v) in &req {
        if l != &other {
            assert_eq!(req2[l], *v, "kept series unchanged");
        }
    }
    assert_eq!(req2[&other], req[&other] + 1.0);
}

#[test]
fn bad_label_flags_are_refused() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["--labels.exclude", "group,colour"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("colour") && err.contains("--labels.exclude"),
        "{err}"
    );
    // The missing-quota alerts join on `model`: leaving it out is refused, with the reason and
    // the alternative.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["--labels.exclude", "model"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing-quota alerts") && err.contains("--series.max-per-metric"),
        "{err}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["--series.max-per-metric", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
