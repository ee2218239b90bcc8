//! The gateway's second ledger as read: `channels.used_quota` per channel and the users' sums
//! of `used_quota` and `request_count`, on SQLite, MariaDB and PostgreSQL, against
//! hand-computed values; and whether the gateway logs billed requests at all.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use newapi_exporter::clock::unix_now;
use newapi_exporter::collect::Settings;
use newapi_exporter::collect::ledger::RefundRule;
use newapi_exporter::db::Sources;
use newapi_exporter::demo::gateway::{Gateway, Tables};
use newapi_exporter::poll::Pipeline;

use crate::common::engines::{SERVERS, Server, TestDb, admin_dsn};
use crate::common::*;

/// (id, type, name, used_quota) of the fixture's channels.
const CHANNELS: [(i64, i64, &str, i64); 3] = [
    (1, 1, "openai", 1_250_000),
    (2, 14, "anthropic", 0),
    (3, 43, "deepseek", 3_000_000_000),
];

/// (id, used_quota, request_count) of the fixture's users; user 4 is soft-deleted history.
const USERS: [(i64, i64, i64); 4] = [
    (1, 1_000_000, 40),
    (2, 2_147_483_000, 2_000_000_000),
    (3, 0, 0),
    (4, 5_500, 3),
];

fn check(samples: &[Sample], users_used: f64, users_requests: f64, what: &str) {
    let used = series(samples, "newapi_channel_used_quota");
    for (id, ty, name, quota) in CHANNELS {
        let type_name = newapi_exporter::collect::channels::channel_type_name(ty);
        let l = labels(&[
            ("channel_id", &id.to_string()),
            ("channel_name", name),
            ("channel_type", &type_name),
        ]);
        assert_eq!(used.get(&l), Some(&(quota as f64)), "{what}: channel {id}");
    }
    assert_eq!(used.len(), CHANNELS.len(), "{what}");
    let one = |name: &str| series(samples, name).get(&Labels::new()).copied();
    assert_eq!(one("newapi_users_used_quota"), Some(users_used), "{what}");
    assert_eq!(one("newapi_users_requests"), Some(users_requests), "{what}");
}

fn fill_sqlite(db: &Path) {
    let gw = Gateway::create(db, Tables::NewApiCurrent).unwrap();
    for (id, ty, name, quota) in CHANNELS {
        gw.add_channel(id, ty, name, 1, 1.0, 100, "default", "m")
            .unwrap();
        gw.conn
            .execute(
                "UPDATE channels SET used_quota = ?1 WHERE id = ?2",
                [quota, id],
            )
            .unwrap();
    }
    for (id, used, requests) in USERS {
        gw.conn
            .execute(
                "INSERT INTO users (id, username, password, used_quota, request_count) \
                 VALUES (?1, 'u' || ?1, 'x', ?2, ?3)",
                [id, used, requests],
            )
            .unwrap();
    }
}

#[test]
fn the_second_ledger_is_read_on_every_engine() {
    let test = "the_second_ledger_is_read_on_every_engine";
    let users_used = (1_000_000_i64 + 2_147_483_000 + 5_500) as f64;
    let users_requests = (40_i64 + 2_000_000_000 + 3) as f64;

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    fill_sqlite(&db);
    check(
        &InProcess::new(&db).poll(),
        users_used,
        users_requests,
        "sqlite",
    );

    // A user whose used_quota is beyond any real charge (SQLite keeps 64 bits): the value is
    // left out of the sum, and the row counted as rejected.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute(
            "INSERT INTO users (id, username, password, used_quota, request_count) \
             VALUES (9, 'u9', 'x', 9223372036854775000, 1)",
            [],
        )
        .unwrap();
    let samples = InProcess::new(&db).poll();
    check(
        &samples,
        users_used,
        // Only the absurd value is left out: the row's request count is sound and counts.
        users_requests + 1.0,
        "sqlite, one absurd row",
    );
    let rejected = series(&samples, "newapi_exporter_rows_rejected_total");
    assert_eq!(
        rejected.get(&labels(&[
            ("reason", "amount_out_of_range"),
            ("table", "users")
        ])),
        Some(&1.0)
    );

    for server in SERVERS {
        let Some(admin) = admin_dsn(server, test) else {
            continue;
        };
        let t = TestDb::create_with(server, &admin, "ledger", true);
        let q = |c: &str| match server {
            Server::Mysql => format!("`{c}`"),
            Server::Postgres => format!("\"{c}\""),
        };
        let mut statements = Vec::new();
        for (id, ty, name, quota) in CHANNELS {
            statements.push(format!(
                "INSERT INTO channels (id, type, {}, status, name, balance, response_time, used_quota) \
                 VALUES ({id}, {ty}, 'k', 1, '{name}', 1.0, 100, {quota})",
                q("key")
            ));
        }
        for (id, used, requests) in USERS {
            statements.push(format!(
                "INSERT INTO users (id, username, password, used_quota, request_count) \
                 VALUES ({id}, 'u{id}', 'x', {used}, {requests})"
            ));
        }
        let refs: Vec<&str> = statements.iter().map(String::as_str).collect();
        t.exec(&refs);
        let samples = InProcess::with_dsn(&t.dsn, None).poll();
        check(&samples, users_used, users_requests, &format!("{server:?}"));
    }
}

