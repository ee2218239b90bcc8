//! Benchmarks that print figures (see docs/benchmarks.md for results and how to read them).
//!
//!   cargo bench --bench exporter -- [cold-start|poll|scrape|rss|writer|query-exporter|clickhouse|engines|all|soak]
//!
//! Databases are generated once into target/bench-data/ with `newapi-exporter generate`.

mod clickhouse;
mod engines;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use newapi_exporter::collect::Settings;
use newapi_exporter::poll::Poller;
use newapi_exporter::poll::sqlite_connector;
use newapi_exporter::snapshot::Shared;

const BIN: &str = env!("CARGO_BIN_EXE_newapi-exporter");

fn data_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A generated database of `rows` log rows over 30 days, made once and reused.
fn database(rows: i64) -> PathBuf {
    database_over(rows, 30)
}

/// A generated database of `rows` log rows spread over `days`, made once and reused.
fn database_over(rows: i64, days: i64) -> PathBuf {
    let name = if days == 30 {
        format!("logs-{rows}.db")
    } else {
        format!("logs-{rows}-{days}d.db")
    };
    let path = data_dir().join(name);
    if !path.exists() {
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let t = Instant::now();
        let ok = Command::new(BIN)
            .args([
                "generate",
                "--rows",
                &rows.to_string(),
                "--days",
                &days.to_string(),
                // The figures in docs/benchmarks.md are on the older generation's tables.
                "--generation",
                "older",
                "--db",
            ])
            .arg(&tmp)
            .status()
            .unwrap();
        assert!(ok.success(), "generate failed");
        std::fs::rename(&tmp, &path).unwrap();
        println!("generated {rows} rows in {:.1?}", t.elapsed());
    }
    path
}

/// A copy that a scenario may write to.
fn scratch_copy(rows: i64, days: i64, name: &str) -> PathBuf {
    let src = database_over(rows, days);
    let dst = data_dir().join(format!("{name}-{rows}-{days}d.db"));
    std::fs::copy(&src, &dst).unwrap();
    dst
}

struct Exporter {
    child: Child,
    addr: String,
}

impl Exporter {
    fn start(db: &Path, extra: &[&str]) -> Exporter {
        let mut args = vec!["--sqlite-path", db.to_str().unwrap()];
        args.extend_from_slice(extra);
        Self::start_with(&args)
    }

