use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use newapi_exporter::cli::{Cli, Command, LogArgs, LogFormat};
use newapi_exporter::commands::{backfill, check, reconcile, serve};

fn init_logging(log: &LogArgs) {
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
        .with_target("rustls", drivers)
        // sqlx prints each connection parameter it does not know, value included: a libpq
        // `sslpassword` would reach the log in clear at any level.
        .with_target(
            "sqlx_postgres::options",
            tracing::level_filters::LevelFilter::OFF,
        );
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
        LogFormat::Logfmt => tracing_subscriber::registry()
            .with(
                tracing_logfmt::builder()
                    .layer()
                    .with_writer(std::io::stderr),
            )
            .with(filter)
            .init(),
    }
}

/// Asks the exporter's health probe; an error names the URL and what went wrong.
fn healthcheck(url: &str) -> anyhow::Result<()> {
    let client = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()?;
    let resp = client
        .get(url)
        .send()
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    anyhow::ensure!(resp.status().is_success(), "{url}: {}", resp.status());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let result = match cli.command {
        None => serve::run(cli.serve),
        Some(Command::Serve(args)) => serve::run(args),
        Some(Command::Demo(args)) => serve::run_demo(args),
        Some(Command::Check(args)) => check::run(&args),
        Some(Command::Reconcile(args)) => reconcile::run(&args),
        Some(Command::Backfill(args)) => backfill::run(&args),
        Some(Command::Generate(args)) => serve::run_generate(&args),
        Some(Command::Healthcheck(args)) => healthcheck(&args.url),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("newapi-exporter: {e:#}");
            ExitCode::FAILURE
        }
    }
}
