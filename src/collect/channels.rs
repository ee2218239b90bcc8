//! Channel state from `channels`: status, balance, last test response time, the quota the
//! gateway's second ledger charged (`used_quota`); and the channel names the usage counters are
//! labeled with.
//!
//! The table holds one row per upstream channel (tens to a few thousand) and has no change
//! column, so each poll reads it whole in one short statement. `key` is a secret and is never
//! selected.

use std::collections::HashMap;

use anyhow::Result;
use prometheus::proto::MetricFamily;

use super::{Collector, Context};
use crate::db::{Sources, Value};
use crate::metrics::{self as m, Family};

pub const CHANNEL_LABELS: [&str; 3] = ["channel_id", "channel_name", "channel_type"];

#[derive(Debug, Clone, PartialEq)]
struct Channel {
    id: String,
    name: String,
    type_name: String,
    status: Option<f64>,
    balance_usd: Option<f64>,
    response_time_seconds: Option<f64>,
    used_quota: Option<f64>,
}

#[derive(Default)]
pub struct ChannelsCollector {
    channels: Vec<Channel>,
}

/// Readable name of new-api's channel type number (constant/channel.go).
pub fn channel_type_name(t: i64) -> String {
    let name = match t {
        0 => "Unknown",
        1 => "OpenAI",
        2 => "Midjourney",
        3 => "Azure",
        4 => "Ollama",
        5 => "MidjourneyPlus",
        6 => "OpenAIMax",
        7 => "OhMyGPT",
        8 => "Custom",
        9 => "AILS",
        10 => "AIProxy",
        11 => "PaLM",
        12 => "API2GPT",
        13 => "AIGC2D",
        14 => "Anthropic",
        15 => "Baidu",
        16 => "Zhipu",
        17 => "Ali",
        18 => "Xunfei",
        19 => "360",
        20 => "OpenRouter",
        21 => "AIProxyLibrary",
        22 => "FastGPT",
        23 => "Tencent",
        24 => "Gemini",
        25 => "Moonshot",
        26 => "ZhipuV4",
        27 => "Perplexity",
        31 => "LingYiWanWu",
        33 => "AWS",
        34 => "Cohere",
        35 => "MiniMax",
        36 => "SunoAPI",
        37 => "Dify",
        38 => "Jina",
        39 => "Cloudflare",
        40 => "SiliconFlow",
        41 => "VertexAI",
        42 => "Mistral",
        43 => "DeepSeek",
        44 => "MokaAI",
        45 => "VolcEngine",
        46 => "BaiduV2",
        47 => "Xinference",
        48 => "xAI",
        49 => "Coze",
        50 => "Kling",
        51 => "Jimeng",
        52 => "Vidu",
        53 => "Submodel",
        54 => "DoubaoVideo",
        55 => "Sora",
        56 => "Replicate",
        57 => "Codex",
        58 => "AdvancedCustom",
        59 => "Sub2API",
        60 => "NewAPI",
        _ => return format!("type_{t}"),
    };
    name.to_string()
}

impl Collector for ChannelsCollector {
    fn name(&self) -> &'static str {
        "channels"
    }

    fn poll(&mut self, src: &mut Sources, ctx: &mut Context) -> Result<()> {
        let Some(cols) = ctx.schema.channels.clone() else {
            return Ok(());
        };
        if !cols.has("id") {
            anyhow::bail!("table `channels` has no column `id`; channel metrics are off");
        }
        let db = src.main();
        let d = db.dialect();
        let sql = format!(
            "SELECT {}, {}, {}, {}, {}, {}, {} FROM channels",
            d.ident("id"),
            cols.or(d, "name", "NULL"),
            cols.or(d, "type", "NULL"),
            cols.or(d, "status", "NULL"),
            d.float(&cols.or(d, "balance", "NULL")),
            cols.or(d, "response_time", "NULL"),
            cols.or(d, "used_quota", "NULL"),
        );
        let rows = db.query(&sql, &[])?;
        ctx.count_rows("channels", rows.len() as u64);
        let cell = |r: &[Value], i: usize| r.get(i).cloned().unwrap_or(Value::Null);
        self.channels = rows
            .iter()
            .map(|r| Channel {
                id: cell(r, 0).to_label(),
                name: cell(r, 1).to_label(),
                type_name: cell(r, 2)
                    .as_i64()
                    .map(channel_type_name)
                    .unwrap_or_default(),
                status: cell(r, 3).as_f64(),
                balance_usd: cell(r, 4).as_f64(),
                response_time_seconds: cell(r, 5).as_f64().map(|ms| ms / 1000.0),
                used_quota: cell(r, 6).as_f64(),
            })
            .collect();
        self.channels.sort_by(|a, b| a.id.cmp(&b.id));
        self.channels.dedup_by(|a, b| a.id == b.id);
        ctx.channel_names = self
            .channels
            .iter()
            .map(|c| (c.id.clone(), c.name.clone()))
            .collect::<HashMap<_, _>>();
        Ok(())
    }

    fn render(&self, _ctx: &Context, out: &mut Vec<MetricFamily>) {
        let mut status = Family::of(&m::CHANNEL_STATUS);
        let mut balance = Family::of(&m::CHANNEL_BALANCE_USD);
        let mut response = Family::of(&m::CHANNEL_RESPONSE_TIME_SECONDS);
        let mut used_quota = Family::of(&m::CHANNEL_USED_QUOTA);
        for c in &self.channels {
            let l = [
                (CHANNEL_LABELS[0], c.id.as_str()),
                (CHANNEL_LABELS[1], c.name.as_str()),
                (CHANNEL_LABELS[2], c.type_name.as_str()),
            ];
            if let Some(v) = c.status {
                status.sample(&l, v);
            }
            if let Some(v) = c.balance_usd {
                balance.sample(&l, v);
            }
            if let Some(v) = c.response_time_seconds {
                response.sample(&l, v);
            }
            if let Some(v) = c.used_quota {
                used_quota.sample(&l, v);
            }
        }
        status.finish(out);
        balance.finish(out);
        response.finish(out);
        used_quota.finish(out);
    }
}

#[cfg(test)]
mod tests {
    use super::channel_type_name;

    #[test]
    fn the_2026_channel_types_have_their_names() {
        let names: Vec<String> = [1, 57, 58, 59, 60, 61].map(channel_type_name).to_vec();
        assert_eq!(
            names,
            [
                "OpenAI",
                "Codex",
                "AdvancedCustom",
                "Sub2API",
                "NewAPI",
                "type_61"
            ]
        );
    }
}
