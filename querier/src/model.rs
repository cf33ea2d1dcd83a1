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

#[cfg(test)]
impl SpanNode {
    /// A CHAIN span of service `svc` named `span-<id>`, with no LLM fields: the start
    /// of a test's span.
    pub(crate) fn test(id: &str, parent: Option<&str>, start_ns: i64, end_ns: i64) -> SpanNode {
        SpanNode {
            span_id: id.into(),
            parent_span_id: parent.map(Into::into),
            name: format!("span-{id}"),
            service_name: "svc".into(),
            span_kind: "INTERNAL".into(),
            llm_kind: "CHAIN".into(),
            start_ns,
            end_ns,
            duration_ms: ms(end_ns - start_ns),
            status: "OK".into(),
            status_message: None,
            provider: None,
            request_model: None,
            response_model: None,
            input_tokens: None,
            output_tokens: None,
            total_tokens: None,
            cache_read_tokens: None,
            reasoning_tokens: None,
            cost_input_usd: None,
            cost_output_usd: None,
            cost_total_usd: None,
            cost_source: None,
            finish_reason: None,
            user_id: None,
            session_id: None,
            prompt_name: None,
            prompt_version: None,
            environment: None,
            input: None,
            output: None,
            attributes: serde_json::json!({}),
            resource: serde_json::json!({}),
            scope: serde_json::json!({}),
            events: serde_json::json!([]),
            links: serde_json::json!([]),
            children: Vec::new(),
        }
    }
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
    /// The trace's user: the root span's, else any span's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The trace's session: the root span's, else any span's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
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