    /// An exporter on the database `args` name.
    fn start_with(args: &[&str]) -> Exporter {
        let mut child = Command::new(BIN)
            .args(["--web.listen-address", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("exporter output").unwrap();
            if let Some(rest) = line.split("listening on http://").nth(1) {
                break rest.split('/').next().unwrap().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Exporter { child, addr }
    }

    fn ready(&self) -> bool {
        ureq::get(format!("http://{}/-/ready", self.addr))
            .call()
            .is_ok()
    }

    fn wait_ready(&self) -> Duration {
        let t = Instant::now();
        while !self.ready() {
            std::thread::sleep(Duration::from_millis(2));
        }
        t.elapsed()
    }

    /// Polls made so far (the poll-time histogram's count).
    fn polls(&self) -> f64 {
        let body = ureq::get(format!("http://{}/metrics", self.addr))
            .call()
            .map(|mut r| r.body_mut().read_to_string().unwrap_or_default())
            .unwrap_or_default();
        body.lines()
            .find_map(|l| l.strip_prefix("newapi_exporter_poll_duration_seconds_count "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The aggregate the exporter's cold start computes, as one statement for the sqlite3 shell.
const EQUIVALENT_GROUP_BY: &str = "SELECT type, model_name, channel_id, `group`, \
   CASE WHEN created_at >= strftime('%s','now') - 90000 THEN created_at - created_at % 3600 END, \
   CASE WHEN created_at >= strftime('%s','now') - 90000 THEN user_id END, \
   CASE WHEN type = 2 AND prompt_tokens = 0 AND completion_tokens = 0 AND COALESCE(request_id, '') = '' \
        AND other LIKE '%pre_consumed_quota%' THEN 1 ELSE 0 END, \
   COUNT(*), SUM(CASE WHEN quota > 0 THEN quota ELSE 0 END), SUM(CASE WHEN quota < 0 THEN -quota ELSE 0 END), \
   SUM(prompt_tokens), SUM(completion_tokens), SUM(use_time), SUM(quota), MIN(created_at), MAX(created_at), MIN(id) \
   FROM logs GROUP BY 1, 2, 3, 4, 5, 6, 7;";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn cold_start() {
    println!("\n== cold start to ready vs sqlite3 running the equivalent GROUP BY");
    for rows in [1_000_000, 10_000_000] {
        let db = database(rows);
        // Warm the page cache the same way for both.
        let _ = std::fs::read(&db);
        let mut reference = Command::new("sqlite3");
        reference.arg(&db).arg(EQUIVALENT_GROUP_BY);
        let db_arg = db.to_str().unwrap();
        let (s, o) = cold_start_against(&mut reference, &["--sqlite-path", db_arg], 3);
        println!(
            "{rows:>9} rows: sqlite3 {s:.2} s, exporter {o:.2} s to ready, ratio {:.2} (target <= 1.5)",
            o / s
        );
    }
}

/// Runs `reference` (output discarded) and starts an exporter with `args` until it is ready,
/// `runs` times each, alternately; the medians in seconds.
fn cold_start_against(reference: &mut Command, args: &[&str], runs: usize) -> (f64, f64) {
    let mut theirs = Vec::new();
    let mut ours = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let status = reference.stdout(Stdio::null()).status().unwrap();
        assert!(status.success(), "{reference:?} failed");
        theirs.push(t.elapsed().as_secs_f64());
        let started = Instant::now();
        let e = Exporter::start_with(args);
        e.wait_ready();
        ours.push(started.elapsed().as_secs_f64());
    }
    (median(theirs), median(ours))
}

fn insert_rows(db: &Path, n: i64) {
    let conn = newapi_exporter::demo::gateway::gateway_connection(db).unwrap();
    let now = newapi_exporter::clock::unix_now();
    conn.execute_batch(&format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n})
         INSERT INTO logs (user_id, created_at, type, content, username, model_name, quota, prompt_tokens,
                           completion_tokens, use_time, channel_id, `group`, request_id, other)
         SELECT i % 300, {now}, 2, 'model ratio 1.25, group ratio 1', 'user' || (i % 300), 'gpt-4o',
                1000 + i % 500, 500, 100, 3, 1 + i % 2, 'default', printf('req-new-%d', i), '{{\"model_ratio\":1.25}}'
         FROM n;"
    ))
    .unwrap();
}

fn poll() {
    println!(
        "\n== one poll ingesting 10k new rows (same traffic per hour; 3 vs 30 days of history)"
    );
    let mut results = Vec::new();
    for (rows, days) in [(1_000_000, 3), (10_000_000, 30)] {
        let db = scratch_copy(rows, days, "poll");
        let shared = Shared::default();
        let mut p = Poller::new(
            sqlite_connector(db.clone()),
            db.display().to_string(),
            Settings::default(),
            Arc::new(AtomicBool::new(false)),
        );
        p.poll_once(&shared); // cold start
        let mut times = Vec::new();
        for _ in 0..5 {
            insert_rows(&db, 10_000);
            let t = Instant::now();
            p.poll_once(&shared);
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let m = median(times);
        println!(
            "{rows:>9} rows over {days:>2} days: {m:.1} ms per poll of 10k new rows (median of 5)"
        );
        results.push(m);
        let _ = std::fs::remove_file(&db);
    }
    println!(
        "ratio 10M/1M {:.2} (target <= 1.5), target < 50 ms",
        results[1] / results[0]
    );
}

/// A database whose scrape has about 5,000 series.
fn many_series_db() -> PathBuf {
    let path = data_dir().join("series-5k.db");
    if path.exists() {
        return path;
    }
    let gw = newapi_exporter::demo::gateway::Gateway::create(
        &path,
        newapi_exporter::demo::gateway::Tables::NewApiOlder,
    )
    .unwrap();
    let now = newapi_exporter::clock::unix_now();
    // 110 models x 5 channels = 550 label sets; ~9 series each across the usage metrics.
    gw.conn
        .execute_batch(&format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000)
             INSERT INTO logs (user_id, created_at, type, model_name, quota, prompt_tokens, completion_tokens,
                               use_time, channel_id, `group`)
             SELECT i % 50, {now} - 3600 + i % 3000, CASE WHEN i % 40 = 0 THEN 5 WHEN i % 97 = 0 THEN 6 ELSE 2 END,
                    'model-' || (i % 110), 10, 5, 5, 1, 1 + (i / 110) % 5, 'default' FROM n;"
        ))
        .unwrap();
    path
}

fn scrape() {
    println!("\n== /metrics under 50 concurrent clients");
    let db = many_series_db();
    let e = Exporter::start(&db, &[]);
    e.wait_ready();
    let body = ureq::get(format!("http://{}/metrics", e.addr))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let series = body.lines().filter(|l| !l.starts_with('#')).count();
    let url = format!("http://{}/metrics", e.addr);
    let per_client = 200;
    let started = Instant::now();
    let handles: Vec<_> = (0..50)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let agent = ureq::Agent::new_with_defaults();
                let mut lat = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let t = Instant::now();
                    let mut r = agent.get(&url).call().unwrap();
                    let _ = r.body_mut().read_to_vec().unwrap();
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                lat
            })
        })
        .collect();
    let lat: Vec<f64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let total = started.elapsed().as_secs_f64();
    println!(
        "{series} series, {} KiB per scrape; {} requests in {total:.1} s ({:.0}/s): median {:.2} ms, p99 {:.2} ms (target p99 <= 50 ms)",
        body.len() / 1024,
        lat.len(),
        lat.len() as f64 / total,
        median(lat.clone()),
        percentile(lat, 0.99)
    );
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss() {
    println!("\n== peak memory");
    for rows in [1_000_000, 10_000_000] {
        let db = database(rows);
        let e = Exporter::start(&db, &["--poll-interval", "1s"]);
        e.wait_ready();
        std::thread::sleep(Duration::from_secs(3)); // a few incremental polls and scrapes
        let _ = ureq::get(format!("http://{}/metrics", e.addr)).call();
        let kib = vm_hwm_kib(e.pid());
        println!(
            "{rows:>9} rows: peak RSS {:.1} MiB (target <= 64 MiB at 10M)",
            kib as f64 / 1024.0
        );
    }
}

