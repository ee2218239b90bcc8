//! The gateway's second ledger as read: `channels.used_quota` per channel and the users' sums
//! of `used_quota` and `request_count`, on SQLite, MariaDB and PostgreSQL, against
//! hand-computed values; and whether the gateway logs billed requests at all.

use std::path::Path;

use newapi_exporter::demo::gateway::{Gateway, Tables};

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
