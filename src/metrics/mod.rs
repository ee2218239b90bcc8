//! Every metric the exporter publishes, defined once: its Prometheus name, help text and
//! type, and its OpenTelemetry name and unit. Collectors render from these definitions and the
//! OTLP exporter maps them, so both sides always agree.

pub mod family;

pub use family::Family;

/// What kind of metric a definition is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricDef {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    /// The OpenTelemetry instrument's name and unit (UCUM).
    pub otel_name: &'static str,
    pub otel_unit: &'static str,
}

pub const REQUESTS_TOTAL: MetricDef = MetricDef {
    name: "newapi_requests_total",
    help: "Billed requests: consume log rows (type 2).",
    kind: Kind::Counter,
    otel_name: "newapi.requests",
    otel_unit: "{request}",
};
pub const QUOTA_TOTAL: MetricDef = MetricDef {
    name: "newapi_quota_total",
    help: "Quota billed: sum of quota over consume log rows with quota >= 0 (divide by newapi_quota_per_unit for USD).",
    kind: Kind::Counter,
    otel_name: "newapi.quota",
    otel_unit: "{quota}",
};
pub const QUOTA_CORRECTIONS_TOTAL: MetricDef = MetricDef {
    name: "newapi_quota_corrections_total",
    help: "Absolute sum of negative quota on consume log rows (corrections).",
    kind: Kind::Counter,
    otel_name: "newapi.quota.corrections",
    otel_unit: "{quota}",
};
pub const TOKENS_TOTAL: MetricDef = MetricDef {
    name: "newapi_tokens_total",
    help: "Tokens on consume log rows, by token_type (prompt, completion).",
    kind: Kind::Counter,
    otel_name: "newapi.tokens",
    otel_unit: "{token}",
};
pub const REQUEST_DURATION_SECONDS: MetricDef = MetricDef {
    name: "newapi_request_duration_seconds",
    help: "Billed requests by duration (logs.use_time, whole seconds rounded down by the gateway).",
    kind: Kind::Histogram,
    otel_name: "newapi.request.duration",
    otel_unit: "s",
};
pub const TIME_TO_FIRST_RESPONSE_SECONDS: MetricDef = MetricDef {
    name: "newapi_time_to_first_response_seconds",
    help: "Billed requests by time to the first response byte (other.frt in logs), where the gateway recorded it.",
    kind: Kind::Histogram,
    otel_name: "newapi.time_to_first_response",
    otel_unit: "s",
};
pub const USE_TIME_SECONDS_TOTAL: MetricDef = MetricDef {
    name: "newapi_use_time_seconds_total",
    help: "Sum of use_time (whole seconds) over consume log rows.",
    kind: Kind::Counter,
    otel_name: "newapi.use_time",
    otel_unit: "s",
};
pub const REFUNDS_TOTAL: MetricDef = MetricDef {
    name: "newapi_refunds_total",
    help: "Refund log rows (type 6, new-api only).",
    kind: Kind::Counter,
    otel_name: "newapi.refunds",
    otel_unit: "{refund}",
};
pub const REFUND_QUOTA_TOTAL: MetricDef = MetricDef {
    name: "newapi_refund_quota_total",
    help: "Quota given back by refund log rows (type 6, new-api only).",
    kind: Kind::Counter,
    otel_name: "newapi.refund.quota",
    otel_unit: "{quota}",
};
pub const ERRORS_TOTAL: MetricDef = MetricDef {
    name: "newapi_errors_total",
    help: "Error log rows (type 5, new-api only; written when the gateway runs with ERROR_LOG_ENABLED).",
    kind: Kind::Counter,
    otel_name: "newapi.errors",
    otel_unit: "{error}",
};
pub const PERF_REQUESTS_TOTAL: MetricDef = MetricDef {
    name: "newapi_perf_requests_total",
    help: "Relayed requests by outcome (success, failure), from perf_metrics: one per request, written by default (not comparable with newapi_errors_total).",
    kind: Kind::Counter,
    otel_name: "newapi.perf.requests",
    otel_unit: "{request}",
};
pub const PERF_REQUEST_LATENCY_SECONDS_TOTAL: MetricDef = MetricDef {
    name: "newapi_perf_request_latency_seconds_total",
    help: "Summed latency of the relayed requests, from perf_metrics: divided by the requests, the mean latency.",
    kind: Kind::Counter,
    otel_name: "newapi.perf.request_latency",
    otel_unit: "s",
};
pub const CHANNEL_TEST_REQUESTS_TOTAL: MetricDef = MetricDef {
    name: "newapi_channel_test_requests_total",
    help: "Channel tests the gateway logged (consume rows under the token name 模型测试, token 0): mirrored into quota_data, never charged; not in newapi_requests_total.",
    kind: Kind::Counter,
    otel_name: "newapi.channel_test.requests",
    otel_unit: "{request}",
};
pub const CHANNEL_TEST_QUOTA_TOTAL: MetricDef = MetricDef {
    name: "newapi_channel_test_quota_total",
    help: "Quota the channel tests' log rows carry (never charged to anyone); not in newapi_quota_total.",
    kind: Kind::Counter,
    otel_name: "newapi.channel_test.quota",
    otel_unit: "{quota}",
};
pub const TASK_SETTLEMENTS_TOTAL: MetricDef = MetricDef {
    name: "newapi_task_settlements_total",
    help: "Async task settlement rows: their quota (the difference to the pre-charge) is in newapi_quota_total, their request was counted at submission.",
    kind: Kind::Counter,
    otel_name: "newapi.task.settlements",
    otel_unit: "{settlement}",
};
pub const ZERO_USAGE_REQUESTS_TOTAL: MetricDef = MetricDef {
    name: "newapi_zero_usage_requests_total",
    help: "Requests served with nothing billed (the upstream returned no usage: quota and tokens 0); not in newapi_requests_total.",
    kind: Kind::Counter,
    otel_name: "newapi.zero_usage.requests",
    otel_unit: "{request}",
};
pub const QUOTA_SATURATED_REQUESTS_TOTAL: MetricDef = MetricDef {
    name: "newapi_quota_saturated_requests_total",
    help: "Billed requests whose quota computation overflowed and was clamped (other.admin_info.quota_saturation): mis-billed; also in newapi_requests_total.",
    kind: Kind::Counter,
    otel_name: "newapi.quota_saturated.requests",
    otel_unit: "{request}",
};
pub const LOGS_OLDEST_TIMESTAMP_SECONDS: MetricDef = MetricDef {
    name: "newapi_logs_oldest_timestamp_seconds",
    help: "created_at of the oldest row left in logs: where the gateway's log cleanup (or a ClickHouse TTL) has cut the table.",
    kind: Kind::Gauge,
    otel_name: "newapi.logs.oldest_timestamp",
    otel_unit: "s",
};
pub const CHANNEL_STATUS: MetricDef = MetricDef {
    name: "newapi_channel_status",
    help: "Channel status: 1 enabled, 2 disabled by hand, 3 disabled automatically.",
    kind: Kind::Gauge,
    otel_name: "newapi.channel.status",
    otel_unit: "{status}",
};
pub const CHANNEL_BALANCE_USD: MetricDef = MetricDef {
    name: "newapi_channel_balance_usd",
    help: "Channel balance in USD as last fetched by the gateway.",
    kind: Kind::Gauge,
    otel_name: "newapi.channel.balance_usd",
    otel_unit: "{USD}",
};
pub const CHANNEL_USED_QUOTA: MetricDef = MetricDef {
    name: "newapi_channel_used_quota",
    help: "channels.used_quota as read: the quota the gateway's second ledger charged to the channel (quota units).",
    kind: Kind::Gauge,
    otel_name: "newapi.channel.used_quota",
    otel_unit: "{quota}",
};
pub const USERS_USED_QUOTA: MetricDef = MetricDef {
    name: "newapi_users_used_quota",
    help: "Sum of users.used_quota over all users as read (quota units).",
    kind: Kind::Gauge,
    otel_name: "newapi.users.used_quota",
    otel_unit: "{quota}",
};
pub const USERS_REQUESTS: MetricDef = MetricDef {
    name: "newapi_users_requests",
    help: "Sum of users.request_count over all users as read.",
    kind: Kind::Gauge,
    otel_name: "newapi.users.requests",
    otel_unit: "{request}",
};
pub const CHANNEL_RESPONSE_TIME_SECONDS: MetricDef = MetricDef {
    name: "newapi_channel_response_time_seconds",
    help: "Response time of the channel's last test by the gateway.",
    kind: Kind::Gauge,
    otel_name: "newapi.channel.response_time",
    otel_unit: "s",
};
pub const LEDGER_UNLOGGED_QUOTA: MetricDef = MetricDef {
    name: "newapi_ledger_unlogged_quota",
    help: "Over the last completed ledger window: quota the channel's used_quota rose by beyond what the logs billed on it (charged, not logged).",
    kind: Kind::Gauge,
    otel_name: "newapi.ledger.unlogged.quota",
    otel_unit: "{quota}",
};
pub const LEDGER_UNCHARGED_QUOTA: MetricDef = MetricDef {
    name: "newapi_ledger_uncharged_quota",
    help: "Over the last completed ledger window: quota the logs billed on the channel beyond what its used_quota rose by (logged, not charged).",
    kind: Kind::Gauge,
    otel_name: "newapi.ledger.uncharged.quota",
    otel_unit: "{quota}",
};
pub const LEDGER_LOGGED_QUOTA: MetricDef = MetricDef {
    name: "newapi_ledger_logged_quota",
    help: "Over the last completed ledger window: quota the logs billed on the channel (what the unlogged and uncharged gauges are relative to).",
    kind: Kind::Gauge,
    otel_name: "newapi.ledger.logged.quota",
    otel_unit: "{quota}",
};
pub const LEDGER_USERS_UNLOGGED_QUOTA: MetricDef = MetricDef {
    name: "newapi_ledger_users_unlogged_quota",
    help: "Over the last completed ledger window: quota the users' used_quota sum rose by beyond what the logs billed.",
    kind: Kind::Gauge,
    otel_name: "newapi.ledger.users.unlogged.quota",
    otel_unit: "{quota}",
};
pub const LEDGER_USERS_UNCHARGED_QUOTA: MetricDef = MetricDef {
    name: "newapi_ledger_users_uncharged_quota",
    help: "Over the last completed ledger window: quota the logs billed beyond what the users' used_quota sum rose by.",
    kind: Kind::Gauge,
    otel_name: "newapi.ledger.users.uncharged.quota",
    otel_unit: "{quota}",
};
pub const LEDGER_WINDOW_END_TIMESTAMP_SECONDS: MetricDef = MetricDef {
    name: "newapi_ledger_window_end_timestamp_seconds",
    help: "End of the ledger window the newapi_ledger_* gauges describe.",
    kind: Kind::Gauge,
    otel_name: "newapi.ledger.window_end_timestamp",
    otel_unit: "s",
};
pub const LEDGER_REFUNDS_LOWER_USED_QUOTA: MetricDef = MetricDef {
    name: "newapi_ledger_refunds_lower_used_quota",
    help: "1 when the ledger comparison takes refunds as lowering used_quota (gateways from v1.0.0-rc.22 on, or --ledger.refunds=lower), 0 otherwise.",
    kind: Kind::Gauge,
    otel_name: "newapi.ledger.refunds_lower_used_quota",
    otel_unit: "{boolean}",
};
pub const GATEWAY_NODE_UP: MetricDef = MetricDef {
    name: "newapi_gateway_node_up",
    help: "1 while the gateway node heartbeats (system_instances.last_seen_at at most 90 s old), 0 once it stopped; nodes seen alive within a day.",
    kind: Kind::Gauge,
    otel_name: "newapi.gateway.node.up",
    otel_unit: "{boolean}",
};
pub const GATEWAY_NODE_START_TIME_SECONDS: MetricDef = MetricDef {
    name: "newapi_gateway_node_start_time_seconds",
    help: "When the gateway node last started (system_instances.started_at): a change is a restart.",
    kind: Kind::Gauge,
    otel_name: "newapi.gateway.node.start_time",
    otel_unit: "s",
};
pub const GATEWAY_NODE_LAST_SEEN_TIMESTAMP_SECONDS: MetricDef = MetricDef {
    name: "newapi_gateway_node_last_seen_timestamp_seconds",
    help: "The gateway node's last heartbeat (system_instances.last_seen_at).",
    kind: Kind::Gauge,
    otel_name: "newapi.gateway.node.last_seen_timestamp",
    otel_unit: "s",
};
pub const GATEWAY_NODE_INFO: MetricDef = MetricDef {
    name: "newapi_gateway_node_info",
    help: "Constant 1 per gateway node, with the version it reports and whether it is the master.",
    kind: Kind::Gauge,
    otel_name: "newapi.gateway.node.info",
    otel_unit: "{info}",
};
pub const TASKS_IN_FLIGHT: MetricDef = MetricDef {
    name: "newapi_tasks_in_flight",
    help: "Async jobs (tasks table) not yet finished, by platform and status.",
    kind: Kind::Gauge,
    otel_name: "newapi.tasks.in_flight",
    otel_unit: "{task}",
};
pub const TASKS_OLDEST_IN_FLIGHT_AGE_SECONDS: MetricDef = MetricDef {
    name: "newapi_tasks_oldest_in_flight_age_seconds",
    help: "Age of the oldest unfinished async job of the platform (since its submit_time).",
    kind: Kind::Gauge,
    otel_name: "newapi.tasks.oldest_in_flight_age",
    otel_unit: "s",
};
pub const TASKS_USUAL_DURATION_SECONDS: MetricDef = MetricDef {
    name: "newapi_tasks_usual_duration_seconds",
    help: "Mean time from submission to finish of the platform's async jobs submitted in the last day.",
    kind: Kind::Gauge,
    otel_name: "newapi.tasks.usual_duration",
    otel_unit: "s",
};
pub const QUOTA_PER_UNIT: MetricDef = MetricDef {
    name: "newapi_quota_per_unit",
    help: "Quota units per USD (options.QuotaPerUnit, default 500000): USD = quota / this.",
    kind: Kind::Gauge,
    otel_name: "newapi.quota_per_unit",
    otel_unit: "{quota_per_USD}",
};
pub const LOG_CONSUME_ENABLED: MetricDef = MetricDef {
    name: "newapi_log_consume_enabled",
    help: "1 when the gateway writes a log row per billed request (options.LogConsumeEnabled, default true), else 0: every usage counter is blind while it is 0.",
    kind: Kind::Gauge,
    otel_name: "newapi.log_consume.enabled",
    otel_unit: "{boolean}",
};
pub const QUOTA_DATA_EXPORT_ENABLED: MetricDef = MetricDef {
    name: "newapi_quota_data_export_enabled",
    help: "1 when the gateway writes quota_data (options.DataExportEnabled, default true), else 0.",
    kind: Kind::Gauge,
    otel_name: "newapi.quota_data.export.enabled",
    otel_unit: "{boolean}",
};
pub const QUOTA_DATA_EXPORT_INTERVAL_SECONDS: MetricDef = MetricDef {
    name: "newapi_quota_data_export_interval_seconds",
    help: "How often each gateway node flushes its quota_data map (options.DataExportInterval, default 5 minutes).",
    kind: Kind::Gauge,
    otel_name: "newapi.quota_data.export.interval",
    otel_unit: "s",
};
pub const QUOTA_DATA_REQUESTS_TOTAL: MetricDef = MetricDef {
    name: "newapi_quota_data_requests_total",
    help: "Requests the gateway's dashboard recorded: sum of quota_data.count.",
    kind: Kind::Counter,
    otel_name: "newapi.quota_data.requests",
    otel_unit: "{request}",
};
pub const QUOTA_DATA_QUOTA_TOTAL: MetricDef = MetricDef {
    name: "newapi_quota_data_quota_total",
    help: "Quota the gateway's dashboard recorded: sum of quota_data.quota.",
    kind: Kind::Counter,
    otel_name: "newapi.quota_data.quota",
    otel_unit: "{quota}",
};
pub const QUOTA_DATA_TOKENS_TOTAL: MetricDef = MetricDef {
    name: "newapi_quota_data_tokens_total",
    help: "Tokens the gateway's dashboard recorded: sum of quota_data.token_used.",
    kind: Kind::Counter,
    otel_name: "newapi.quota_data.tokens",
    otel_unit: "{token}",
};
pub const QUOTA_DATA_LAG_SECONDS: MetricDef = MetricDef {
    name: "newapi_quota_data_lag_seconds",
    help: "Newest consume log time minus the end of the newest quota_data hour (0 when recording keeps up); async task settlement rows left out.",
    kind: Kind::Gauge,
    otel_name: "newapi.quota_data.lag",
    otel_unit: "s",
};
pub const QUOTA_DATA_MODEL_LAG_SECONDS: MetricDef = MetricDef {
    name: "newapi_quota_data_model_lag_seconds",
    help: "Per model: newest consume log time minus the end of its newest quota_data hour (minus its first log when quota_data has none).",
    kind: Kind::Gauge,
    otel_name: "newapi.quota_data.model_lag",
    otel_unit: "s",
};
pub const QUOTA_DATA_MISSING_QUOTA: MetricDef = MetricDef {
    name: "newapi_quota_data_missing_quota",
    help: "Quota in consume logs of settled hours in the window that never reached quota_data.",
    kind: Kind::Gauge,
    otel_name: "newapi.quota_data.missing.quota",
    otel_unit: "{quota}",
};
pub const QUOTA_DATA_MISSING_REQUESTS: MetricDef = MetricDef {
    name: "newapi_quota_data_missing_requests",
    help: "Consume log rows of settled hours in the window missing from quota_data counts.",
    kind: Kind::Gauge,
    otel_name: "newapi.quota_data.missing.requests",
    otel_unit: "{request}",
};
pub const QUOTA_DATA_EXCESS_QUOTA: MetricDef = MetricDef {
    name: "newapi_quota_data_excess_quota",
    help: "Quota in quota_data beyond the consume logs of settled hours in the window (deleted logs, duplicate rows).",
    kind: Kind::Gauge,
    otel_name: "newapi.quota_data.excess.quota",
    otel_unit: "{quota}",
};
pub const QUOTA_DATA_EXCESS_REQUESTS: MetricDef = MetricDef {
    name: "newapi_quota_data_excess_requests",
    help: "Requests in quota_data beyond the consume logs of settled hours in the window.",
    kind: Kind::Gauge,
    otel_name: "newapi.quota_data.excess.requests",
    otel_unit: "{request}",
};
pub const QUOTA_DATA_UNMIRRORED_QUOTA: MetricDef = MetricDef {
    name: "newapi_quota_data_unmirrored_quota",
    help: "Quota of async task settlement rows in the window: billed, never written to quota_data by design.",
    kind: Kind::Gauge,
    otel_name: "newapi.quota_data.unmirrored.quota",
    otel_unit: "{quota}",
};
pub const QUOTA_DATA_DUPLICATE_ROWS: MetricDef = MetricDef {
    name: "newapi_quota_data_duplicate_rows",
    help: "quota_data rows of settled hours in the window beyond the first for the same key (the gateway generation's key: eight columns on current new-api, (hour, user, username, model) before).",
    kind: Kind::Gauge,
    otel_name: "newapi.quota_data.duplicate_rows",
    otel_unit: "{row}",
};
pub const QUOTA_DATA_CHANNEL_MISSING_QUOTA: MetricDef = MetricDef {
    name: "newapi_quota_data_channel_missing_quota",
    help: "Quota billed in logs on a channel but missing from quota_data, over settled hours in the window (current new-api only).",
    kind: Kind::Gauge,
    otel_name: "newapi.quota_data.channel.missing.quota",
    otel_unit: "{quota}",
};
pub const QUOTA_DATA_CHANNEL_MISSING_REQUESTS: MetricDef = MetricDef {
    name: "newapi_quota_data_channel_missing_requests",
    help: "Consume log rows on a channel missing from quota_data's count, over settled hours in the window (current new-api only).",
    kind: Kind::Gauge,
    otel_name: "newapi.quota_data.channel.missing.requests",
    otel_unit: "{request}",
};
pub const QUOTA_DATA_CHANNEL_EXCESS_QUOTA: MetricDef = MetricDef {
    name: "newapi_quota_data_channel_excess_quota",
    help: "Quota in quota_data on a channel beyond what its logs billed, over settled hours in the window (current new-api only).",
    kind: Kind::Gauge,
    otel_name: "newapi.quota_data.channel.excess.quota",
    otel_unit: "{quota}",
};
pub const GATEWAY_INFO: MetricDef = MetricDef {
    name: "newapi_gateway_info",
    help: "Constant 1; generation is the gateway generation detected from the tables (one-api, new-api-older, new-api-current).",
    kind: Kind::Gauge,
    otel_name: "newapi.gateway.info",
    otel_unit: "{info}",
};
pub const QUOTA_DATA_SETTLED_UNTIL_TIMESTAMP_SECONDS: MetricDef = MetricDef {
    name: "newapi_quota_data_settled_until_timestamp_seconds",
    help: "End of the newest settled hour: missing and excess cover the window's hours before it.",
    kind: Kind::Gauge,
    otel_name: "newapi.quota_data.settled_until_timestamp",
    otel_unit: "s",
};
pub const UP: MetricDef = MetricDef {
    name: "newapi_up",
    help: "1 when the last poll of the gateway's database succeeded, else 0.",
    kind: Kind::Gauge,
    otel_name: "newapi.up",
    otel_unit: "{boolean}",
};
pub const EXPORTER_BUILD_INFO: MetricDef = MetricDef {
    name: "newapi_exporter_build_info",
    help: "Constant 1, labeled with the exporter's version, git revision and branch, and the Rust compiler's version.",
    kind: Kind::Gauge,
    otel_name: "newapi.exporter.build_info",
    otel_unit: "{info}",
};
pub const EXPORTER_POLL_DURATION_SECONDS: MetricDef = MetricDef {
    name: "newapi_exporter_poll_duration_seconds",
    help: "Time one poll of the gateway's database took.",
    kind: Kind::Histogram,
    otel_name: "newapi.exporter.poll.duration",
    otel_unit: "s",
};
pub const EXPORTER_POLL_ERRORS_TOTAL: MetricDef = MetricDef {
    name: "newapi_exporter_poll_errors_total",
    help: "Polls that failed (the previous state kept being served).",
    kind: Kind::Counter,
    otel_name: "newapi.exporter.poll.errors",
    otel_unit: "{poll}",
};
pub const EXPORTER_ROWS_READ_TOTAL: MetricDef = MetricDef {
    name: "newapi_exporter_rows_read_total",
    help: "Rows the exporter read from the gateway's database, by table.",
    kind: Kind::Counter,
    otel_name: "newapi.exporter.rows_read",
    otel_unit: "{row}",
};
pub const EXPORTER_ROWS_REJECTED_TOTAL: MetricDef = MetricDef {
    name: "newapi_exporter_rows_rejected_total",
    help: "Rows set aside as implausible (millisecond, pre-2020 or future timestamps; amounts beyond 32 bits), by table and reason: left out of the reconciliation.",
    kind: Kind::Counter,
    otel_name: "newapi.exporter.rows_rejected",
    otel_unit: "{row}",
};
pub const EXPORTER_LAST_POLL_TIMESTAMP_SECONDS: MetricDef = MetricDef {
    name: "newapi_exporter_last_poll_timestamp_seconds",
    help: "Unix time the last poll finished, successful or not.",
    kind: Kind::Gauge,
    otel_name: "newapi.exporter.last_poll_timestamp",
    otel_unit: "s",
};
pub const EXPORTER_LOGS_CURSOR: MetricDef = MetricDef {
    name: "newapi_exporter_logs_cursor",
    help: "Highest logs.id ingested (0 with logs in ClickHouse, which has no ids).",
    kind: Kind::Gauge,
    otel_name: "newapi.exporter.logs_cursor",
    otel_unit: "{id}",
};
pub const EXPORTER_OTLP_ERRORS_TOTAL: MetricDef = MetricDef {
    name: "newapi_exporter_otlp_errors_total",
    help: "OTLP exports that failed (the collector was down, slow or refused them).",
    kind: Kind::Counter,
    otel_name: "newapi.exporter.otlp.errors",
    otel_unit: "{export}",
};

