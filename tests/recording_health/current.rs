//! The current generation (2026-06-20 on): quota_data keyed by eight columns, one row per
//! channel, token, group and node. Checked against an SQL oracle written for that key.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use newapi_exporter::db::dsn::DbConfig;
use newapi_exporter::db::{Database, Dialect, Sources, Upsert, UpsertSql, Value};
use newapi_exporter::poll::Poller;
use newapi_exporter::snapshot::Shared;

use super::incident_and_backfill::backfill;
use super::*;

const CHANNELS: [i64; 3] = [1, 2, 3];
const NODES: [&str; 2] = ["node-a", "node-b"];

/// Healthy multi-channel, multi-group, multi-token traffic from two nodes, each flushing its own
/// map at the end of every hour; `lost` channels never reach quota_data (a silent insert
/// failure of their rows).
pub(crate) fn build_current(db: &Path, lost: &[i64]) {
    let mut nodes: Vec<Gateway> = NODES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut gw = if i == 0 {
                Gateway::create(db, Tables::NewApiCurrent).unwrap()
            } else {
                Gateway::open(db, Tables::NewApiCurrent).unwrap()
            };
            gw.node_name = name.to_string();
            gw.lost_channels = lost.to_vec();
            gw
        })
        .collect();
    for (id, name) in [(1, "openai-main"), (2, "azure-east"), (3, "claude-direct")] {
        nodes[0]
            .add_channel(id, 1, name, 1, 10.0, 100, "default", "gpt-4o")
            .unwrap();
    }
    let base = base_hour();
    for h in 0..HOURS {
        let hour = base + h * HOUR;
        let mut k = 0;
        for user in 1..=USERS {
            for (mi, model) in MODELS.iter().enumerate() {
                for step in 0..4 {
                    k += 1;
                    let t = hour + 30 + step * 800 + user * 11 + mi as i64;
                    let mut row = consume(user, model, t, 900 + 13 * k + h);
                    row.channel_id = CHANNELS[(k as usize) % CHANNELS.len()];
                    row.group = ["default", "vip"][(k as usize / 3) % 2].to_string();
                    row.token_id = 10 * user + (k % 2);
                    // The same key served by both nodes: two rows, both healthy.
                    let node = (k as usize) % NODES.len();
                    nodes[node].record(&row, true, t).unwrap();
                }
            }
        }
        for gw in &mut nodes {
            gw.flush().unwrap();
        }
    }
}

/// Per channel: logs minus quota_data per (hour, user, username, model, group, token, channel)
/// over settled hours, positive part and negative part.
fn channel_oracle(db: &Path) -> BTreeMap<i64, (i64, i64, i64)> {
    let conn = Connection::open(db).unwrap();
    let settled = unix_now() - unix_now().rem_euclid(HOUR) - 2 * HOUR;
    let mut stmt = conn
        .prepare(
            "WITH l AS (SELECT created_at - created_at % 3600 AS h, user_id, username, model_name,
                        `group` AS g, token_id, channel_id, COUNT(*) AS n, SUM(quota) AS q
                        FROM logs WHERE type = 2 GROUP BY 1, 2, 3, 4, 5, 6, 7),
                  d AS (SELECT created_at AS h, user_id, username, model_name, use_group AS g,
                        token_id, channel_id, SUM(count) AS n, SUM(quota) AS q
                        FROM quota_data GROUP BY 1, 2, 3, 4, 5, 6, 7),
                  k AS (SELECT h, user_id, username, model_name, g, token_id, channel_id FROM l
                        UNION SELECT h, user_id, username, model_name, g, token_id, channel_id FROM d)
             SELECT k.channel_id,
                    SUM(MAX(COALESCE(l.q, 0) - COALESCE(d.q, 0), 0)),
                    SUM(MAX(COALESCE(l.n, 0) - COALESCE(d.n, 0), 0)),
                    SUM(MAX(COALESCE(d.q, 0) - COALESCE(l.q, 0), 0))
             FROM k LEFT JOIN l USING (h, user_id, username, model_name, g, token_id, channel_id)
                    LEFT JOIN d USING (h, user_id, username, model_name, g, token_id, channel_id)
             WHERE k.h + 3600 <= ?1
             GROUP BY k.channel_id",
        )
        .unwrap();
    stmt.query_map([settled], |r| {
        Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?)))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

