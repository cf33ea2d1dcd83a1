//! What the query API returns.

use serde::{Deserialize, Serialize};

/// One span of a trace, with its children nested (ordered by start).
#[derive(Clone, Debug, Serialize, schemars::JsonSchema, Deserialize, PartialEq)]
pub struct SpanNode {
    pub span_id: String,
    pub parent_span_id: Option<String>,
    pub name: String,
    pub service_name: String,
    pub span_kind: String,
    pub llm_kind: String,
    pub start_ns: i64,
    pub end_ns: i64,
    pub duration_ms: f64,
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_read_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_input_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_output_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_total_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    pub attributes: serde_json::Value,
    pub resource: serde_json::Value,
    pub scope: serde_json::Value,
    pub events: serde_json::Value,
    pub links: serde_json::Value,
    pub children: Vec<SpanNode>,
}

/// A whole trace: totals and the span tree.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema, Deserialize, PartialEq)]
pub struct TraceView {
    pub trace_id: String,
    #[serde(flatten)]
    pub summary: TraceTotals,
    /// Root spans (normally one; spans whose parent never arrived are roots too).
    pub roots: Vec<SpanNode>,
    /// Scores of the trace and of its spans, oldest first.
    #[serde(default)]
    pub scores: Vec<crate::scores::ScoreView>,
}

/// Totals of a trace, shared by the trace view and search results.
#[derive(Clone, Debug, Default, Serialize, schemars::JsonSchema, Deserialize, PartialEq)]
pub struct TraceTotals {
    pub root_name: String,
    pub root_service: String,
    pub start_time: String,
    pub start_ns: i64,
    pub end_ns: i64,
    pub duration_ms: f64,
    pub span_count: u64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub total_tokens: i64,
    pub cost_usd: f64,
    pub error: bool,
}

/// One search hit.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema, Deserialize, PartialEq)]
pub struct TraceSummary {
    pub trace_id: String,
    #[serde(flatten)]
    pub totals: TraceTotals,
}

/// The answer to a search.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema, Deserialize, PartialEq)]
pub struct SearchResponse {
    pub traces: Vec<TraceSummary>,
    /// The time range searched (trace start), Unix nanoseconds.
    pub start_ns: i64,
    pub end_ns: i64,
    pub limit: usize,
}

/// RFC 3339 text of a Unix-nanosecond time.
pub fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

pub fn ms(ns: i64) -> f64 {
    ns as f64 / 1e6
}