#[test]
fn consume_logging_switched_off_is_shown() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    fill_sqlite(&db);
    let enabled = |samples: &[Sample]| {
        series(samples, "newapi_log_consume_enabled")
            .get(&Labels::new())
            .copied()
    };
    // Unset, the gateway logs (its default).
    assert_eq!(enabled(&InProcess::new(&db).poll()), Some(1.0));
    let gw = rusqlite::Connection::open(&db).unwrap();
    gw.execute(
        "INSERT INTO options (`key`, value) VALUES ('LogConsumeEnabled', 'false')",
        [],
    )
    .unwrap();
    assert_eq!(enabled(&InProcess::new(&db).poll()), Some(0.0));
    gw.execute(
        "UPDATE options SET value = 'true' WHERE `key` = 'LogConsumeEnabled'",
        [],
    )
    .unwrap();
    assert_eq!(enabled(&InProcess::new(&db).poll()), Some(1.0));
}

#[test]
fn the_demo_gateway_charges_what_it_logs() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    newapi_exporter::demo::create(&db, std::time::Duration::from_secs(6 * 3600), 4).unwrap();
    // The oracle: billed quota per channel from the logs, channel tests left out.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT channel_id, SUM(quota) FROM logs WHERE type = 2 \
             AND NOT (token_id = 0 AND token_name = '模型测试') GROUP BY channel_id",
        )
        .unwrap();
    let logged: std::collections::BTreeMap<String, f64> = stmt
        .query_map([], |r| {
            Ok((r.get::<_, i64>(0)?.to_string(), r.get::<_, i64>(1)? as f64))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(logged.len() >= 3, "{logged:?}");
    let samples = InProcess::new(&db).poll();
    let charged: std::collections::BTreeMap<String, f64> =
        series(&samples, "newapi_channel_used_quota")
            .into_iter()
            .filter(|(_, v)| *v != 0.0)
            .map(|(l, v)| (l["channel_id"].clone(), v))
            .collect();
    assert_eq!(charged, logged);
    let users: f64 = logged.values().sum();
    assert_eq!(
        series(&samples, "newapi_users_used_quota").get(&Labels::new()),
        Some(&users)
    );
}

/// A gateway-like writer on one engine: each request is one transaction that writes its log
/// row and its charge together (or, for a planted fault, only one of them).
struct Writer {
    sqlite: Option<rusqlite::Connection>,
    server: Option<TestDb>,
}

impl Writer {
    fn q(&self, c: &str) -> String {
        match self.server.as_ref().map(|t| t.server) {
            Some(Server::Postgres) => format!("\"{c}\""),
            _ => format!("`{c}`"),
        }
    }

    fn run(&self, statements: &[String]) {
        let mut all = vec!["BEGIN".to_string()];
        all.extend_from_slice(statements);
        all.push("COMMIT".to_string());
        match (&self.sqlite, &self.server) {
            (Some(c), _) => c.execute_batch(&all.join(";\n")).unwrap(),
            (_, Some(t)) => {
                let refs: Vec<&str> = all.iter().map(String::as_str).collect();
                t.exec(&refs);
            }
            _ => unreachable!(),
        }
    }

    fn log(&self, t: i64, ty: i64, channel: i64, quota: i64, tokens: i64, test: bool) -> String {
        let (token_name, token_id) = if test {
            ("模型测试", 0)
        } else {
            ("sk-user", 7)
        };
        format!(
            "INSERT INTO logs (user_id, username, created_at, type, model_name, quota, prompt_tokens, \
             completion_tokens, channel_id, token_name, token_id, {}, other) \
             VALUES (1, 'u1', {t}, {ty}, 'gpt-4o', {quota}, {tokens}, {tokens}, {channel}, \
             '{token_name}', {token_id}, 'default', '')",
            self.q("group")
        )
    }

    fn charge(&self, channel: i64, quota: i64) -> Vec<String> {
        vec![
            format!("UPDATE channels SET used_quota = used_quota + {quota} WHERE id = {channel}"),
            format!(
                "UPDATE users SET used_quota = used_quota + {quota}, \
                 request_count = request_count + 1 WHERE id = 1"
            ),
        ]
    }

    /// A billed request, logged and charged together.
    fn request(&self, t: i64, channel: i64, quota: i64) {
        let mut s = vec![self.log(t, 2, channel, quota, 10, false)];
        s.extend(self.charge(channel, quota));
        self.run(&s);
    }

    /// A refund, logged and (when the gateway lowers used_quota) given back.
    fn refund(&self, t: i64, channel: i64, quota: i64, lowers: bool) {
        let mut s = vec![self.log(t, 6, channel, quota, 0, false)];
        if lowers {
            s.extend(self.charge(channel, -quota));
        }
        self.run(&s);
    }
}

const CHANNEL_ROWS: [(i64, &str); 3] = [(1, "openai"), (2, "anthropic"), (3, "deepseek")];

fn ledger_writer(server: Option<Server>, dir: &Path, test: &str) -> Option<(Writer, Sources)> {
    use newapi_exporter::db::dsn::DbConfig;
    let (writer, config) = match server {
        None => {
            let db = dir.join("one-api.db");
            let gw = Gateway::create(&db, Tables::NewApiCurrent).unwrap();
            let w = Writer {
                sqlite: Some(gw.conn),
                server: None,
            };
            (w, DbConfig::Sqlite(db))
        }
        Some(server) => {
            let admin = admin_dsn(server, test)?;
            let t = TestDb::create_with(server, &admin, "ledger_gauges", true);
            let config = DbConfig::from_dsn(Some(&t.dsn), Path::new("unused.db")).unwrap();
            let w = Writer {
                sqlite: None,
                server: Some(t),
            };
            (w, config)
        }
    };
    let mut setup = Vec::new();
    for (id, name) in CHANNEL_ROWS {
        setup.push(format!(
            "INSERT INTO channels (id, type, {}, status, name, balance, response_time, used_quota) \
             VALUES ({id}, 1, 'k', 1, '{name}', 1.0, 100, 0)",
            writer.q("key")
        ));
    }
    setup.push(
        "INSERT INTO users (id, username, password, used_quota, request_count) \
         VALUES (1, 'u1', 'x', 0, 0)"
            .to_string(),
    );
    writer.run(&setup);
    let src = newapi_exporter::db::open(&config, &None).unwrap();
    Some((writer, src))
}

/// The ledger gauges of the last completed window, by channel id, and the users' pair.
fn ledger_gauges(samples: &[Sample]) -> (BTreeMap<(String, String), f64>, (f64, f64)) {
    let mut by_channel = BTreeMap::new();
    for (name, short) in [
        ("newapi_ledger_unlogged_quota", "unlogged"),
        ("newapi_ledger_uncharged_quota", "uncharged"),
        ("newapi_ledger_logged_quota", "logged"),
    ] {
        for (l, v) in series(samples, name) {
            by_channel.insert((l["channel_id"].clone(), short.to_string()), v);
        }
    }
    let one = |n: &str| series(samples, n).get(&Labels::new()).copied().unwrap();
    (
        by_channel,
        (
            one("newapi_ledger_users_unlogged_quota"),
            one("newapi_ledger_users_uncharged_quota"),
        ),
    )
}

/// (channel, unlogged, uncharged, logged) rows into the gauge map.
fn expect(rows: &[(i64, f64, f64, f64)]) -> BTreeMap<(String, String), f64> {
    let mut m = BTreeMap::new();
    for &(c, unlogged, uncharged, logged) in rows {
        let c = c.to_string();
        m.insert((c.clone(), "unlogged".into()), unlogged);
        m.insert((c.clone(), "uncharged".into()), uncharged);
        m.insert((c, "logged".into()), logged);
    }
    m
}

/// The series the alert's expression selects from these samples (scraped as job "newapi",
/// instance "gw"), by channel id, evaluated by promtool over the shipped rule.
fn alerting(samples: &[Sample], alert: &str) -> Vec<(String, f64)> {
    if !require_tool(
        "promtool",
        "planted_ledger_faults_show_exactly_once_on_their_channel",
    ) {
        return Vec::new();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root.join("alerts/newapi.rules.yml")).unwrap(),
    )
    .unwrap();
    let expr = rules["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap())
        .find(|r| r["alert"].as_str() == Some(alert))
        .and_then(|r| r["expr"].as_str())
        .unwrap()
        .to_string();
    let mut input = String::new();
    for s in samples
        .iter()
        .filter(|s| s.name.starts_with("newapi_ledger_") || s.name == "newapi_quota_per_unit")
    {
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        labels.extend(["job=\"newapi\"".to_string(), "instance=\"gw\"".to_string()]);
        input.push_str(&format!(
            "      - series: '{}{{{}}}'\n        values: '{}x10'\n",
            s.name,
            labels.join(","),
            s.value
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    // An expression test that expects nothing: promtool's failure prints what it got.
    let test = format!(
        "rule_files: []\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{input}\
         \n    promql_expr_test:\n      - expr: {}\n        eval_time: 5m\n        exp_samples: []\n",
        serde_json::to_string(&expr).unwrap()
    );
    let file = dir.path().join("t.yml");
    std::fs::write(&file, test).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["test", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        return Vec::new();
    }
    // Lines such as `{channel_id="2", channel_name="anthropic", ...} 5e+06` under "got:".
    let got = said
        .split("got:")
        .nth(1)
        .unwrap_or_else(|| panic!("promtool: {said}"));
    let mut found = Vec::new();
    for line in got.lines() {
        let Some(id) = line
            .split("channel_id=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        else {
            continue;
        };
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("promtool line {line:?}"));
        found.push((id.to_string(), value));
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

#[test]
fn planted_ledger_faults_show_exactly_once_on_their_channel_on_every_engine() {
    let test = "planted_ledger_faults_show_exactly_once_on_their_channel_on_every_engine";
    for server in [None, Some(Server::Mysql), Some(Server::Postgres)] {
        let dir = tempfile::tempdir().unwrap();
        let Some((w, mut src)) = ledger_writer(server, dir.path(), test) else {
            continue;
        };
        let what = format!("{server:?}");
        const W: i64 = 600;
        let settings = Settings {
            ledger_window_secs: W,
            refunds: RefundRule::Lower,
            ..Settings::default()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut p = Pipeline::build(&mut src, settings, stop).unwrap();
        let t0 = (unix_now() / W) * W - 10 * W;
        let mut poll = |p: &mut Pipeline, t: i64| {
            p.poll(&mut src, t).unwrap();
            scrape_pipeline(p)
        };
        // No completed window yet: no gauges.
        let s = poll(&mut p, t0 + 5);
        assert!(
            series(&s, "newapi_ledger_unlogged_quota").is_empty(),
            "{what}"
        );

        // Window A: healthy traffic with a channel test, a zero-usage request and a refund.
        w.request(t0 + 20, 1, 1_000);
        w.request(t0 + 21, 2, 2_500);
        w.run(&[w.log(t0 + 22, 2, 3, 4_000, 5, true)]); // channel test: never charged
        w.run(&[w.log(t0 + 23, 2, 1, 0, 0, false)]); // zero usage: nothing charged
        poll(&mut p, t0 + 100);
        w.request(t0 + 120, 1, 300);
        w.refund(t0 + 130, 2, 500, true);
        poll(&mut p, t0 + 400);

        // Window B: one burst charged without a log (channel 2), one log without a charge
        // (channel 1, a batch lost on restart), and healthy traffic around them.
        let s = poll(&mut p, t0 + W + 10);
        let (channels, users) = ledger_gauges(&s);
        assert_eq!(
            channels,
            expect(&[(1, 0.0, 0.0, 1_300.0), (2, 0.0, 0.0, 2_000.0)]),
            "{what}: window A is healthy"
        );
        assert_eq!(users, (0.0, 0.0), "{what}");
        w.request(t0 + W + 20, 1, 700);
        w.run(&w.charge(2, 5_000_000));
        w.run(&[w.log(t0 + W + 40, 2, 1, 7_000_000, 10, false)]);
        poll(&mut p, t0 + W + 200);
        w.request(t0 + W + 300, 2, 100);
        poll(&mut p, t0 + W + 500);

        // Window C: the gateway stops logging (LogConsumeEnabled off) while it charges.
        let s = poll(&mut p, t0 + 2 * W + 10);
        let (channels, users) = ledger_gauges(&s);
        assert_eq!(
            channels,
            expect(&[
                (1, 0.0, 7_000_000.0, 7_000_700.0),
                (2, 5_000_000.0, 0.0, 100.0)
            ]),
            "{what}: window B"
        );
        // The users' total nets the two: 5M charged unlogged, 7M logged uncharged.
        assert_eq!(users, (0.0, 2_000_000.0), "{what}");
        if server.is_none() {
            // The rules page for exactly these channels: channel 2 unlogged, channel 1
            // uncharged (US$10 and US$14, far above 1% of their windows).
            assert_eq!(alerting(&s, "NewapiLedgerUnlogged"), [("2".into(), 5e6)]);
            assert_eq!(alerting(&s, "NewapiLedgerUncharged"), [("1".into(), 7e6)]);
        }
        w.run(&[format!(
            "INSERT INTO options ({}, value) VALUES ('LogConsumeEnabled', 'false')",
            w.q("key")
        )]);
        for q in [1_000_000, 2_000_000, 3_000_000] {
            w.run(&w.charge(3, q));
        }
        poll(&mut p, t0 + 2 * W + 300);
        let s = poll(&mut p, t0 + 3 * W + 10);
        let (channels, users) = ledger_gauges(&s);
        assert_eq!(
            channels,
            expect(&[(3, 6_000_000.0, 0.0, 0.0)]),
            "{what}: window C"
        );
        assert_eq!(users, (6_000_000.0, 0.0), "{what}");
        if server.is_none() {
            assert_eq!(alerting(&s, "NewapiLedgerUnlogged"), [("3".into(), 6e6)]);
            assert!(alerting(&s, "NewapiLedgerUncharged").is_empty());
        }
        assert_eq!(
            series(&s, "newapi_log_consume_enabled").get(&Labels::new()),
            Some(&0.0),
            "{what}"
        );
        // Window D, healthy again: the burst is gone, shown once. (Each interval between two
        // readings counts in the window of its closing reading.)
        w.request(t0 + 3 * W + 20, 3, 50);
        poll(&mut p, t0 + 3 * W + 300);
        let s = poll(&mut p, t0 + 4 * W + 10);
        let (channels, users) = ledger_gauges(&s);
        assert_eq!(channels, expect(&[(3, 0.0, 0.0, 50.0)]), "{what}: window D");
        assert_eq!(users, (0.0, 0.0), "{what}");
        assert_eq!(
            series(&s, "newapi_ledger_window_end_timestamp_seconds").get(&Labels::new()),
            Some(&((t0 + 4 * W) as f64)),
            "{what}"
        );
    }
}

#[test]
fn refunds_count_as_the_gateway_version_in_use_handles_them() {
    let dir = tempfile::tempdir().unwrap();
    let (w, mut src) = ledger_writer(None, dir.path(), "refunds").unwrap();
    // A gateway node that reports its version in system_instances (the gateway's table).
    const W: i64 = 600;
    let t0 = (unix_now() / W) * W - 10 * W;
    // (version reported, whether this gateway lowers used_quota on a refund, lowers expected)
    for (version, gateway_lowers) in [
        ("v1.0.0-rc.21", false),
        ("v1.0.0-rc.22", true),
        ("v1.2.3", true),
    ] {
        w.run(&[
            "DELETE FROM system_instances".to_string(),
            format!(
                "INSERT INTO system_instances (node_name, info, started_at, last_seen_at, \
                 created_at, updated_at) VALUES ('node-1', \
                 '{{\"version\":\"{version}\",\"is_master\":true}}', {t0}, {t5}, {t0}, {t5})",
                t5 = t0 + 5
            ),
        ]);
        let settings = Settings {
            ledger_window_secs: W,
            ..Settings::default()
        };
        let mut p = Pipeline::build(&mut src, settings, Arc::new(AtomicBool::new(false))).unwrap();
        p.poll(&mut src, t0 + 10).unwrap();
        w.request(t0 + 20, 1, 1_000);
        w.refund(t0 + 30, 1, 400, gateway_lowers);
        p.poll(&mut src, t0 + 300).unwrap();
        p.poll(&mut src, t0 + W + 10).unwrap();
        let s = scrape_pipeline(&p);
        let (channels, _) = ledger_gauges(&s);
        let logged = if gateway_lowers { 600.0 } else { 1_000.0 };
        assert_eq!(channels, expect(&[(1, 0.0, 0.0, logged)]), "{version}");
        assert_eq!(
            series(&s, "newapi_ledger_refunds_lower_used_quota").get(&Labels::new()),
            Some(&f64::from(u8::from(gateway_lowers))),
            "{version}"
        );
    }
}
