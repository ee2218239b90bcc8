//! Every usage counter against an SQL oracle run by the test over the same file.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::*;
use newapi_exporter::demo::Traffic;
use newapi_exporter::demo::gateway::Gateway;
use newapi_exporter::demo::gateway::Tables;
use rusqlite::{Connection, params};

type Expected = BTreeMap<String, BTreeMap<Labels, f64>>;

/// What the counters must read, computed with plain SQL (one GROUP BY over the whole table).
fn oracle(db: &Path, flavor: Tables) -> Expected {
    let conn = Connection::open(db).unwrap();
    let has = |col: &str| -> bool {
        conn.query_row(
            "SELECT count(*) FROM pragma_table_info('logs') WHERE name = ?1",
            [col],
            |r| r.get::<_, i64>(0),
        )
        .unwrap()
            > 0
    };
    let group = if has("group") {
        "COALESCE(l.`group`, '')"
    } else {
        "''"
    };
    let use_time = if has("use_time") { "l.use_time" } else { "0" };
    let types = if flavor == Tables::OneApi {
        "(2)"
    } else {
        "(2, 5, 6)"
    };
    // Kinds of consume rows as the schema reference describes them: 0 billed, 1 channel test,
    // 2 task settlement, 3 zero usage, 4 billed with a saturated quota.
    let other = |key: &str| {
        if has("other") {
            format!("COALESCE(l.other, '') LIKE '%{key}%'")
        } else {
            "0".to_string()
        }
    };
    let test = if has("token_id") {
        "l.token_name = '模型测试' AND l.token_id = 0"
    } else {
        "l.token_name = '模型测试'"
    };
    let kind = format!(
        "(CASE WHEN l.type <> 2 THEN -1 WHEN {test} THEN 1 \
          WHEN l.prompt_tokens = 0 AND l.completion_tokens = 0 AND {} THEN 2 \
          WHEN l.prompt_tokens = 0 AND l.completion_tokens = 0 AND l.quota = 0 THEN 3 \
          WHEN {} THEN 4 ELSE 0 END)",
        other("pre_consumed_quota"),
        other("quota_saturation")
    );
    let sql = format!(
        "SELECT COALESCE(l.model_name, ''), COALESCE(CAST(l.channel_id AS TEXT), ''), {group},
                COALESCE(c.name, ''),
                SUM({kind} IN (0, 4)),
                SUM(CASE WHEN {kind} IN (0, 2, 4) AND l.quota > 0 THEN l.quota ELSE 0 END),
                SUM(CASE WHEN {kind} IN (0, 2, 4) AND l.quota < 0 THEN -l.quota ELSE 0 END),
                SUM(CASE WHEN {kind} IN (0, 4) THEN l.prompt_tokens ELSE 0 END),
                SUM(CASE WHEN {kind} IN (0, 4) THEN l.completion_tokens ELSE 0 END),
                SUM(CASE WHEN {kind} IN (0, 4) THEN {use_time} ELSE 0 END),
                SUM(l.type = 6),
                SUM(CASE WHEN l.type = 6 AND l.quota > 0 THEN l.quota ELSE 0 END),
                SUM(l.type = 5),
                SUM({kind} = 1),
                SUM(CASE WHEN {kind} = 1 AND l.quota > 0 THEN l.quota ELSE 0 END),
                SUM({kind} = 2),
                SUM({kind} = 3),
                SUM({kind} = 4)
         FROM logs l LEFT JOIN channels c ON c.id = l.channel_id
         WHERE l.type IN {types}
         GROUP BY 1, 2, 3, 4"
    );
    let mut out = Expected::new();
    let mut stmt = conn.prepare(&sql).unwrap();
    let mut rows = stmt.query([]).unwrap();
    while let Some(r) = rows.next().unwrap() {
        let s = |i: usize| r.get::<_, String>(i).unwrap();
        let n = |i: usize| r.get::<_, i64>(i).unwrap() as f64;
        let l = labels(&[
            ("model", &s(0)),
            ("channel_id", &s(1)),
            ("channel_name", &s(3)),
            ("group", &s(2)),
        ]);
        let mut put = |metric: &str, l: &Labels, v: f64| {
            out.entry(metric.to_string())
                .or_default()
                .insert(l.clone(), v);
        };
        if n(13) > 0.0 {
            put("newapi_channel_test_requests_total", &l, n(13));
            put("newapi_channel_test_quota_total", &l, n(14));
        }
        for (i, name) in [
            (15, "newapi_task_settlements_total"),
            (16, "newapi_zero_usage_requests_total"),
            (17, "newapi_quota_saturated_requests_total"),
        ] {
            if n(i) > 0.0 {
                put(name, &l, n(i));
            }
        }
        if n(4) > 0.0 || n(5) > 0.0 || n(6) > 0.0 {
            put("newapi_requests_total", &l, n(4));
            put("newapi_quota_total", &l, n(5));
            put("newapi_quota_corrections_total", &l, n(6));
            let mut lp = l.clone();
            lp.insert("token_type".into(), "prompt".into());
            put("newapi_tokens_total", &lp, n(7));
            lp.insert("token_type".into(), "completion".into());
            put("newapi_tokens_total", &lp, n(8));
            if has("use_time") {
                put("newapi_use_time_seconds_total", &l, n(9));
            }
        }
        if n(10) > 0.0 {
            put("newapi_refunds_total", &l, n(10));
            put("newapi_refund_quota_total", &l, n(11));
        }
        if n(12) > 0.0 {
            put("newapi_errors_total", &l, n(12));
        }
    }
    out
}

