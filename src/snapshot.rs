//! The immutable result of a poll, as every output reads it: the metric families, their text
//! exposition (encoded once per poll, so a scrape only copies bytes), and the status the
//! landing page shows.

use std::sync::{Arc, OnceLock, RwLock};

use prometheus::TextEncoder;
use prometheus::proto::MetricFamily;

use crate::poll::{PollOutput, Publish, Status};

/// Everything a scrape serves, built once per poll.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub families: Vec<MetricFamily>,
    /// `families` in the Prometheus text format.
    pub text: String,
    /// `families` in the OpenMetrics text format, encoded when first asked for.
    pub openmetrics: OnceLock<String>,
    pub status: Status,
}

impl Snapshot {
    pub fn new(out: PollOutput) -> Self {
        let mut text = String::new();
        if let Err(e) = TextEncoder::new().encode_utf8(&out.families, &mut text) {
            tracing::error!("encoding metrics failed: {e}");
        }
        Snapshot {
            families: out.families,
            text,
            openmetrics: OnceLock::new(),
            status: out.status,
        }
    }
}

/// The last snapshot, shared between the poll thread and the outputs.
#[derive(Default)]
pub struct Shared {
    snapshot: RwLock<Arc<Snapshot>>,
}

impl Shared {
    /// Before the first poll: the landing page already names the database (passwords masked).
    pub fn starting(database: &str) -> Self {
        let snapshot = Snapshot {
            status: Status {
                database: database.to_string(),
                ..Status::default()
            },
            ..Snapshot::default()
        };
        Shared {
            snapshot: RwLock::new(Arc::new(snapshot)),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Publish for Shared {
    fn publish(&self, out: PollOutput) {
        let s = Arc::new(Snapshot::new(out));
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = s;
    }
}
