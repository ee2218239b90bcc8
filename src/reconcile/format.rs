//! Printing a reconciliation [`Report`]: an aligned table for people, JSON as the stable
//! machine interface, CSV for spreadsheets.

use std::fmt::Write;

use super::report::{ChannelReport, Comparison, Report};
use crate::clock::{duration, rfc3339};

/// The forms a report is printed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFormat {
    /// An aligned table for people.
    Table,
    /// JSON, the stable machine interface.
    Json,
    /// CSV, one line per model and a total.
    Csv,
}

/// Column headers of the table and CSV forms, in order.
pub const HEADERS: [&str; 16] = [
    "model",
    "logs_requests",
    "logs_quota",
    "logs_tokens",
    "logs_latest",
    "qd_rows",
    "qd_requests",
    "qd_quota",
    "qd_tokens",
    "qd_latest_hour",
    "missing_requests",
    "missing_quota",
    "excess_requests",
    "excess_quota",
    "unmirrored_quota",
    "lag",
];

pub fn render(report: &Report, format: ReportFormat) -> String {
    match format {
        ReportFormat::Json => {
            let mut s = serde_json::to_string_pretty(report).expect("a report serializes");
            s.push('\n');
            s
        }
        ReportFormat::Csv => csv(report),
        ReportFormat::Table => table(report),
    }
}

/// The cells of one line: a model, or the total.
pub fn cells(name: &str, c: &Comparison, lag: i64, time: fn(i64) -> String) -> Vec<String> {
    vec![
        name.to_string(),
        c.logs.requests.to_string(),
        c.logs.quota.to_string(),
        c.logs.tokens.to_string(),
        time(c.logs.latest),
        c.quota_data.rows.to_string(),
        c.quota_data.requests.to_string(),
        c.quota_data.quota.to_string(),
        c.quota_data.tokens.to_string(),
        time(c.quota_data.latest),
        c.missing.requests.to_string(),
        c.missing.quota.to_string(),
        c.excess.requests.to_string(),
        c.excess.quota.to_string(),
        c.unmirrored.quota.to_string(),
        lag.to_string(),
    ]
}

pub fn rows(report: &Report, time: fn(i64) -> String) -> Vec<Vec<String>> {
    let mut out: Vec<_> = report
        .models
        .iter()
        .map(|m| cells(&m.model, &m.cmp, m.lag_seconds, time))
        .collect();
    out.push(cells("TOTAL", &report.totals, report.lag_seconds, time));
    out
}

fn plain(t: i64) -> String {
    t.to_string()
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A channel as people name it: `12 (azure-east): 1500 quota, 3 requests missing`.
pub fn channel_label(c: &ChannelReport) -> String {
    format!(
        "{} ({}): {} quota, {} requests missing",
        c.channel_id,
        c.channel_name.replace(['\n', '\r'], " "),
        c.missing.quota,
        c.missing.requests
    )
}

/// Column headers of the per-channel part (current generation only).
pub const CHANNEL_HEADERS: [&str; 6] = [
    "channel_id",
    "channel_name",
    "missing_requests",
    "missing_quota",
    "excess_requests",
    "excess_quota",
];

/// The cells of each channel's line.
pub fn channel_rows(report: &Report) -> Vec<Vec<String>> {
    report
        .channels
        .iter()
        .map(|c| {
            vec![
                c.channel_id.to_string(),
                c.channel_name.clone(),
                c.missing.requests.to_string(),
                c.missing.quota.to_string(),
                c.excess.requests.to_string(),
                c.excess.quota.to_string(),
            ]
        })
        .collect()
}

fn csv_lines(out: &mut String, headers: &[&str], rows: Vec<Vec<String>>) {
    out.push_str(&headers.join(","));
    out.push('\n');
    for r in rows {
        let line: Vec<_> = r.iter().map(|c| csv_field(c)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
}

/// The per-model lines; on the current generation, a blank line and the per-channel lines.
fn csv(report: &Report) -> String {
    let mut out = String::new();
    csv_lines(&mut out, &HEADERS, rows(report, plain));
    if !report.channels.is_empty() {
        out.push('\n');
        csv_lines(&mut out, &CHANNEL_HEADERS, channel_rows(report));
    }
    out
}

/// Lines of aligned columns: the first left-aligned, the others right-aligned.
fn aligned(out: &mut String, headers: &[&str], rows: Vec<Vec<String>>) {
    let mut grid = vec![headers.iter().map(|h| h.to_string()).collect::<Vec<_>>()];
    grid.extend(rows);
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| grid.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in grid {
        let line: Vec<_> = r
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                // Names may hold newlines; keep one line per row.
                let c = c.replace(['\n', '\r'], " ");
                if i == 0 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
}

fn table(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "range {} .. {}; missing/excess over settled hours before {}; lag {}{}{}",
        rfc3339(report.since),
        rfc3339(report.until),
        rfc3339(report.settled_until),
        duration(report.lag_seconds),
        report
            .worst_model_lag()
            .map(|m| format!(
                "; longest per model: {} ({})",
                m.model.replace(['\n', '\r'], " "),
                duration(m.lag_seconds)
            ))
            .unwrap_or_default(),
        report
            .worst_channel()
            .map(|c| format!("; most missing on channel {}", channel_label(c)))
            .unwrap_or_default(),
    );
    aligned(&mut out, &HEADERS, rows(report, rfc3339));
    if !report.channels.is_empty() {
        let _ = writeln!(out, "\nper channel (settled hours):");
        aligned(&mut out, &CHANNEL_HEADERS, channel_rows(report));
    }
    out
}