fn by_channel(samples: &[Sample], name: &str) -> BTreeMap<i64, i64> {
    series(samples, name)
        .into_iter()
        .map(|(l, v)| (l["channel_id"].parse().unwrap(), v as i64))
        .collect()
}

#[test]
fn healthy_multi_channel_multi_node_traffic_shows_no_drift_and_no_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    build_current(&db, &[]);
    // The fixture really has several rows per (hour, user, model): one per channel, token,
    // group and node, which the older key would count as duplicates.
    let conn = Connection::open(&db).unwrap();
    let per_older_key: i64 = conn
        .query_row(
            "SELECT COUNT(*) - COUNT(DISTINCT created_at || '/' || user_id || '/' || username || '/' || model_name)
             FROM quota_data",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(per_older_key > 100, "{per_older_key}");
    let samples = check_against_oracle(&db);
    assert_eq!(scalar(&samples, "newapi_quota_data_duplicate_rows"), 0.0);
    for name in [
        "newapi_quota_data_channel_missing_quota",
        "newapi_quota_data_channel_missing_requests",
        "newapi_quota_data_channel_excess_quota",
    ] {
        let got = by_channel(&samples, name);
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), CHANNELS, "{name}");
        assert!(got.values().all(|v| *v == 0), "{name}: {got:?}");
    }
    let info = series(&samples, "newapi_gateway_info");
    assert_eq!(
        info.keys()
            .map(|l| l["generation"].clone())
            .collect::<Vec<_>>(),
        ["new-api-current"]
    );
}

#[test]
fn a_channel_whose_flushes_never_land_is_named_with_its_models() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    build_current(&db, &[2]);
    let samples = check_against_oracle(&db);
    let want = channel_oracle(&db);
    let missing = by_channel(&samples, "newapi_quota_data_channel_missing_quota");
    let requests = by_channel(&samples, "newapi_quota_data_channel_missing_requests");
    let excess = by_channel(&samples, "newapi_quota_data_channel_excess_quota");
    for (channel, (q, n, x)) in &want {
        assert_eq!(missing[channel], *q, "missing quota on channel {channel}");
        assert_eq!(
            requests[channel], *n,
            "missing requests on channel {channel}"
        );
        assert_eq!(excess[channel], *x, "excess quota on channel {channel}");
    }
    assert!(
        want[&2].0 > 0 && want[&1].0 == 0 && want[&3].0 == 0,
        "{want:?}"
    );
    // The channel's name comes from `channels`.
    let names: Vec<String> = series(&samples, "newapi_quota_data_channel_missing_quota")
        .keys()
        .map(|l| l["channel_name"].clone())
        .collect();
    assert_eq!(names, ["openai-main", "azure-east", "claude-direct"]);
    // The JSON report says the same, channel by channel.
    let report = reconcile_json(&db, &[]);
    let channels = report["channels"].as_array().unwrap();
    for c in channels {
        let id = c["channel_id"].as_i64().unwrap();
        assert_eq!(c["missing"]["quota"].as_i64().unwrap(), want[&id].0);
        assert_eq!(c["missing"]["requests"].as_i64().unwrap(), want[&id].1);
        assert_eq!(c["excess"]["quota"].as_i64().unwrap(), want[&id].2);
    }
    assert_eq!(channels[1]["channel_name"], "azure-east");
    // The CSV form adds the channels after a blank line.
    let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
        .args(["reconcile", "--format", "csv", "--sqlite-path"])
        .arg(&db)
        .output()
        .unwrap();
    let csv = String::from_utf8_lossy(&out.stdout);
    let (_, channels_csv) = csv.split_once("\n\n").expect("a channel section");
    let expected: Vec<String> = std::iter::once(
        "channel_id,channel_name,missing_requests,missing_quota,excess_requests,excess_quota"
            .to_string(),
    )
    .chain(
        [(1, "openai-main"), (2, "azure-east"), (3, "claude-direct")].map(|(id, name)| {
            let (q, n, x) = want[&id];
            format!("{id},{name},{n},{q},0,{x}")
        }),
    )
    .collect();
    assert_eq!(channels_csv.lines().collect::<Vec<_>>(), expected);
    // The table names the channel first.
    let table = reconcile_table(&db);
    assert!(
        table
            .lines()
            .next()
            .unwrap()
            .contains("most missing on channel 2 (azure-east)"),
        "{table}"
    );
}

