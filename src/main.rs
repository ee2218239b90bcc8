use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Result;
use clap::Parser;

use newapi_exporter::cli::{
    BackfillArgs, Cli, Command, DbArgs, DemoArgs, LogArgs, LogFormat, RangeArgs, ReconcileArgs,
    ServeArgs,
};
use newapi_exporter::db::Sources;
use newapi_exporter::reconcile::{self, HOUR, Report, hour_of};
use newapi_exporter::schema::Schema;
use newapi_exporter::{backfill, demo, poller, report, serve};

fn init_logging(log: &LogArgs) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // The database drivers report each failed connection attempt themselves; the exporter
    // already says once per outage what failed, so theirs show only when debugging.
    let drivers = if log.log_level >= tracing::Level::DEBUG {
        log.log_level
    } else {
        tracing::Level::ERROR
    };
    let filter = Targets::new()
        .with_default(log.log_level)
        .with_target("sqlx", drivers)
        .with_target("rustls", drivers);
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match log.log_format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(layer)
            .with(filter)
            .init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(layer.json())
            .with(filter)
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let result = match cli.command {
        None => run_serve(cli.serve),
        Some(Command::Serve(args)) => run_serve(args),
        Some(Command::Demo(args)) => run_demo(args),
        Some(Command::Check(args)) => run_check(&args),
        Some(Command::Reconcile(args)) => run_reconcile(&args),
        Some(Command::Backfill(args)) => run_backfill(&args),
        Some(Command::Generate(args)) => {
            let started = std::time::Instant::now();
            newapi_exporter::generate::generate(&args.db, args.rows, args.days).map(|()| {
                println!(
                    "wrote {} log rows to {} in {:.1?}",
                    args.rows,
                    args.db.display(),
                    started.elapsed()
                )
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("newapi-exporter: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn run_serve(args: ServeArgs) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let poller = serve::poller_for(&args.db, &args.window, &args.series, stop.clone())?;
    runtime()?.block_on(serve::run(&args.web, poller, stop))
}

fn run_demo(args: DemoArgs) -> Result<()> {
    demo::prepare(&args.db, args.history)?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer_stop = stop.clone();
    let path = args.db.clone();
    let rate = args.rate;
    let writer = std::thread::Builder::new()
        .name("demo-gateway".into())
        .spawn(move || demo::write_live(&path, rate, writer_stop, 7))?;
    let db = DbArgs {
        sqlite_path: args.db.clone(),
        sql_dsn: None,
        log_sql_dsn: None,
        chunk_rows: newapi_exporter::collect::DEFAULT_CHUNK_ROWS,
    };
    let poller = serve::poller_for(&db, &args.window, &args.series, stop.clone())?;
    tracing::info!(
        "demo gateway writing {rate} requests/s into {}",
        args.db.display()
    );
    runtime()?.block_on(serve::run(&args.web, poller, stop))?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("demo writer thread panicked"))?
}

fn run_check(args: &DbArgs) -> Result<()> {
    let mut src = open_db(args)?;
    let schema = Schema::detect(&mut src)?;
    println!("database: {}", src.describe());
    println!("schema:   {}", schema.flavor);
    let optional = ["channel_id", "group", "use_time", "other", "request_id"];
    let missing: Vec<_> = optional.iter().filter(|c| !schema.logs.has(c)).collect();
    if !missing.is_empty() {
        println!("logs lacks optional columns (labels degrade): {missing:?}");
    }
    for (table, cols) in [
        ("quota_data", &schema.quota_data),
        ("channels", &schema.channels),
        ("options", &schema.options),
    ] {
        println!(
            "{table}: {}",
            if cols.is_some() { "present" } else { "absent" }
        );
    }
    let top = src.logs().query("SELECT MAX(id) FROM logs", &[])?;
    println!(
        "highest logs.id: {}",
        top.first()
            .and_then(|r| r.first())
            .map(|v| v.to_label())
            .unwrap_or_default()
    );
    Ok(())
}

fn open_db(db: &DbArgs) -> Result<Sources> {
    let (main, logs) = serve::db_configs(db)?;
    serve::open(&main, &logs)
}

/// Reconciles the requested range (default: all history up to the end of the current hour).
fn reconcile_range(src: &mut Sources, db: &DbArgs, range: &RangeArgs) -> Result<Report> {
    let since = range.since.unwrap_or(0);
    let until = range
        .until
        .unwrap_or_else(|| hour_of(poller::unix_now()) + HOUR);
    anyhow::ensure!(
        since < until,
        "--since ({since}) must be before --until ({until})"
    );
    reconcile::run_once(
        src,
        since,
        until,
        range.settle.margin.as_secs() as i64,
        db.chunk_rows,
    )
}

fn run_reconcile(args: &ReconcileArgs) -> Result<()> {
    let mut src = open_db(&args.db)?;
    let r = reconcile_range(&mut src, &args.db, &args.range)?;
    print!("{}", report::render(&r, args.format));
    Ok(())
}

fn run_backfill(args: &BackfillArgs) -> Result<()> {
    let mut src = open_db(&args.db)?;
    let r = reconcile_range(&mut src, &args.db, &args.range)?;
    if r.until > r.settled_until {
        println!(
            "hours from {} on are not settled yet (the gateway may still flush them until hour end + \
             DataExportInterval + the margin): left alone",
            report::rfc3339(r.settled_until)
        );
    }
    let fixes = backfill::plan(&mut src, &r)?;
    if fixes.is_empty() {
        println!("nothing to write: quota_data has no deficit in the settled hours of this range");
        return Ok(());
    }
    println!("hour                  user_id  username  model  +requests  +quota  +tokens");
    for f in &fixes {
        println!(
            "{}  {}  {:?}  {:?}  +{}  +{}  +{}",
            report::rfc3339(f.hour),
            f.user_id,
            f.username,
            f.model,
            f.requests,
            f.quota,
            f.tokens
        );
    }
    let (req, quota): (i64, i64) = fixes
        .iter()
        .fold((0, 0), |a, f| (a.0 + f.requests, a.1 + f.quota));
    if !args.apply {
        println!(
            "dry run: would add {req} requests and {quota} quota in {} rows; run again with --apply to write",
            fixes.len()
        );
        return Ok(());
    }
    let written = backfill::apply(src.main(), &fixes)?;
    println!("wrote {written} quota_data rows: added {req} requests and {quota} quota");
    Ok(())
}
