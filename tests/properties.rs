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