/// A gateway-like writer at `rate` inserts/s for `secs`: (latencies in ms, errors).
fn writer(db: &Path, rate: f64, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(Vec<f64>, u64)> {
    let db = db.to_path_buf();
    std::thread::spawn(move || {
        let conn = newapi_exporter::demo::gateway::gateway_connection(&db).unwrap();
        let gap = Duration::from_secs_f64(1.0 / rate);
        let mut lat = Vec::new();
        let mut errors = 0;
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let r = conn.execute(
                "INSERT INTO logs (user_id, created_at, type, model_name, quota, prompt_tokens, completion_tokens, channel_id, `group`)
                 VALUES (1, strftime('%s','now'), 2, 'live', 10, 3, 4, 1, 'default')",
                [],
            );
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
            if r.is_err() {
                errors += 1;
            }
            next += gap;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        (lat, errors)
    })
}

fn writer_during_cold_start() {
    println!("\n== a gateway-like writer at 200 inserts/s during a cold start on 5M rows");
    let db = scratch_copy(5_000_000, 30, "writer");
    let _ = std::fs::read(&db);
    // With the exporter cold-starting.
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(&db, 200.0, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let e = Exporter::start(&db, &[]);
    let took = e.wait_ready();
    stop.store(true, Ordering::Relaxed);
    let (with, errors_with) = w.join().unwrap();
    drop(e);
    // The same time without it.
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(&db, 200.0, stop.clone());
    std::thread::sleep(took + Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (without, errors_without) = w.join().unwrap();
    println!(
        "cold start {took:.1?}; with the exporter: {} inserts, {errors_with} errors, p99 {:.2} ms, max {:.2} ms; \
         without: {} inserts, {errors_without} errors, p99 {:.2} ms, max {:.2} ms",
        with.len(),
        percentile(with.clone(), 0.99),
        percentile(with, 1.0),
        without.len(),
        percentile(without.clone(), 0.99),
        percentile(without, 1.0),
    );
    let _ = std::fs::remove_file(&db);
}

/// CPU time of a process, in seconds: the scheduler's per-thread run time (sub-millisecond),
/// summed over its threads; `/proc/PID/stat` (10 ms ticks) where the kernel does not show it.
/// An idle exporter uses a few ticks in minutes, too few for tick counts to tell apart.
fn cpu_seconds(pid: u32) -> f64 {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    let mut ms = 0.0;
    let mut found = false;
    for t in threads.flatten() {
        let Ok(sched) = std::fs::read_to_string(t.path().join("sched")) else {
            continue;
        };
        if let Some(v) = sched
            .lines()
            .find(|l| l.starts_with("se.sum_exec_runtime"))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            ms += v;
            found = true;
        }
    }
    if found {
        return ms / 1000.0;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn query_exporter() {
    println!("\n== CPU per hour vs query-exporter (same database, same aggregate, 15 s interval)");
    let Ok(qe) = which("query-exporter") else {
        println!("query-exporter is not installed: pip install query-exporter");
        return;
    };
    let db = database(1_000_000);
    let minutes: u64 = std::env::var("BENCH_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(4);
    let config = data_dir().join("query-exporter.yaml");
    std::fs::write(
        &config,
        format!(
            "databases:\n  gateway:\n    dsn: sqlite:///{}\n\
             metrics:\n  requests:\n    type: gauge\n    description: requests\n    labels: [model, channel, grp]\n\
             queries:\n  usage:\n    interval: 15\n    databases: [gateway]\n    metrics: [requests]\n\
             \x20   sql: SELECT model_name AS model, channel_id AS channel, \"group\" AS grp, COUNT(*) AS requests FROM logs WHERE type = 2 GROUP BY 1, 2, 3\n",
            db.display()
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut q = Command::new(qe)
        .args(["--config"])
        .arg(&config)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let e = Exporter::start(&db, &["--poll-interval", "15s"]);
    e.wait_ready();
    std::thread::sleep(Duration::from_secs(5));
    let (ours0, theirs0) = (cpu_seconds(e.pid()), cpu_seconds(q.id()));
    std::thread::sleep(Duration::from_secs(60 * minutes));
    let (ours1, theirs1) = (cpu_seconds(e.pid()), cpu_seconds(q.id()));
    let _ = q.kill();
    let _ = q.wait();
    let scale = 60.0 / minutes as f64;
    let (ours, theirs) = ((ours1 - ours0) * scale, (theirs1 - theirs0) * scale);
    println!(
        "over {minutes} min, per hour: newapi-exporter {ours:.2} CPU s, query-exporter {theirs:.1} CPU s, ratio {:.0}x (target >= 100x)",
        theirs / ours.max(0.01)
    );
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

/// VmRSS of a process, in KiB.
fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The sum and count of the poll-duration histogram in a scrape.
fn poll_totals(addr: &str) -> (f64, f64) {
    let text = ureq::get(format!("http://{addr}/metrics"))
        .call()
        .map(|mut r| r.body_mut().read_to_string().unwrap_or_default())
        .unwrap_or_default();
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (
        value("newapi_exporter_poll_duration_seconds_sum"),
        value("newapi_exporter_poll_duration_seconds_count"),
    )
}

/// The demo gateway writing 50 requests/s while the exporter polls every second, for
/// `BENCH_SOAK_MINUTES` (default 30): RSS and mean poll time per minute, first and last five.
fn soak() {
    let minutes: u64 = std::env::var("BENCH_SOAK_MINUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    println!("\n== soak: demo gateway at 50 requests/s, poll every 1 s, {minutes} minutes");
    let db = data_dir().join("soak.db");
    let _ = std::fs::remove_file(&db);
    newapi_exporter::demo::create(&db, Duration::from_secs(6 * 3600), 42).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let gateway = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || newapi_exporter::demo::write_live(&db, 50.0, stop, 9))
    };
    let e = Exporter::start(&db, &["--poll-interval", "1s"]);
    e.wait_ready();
    let mut rows = Vec::new();
    let mut last = poll_totals(&e.addr);
    for minute in 1..=minutes {
        std::thread::sleep(Duration::from_secs(60));
        let now = poll_totals(&e.addr);
        let polls = now.1 - last.1;
        let mean_ms = if polls > 0.0 {
            (now.0 - last.0) / polls * 1000.0
        } else {
            0.0
        };
        rows.push((minute, vm_rss_kib(e.pid()) as f64 / 1024.0, polls, mean_ms));
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = gateway.join();
    let shown: Vec<_> = if rows.len() > 10 {
        rows[..5].iter().chain(&rows[rows.len() - 5..]).collect()
    } else {
        rows.iter().collect()
    };
    println!("minute  RSS MiB  polls  mean poll ms");
    for (m, rss, polls, ms) in shown {
        println!("{m:>6}  {rss:>7.1}  {polls:>5}  {ms:>12.2}");
    }
}

fn main() {
    let arg = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| "all".into());
    let all = arg == "all";
    if all || arg == "cold-start" {
        cold_start();
    }
    if all || arg == "poll" {
        poll();
    }
    if all || arg == "scrape" {
        scrape();
    }
    if all || arg == "rss" {
        rss();
    }
    if all || arg == "writer" {
        writer_during_cold_start();
    }
    if all || arg == "query-exporter" {
        query_exporter();
    }
    if all || arg == "clickhouse" {
        clickhouse::run();
    }
    if all || arg == "engines" {
        engines::run();
    }
    // Thirty minutes by default: run on its own.
    if arg == "soak" {
        soak();
    }
}
