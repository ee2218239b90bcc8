//! The landing page: what the exporter reads, how its last poll went, and the recording health
//! over the reconciliation window.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::extract::State;
use axum::response::Html;
use html_escape::encode_text as esc;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::clock::{duration, rfc3339};
use crate::poll::Status;
use crate::reconcile::format;
use crate::schema::Generation;
use crate::snapshot::Shared;

/// What a link's path must escape (RFC 3986: everything but unreserved, sub-delims, `:@/`).
const PATH: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'|')
    .add(b'\\')
    .add(b'^')
    .add(b'[')
    .add(b']');

pub async fn landing(State(shared): State<Arc<Shared>>, metrics_path: String) -> Html<String> {
    let snap = shared.snapshot();
    let st = &snap.status;
    let last_poll = st
        .last_poll
        .map(|t| {
            let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            rfc3339(secs as i64)
        })
        .unwrap_or_else(|| "not yet".into());
    let result = match (&st.last_error, st.ready) {
        (Some(e), _) => format!("<span class=bad>failed: {}</span>", esc(e)),
        (None, true) => "<span class=ok>ok</span>".to_string(),
        (None, false) => "reading the gateway's database for the first time".to_string(),
    };
    let generation = st
        .generation
        .map(|g| g.describe())
        .unwrap_or("not detected yet");
    let recording = recording_section(st);
    Html(format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>newapi-exporter</title>
<style>body{{font-family:sans-serif;margin:2em}} td{{padding:0 1em 0 0}} .ok{{color:#080}} .bad{{color:#b00}}
table.cmp{{border-collapse:collapse;font-size:0.85em}} .cmp th,.cmp td{{border:1px solid #999;padding:0.2em 0.5em;white-space:nowrap}}
.cmp th{{white-space:normal}} .cmp td+td{{text-align:right;font-variant-numeric:tabular-nums}}</style>
</head><body>
<h1>newapi-exporter</h1>
<p>Prometheus exporter for the new-api / one-api LLM gateway.</p>
<table>
<tr><td>Version</td><td>{version}</td></tr>
<tr><td>Database</td><td>{database}</td></tr>
<tr><td>Gateway</td><td>{generation}</td></tr>
<tr><td>Last poll</td><td>{last_poll}</td></tr>
<tr><td>Result</td><td>{result}</td></tr>
<tr><td>Highest logs.id read</td><td>{cursor}</td></tr>
</table>
{recording}
<ul>
<li><a href="{metrics}">Metrics</a></li>
<li><a href="/-/healthy">Health</a></li>
<li><a href="/-/ready">Readiness</a></li>
</ul>
</body></html>
"#,
        version = env!("CARGO_PKG_VERSION"),
        database = esc(&st.database),
        generation = esc(generation),
        cursor = st.logs_cursor,
        recording = recording,
        metrics = html_escape::encode_double_quoted_attribute(
            &utf8_percent_encode(&metrics_path, PATH).to_string()
        ),
    ))
}

/// The logs-versus-quota_data comparison over the reconciliation window.
fn recording_section(st: &Status) -> String {
    let Some(r) = &st.report else {
        return match st.generation {
            Some(Generation::OneApi) => "<h2>Recording health</h2>\n<p>Not available: \
                this database was written by one-api, which has no quota_data table (the dashboard \
                export is a new-api feature), so there is nothing to reconcile.</p>"
                .to_string(),
            _ => String::new(),
        };
    };
    let mut html = format!(
        "<h2>Recording health: logs against quota_data</h2>\n<p>Hours {} to {}; missing and excess \
         count settled hours (before {}). quota_data lag: {}{}{}.</p>\n<table class=cmp>\n<tr>",
        esc(&rfc3339(r.since)),
        esc(&rfc3339(r.until)),
        esc(&rfc3339(r.settled_until)),
        duration(r.lag_seconds),
        r.worst_model_lag()
            .map(|m| format!(
                "; <span class=bad>longest per model: {} ({})</span>",
                esc(&m.model),
                duration(m.lag_seconds)
            ))
            .unwrap_or_default(),
        r.worst_channel()
            .map(|c| format!(
                "; <span class=bad>most missing on channel {}</span>",
                esc(&format::channel_label(c))
            ))
            .unwrap_or_default(),
    );
    for h in format::HEADERS {
        let h = if h == "lag" { "lag (s)" } else { h };
        html.push_str(&format!("<th>{}</th>", h.replace('_', " ")));
    }
    html.push_str("</tr>\n");
    let has_missing = r
        .models
        .iter()
        .map(|m| &m.cmp)
        .chain([&r.totals])
        .map(|c| c.missing.requests > 0 || c.missing.quota > 0);
    for (row, missing) in format::rows(r, rfc3339).into_iter().zip(has_missing) {
        html.push_str(if missing { "<tr class=bad>" } else { "<tr>" });
        for c in &row {
            html.push_str(&format!("<td>{}</td>", esc(c)));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n");
    html
}