fn assert_matches_oracle(samples: &[Sample], db: &Path, flavor: Tables) {
    let expected = oracle(db, flavor);
    assert!(
        expected.contains_key("newapi_requests_total"),
        "fixture has no consume rows"
    );
    let mut names: Vec<&str> = USAGE_COUNTERS.to_vec();
    names.extend([
        "newapi_tokens_total",
        "newapi_channel_test_requests_total",
        "newapi_channel_test_quota_total",
        "newapi_task_settlements_total",
        "newapi_zero_usage_requests_total",
        "newapi_quota_saturated_requests_total",
    ]);
    for name in names {
        let got = series(samples, name);
        let want = expected.get(name).cloned().unwrap_or_default();
        assert_eq!(got, want, "{name} differs from the SQL oracle");
    }
}

fn channels(gw: &Gateway) {
    gw.add_channel(1, 1, "openai-primary", 1, 12.5, 420, "default", "gpt-4o")
        .unwrap();
    gw.add_channel(2, 14, "anthropic \"eu\"", 3, 0.0, 910, "vip", "claude")
        .unwrap();
    gw.add_channel(5, 43, "deepseek", 2, 3.25, 300, "default", "deepseek-chat")
        .unwrap();
}

/// Realistic traffic from the simulated gateway plus rows that break naive exporters.
fn fixture(db: &Path, flavor: Tables, rows: usize) -> Gateway {
    let mut gw = Gateway::create(db, flavor).unwrap();
    channels(&gw);
    let mut traffic = Traffic::new(42);
    gw.conn.execute_batch("BEGIN").unwrap();
    for i in 0..rows {
        let (row, feed) = traffic.request(1_767_225_600 + i as i64 * 7);
        gw.record(&row, feed, row.created_at).unwrap();
    }
    gw.conn.execute_batch("COMMIT").unwrap();
    insert_edge_rows(&gw.conn, flavor);
    gw
}

