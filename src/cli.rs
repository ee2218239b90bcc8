//! Command-line interface: the clap types, and their conversion into the settings of the layers
//! below (databases, collectors, report format) in one place. `serve` is the default: its flags
//! also work without a subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, anyhow};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::collect::ledger::RefundRule;
use crate::collect::{DEFAULT_CHUNK_ROWS, LabelSettings, Settings};
use crate::db::dsn::{ClickhouseDsn, DbConfig};
use crate::demo::gateway::Tables;
use crate::reconcile::format::ReportFormat;

/// The listen port: 9100-9999 is fully allocated to other exporters, and 10160 is used by none of
/// the well-known ones.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:10160";

#[derive(Parser, Debug)]
#[command(
    name = "newapi-exporter",
    version,
    about = "Prometheus exporter for the new-api / one-api LLM gateway: billed usage from `logs`, \
             channel state, and the exporter's own health. Reads the gateway's database, never writes it.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Flags of `serve`, accepted without the subcommand.
    #[command(flatten)]
    pub serve: ServeArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve metrics for the gateway's database (the default).
    Serve(ServeArgs),
    /// Create a demo gateway database, keep writing realistic traffic into it the way the
    /// gateway does, and serve the exporter on it.
    Demo(DemoArgs),
    /// Open the database, detect its schema, print what the exporter would read, and exit
    /// (non-zero on any problem).
    Check(DbArgs),
    /// Compare what the gateway billed (logs) with what its dashboard recorded (quota_data),
    /// per model and in total: requests, quota, tokens, newest time, missing, excess, lag.
    Reconcile(ReconcileArgs),
    /// Repair quota_data: add each settled hour's deficit the way the gateway would. Dry run
    /// unless --apply. THE ONLY COMMAND THAT WRITES THE GATEWAY'S DATABASE (quota_data only;
    /// logs is never touched).
    Backfill(BackfillArgs),
    /// Exit 0 when the exporter at --url answers its health probe, 1 otherwise: the container
    /// image's HEALTHCHECK (the minimal image has no curl).
    Healthcheck(HealthcheckArgs),
    /// Write a large, realistic gateway database (for benchmarks): logs with a skewed mix of
    /// models and users, errors, refunds and task settlements, and the matching quota_data.
    Generate(GenerateArgs),
}

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Log rows to write.
    #[arg(long = "rows", default_value_t = 1_000_000, value_name = "N")]
    pub rows: i64,
    /// The new database file.
    #[arg(long = "db", value_name = "PATH")]
    pub db: PathBuf,
    /// Days the rows are spread over, ending now.
    #[arg(long = "days", default_value_t = 30, value_name = "N")]
    pub days: i64,
    /// Which gateway generation's tables to write.
    #[arg(
        long = "generation",
        default_value = "current",
        value_name = "GENERATION"
    )]
    pub generation: GenerationArg,
}

#[derive(Args, Debug, Clone)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub range: RangeArgs,
    /// Output format.
    #[arg(long = "format", default_value = "table", value_name = "FORMAT")]
    pub format: FormatArg,
}

/// Which generation of the gateway the demo and `generate` write.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum GenerationArg {
    /// new-api since 2026-06-20: quota_data per channel, token, group and node.
    Current,
    /// new-api before: quota_data per user, model and hour.
    Older,
}

impl From<GenerationArg> for Tables {
    fn from(g: GenerationArg) -> Self {
        match g {
            GenerationArg::Current => Tables::NewApiCurrent,
            GenerationArg::Older => Tables::NewApiOlder,
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatArg {
    Table,
    Json,
    Csv,
}

impl From<FormatArg> for ReportFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Table => ReportFormat::Table,
            FormatArg::Json => ReportFormat::Json,
            FormatArg::Csv => ReportFormat::Csv,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct BackfillArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub range: RangeArgs,
    /// Write the additions (one transaction per hour). Without it, only print them.
    #[arg(long = "apply")]
    pub apply: bool,
}

#[derive(Args, Debug, Clone)]
pub struct RangeArgs {
    /// Start of the range: unix seconds or RFC 3339 (2025-10-21T16:32:00Z, or with an offset
    /// such as +08:00). Default: all history.
    #[arg(long = "since", value_name = "TIME", value_parser = parse_time)]
    pub since: Option<i64>,
    /// End of the range (exclusive), same forms. Default: the end of the current hour.
    #[arg(long = "until", value_name = "TIME", value_parser = parse_time)]
    pub until: Option<i64>,
    #[command(flatten)]
    pub settle: SettleArgs,
}

#[derive(Args, Debug, Clone, Default)]
pub struct SeriesArgs {
    /// Add a `user` label (the username) to the usage counters. Off by default: one series per
    /// user and model can be many.
    #[arg(long = "labels.user")]
    pub user: bool,

    /// Usage labels to leave out, comma-separated (channel_id, channel_name, group); their
    /// series are summed together. `model` stays: the reconciliation and its alerts join on it
    /// (bound the models with --series.max-per-metric instead).
    #[arg(long = "labels.exclude", value_name = "LABELS", value_delimiter = ',',
          value_parser = parse_excluded_label)]
    pub exclude: Vec<String>,

