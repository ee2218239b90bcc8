//! Async jobs from `tasks` and `midjourneys` on SQLite, MariaDB and PostgreSQL, with the tables
//! as gorm creates them, against hand-computed values.

use newapi_exporter::clock::unix_now;

use crate::common::engines::Server;
use crate::common::*;

/// gorm's `tasks` on MySQL and PostgreSQL (`json` columns as gorm maps them).
fn ddl(server: Server) -> Vec<&'static str> {
    match server {
        Server::Mysql => vec![
            "CREATE TABLE tasks (id bigint AUTO_INCREMENT, created_at bigint, updated_at bigint, \
             task_id varchar(191), platform varchar(30), user_id bigint, `group` varchar(50), \
             channel_id bigint, quota bigint, action varchar(40), status varchar(20), \
             fail_reason longtext, submit_time bigint, start_time bigint, finish_time bigint, \
             progress varchar(20), properties JSON, private_data JSON, data JSON, PRIMARY KEY (id), \
             INDEX idx_tasks_platform (platform), INDEX idx_tasks_status (status), \
             INDEX idx_tasks_submit_time (submit_time), INDEX idx_tasks_finish_time (finish_time), \
             INDEX idx_tasks_progress (progress))",
            "CREATE TABLE midjourneys (id bigint AUTO_INCREMENT, code bigint, user_id bigint, \
             action varchar(40), mj_id varchar(191), prompt longtext, prompt_en longtext, \
             description longtext, state longtext, submit_time bigint, start_time bigint, \
             finish_time bigint, image_url longtext, video_url longtext, video_urls longtext, \
             status varchar(20), progress varchar(30), fail_reason longtext, channel_id bigint, \
             quota bigint, token_id bigint DEFAULT 0, billing_channel_id bigint DEFAULT 0, \
             buttons longtext, properties longtext, PRIMARY KEY (id), \
             INDEX idx_midjourneys_submit_time (submit_time), \
             INDEX idx_midjourneys_finish_time (finish_time), INDEX idx_midjourneys_status (status), \
             INDEX idx_midjourneys_progress (progress))",
        ],
        Server::Postgres => vec![
            "CREATE TABLE tasks (id bigserial, created_at bigint, updated_at bigint, \
             task_id varchar(191), platform varchar(30), user_id bigint, \"group\" varchar(50), \
             channel_id bigint, quota bigint, action varchar(40), status varchar(20), \
             fail_reason text, submit_time bigint, start_time bigint, finish_time bigint, \
             progress varchar(20), properties json, private_data json, data json, PRIMARY KEY (id))",
            "CREATE INDEX idx_tasks_status ON tasks (status)",
            "CREATE INDEX idx_tasks_submit_time ON tasks (submit_time)",
            "CREATE TABLE midjourneys (id bigserial, code bigint, user_id bigint, \
             action varchar(40), mj_id text, prompt text, prompt_en text, description text, \
             state text, submit_time bigint, start_time bigint, finish_time bigint, image_url text, \
             video_url text, video_urls text, status varchar(20), progress varchar(30), \
             fail_reason text, channel_id bigint, quota bigint, token_id bigint DEFAULT 0, \
             billing_channel_id bigint DEFAULT 0, buttons text, properties text, PRIMARY KEY (id))",
            "CREATE INDEX idx_midjourneys_status ON midjourneys (status)",
            "CREATE INDEX idx_midjourneys_submit_time ON midjourneys (submit_time)",
        ],
    }
}

