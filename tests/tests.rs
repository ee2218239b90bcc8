//! The integration tests, one binary with a module per topic.

mod common;

mod architecture;
mod cardinality;
mod clickhouse;
mod e2e_alerting;
mod engines;
mod faults;
mod gateway_never_blocked;
mod generate;
mod landing_page;
mod latency;
mod ledger;
mod logs_counters;
mod monitoring_bundle;
mod nodes;
mod otlp;
mod packaging;
mod perf_metrics;
mod process;
mod properties;
mod recording_health;
mod robustness;
mod security;
mod sqlite_wal;
mod tasks;
mod web_config;