pub const EXPORTER_SERIES_FOLDED_TOTAL: MetricDef = MetricDef {
    name: "newapi_exporter_series_folded_total",
    help: "Label sets folded into model=\"__other__\" by --series.max-per-metric, by family (usage, quota_data, reconcile).",
    kind: Kind::Counter,
    otel_name: "newapi.exporter.series_folded",
    otel_unit: "{series}",
};

pub const EXPORTER_COLLECTOR_SUCCESS: MetricDef = MetricDef {
    name: "newapi_exporter_collector_success",
    help: "Whether each collector's last poll succeeded (1) or failed (0), by collector.",
    kind: Kind::Gauge,
    otel_name: "newapi.exporter.collector.success",
    otel_unit: "{boolean}",
};
pub const EXPORTER_COLLECTOR_DURATION_SECONDS: MetricDef = MetricDef {
    name: "newapi_exporter_collector_duration_seconds",
    help: "How long each collector's last poll took, by collector.",
    kind: Kind::Gauge,
    otel_name: "newapi.exporter.collector.duration",
    otel_unit: "s",
};

/// All of them, in the order `docs/metrics.md` lists them.
pub const ALL: &[MetricDef] = &[
    REQUESTS_TOTAL,
    QUOTA_TOTAL,
    QUOTA_CORRECTIONS_TOTAL,
    TOKENS_TOTAL,
    USE_TIME_SECONDS_TOTAL,
    REQUEST_DURATION_SECONDS,
    TIME_TO_FIRST_RESPONSE_SECONDS,
    REFUNDS_TOTAL,
    REFUND_QUOTA_TOTAL,
    ERRORS_TOTAL,
    PERF_REQUESTS_TOTAL,
    PERF_REQUEST_LATENCY_SECONDS_TOTAL,
    CHANNEL_TEST_REQUESTS_TOTAL,
    CHANNEL_TEST_QUOTA_TOTAL,
    TASK_SETTLEMENTS_TOTAL,
    ZERO_USAGE_REQUESTS_TOTAL,
    QUOTA_SATURATED_REQUESTS_TOTAL,
    LOGS_OLDEST_TIMESTAMP_SECONDS,
    CHANNEL_STATUS,
    CHANNEL_BALANCE_USD,
    CHANNEL_USED_QUOTA,
    USERS_USED_QUOTA,
    USERS_REQUESTS,
    LEDGER_UNLOGGED_QUOTA,
    LEDGER_UNCHARGED_QUOTA,
    LEDGER_LOGGED_QUOTA,
    LEDGER_USERS_UNLOGGED_QUOTA,
    LEDGER_USERS_UNCHARGED_QUOTA,
    LEDGER_WINDOW_END_TIMESTAMP_SECONDS,
    LEDGER_REFUNDS_LOWER_USED_QUOTA,
    GATEWAY_NODE_UP,
    GATEWAY_NODE_START_TIME_SECONDS,
    GATEWAY_NODE_LAST_SEEN_TIMESTAMP_SECONDS,
    GATEWAY_NODE_INFO,
    TASKS_IN_FLIGHT,
    TASKS_OLDEST_IN_FLIGHT_AGE_SECONDS,
    TASKS_USUAL_DURATION_SECONDS,
    CHANNEL_RESPONSE_TIME_SECONDS,
    QUOTA_PER_UNIT,
    LOG_CONSUME_ENABLED,
    QUOTA_DATA_EXPORT_ENABLED,
    QUOTA_DATA_EXPORT_INTERVAL_SECONDS,
    QUOTA_DATA_REQUESTS_TOTAL,
    QUOTA_DATA_QUOTA_TOTAL,
    QUOTA_DATA_TOKENS_TOTAL,
    QUOTA_DATA_LAG_SECONDS,
    QUOTA_DATA_MODEL_LAG_SECONDS,
    QUOTA_DATA_MISSING_QUOTA,
    QUOTA_DATA_MISSING_REQUESTS,
    QUOTA_DATA_EXCESS_QUOTA,
    QUOTA_DATA_EXCESS_REQUESTS,
    QUOTA_DATA_UNMIRRORED_QUOTA,
    QUOTA_DATA_DUPLICATE_ROWS,
    QUOTA_DATA_CHANNEL_MISSING_QUOTA,
    QUOTA_DATA_CHANNEL_MISSING_REQUESTS,
    QUOTA_DATA_CHANNEL_EXCESS_QUOTA,
    GATEWAY_INFO,
    QUOTA_DATA_SETTLED_UNTIL_TIMESTAMP_SECONDS,
    UP,
    EXPORTER_BUILD_INFO,
    EXPORTER_POLL_DURATION_SECONDS,
    EXPORTER_POLL_ERRORS_TOTAL,
    EXPORTER_ROWS_READ_TOTAL,
    EXPORTER_ROWS_REJECTED_TOTAL,
    EXPORTER_LAST_POLL_TIMESTAMP_SECONDS,
    EXPORTER_LOGS_CURSOR,
    EXPORTER_OTLP_ERRORS_TOTAL,
    EXPORTER_SERIES_FOLDED_TOTAL,
    EXPORTER_COLLECTOR_SUCCESS,
    EXPORTER_COLLECTOR_DURATION_SECONDS,
];

#[cfg(test)]
mod tests {
    use super::ALL;

    #[test]
    fn every_metric_is_documented_with_both_names() {
        let doc = include_str!("../../docs/metrics.md");
        for def in ALL {
            assert!(
                doc.contains(&format!("`{}", def.name)),
                "{} not in docs/metrics.md",
                def.name
            );
            assert!(
                doc.contains(&format!("`{}`", def.otel_name)),
                "{} not in docs/metrics.md",
                def.otel_name
            );
        }
    }

    #[test]
    fn names_follow_the_conventions() {
        let mut seen = std::collections::HashSet::new();
        for def in ALL {
            assert!(seen.insert(def.name), "{} defined twice", def.name);
            assert!(def.name.starts_with("newapi_"), "{}", def.name);
            let counter = def.kind == super::Kind::Counter;
            assert_eq!(
                counter,
                def.name.ends_with("_total"),
                "{}: _total is for counters",
                def.name
            );
            assert!(!def.otel_name.ends_with("_total") && def.otel_name.starts_with("newapi."));
            assert!(!def.help.is_empty());
        }
    }
}
