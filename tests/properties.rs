//! Property tests: label values of any content survive the exposition format, and any DSN
//! string parses without panicking and never shows its password.

use std::path::Path;

use crate::common::*;
use newapi_exporter::db::dsn::{DbConfig, MysqlNet};
use newapi_exporter::demo::gateway::Tables;
use newapi_exporter::demo::gateway::{Gateway, LogRow};
use newapi_exporter::metrics::Family;
use proptest::prelude::*;

fn render(values: &[String]) -> String {
    let mut f = Family::of(&newapi_exporter::metrics::REQUESTS_TOTAL);
    for (i, v) in values.iter().enumerate() {
        f.sample(&[("model", v.as_str()), ("n", &i.to_string())], i as f64);
    }
    let mut out = Vec::new();
    f.finish(&mut out);
    let mut text = String::new();
    prometheus::TextEncoder::new()
        .encode_utf8(&out, &mut text)
        .unwrap();
    text
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever a model name holds (quotes, backslashes, newlines, unicode, control
    /// characters), the scrape carries it back exactly and on one line per sample.
    #[test]
    fn label_values_round_trip(values in proptest::collection::vec(any::<String>(), 1..8)) {
        let text = render(&values);
        let samples = parse_metrics(&text);
        prop_assert_eq!(samples.len(), values.len());
        for s in samples {
            let i: usize = s.labels["n"].parse().unwrap();
            prop_assert_eq!(&s.labels["model"], &values[i]);
            prop_assert_eq!(s.value, i as f64);
        }
        prop_assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), values.len());
    }

    /// Any string given as SQL_DSN: an engine or an error, never a panic, never the password.
    #[test]
    fn any_dsn_string_is_handled(dsn in ".{0,80}") {
        let _ = DbConfig::from_dsn(Some(&dsn), Path::new("x.db"));
    }

    /// Well-formed go-sql-driver DSNs parse to their parts; errors and descriptions mask the
    /// password.
    #[test]
    fn mysql_dsns_parse_and_mask(
        user in "[a-z][a-z0-9_]{0,8}",
        password in "PW[A-Za-z0-9@:!#%^&*()_+=-]{4,16}",
        host in "[a-z][a-z0-9.-]{0,12}",
        port in 1u16..,
        db in "[a-z][a-z0-9_-]{0,12}",
        tls in prop_oneof![Just(""), Just("?tls=true"), Just("?tls=skip-verify&charset=utf8mb4")],
    ) {
        let dsn = format!("{user}:{password}@tcp({host}:{port})/{db}{tls}");
        let cfg = DbConfig::from_dsn(Some(&dsn), Path::new("x.db")).unwrap();
        let DbConfig::Mysql(m) = &cfg else { panic!("{dsn} is MySQL") };
        prop_assert_eq!(&m.user, &user);
        prop_assert_eq!(m.password.as_deref(), Some(password.as_str()));
        prop_assert_eq!(&m.net, &MysqlNet::Tcp { host: host.clone(), port });
        prop_assert_eq!(&m.database, &db);
        prop_assert!(!cfg.describe().contains(&password));
        let debug = format!("{:?}", cfg);
        prop_assert!(!debug.contains(&password));
        // A broken variant of the same DSN: its error does not leak the password either.
        let broken = format!("{user}:{password}@tcp({host}:{port}x)/{db}");
        let err = DbConfig::from_dsn(Some(&broken), Path::new("x.db")).unwrap_err();
        prop_assert!(!format!("{err:#}").contains(&password), "{}", err);
    }

    /// A secret in any position a driver reads it from (URL credentials, `password` or
    /// `sslpassword` parameters in any case and order, MySQL credentials, ClickHouse URLs): the
    /// description, the debug form and any parse error never show it.
    #[test]
    fn a_secret_in_any_dsn_position_is_never_shown(
        secret in "S3[A-Za-z0-9_.~-]{6,14}",
        form in 0usize..8,
        key in prop_oneof![Just("password"), Just("PASSWORD"), Just("sslpassword"), Just("Password")],
        extra in prop_oneof![Just(""), Just("sslmode=require&"), Just("application_name=a@b&")],
    ) {
        let dsn = match form {
            0 => format!("postgres://newapi:{secret}@db:5432/newapi?{extra}sslmode=disable"),
            1 => format!("postgres://newapi@db:5432/newapi?{extra}{key}={secret}"),
            2 => format!("postgresql://db/newapi?{extra}user=newapi&{key}={secret}&connect_timeout=5"),
            3 => format!("postgres://newapi:{secret}@db/newapi?{key}={secret}"),
            4 => format!("newapi:{secret}@tcp(db:3306)/newapi?{extra}tls=true"),
            5 => format!("newapi:{secret}@unix(/run/mysqld.sock)/newapi"),
            6 => format!("clickhouse://default:{secret}@clickhouse:9000/new_api_logs"),
            _ => format!("https://default@ch:8443/logs?{extra}{key}={secret}"),
        };
        let shown = newapi_exporter::db::mask_password(&dsn);
        prop_assert!(!shown.contains(&secret), "{}", shown);
        match DbConfig::from_dsn(Some(&dsn), Path::new("x.db")) {
            Ok(cfg) => {
                prop_assert!(!cfg.describe().contains(&secret), "{}", cfg.describe());
                let debug = format!("{:?}", cfg);
                prop_assert!(!debug.contains(&secret), "{}", debug);
            }
            Err(e) => {
                let e = format!("{:#}", e);
                prop_assert!(!e.contains(&secret), "{}", e);
            }
        }
    }

    #[test]
    fn postgres_urls_are_masked(password in "PW[A-Za-z0-9_.~-]{4,16}", host in "[a-z]{1,10}") {
        let url = format!("postgres://newapi:{password}@{host}:5432/newapi?sslmode=require");
        let cfg = DbConfig::from_dsn(Some(&url), Path::new("x.db")).unwrap();
        prop_assert!(!cfg.describe().contains(&password));
        prop_assert!(cfg.describe().contains("newapi:***@"));
    }
}

