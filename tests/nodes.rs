//! Gateway nodes from `system_instances` on SQLite, MariaDB and PostgreSQL, with the tables as
//! gorm creates them, against hand-computed values.

use newapi_exporter::clock::unix_now;

use crate::common::engines::Server;
use crate::common::*;

/// gorm's `system_instances` on MySQL and PostgreSQL.
fn ddl(server: Server) -> Vec<&'static str> {
    match server {
        Server::Mysql => vec![
            "CREATE TABLE system_instances (node_name varchar(128) NOT NULL, info text, \
             started_at bigint, last_seen_at bigint, created_at bigint, updated_at bigint, \
             PRIMARY KEY (node_name), INDEX idx_system_instances_started_at (started_at), \
             INDEX idx_system_instances_last_seen_at (last_seen_at), \
             INDEX idx_system_instances_created_at (created_at), \
             INDEX idx_system_instances_updated_at (updated_at))",
        ],
        Server::Postgres => vec![
            "CREATE TABLE system_instances (node_name varchar(128), info text, started_at bigint, \
             last_seen_at bigint, created_at bigint, updated_at bigint, PRIMARY KEY (node_name))",
            "CREATE INDEX idx_system_instances_started_at ON system_instances (started_at)",
            "CREATE INDEX idx_system_instances_last_seen_at ON system_instances (last_seen_at)",
        ],
    }
}

/// (node, started_at offset, last_seen offset, info) relative to now: a node heartbeating, one
/// stopped 5 minutes ago, one gone two days ago (no series), one with info that is not JSON.
fn rows(now: i64) -> Vec<String> {
    [
        (
            "node-a",
            -7200,
            -10,
            r#"{"version":"v1.0.0-rc.22","is_master":true}"#,
        ),
        (
            "node-b",
            -3600,
            -300,
            r#"{"version":"v1.0.0-rc.21","is_master":false}"#,
        ),
        ("node-old", -300_000, -172_800, r#"{"version":"v0.9.0"}"#),
        ("node-c", -60, -30, "not json"),
    ]
    .iter()
    .map(|(n, s, l, info)| {
        format!(
            "INSERT INTO system_instances (node_name, info, started_at, last_seen_at, created_at, \
             updated_at) VALUES ('{n}', '{info}', {}, {}, {}, {})",
            now + s,
            now + l,
            now + s,
            now + l
        )
    })
    .collect()
}

fn check(samples: &[Sample], now: i64, what: &str) {
    let up = series(samples, "newapi_gateway_node_up");
    let expected: Vec<(Labels, f64)> = [("node-a", 1.0), ("node-b", 0.0), ("node-c", 1.0)]
        .iter()
        .map(|(n, v)| (labels(&[("node", n)]), *v))
        .collect();
    assert_eq!(up.into_iter().collect::<Vec<_>>(), expected, "{what}");
    let started = series(samples, "newapi_gateway_node_start_time_seconds");
    assert_eq!(
        started.get(&labels(&[("node", "node-a")])),
        Some(&((now - 7200) as f64)),
        "{what}"
    );
    let info = series(samples, "newapi_gateway_node_info");
    let expected_info: std::collections::BTreeSet<Labels> = [
        labels(&[
            ("master", "true"),
            ("node", "node-a"),
            ("version", "v1.0.0-rc.22"),
        ]),
        labels(&[
            ("master", "false"),
            ("node", "node-b"),
            ("version", "v1.0.0-rc.21"),
        ]),
        labels(&[("master", "false"), ("node", "node-c"), ("version", "")]),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        info.keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        expected_info,
        "{what}"
    );
}

#[test]
fn gateway_nodes_are_read_on_every_engine() {
    let now = unix_now();
    on_every_engine(
        "gateway_nodes_are_read_on_every_engine",
        ddl,
        &rows(now),
        |c, what| check(&poll_at(c, now), now, what),
    );
}

/// Older gateways have no system_instances: no node series, nothing fails.
#[test]
fn gateways_without_system_instances_have_no_node_series() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    newapi_exporter::demo::gateway::Gateway::create(
        &db,
        newapi_exporter::demo::gateway::Tables::NewApiOlder,
    )
    .unwrap();
    let samples = poll_at(&newapi_exporter::db::dsn::DbConfig::Sqlite(db), unix_now());
    assert!(series(&samples, "newapi_gateway_node_up").is_empty());
    assert!(series(&samples, "newapi_gateway_node_info").is_empty());
}
