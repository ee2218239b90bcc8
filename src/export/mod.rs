//! Outputs besides the Prometheus endpoint (which [`crate::web`] serves).

pub mod otlp;