fn insert_edge_rows(conn: &Connection, flavor: Tables) {
    let with_group = flavor == Tables::NewApiOlder;
    let ins =
        |model: Option<&str>, channel: Option<i64>, group: Option<&str>, ty: i64, quota: i64| {
            if with_group {
                conn.execute(
                    "INSERT INTO logs (user_id, created_at, type, model_name, quota, prompt_tokens,
                   completion_tokens, use_time, channel_id, `group`)
                 VALUES (1, 1767300000, ?1, ?2, ?3, 11, 7, 3, ?4, ?5)",
                    params![ty, model, quota, channel, group],
                )
                .unwrap();
            } else {
                conn.execute(
                    "INSERT INTO logs (user_id, created_at, type, model_name, quota, prompt_tokens,
                   completion_tokens, channel_id)
                 VALUES (1, 1767300000, ?1, ?2, ?3, 11, 7, ?4)",
                    params![ty, model, quota, channel],
                )
                .unwrap();
            }
        };
    ins(None, None, None, 2, 100);
    ins(Some(""), Some(1), Some(""), 2, 50);
    ins(Some("通义千问-max 🚀"), Some(2), Some("vip"), 2, 777);
    ins(
        Some("we\"ird\\mo\ndel"),
        Some(5),
        Some("gr\"oup\\x\ny"),
        2,
        31,
    );
    ins(Some("gpt-4o"), Some(1), Some("default"), 2, -2_500);
    ins(Some("gpt-4o"), Some(99), Some("default"), 2, 40);
    ins(Some("gpt-4o"), Some(1), Some("default"), 5, 0);
    ins(Some("gpt-4o"), Some(1), Some("default"), 6, 9_000);
    ins(Some("gpt-4o"), Some(1), Some("default"), 1, 1_000_000);
    ins(Some("gpt-4o"), Some(1), Some("default"), 3, 0);
    if matches!(flavor, Tables::NewApiOlder | Tables::NewApiCurrent) {
        // Consume rows that are not ordinary billed requests: a channel test, a request the
        // upstream returned no usage for, one billed at a saturated quota, and a settlement
        // below its pre-charge.
        for (token_name, token_id, quota, prompt, completion, other) in [
            ("模型测试", 0, 321, 5, 5, ""),
            ("sk-user", 4, 0, 0, 0, ""),
            (
                "sk-user",
                4,
                2_147_483_647,
                1,
                1,
                r#"{"admin_info":{"quota_saturation":true}}"#,
            ),
            (
                "sk-user",
                4,
                -40,
                0,
                0,
                r#"{"pre_consumed_quota":100,"actual_quota":60}"#,
            ),
            // A test row of a real token named like the test token: billed.
            ("模型测试", 8, 70, 3, 3, ""),
        ] {
            conn.execute(
                "INSERT INTO logs (user_id, created_at, type, model_name, quota, prompt_tokens,
                   completion_tokens, use_time, channel_id, `group`, token_name, token_id, other)
                 VALUES (1, 1767300000, 2, 'gpt-4o', ?1, ?2, ?3, 2, 2, 'vip', ?4, ?5, ?6)",
                params![quota, prompt, completion, token_name, token_id, other],
            )
            .unwrap();
        }
    }
}

fn run_flavor(flavor: Tables) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let gw = fixture(&db, flavor, 2_500);
    let mut exp = InProcess::new(&db);
    let samples = exp.poll();
    assert_eq!(series(&samples, "newapi_up").values().next(), Some(&1.0));
    assert_matches_oracle(&samples, &db, flavor);
    // In chunks of 7 ids the cold start is a long read: its chunks (every row is months old)
    // are read with the statement for rows before the reconciliation's hours.
    assert_matches_oracle(&InProcess::with_chunk(&db, 7).poll(), &db, flavor);

    // Rows added between polls, after a large gap in ids.
    gw.conn
        .execute(
            "INSERT INTO logs (id, user_id, created_at, type, model_name, quota, prompt_tokens,
               completion_tokens, channel_id) VALUES (5000000000, 3, 1767400000, 2, 'gpt-4o', 123, 1, 2, 5)",
            [],
        )
        .unwrap();
    let mut traffic = Traffic::new(7);
    let mut gw = gw;
    for i in 0..300 {
        let (row, feed) = traffic.request(1_767_500_000 + i);
        gw.record(&row, feed, row.created_at).unwrap();
    }
    let samples = exp.poll();
    assert_matches_oracle(&samples, &db, flavor);
    let cursor = series(&samples, "newapi_exporter_logs_cursor");
    let max_id: i64 = gw
        .conn
        .query_row("SELECT MAX(id) FROM logs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(cursor.values().next(), Some(&(max_id as f64)));
}

#[test]
fn counters_match_sql_on_current_new_api() {
    run_flavor(Tables::NewApiOlder);
}

#[test]
fn counters_match_sql_on_legacy_new_api() {
    run_flavor(Tables::NewApiOlderLogs);
}

#[test]
fn counters_match_sql_on_one_api() {
    run_flavor(Tables::OneApi);
}

