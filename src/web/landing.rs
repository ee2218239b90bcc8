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
use crate::reconcile::{Amount, format};
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

/// Where the shipped dashboards are: in Grafana when its URL is given, else their files.
fn dashboard_links(grafana: Option<&str>) -> String {
    let dashboards = [
        ("newapi-usage", "Usage dashboard"),
        ("newapi-recording-health", "Recording-health dashboard"),
    ];
    dashboards
        .iter()
        .map(|(uid, title)| {
            let href = match grafana {
                Some(g) => format!("{}/d/{uid}", g.trim_end_matches('/')),
                None => format!(
                    "{}/blob/main/dashboards/{uid}.json",
                    env!("CARGO_PKG_REPOSITORY")
                ),
            };
            format!(
                "<li><a href=\"{}\">{title}</a></li>",
                html_escape::encode_double_quoted_attribute(&href)
            )
        })
        .collect()
}

pub async fn landing(
    State(shared): State<Arc<Shared>>,
    metrics_path: String,
    grafana: Option<String>,
) -> Html<String> {
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
<meta name="viewport" content="width=device-width">
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1240px}} td{{padding:0 1em 0 0}}
.ok{{color:#080}} .bad{{color:#b00;font-weight:bold}} .warn{{color:#a60}}
table.cmp{{border-collapse:collapse;font-size:0.85em;margin-bottom:1em}}
.cmp th,.cmp td{{border:1px solid #bbb;padding:0.2em 0.45em}}
.cmp th{{background:#f3f3f3;font-weight:normal}} .cmp td{{white-space:nowrap}}
.cmp td.n{{text-align:right;font-variant-numeric:tabular-nums}} .cmp td.name{{min-width:10em;max-width:18em;overflow-wrap:anywhere;white-space:normal}}
.q{{color:#666;font-size:0.85em}} tr.total td{{border-top:2px solid #666;font-weight:bold}}
nav a{{margin-right:1.2em}}</style>
</head><body>
<h1>newapi-exporter</h1>
<nav><a href="{metrics}">Metrics</a><a href="/runbook">Runbook</a><a href="/-/healthy">Health</a><a href="/-/ready">Readiness</a></nav>
<p>Prometheus exporter for the new-api / one-api LLM gateway.</p>
<table>
<tr><td>Version</td><td>{version}</td></tr>
<tr><td>Database</td><td>{database}</td></tr>
<tr><td>Gateway</td><td>{generation}</td></tr>
<tr><td>Last poll</td><td>{last_poll}</td></tr>
<tr><td>Result</td><td>{result}</td></tr>
<tr><td>Highest logs.id read</td><td>{cursor}</td></tr>
<tr><td>Quota per US$</td><td>{per_unit}</td></tr>
</table>
{recording}
<h2>Dashboards and alerts</h2>
<ul>
{dashboards}
<li><a href="/runbook">Runbook</a>: what each alert means and what to do</li>
</ul>
</body></html>
"#,
        version = env!("CARGO_PKG_VERSION"),
        database = esc(&st.database),
        generation = esc(generation),
        cursor = st.logs_cursor,
        per_unit = st.options.quota_per_unit,
        recording = recording,
        dashboards = dashboard_links(grafana.as_deref()),
        metrics = html_escape::encode_double_quoted_attribute(
            &utf8_percent_encode(&metrics_path, PATH).to_string()
        ),
    ))
}

/// A quota amount as money, with the quota beside it.
fn money(quota: i64, per_unit: f64) -> String {
    let per_unit = if per_unit > 0.0 { per_unit } else { 500_000.0 };
    format!(
        "US${:.2} <span class=q>{quota}</span>",
        quota as f64 / per_unit
    )
}

/// One numeric cell; `bad` paints this cell only.
fn cell(html: &mut String, content: &str, bad: bool) {
    let class = if bad { "n bad" } else { "n" };
    html.push_str(&format!("<td class=\"{class}\">{content}</td>"));
}

/// Missing requests and quota (red when any) and excess quota.
fn missing_and_excess(html: &mut String, missing: &Amount, excess: &Amount, per_unit: f64) {
    cell(html, &missing.requests.to_string(), missing.requests > 0);
    cell(html, &money(missing.quota, per_unit), missing.quota > 0);
    cell(html, &money(excess.quota, per_unit), false);
}

/// The logs-versus-quota_data comparison over the reconciliation window, the worst model and
/// channel first, amounts in US$ beside quota, lags in hours and minutes.
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
    let per_unit = st.options.quota_per_unit;
    // The recording-stalled alert's threshold: three flush intervals and a quarter hour.
    let lag_limit = 3 * st.options.data_export_interval_seconds + 900;
    let mut html = format!(
        "<h2>Recording health: logs against quota_data</h2>\n<p>Hours {} to {}; missing and excess \
         count settled hours (before {}). quota_data lag: {}{}{}.</p>\n",
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
    html.push_str(
        "<table class=cmp>\n<tr><th rowspan=2>model</th><th colspan=2>logs</th>\
         <th colspan=3>quota_data</th><th colspan=2>missing</th><th rowspan=2>excess</th>\
         <th rowspan=2>unmirrored task settlements</th><th rowspan=2>lag</th></tr>\n\
         <tr><th>requests</th><th>quota</th><th>rows</th><th>requests</th><th>quota</th>\
         <th>requests</th><th>quota</th></tr>\n",
    );
    let mut models: Vec<_> = r.models.iter().collect();
    models.sort_by(|a, b| {
        (b.cmp.missing.quota, b.lag_seconds, b.cmp.logs.quota).cmp(&(
            a.cmp.missing.quota,
            a.lag_seconds,
            a.cmp.logs.quota,
        ))
    });
    let rows = models
        .into_iter()
        .map(|m| (m.model.as_str(), &m.cmp, m.lag_seconds, false))
        .chain([("TOTAL", &r.totals, r.lag_seconds, true)]);
    for (name, c, lag, total) in rows {
        html.push_str(if total { "<tr class=total>" } else { "<tr>" });
        html.push_str(&format!("<td class=name>{}</td>", esc(name)));
        cell(&mut html, &c.logs.requests.to_string(), false);
        cell(&mut html, &money(c.logs.quota, per_unit), false);
        cell(
            &mut html,
            &c.quota_data.rows.to_string(),
            c.duplicate_rows > 0,
        );
        cell(&mut html, &c.quota_data.requests.to_string(), false);
        cell(&mut html, &money(c.quota_data.quota, per_unit), false);
        missing_and_excess(&mut html, &c.missing, &c.excess, per_unit);
        cell(&mut html, &money(c.unmirrored.quota, per_unit), false);
        cell(&mut html, &duration(lag), lag > lag_limit);
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n");
    let mut channels: Vec<_> = r
        .channels
        .iter()
        .filter(|c| c.missing.quota > 0 || c.missing.requests > 0 || c.excess.quota > 0)
        .collect();
    if !channels.is_empty() {
        channels.sort_by(|a, b| {
            (b.missing.quota, b.excess.quota).cmp(&(a.missing.quota, a.excess.quota))
        });
        html.push_str(
            "<table class=cmp>\n<tr><th>channel</th><th>missing requests</th>\
             <th>missing quota</th><th>excess quota</th></tr>\n",
        );
        for c in channels {
            html.push_str(&format!(
                "<tr><td class=name>{} {}</td>",
                c.channel_id,
                esc(&c.channel_name)
            ));
            missing_and_excess(&mut html, &c.missing, &c.excess, per_unit);
            html.push_str("</tr>\n");
        }
        html.push_str("</table>\n");
    }
    html
}
