//! newapi-exporter: Prometheus metrics for the new-api / one-api LLM gateway, read from the
//! gateway's own database.
//!
//! A walk through the house:
//! - [`metrics`]: every metric's names, help and unit, defined once;
//! - [`db`]: one file per database engine behind the [`db::Database`] trait;
//! - [`schema`]: which gateway wrote the database and which columns exist;
//! - [`collect`]: one collector per table, each reading incrementally into its own state;
//! - [`poller`]: the poll loop that runs the collectors and publishes a snapshot;
//! - [`reconcile`]: logs against quota_data, for the gauges, the report and backfill;
//! - [`backfill`]: the only code that writes the gateway's database;
//! - [`web`]: the HTTP routes serving that snapshot;
//! - [`demo`]: a simulated gateway for the demo and the tests;
//! - [`cli`] and [`serve`]: the command line and the server wiring.

pub mod backfill;
pub mod cli;
pub mod collect;
pub mod db;
pub mod demo;
pub mod export;
pub mod generate;
pub mod metrics;
pub mod poller;
pub mod reconcile;
pub mod report;
pub mod schema;
pub mod serve;
pub mod web;
pub mod web_config;