    /// Most series per metric (label sets, by first appearance); later ones are folded into
    /// one `model="__other__"` series and counted in newapi_exporter_series_folded_total.
    #[arg(long = "series.max-per-metric", value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_per_metric: Option<u64>,
}

impl SeriesArgs {
    pub fn settings(&self) -> LabelSettings {
        LabelSettings {
            user: self.user,
            exclude: self.exclude.iter().cloned().collect(),
            max_series: self.max_per_metric.map(|n| n as usize),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct HealthcheckArgs {
    /// The probe to ask (plain HTTP).
    #[arg(
        long = "url",
        default_value = "http://127.0.0.1:10160/-/healthy",
        value_name = "URL"
    )]
    pub url: String,
}

#[derive(Args, Debug, Clone)]
pub struct WindowArgs {
    /// Settled hours compared by the reconciliation gauges (newapi_quota_data_missing_*, ...).
    #[arg(long = "reconcile.window", default_value = "24h", value_name = "DURATION",
          value_parser = parse_duration)]
    pub window: Duration,
    #[command(flatten)]
    pub settle: SettleArgs,
    /// Window over which the second ledger (channels/users used_quota) is compared with the
    /// logs: the newapi_ledger_* gauges show the last completed one.
    #[arg(long = "ledger.window", default_value = "1h", value_name = "DURATION",
          value_parser = parse_duration)]
    pub ledger_window: Duration,
    /// Whether refunds lower used_quota: `auto` (from the gateway nodes' versions in
    /// system_instances: v1.0.0-rc.22 on), `lower`, or `keep` (older gateways).
    #[arg(long = "ledger.refunds", default_value = "auto", value_enum)]
    pub refunds: RefundsArg,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundsArg {
    Auto,
    Lower,
    Keep,
}

impl From<RefundsArg> for RefundRule {
    fn from(a: RefundsArg) -> Self {
        match a {
            RefundsArg::Auto => RefundRule::Auto,
            RefundsArg::Lower => RefundRule::Lower,
            RefundsArg::Keep => RefundRule::Keep,
        }
    }
}

/// When an hour counts as settled: shared by the gauges and the one-shot commands.
#[derive(Args, Debug, Clone)]
pub struct SettleArgs {
    /// Slack after hour end + DataExportInterval before an hour counts as settled (its
    /// quota_data can no longer change).
    #[arg(long = "reconcile.settle-margin", default_value = "5m", value_name = "DURATION",
          value_parser = parse_duration)]
    pub margin: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct LogArgs {
    /// Log level: error, warn, info, debug or trace.
    #[arg(
        long = "log.level",
        global = true,
        default_value = "info",
        value_name = "LEVEL"
    )]
    pub log_level: tracing::Level,

    /// Log format: text, logfmt (as the official exporters write it) or json.
    #[arg(
        long = "log.format",
        global = true,
        default_value = "text",
        value_name = "FORMAT"
    )]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Logfmt,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct DbArgs {
    /// The gateway's SQLite database (the gateway's SQLITE_PATH; its default is one-api.db in
    /// its working directory, /data/one-api.db in the official image).
    #[arg(
        long = "sqlite-path",
        env = "SQLITE_PATH",
        default_value = "one-api.db",
        value_name = "PATH"
    )]
    pub sqlite_path: PathBuf,

    /// The gateway's SQL_DSN: a MySQL DSN in go-sql-driver form
    /// (user:password@tcp(host:3306)/newapi?tls=true) or a postgres:// URL (sslmode=...).
    /// Unset, or starting with `local`: SQLite at --sqlite-path.
    #[arg(
        long = "sql-dsn",
        env = "SQL_DSN",
        hide_env_values = true,
        value_name = "DSN"
    )]
    pub sql_dsn: Option<String>,

    /// The gateway's LOG_SQL_DSN: `logs` lives in this database instead (same forms, or
    /// ClickHouse: clickhouse://, tcp://, http:// or https://).
    #[arg(
        long = "log-sql-dsn",
        env = "LOG_SQL_DSN",
        hide_env_values = true,
        value_name = "DSN"
    )]
    pub log_sql_dsn: Option<String>,

    /// ClickHouse's HTTP interface, which the exporter reads through, when LOG_SQL_DSN names
    /// the native protocol and HTTP is not on the same host's port 8123 (8443 with TLS).
    #[arg(
        long = "clickhouse.http-url",
        env = "NEWAPI_EXPORTER_CLICKHOUSE_HTTP_URL",
        value_name = "URL"
    )]
    pub clickhouse_http_url: Option<String>,

    /// Most log rows one read statement covers (a primary-key range). On SQLite, smaller
    /// chunks make the gateway's writers wait less; larger ones make the cold start cheaper. On
    /// MySQL and PostgreSQL no writer waits for a reader, and a cold start reads two chunks at
    /// once, one per pooled connection.
    #[arg(long = "db.chunk-rows", default_value_t = DEFAULT_CHUNK_ROWS, value_name = "N",
          value_parser = clap::value_parser!(i64).range(1..))]
    pub chunk_rows: i64,
}