#[test]
fn backfill_writes_one_marked_row_per_key_and_never_touches_a_node_row() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    build_current(&db, &[2]);
    let node_rows = |db: &Path| -> String {
        Connection::open(db)
            .unwrap()
            .query_row(
                "SELECT group_concat(id || ':' || count || ':' || quota || ':' || token_used, ';')
                 FROM (SELECT * FROM quota_data WHERE node_name <> 'newapi-exporter-backfill' ORDER BY id)",
                [],
                |r| r.get::<_, String>(0),
            )
            .unwrap()
    };
    let before = node_rows(&db);
    // What backfill must add: the lost channel's logs, per key, over settled hours.
    let settled = unix_now() - unix_now().rem_euclid(HOUR) - 2 * HOUR;
    let conn = Connection::open(&db).unwrap();
    let (keys, quota): (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), SUM(q) FROM (SELECT SUM(quota) AS q FROM logs
             WHERE type = 2 AND channel_id = 2 AND created_at - created_at % 3600 + 3600 <= ?1
             GROUP BY created_at - created_at % 3600, user_id, username, model_name, `group`, token_id)",
            [settled],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(keys > 0);
    let dry = backfill(&db, &[]);
    assert!(
        dry.contains("would add") && dry.contains(&format!("{quota} quota in {keys} rows")),
        "{dry}"
    );
    let applied = backfill(&db, &["--apply"]);
    assert!(
        applied.contains(&format!("wrote {keys} quota_data rows")),
        "{applied}"
    );
    assert_eq!(
        node_rows(&db),
        before,
        "a row a gateway node wrote was changed"
    );
    let (rows, written): (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), SUM(quota) FROM quota_data WHERE node_name = 'newapi-exporter-backfill'
             AND channel_id = 2 AND use_group <> '' AND token_id <> 0",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((rows, written), (keys, quota));
    let again = backfill(&db, &["--apply"]);
    assert!(again.contains("nothing to write"), "{again}");
    let after = channel_oracle(&db);
    assert_eq!(after[&2].0, 0, "{after:?}");
}

#[test]
fn each_generation_is_named_by_check_and_the_info_metric() {
    let dir = tempfile::tempdir().unwrap();
    for (tables, generation) in [
        (Tables::NewApiCurrent, "new-api-current"),
        (Tables::NewApiOlder, "new-api-older"),
        (Tables::NewApiOlderLogs, "new-api-older"),
        (Tables::OneApi, "one-api"),
    ] {
        let db = dir.path().join(format!("{generation}-{tables:?}.db"));
        Gateway::create(&db, tables).unwrap();
        let samples = InProcess::new(&db).poll();
        let info = series(&samples, "newapi_gateway_info");
        assert_eq!(
            info.keys()
                .map(|l| l["generation"].clone())
                .collect::<Vec<_>>(),
            [generation],
            "{tables:?}"
        );
        let out = Command::new(env!("CARGO_BIN_EXE_newapi-exporter"))
            .args(["check", "--sqlite-path"])
            .arg(&db)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let expected = match generation {
            "new-api-current" => "current generation",
            "new-api-older" => "older generation",
            _ => "one-api",
        };
        assert!(text.contains(expected), "{tables:?}: {text}");
    }
}

/// A database whose statements containing `needle` fail while `fail` is set: a busy timeout,
/// a network error or an overflow in the middle of a poll.
struct FailingTable {
    inner: Box<dyn Database>,
    needle: &'static str,
    fail: Arc<AtomicBool>,
}

