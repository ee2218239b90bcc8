//! newapi-exporter: Prometheus metrics for the new-api / one-api LLM gateway, read from the
//! gateway's own database.
//!
//! Data flows one way, and a module imports only from the layers before it in this list
//! (`tests/architecture.rs` enforces it):
//! - [`clock`]: hours and unix time, a leaf;
//! - [`metrics`]: every metric's names, help and unit, defined once, and the family builder;
//! - [`reconcile`]: the pure comparison of logs with quota_data (no I/O);
//! - [`db`]: one file per database engine behind the [`db::Database`] trait, and the one write;
//! - [`schema`]: which gateway wrote the database and which columns exist;
//! - [`collect`]: one collector per table, and the one registration list;
//! - [`poll`]: the poll loop, each collector timed and counted, the exporter's own health;
//! - [`snapshot`]: the immutable result of a poll, which every output reads;
//! - [`web`] and [`export`]: the HTTP endpoint and the OTLP push;
//! - [`demo`]: a simulated gateway for the demo, the benchmarks and the tests;
//! - [`cli`]: the command line and its conversion into the settings above;
//! - [`commands`]: serve, check, reconcile, backfill: the only modules that see every layer.

pub mod cli;
pub mod clock;
pub mod collect;
pub mod commands;
pub mod db;
pub mod demo;
pub mod export;
pub mod metrics;
pub mod poll;
pub mod reconcile;
pub mod schema;
pub mod snapshot;
pub mod web;