impl DbArgs {
    /// The databases named by the gateway's settings: the main one, and the logs one when
    /// `LOG_SQL_DSN` is set. A malformed DSN is an error here, at start-up.
    pub fn configs(&self) -> Result<(DbConfig, Option<DbConfig>)> {
        let main = DbConfig::from_dsn(self.sql_dsn.as_deref(), &self.sqlite_path)?;
        let logs = match self.log_sql_dsn.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(dsn) if ClickhouseDsn::is_clickhouse(dsn) => Some(DbConfig::Clickhouse(
                ClickhouseDsn::parse(dsn, self.clickhouse_http_url.as_deref())?,
            )),
            Some(dsn) => Some(
                DbConfig::from_dsn(Some(dsn), &self.sqlite_path)
                    .map_err(|e| anyhow!("{}", e.to_string().replace("SQL_DSN", "LOG_SQL_DSN")))?,
            ),
        };
        Ok((main, logs))
    }

    /// The SQLite file at `path`, as the demo gateway writes it.
    pub fn sqlite(path: PathBuf) -> Self {
        DbArgs {
            sqlite_path: path,
            sql_dsn: None,
            log_sql_dsn: None,
            clickhouse_http_url: None,
            chunk_rows: DEFAULT_CHUNK_ROWS,
        }
    }
}

/// The collectors' settings for `serve` and `demo`: the sliding reconciliation window.
pub fn poll_settings(db: &DbArgs, window: &WindowArgs, series: &SeriesArgs) -> Settings {
    Settings {
        chunk_rows: db.chunk_rows,
        window_secs: window.window.as_secs() as i64,
        settle_margin_secs: window.settle.margin.as_secs() as i64,
        fixed_range: None,
        labels: series.settings(),
        ledger_window_secs: (window.ledger_window.as_secs() as i64).max(1),
        refunds: window.refunds.into(),
    }
}

#[derive(Args, Debug, Clone)]
pub struct WebArgs {
    /// Address to listen on for the metrics endpoint and landing page; repeat it to listen on
    /// several. `:10160` (as other exporters take it) means every interface.
    #[arg(long = "web.listen-address", default_value = DEFAULT_LISTEN, value_name = "ADDR",
          value_parser = parse_listen_address, action = clap::ArgAction::Append)]
    pub listen_address: Vec<SocketAddr>,

    /// Path under which metrics are served.
    #[arg(long = "web.telemetry-path", default_value = "/metrics", value_name = "PATH",
          value_parser = parse_telemetry_path)]
    pub telemetry_path: String,

    /// How often the database is read; scrapes serve the result of the last read.
    #[arg(long = "poll-interval", default_value = "15s", value_name = "DURATION",
          value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// TLS and basic authentication for every endpoint, in the Prometheus exporter-toolkit
    /// format (tls_server_config, basic_auth_users with bcrypt hashes).
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub web_config_file: Option<PathBuf>,

    /// Grafana's base URL (e.g. http://grafana:3000): the landing page links to the shipped
    /// dashboards there (by their uids); unset, it links to the dashboards' files.
    #[arg(long = "web.grafana-url", value_name = "URL")]
    pub grafana_url: Option<String>,

    /// Also push the metrics over OTLP to this collector (a base URL, like
    /// OTEL_EXPORTER_OTLP_ENDPOINT). The standard OTEL_* variables apply; off when no endpoint
    /// is set.
    #[arg(long = "otlp.endpoint", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub web: WebArgs,
    #[command(flatten)]
    pub window: WindowArgs,
    #[command(flatten)]
    pub series: SeriesArgs,
}

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Demo database to create (or to continue writing to when it exists).
    #[arg(long = "db", default_value = "newapi-demo.db", value_name = "PATH")]
    pub db: PathBuf,

    /// Simulated requests per second.
    #[arg(long = "rate", default_value_t = 5.0, value_name = "N")]
    pub rate: f64,

    /// History written into a new database before live traffic starts.
    #[arg(long = "history", default_value = "48h", value_name = "DURATION",
          value_parser = parse_duration)]
    pub history: Duration,

    /// Which gateway generation a new demo database imitates (an existing one is continued as
    /// it is).
    #[arg(
        long = "generation",
        default_value = "current",
        value_name = "GENERATION"
    )]
    pub generation: GenerationArg,

    #[command(flatten)]
    pub web: WebArgs,
    #[command(flatten)]
    pub window: WindowArgs,
    #[command(flatten)]
    pub series: SeriesArgs,
}