/// The whole path: random model names written by the gateway come back from a scrape.
#[test]
fn random_model_names_survive_the_whole_path() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let names: Vec<String> = (0..150)
        .map(|_| any::<String>().new_tree(&mut runner).unwrap().current())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    let mut gw = Gateway::create(&db, Tables::NewApiOlder).unwrap();
    for (i, name) in names.iter().enumerate() {
        let row = LogRow {
            user_id: 1,
            created_at: 1_767_225_600 + i as i64,
            log_type: 2,
            model_name: name.clone(),
            quota: 1,
            channel_id: 1,
            ..LogRow::default()
        };
        gw.record(&row, false, 0).unwrap();
    }
    let s = InProcess::new(&db).poll();
    let mut got: Vec<String> = series(&s, "newapi_requests_total")
        .keys()
        .map(|l| l["model"].clone())
        .collect();
    // SQLite TEXT keeps any UTF-8, NUL included, so every name is its own series.
    let mut want = names.clone();
    want.sort();
    want.dedup();
    got.sort();
    assert_eq!(got, want);
}

/// A time a row may hold: plausible, milliseconds, or anything at all.
fn any_time() -> impl Strategy<Value = i64> {
    let now = newapi_exporter::clock::unix_now();
    prop_oneof![
        4 => (now - 30 * 3600)..(now + 3600),
        1 => 1_577_836_800_000i64..1_900_000_000_000,
        1 => any::<i64>(),
        1 => Just(i64::MAX),
        1 => Just(i64::MIN),
    ]
}

/// An amount a row may hold: ordinary, or anything at all.
fn any_amount() -> impl Strategy<Value = i64> {
    prop_oneof![4 => 0i64..100_000, 1 => any::<i64>(), 1 => Just(i64::MAX), 1 => Just(i64::MIN)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Arbitrary rows in both tables: every poll ends quickly without a panic, the exporter
    /// stays up, and exactly the rows the plausibility rules name are set aside.
    #[test]
    fn arbitrary_rows_never_stall_a_poll(
        current in any::<bool>(),
        logs in proptest::collection::vec((any_time(), any_amount(), any_amount(), 0i64..8), 0..40),
        qd in proptest::collection::vec((any_time(), any_amount(), any_amount()), 0..40),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("fuzz.db");
        let tables = if current { Tables::NewApiCurrent } else { Tables::NewApiOlder };
        let gw = Gateway::create(&db, tables).unwrap();
        let now = newapi_exporter::clock::unix_now();
        let mut expected: std::collections::BTreeMap<(String, String), f64> = Default::default();
        let mut expect = |table: &str, created_at: i64, amounts: &[i64]| {
            // The poll runs a moment later than this: a row dated right at the edge of the
            // plausible future could be judged either way, so none is generated there.
            if let Some(r) = newapi_exporter::collect::plausible::Reason::of_row(created_at, amounts, now) {
                *expected.entry((table.to_string(), r.as_str().to_string())).or_default() += 1.0;
            }
        };
        for (t, quota, tokens, ty) in &logs {
            gw.conn.execute(
                "INSERT INTO logs (user_id, username, created_at, type, model_name, quota, prompt_tokens,
                   completion_tokens, channel_id, `group`) VALUES (1, 'u', ?1, ?2, 'm', ?3, ?4, 1, 1, 'g')",
                rusqlite::params![t, ty, quota, tokens],
            ).unwrap();
            expect("logs", *t, &[*quota, *tokens, 1]);
        }
        for (t, count, quota) in &qd {
            gw.conn.execute(
                "INSERT INTO quota_data (user_id, username, model_name, created_at, token_used, count, quota)
                 VALUES (1, 'u', 'm', ?1, 1, ?2, ?3)",
                rusqlite::params![t, count, quota],
            ).unwrap();
            expect("quota_data", *t, &[*count, *quota, 1]);
        }
        let edge = |t: i64| t.saturating_sub(now + 86_400).unsigned_abs() < 120;
        prop_assume!(!logs.iter().any(|r| edge(r.0)) && !qd.iter().any(|r| edge(r.0)));
        let mut exp = InProcess::new(&db);
        for _ in 0..2 {
            let started = std::time::Instant::now();
            let samples = exp.poll();
            prop_assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
            prop_assert_eq!(series(&samples, "newapi_up")[&labels(&[])], 1.0);
            let rejected: std::collections::BTreeMap<(String, String), f64> =
                series(&samples, "newapi_exporter_rows_rejected_total")
                    .into_iter()
                    .map(|(l, v)| ((l["table"].clone(), l["reason"].clone()), v))
                    .collect();
            prop_assert_eq!(&rejected, &expected);
        }
    }

    /// Any text as `--web.config.file`: loaded or refused with an error naming the file, never
    /// a panic.
    #[test]
    fn any_web_config_text_is_handled(text in ".{0,200}") {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.yml");
        std::fs::write(&path, &text).unwrap();
        if let Err(e) = newapi_exporter::web::config::WebConfig::load(&path) {
            prop_assert!(format!("{e:#}").contains("web.yml"), "{:#}", e);
        }
    }
}
