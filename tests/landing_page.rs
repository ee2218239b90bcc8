//! The landing page as a browser shows it: headless Chromium at 1280 px.

use std::process::Command;
use std::time::Duration;

use crate::common::*;

/// Renders `html` at 1280 px and returns the document's width and a screenshot's path.
fn render(html: &str, dir: &std::path::Path) -> (u32, std::path::PathBuf) {
    // A script at the end writes the laid-out width into the title, which --dump-dom prints.
    let probe = html.replace(
        "</body>",
        "<script>document.title='W'+document.documentElement.scrollWidth</script></body>",
    );
    let file = dir.join("landing.html");
    std::fs::write(&file, probe).unwrap();
    let url = format!("file://{}", file.display());
    let chromium = |extra: &[&str]| {
        let out = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
            ])
            .arg("--window-size=1280,1400")
            .args(extra)
            .arg(&url)
            .output()
            .unwrap();
        assert!(out.status.success(), "chromium: {out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let dom = chromium(&["--dump-dom"]);
    let width = dom
        .split("<title>W")
        .nth(1)
        .and_then(|r| r.split('<').next())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no width in the DOM: {dom}"));
    let shot = dir.join("landing.png");
    chromium(&[&format!("--screenshot={}", shot.display())]);
    (width, shot)
}

#[test]
fn the_landing_page_reads_at_1280_px_worst_first_in_usd() {
    let test = "the_landing_page_reads_at_1280_px_worst_first_in_usd";
    if !require_tool("chromium", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("one-api.db");
    // The demo gateway: one model (the async workflow) never reaches quota_data.
    newapi_exporter::demo::create(&db, Duration::from_secs(30 * 3600), 3).unwrap();
    let exp = Running::start(&[
        "--sqlite-path",
        db.to_str().unwrap(),
        "--web.grafana-url",
        "http://grafana.example:3000/",
    ]);
    exp.wait_ready(Duration::from_secs(30));
    let (_, page) = exp.get("/");

    // The model missing from quota_data comes first, its missing cells (only they) red.
    let first_row = page
        .split("<tr><td class=name>")
        .nth(1)
        .expect("a model row");
    assert!(first_row.starts_with("coze-workflow-async"), "{first_row}");
    assert!(!page.contains("<tr class=bad>"), "no whole row painted");
    let first_row = first_row.split("</tr>").next().unwrap();
    assert_eq!(
        first_row.matches("class=\"n bad\"").count(),
        3,
        "{first_row}"
    );
    // Money in US$ (QuotaPerUnit 500,000) beside the quota, durations in hours and minutes.
    assert!(page.contains("US$"), "{page}");
    assert!(page.contains("Quota per US$</td><td>500000"));
    let lag = first_row
        .rsplit("<td")
        .next()
        .and_then(|c| c.split('>').nth(1))
        .and_then(|c| c.strip_suffix("</td"))
        .unwrap_or_default();
    assert!(
        lag.contains("h ") && lag.contains("m ") && lag.parse::<f64>().is_err(),
        "lag in hours and minutes: {lag:?}"
    );
    // Links to the runbook and to the dashboards in Grafana.
    assert!(page.contains("href=\"/runbook\""));
    assert!(page.contains("href=\"http://grafana.example:3000/d/newapi-usage\""));
    assert!(page.contains("href=\"http://grafana.example:3000/d/newapi-recording-health\""));

    let (width, shot) = render(&page, dir.path());
    assert!(width <= 1280, "the page is {width} px wide at 1280");
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a screenshot"
    );
    if let Ok(keep) = std::env::var("NEWAPI_TEST_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
}