/// (platform, status, progress, submitted, finished) relative to now.
fn rows(now: i64) -> Vec<String> {
    [
        // kling: two finished in the last day (300 s and 900 s: usual 600 s), one finished two
        // days ago (not counted), two in flight (the oldest submitted 4,000 s ago), one marked
        // IN_PROGRESS but at 100% (the gateway counts it as done).
        ("kling", "SUCCESS", "100%", -5000, -4700),
        ("kling", "FAILURE", "100%", -3000, -2100),
        ("kling", "SUCCESS", "100%", -200_000, -190_000),
        ("kling", "IN_PROGRESS", "40%", -4000, 0),
        ("kling", "QUEUED", "0%", -100, 0),
        ("kling", "IN_PROGRESS", "100%", -9000, 0),
        // suno: one queued, none finished.
        ("suno", "SUBMITTED", "0%", -60, 0),
    ]
    .iter()
    .map(|(p, st, pr, sub, fin)| {
        let finish = if *fin == 0 { 0 } else { now + fin };
        format!(
            "INSERT INTO tasks (created_at, updated_at, task_id, platform, user_id, channel_id, \
             quota, action, status, submit_time, start_time, finish_time, progress) \
             VALUES ({s}, {s}, 't', '{p}', 1, 7, 0, 'generate', '{st}', {s}, {s}, {finish}, '{pr}')",
            s = now + sub
        )
    })
    .chain(
        // Midjourney jobs, times in milliseconds: finished in 1,000 s and 200 s (usual 600 s),
        // three in flight (the oldest submitted 7,000 s ago, one waiting for the user), one
        // at 100% that the gateway counts as done.
        [
            ("SUCCESS", "100%", -5000, -4000),
            ("FAILURE", "100%", -3000, -2800),
            ("IN_PROGRESS", "50%", -7000, 0),
            ("SUBMITTED", "0%", -100, 0),
            ("MODAL", "0%", -50, 0),
            ("IN_PROGRESS", "100%", -9000, 0),
        ]
        .iter()
        .map(|(st, pr, sub, fin)| {
            let finish = if *fin == 0 { 0 } else { (now + fin) * 1000 };
            format!(
                "INSERT INTO midjourneys (code, user_id, action, mj_id, status, progress, \
                 submit_time, start_time, finish_time, channel_id, quota) \
                 VALUES (1, 1, 'IMAGINE', 'mj', '{st}', '{pr}', {s}, {s}, {finish}, 8, 0)",
                s = (now + sub) * 1000
            )
        }),
    )
    .collect()
}

fn check(samples: &[Sample], what: &str) {
    let flying = series(samples, "newapi_tasks_in_flight");
    let expected: Vec<(Labels, f64)> = vec![
        (
            labels(&[("platform", "kling"), ("status", "IN_PROGRESS")]),
            1.0,
        ),
        (labels(&[("platform", "kling"), ("status", "QUEUED")]), 1.0),
        (
            labels(&[("platform", "suno"), ("status", "SUBMITTED")]),
            1.0,
        ),
        (
            labels(&[("platform", "midjourney"), ("status", "IN_PROGRESS")]),
            1.0,
        ),
        (
            labels(&[("platform", "midjourney"), ("status", "SUBMITTED")]),
            1.0,
        ),
        (
            labels(&[("platform", "midjourney"), ("status", "MODAL")]),
            1.0,
        ),
    ];
    let mut got: Vec<(Labels, f64)> = flying.into_iter().collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let mut want = expected;
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, want, "{what}");
    let age = series(samples, "newapi_tasks_oldest_in_flight_age_seconds");
    assert_eq!(
        age.get(&labels(&[("platform", "kling")])),
        Some(&4000.0),
        "{what}"
    );
    assert_eq!(
        age.get(&labels(&[("platform", "suno")])),
        Some(&60.0),
        "{what}"
    );
    assert_eq!(
        age.get(&labels(&[("platform", "midjourney")])),
        Some(&7000.0),
        "{what}"
    );
    let usual = series(samples, "newapi_tasks_usual_duration_seconds");
    assert_eq!(
        usual.into_iter().collect::<Vec<_>>(),
        vec![
            (labels(&[("platform", "kling")]), 600.0),
            (labels(&[("platform", "midjourney")]), 600.0)
        ],
        "{what}"
    );
}

#[test]
fn async_jobs_are_read_on_every_engine() {
    let now = unix_now();
    on_every_engine(
        "async_jobs_are_read_on_every_engine",
        ddl,
        &rows(now),
        |c, what| check(&poll_at(c, now), what),
    );
}