#[test]
fn one_api_type_5_is_a_test_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let gw = fixture(&db, Tables::OneApi, 200);
    let tests: i64 = gw
        .conn
        .query_row("SELECT count(*) FROM logs WHERE type = 5", [], |r| r.get(0))
        .unwrap();
    assert!(tests > 0, "fixture has type 5 rows");
    let samples = InProcess::new(&db).poll();
    assert!(series(&samples, "newapi_errors_total").is_empty());
    assert!(series(&samples, "newapi_refunds_total").is_empty());
    assert!(!series(&samples, "newapi_requests_total").is_empty());
}

#[test]
fn renamed_channel_relabels_the_series_with_unchanged_totals() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let gw = fixture(&db, Tables::NewApiOlder, 500);
    let mut exp = InProcess::new(&db);
    let before = exp.poll();
    assert_matches_oracle(&before, &db, Tables::NewApiOlder);
    gw.conn
        .execute(
            "UPDATE channels SET name = 'openai-renamed' WHERE id = 1",
            [],
        )
        .unwrap();
    let after = exp.poll();
    assert_matches_oracle(&after, &db, Tables::NewApiOlder);
    let total = |s: &[Sample], name: &str| -> f64 {
        series(s, "newapi_quota_total")
            .iter()
            .filter(|(l, _)| l["channel_id"] == "1" && l["channel_name"] == name)
            .map(|(_, v)| v)
            .sum()
    };
    assert!(total(&before, "openai-primary") > 0.0);
    assert_eq!(total(&after, "openai-primary"), 0.0);
    assert_eq!(
        total(&after, "openai-renamed"),
        total(&before, "openai-primary")
    );
    let status = series(&after, "newapi_channel_status");
    assert_eq!(
        status.get(&labels(&[
            ("channel_id", "1"),
            ("channel_name", "openai-renamed"),
            ("channel_type", "OpenAI")
        ])),
        Some(&1.0)
    );
}

#[test]
fn channel_gauges_match_the_channels_table() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    fixture(&db, Tables::NewApiOlder, 50);
    let samples = InProcess::new(&db).poll();
    let conn = Connection::open(&db).unwrap();
    let mut stmt = conn
        .prepare("SELECT id, name, type, status, balance, response_time FROM channels")
        .unwrap();
    let rows: Vec<(i64, String, i64, i64, f64, i64)> = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 3);
    let type_names = BTreeMap::from([(1, "OpenAI"), (14, "Anthropic"), (43, "DeepSeek")]);
    let status = series(&samples, "newapi_channel_status");
    let balance = series(&samples, "newapi_channel_balance_usd");
    let response = series(&samples, "newapi_channel_response_time_seconds");
    assert_eq!(status.len(), rows.len());
    for (id, name, ty, st, bal, ms) in rows {
        let l = labels(&[
            ("channel_id", &id.to_string()),
            ("channel_name", &name),
            ("channel_type", type_names[&ty]),
        ]);
        assert_eq!(status[&l], st as f64);
        assert_eq!(balance[&l], bal);
        assert_eq!(response[&l], ms as f64 / 1000.0);
    }
}

#[test]
fn quota_per_unit_follows_options() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let gw = fixture(&db, Tables::NewApiOlder, 10);
    let mut exp = InProcess::new(&db);
    let s = exp.poll();
    assert_eq!(
        series(&s, "newapi_quota_per_unit").values().next(),
        Some(&500000.0)
    );
    gw.set_option("QuotaPerUnit", "1000000").unwrap();
    let s = exp.poll();
    assert_eq!(
        series(&s, "newapi_quota_per_unit").values().next(),
        Some(&1000000.0)
    );
    gw.set_option("QuotaPerUnit", "not-a-number").unwrap();
    let s = exp.poll();
    assert_eq!(
        series(&s, "newapi_quota_per_unit").values().next(),
        Some(&500000.0),
        "an invalid value falls back to the gateway's default"
    );
}

#[test]
fn rows_read_counts_every_log_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    fixture(&db, Tables::NewApiOlder, 1_234);
    let mut exp = InProcess::with_chunk(&db, 97);
    exp.poll();
    let s = exp.poll();
    let n: f64 = Connection::open(&db)
        .unwrap()
        .query_row("SELECT count(*) FROM logs", [], |r| r.get::<_, i64>(0))
        .unwrap() as f64;
    let read = series(&s, "newapi_exporter_rows_read_total");
    assert_eq!(read[&labels(&[("table", "logs")])], n);
}