/// Unix seconds, or RFC 3339 with `Z` or a numeric offset.
pub fn parse_time(s: &str) -> Result<i64, String> {
    let t = parse_any_time(s)?;
    // Hours are computed from it: keep to the years 1970 to 9999 (as RFC 3339 does).
    const LAST: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    if !(0..=LAST).contains(&t) {
        return Err(format!(
            "{:?} is outside the years 1970 to 9999 (unix seconds 0 to {LAST})",
            s.trim()
        ));
    }
    Ok(t)
}

fn parse_any_time(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let bad = |e: &dyn std::fmt::Display| {
        format!("{s:?} is neither unix seconds nor an RFC 3339 time like 2025-10-21T16:32:00Z: {e}")
    };
    // humantime reads UTC only; a numeric offset is applied by hand.
    let (base, offset) = match s
        .len()
        .checked_sub(6)
        .filter(|&i| s.is_char_boundary(i))
        .map(|i| s.split_at(i))
    {
        Some((b, o)) if (o.starts_with('+') || o.starts_with('-')) && o.as_bytes()[3] == b':' => {
            let h: i64 = o[1..3].parse().map_err(|e| bad(&e))?;
            let m: i64 = o[4..6].parse().map_err(|e| bad(&e))?;
            let sign = if o.starts_with('-') { -1 } else { 1 };
            (format!("{b}Z"), sign * (h * 3600 + m * 60))
        }
        _ => (s.to_string(), 0),
    };
    let t = humantime::parse_rfc3339(&base).map_err(|e| bad(&e))?;
    let secs = match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    Ok(secs - offset)
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 15s or 2m: {e}"))?;
    if d.is_zero() {
        return Err("the duration must be greater than zero".into());
    }
    Ok(d)
}

/// A usage label that may be left out. Without `model` the usage counters could not be joined
/// with the per-model reconciliation gauges, and the missing-quota alerts would never fire.
fn parse_excluded_label(s: &str) -> Result<String, String> {
    match s {
        "channel_id" | "channel_name" | "group" => Ok(s.to_string()),
        "model" => Err(
            "model cannot be left out: the missing-quota alerts and the \
                        reconciliation join the usage counters with their per-model gauges on it; \
                        bound the number of models with --series.max-per-metric instead"
                .to_string(),
        ),
        other => Err(format!(
            "{other:?} is not a usage label that can be left out (channel_id, channel_name, group)"
        )),
    }
}

/// `host:port`, `ip:port`, `[ipv6]:port`, or `:port` for every interface (the Go form the
/// official exporters' flags take).
fn parse_listen_address(s: &str) -> Result<SocketAddr, String> {
    let full = match s.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => s.to_string(),
    };
    if let Ok(addr) = full.parse::<SocketAddr>() {
        return Ok(addr);
    }
    use std::net::ToSocketAddrs;
    full.to_socket_addrs()
        .map_err(|e| format!("{s:?} is not an address to listen on (host:port or :port): {e}"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

/// A literal path (no route syntax: `{`, `:` or `*` are ordinary characters), reachable in
/// the percent-encoded form a client sends.
fn parse_telemetry_path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') || s == "/" || s.starts_with("/-/") {
        return Err(format!(
            "{s:?} must start with / and must not be / or under /-/ (those serve the landing page and probes)"
        ));
    }
    if let Some(c) = s.chars().find(|c| matches!(c, '?' | '#') || c.is_control()) {
        return Err(format!(
            "{s:?} holds {c:?}, which cannot be part of a URL path"
        ));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::parse_time;

    #[test]
    fn times_parse_in_every_documented_form() {
        assert_eq!(parse_time("1761064320"), Ok(1761064320));
        assert_eq!(parse_time("2025-10-21T16:32:00Z"), Ok(1761064320));
        assert_eq!(parse_time("2025-10-22T00:32:00+08:00"), Ok(1761064320));
        assert_eq!(parse_time("2025-10-21T11:32:00-05:00"), Ok(1761064320));
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2025-10-21T16:32:00+0x:00").is_err());
        // Outside the years 1970-9999: a clear error, not a panic or an empty report.
        for bad in ["253402300800", "-9223372036854775808", "-1"] {
            let e = parse_time(bad).unwrap_err();
            assert!(e.contains("1970 to 9999"), "{e}");
        }
        assert_eq!(parse_time("253402300799"), Ok(253_402_300_799));
    }
}
