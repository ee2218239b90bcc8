use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Result;
use clap::Parser;

use newapi_exporter::cli::{Cli, Command, DbArgs, DemoArgs, LogArgs, LogFormat, ServeArgs};
use newapi_exporter::db::Sources;
use newapi_exporter::db::sqlite::SqliteDb;
use newapi_exporter::schema::Schema;
use newapi_exporter::{demo, serve};

fn init_logging(log: &LogArgs) {
    let builder = tracing_subscriber::fmt()
        .with_max_level(log.level)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
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
    let poller = serve::poller_for(&args.db, stop.clone());
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
        chunk_rows: 20_000,
    };
    let poller = serve::poller_for(&db, stop.clone());
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
    let mut src = Sources::new(Box::new(SqliteDb::open(&args.sqlite_path)?), None);
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