impl Database for FailingTable {
    fn dialect(&self) -> Dialect {
        self.inner.dialect()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn table_columns(&mut self, table: &str) -> anyhow::Result<Option<Vec<String>>> {
        self.inner.table_columns(table)
    }
    fn query(&mut self, sql: &str, params: &[Value]) -> anyhow::Result<Vec<Vec<Value>>> {
        if self.fail.load(Ordering::Relaxed) && sql.contains(self.needle) {
            anyhow::bail!("injected failure: {sql}");
        }
        self.inner.query(sql, params)
    }
    fn upsert_all(&mut self, sql: &UpsertSql, items: &[Upsert]) -> anyhow::Result<Vec<usize>> {
        self.inner.upsert_all(sql, items)
    }
}

fn recording_gauges(samples: &[Sample]) -> BTreeMap<(String, Labels), f64> {
    samples
        .iter()
        .filter(|s| s.name.starts_with("newapi_quota_data_") && !s.name.ends_with("_total"))
        .map(|s| ((s.name.clone(), s.labels.clone()), s.value))
        .collect()
}

/// A poll is all or nothing per collector: a failed read of quota_data, in the first poll or a
/// later one, keeps the previous state and says so (`newapi_up 0`, the collector's success 0);
/// after recovery the gauges match the SQL oracle.
#[test]
fn a_failed_read_never_publishes_half_read_gauges() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    build_current(&db, &[2]);
    let fail = Arc::new(AtomicBool::new(true));
    let connect = {
        let (db, fail) = (db.clone(), fail.clone());
        move || -> anyhow::Result<Sources> {
            let inner = newapi_exporter::db::connect(&DbConfig::Sqlite(db.clone()))?;
            // quota_data's re-read of recent hours, after its other statements succeeded.
            let failing = FailingTable {
                inner,
                needle: "`channel_id`, `node_name`, CASE WHEN",
                fail: fail.clone(),
            };
            Ok(Sources::new(Box::new(failing), None))
        }
    };
    let mut poller = Poller::new(
        Box::new(connect),
        "failing".into(),
        newapi_exporter::collect::Settings::default(),
        Arc::new(AtomicBool::new(false)),
    );
    let shared = Shared::default();
    let mut poll = || {
        poller.poll_once(&shared);
        parse_metrics(&shared.snapshot().text)
    };
    let up = |s: &[Sample]| series(s, "newapi_up")[&labels(&[])];
    let qd_success = |s: &[Sample]| {
        series(s, "newapi_exporter_collector_success")[&labels(&[("collector", "quota_data")])]
    };
    // The first poll fails on quota_data after the schema was read.
    let first = poll();
    assert_eq!(up(&first), 0.0);
    assert!(
        recording_gauges(&first).is_empty(),
        "nothing half-read is published"
    );
    fail.store(false, Ordering::Relaxed);
    let recovered = poll();
    assert_eq!(up(&recovered), 1.0);
    assert_eq!(qd_success(&recovered), 1.0);
    assert_gauges_match_oracle(&db, &recovered);
    let want = channel_oracle(&db);
    let missing = by_channel(&recovered, "newapi_quota_data_channel_missing_quota");
    for (channel, (q, _, _)) in &want {
        assert_eq!(missing[channel], *q, "channel {channel}");
    }
    // A later failure, in the re-read a flush calls for: the gauges stay as they were, and the
    // failure shows.
    Connection::open(&db)
        .unwrap()
        .execute(
            "INSERT INTO quota_data (user_id, username, model_name, created_at, use_group, token_id,
               channel_id, node_name, token_used, count, quota)
             VALUES (1, 'user1', 'gpt-4o', ?1, 'default', 10, 2, 'node-c', 5, 1, 777)",
            [unix_now() - unix_now().rem_euclid(HOUR)],
        )
        .unwrap();
    fail.store(true, Ordering::Relaxed);
    let failed = poll();
    assert_eq!(up(&failed), 0.0);
    assert_eq!(qd_success(&failed), 0.0);
    assert_eq!(recording_gauges(&failed), recording_gauges(&recovered));
    fail.store(false, Ordering::Relaxed);
    let again = poll();
    assert_eq!(up(&again), 1.0);
    let gpt =
        |s: &[Sample]| series(s, "newapi_quota_data_quota_total")[&labels(&[("model", "gpt-4o")])];
    assert_eq!(gpt(&failed), gpt(&recovered));
    assert_eq!(
        gpt(&again) - gpt(&recovered),
        777.0,
        "the flush shows once read"
    );
}
