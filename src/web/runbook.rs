//! `/runbook`: the alerts' runbook (docs/runbook.md) as a page, so that each alert's
//! `runbook_url` (`http://<instance>/runbook#<alert>`) opens wherever Prometheus reaches the
//! exporter. Rendered once, from the copy built into the binary: it always matches the rules
//! of the same release.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use pulldown_cmark::{Event, HeadingLevel, Options, Parser, Tag, TagEnd, html};

const RUNBOOK_MD: &str = include_str!("../../docs/runbook.md");

/// The anchor of a heading: its letters and digits, lowercased, words joined by `-` (as GitHub
/// names them; an alert name such as `NewapiQuotaDataMissing` becomes `newapiquotadatamissing`).
pub fn anchor(text: &str) -> String {
    let mut out = String::new();
    for c in text.trim().chars() {
        if c.is_alphanumeric() || c == '-' || c == '_' {
            out.extend(c.to_lowercase());
        } else if c == ' ' {
            out.push('-');
        }
    }
    out
}

/// The runbook as HTML, every heading with its anchor as `id`.
pub fn html_page() -> &'static str {
    static PAGE: OnceLock<String> = OnceLock::new();
    PAGE.get_or_init(|| {
        let mut events: Vec<Event> = Vec::new();
        // (index of the heading's start event in `events`, its level, its text so far)
        let mut heading: Option<(usize, HeadingLevel, String)> = None;
        for ev in Parser::new_ext(RUNBOOK_MD, Options::ENABLE_TABLES) {
            match &ev {
                Event::Start(Tag::Heading { level, .. }) => {
                    heading = Some((events.len(), *level, String::new()));
                }
                Event::Text(t) | Event::Code(t) => {
                    if let Some((_, _, text)) = heading.as_mut() {
                        text.push_str(t);
                    }
                }
                Event::End(TagEnd::Heading(_)) => {
                    if let Some((at, level, text)) = heading.take() {
                        events[at] = Event::Start(Tag::Heading {
                            level,
                            id: Some(anchor(&text).into()),
                            classes: Vec::new(),
                            attrs: Vec::new(),
                        });
                    }
                }
                _ => {}
            }
            events.push(ev);
        }
        let mut body = String::new();
        html::push_html(&mut body, events.into_iter());
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>newapi-exporter runbook</title>\
             <meta name=\"viewport\" content=\"width=device-width\">\
             <style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;\
             line-height:1.45}} code{{background:#f3f3f3}} h2{{border-top:1px solid #ddd;\
             padding-top:1em}}</style></head><body><p><a href=\"/\">newapi-exporter</a></p>\
             {body}</body></html>"
        )
    })
}

pub async fn runbook() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html_page(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_alert_section_has_its_anchor() {
        let page = html_page();
        for line in RUNBOOK_MD.lines() {
            if let Some(name) = line.strip_prefix("## ") {
                let id = anchor(name);
                assert!(page.contains(&format!("<h2 id=\"{id}\">")), "{name}: {id}");
            }
        }
        assert_eq!(anchor("NewapiQuotaDataMissing"), "newapiquotadatamissing");
        assert_eq!(
            anchor("Quota data: the 2 ledgers"),
            "quota-data-the-2-ledgers"
        );
    }
}
