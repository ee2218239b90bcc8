//! The commands: `serve` (and `demo`, which serves a simulated gateway), `check`, `reconcile`,
//! `backfill` and `generate`. The only modules that see every layer.

pub mod backfill;
pub mod check;
pub mod reconcile;
pub mod serve;
