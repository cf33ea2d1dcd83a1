//! The normalized span: one row per span, the unit every role passes on.
//!
//! [`SpanRecord`] is a protobuf message (derived with prost) so that the same bytes
//! travel through the standalone write-ahead log and, in distributed mode, through
//! Kafka records. [`SpanRecord`]s become Arrow [`RecordBatch`]es with [`spans_to_batch`]
//! and are stored as Parquet with [`span_schema`].

use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, FixedSizeBinaryBuilder, Float64Builder, Int64Builder, RecordBatch, StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::tenant::TenantId;

/// The OpenInference span kinds, which Loupe uses to classify every span.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum LlmKind {
    Unknown = 0,
    Llm = 1,
    Chain = 2,
    Retriever = 3,
    Embedding = 4,
    Tool = 5,
    Reranker = 6,
    Agent = 7,
    Guardrail = 8,
    Evaluator = 9,
}

impl LlmKind {
    pub const ALL: [LlmKind; 10] = [
        LlmKind::Unknown,
        LlmKind::Llm,
        LlmKind::Chain,
        LlmKind::Retriever,
        LlmKind::Embedding,
        LlmKind::Tool,
        LlmKind::Reranker,
        LlmKind::Agent,
        LlmKind::Guardrail,
        LlmKind::Evaluator,
    ];

    /// The upper-case name used in storage and the API (`LLM`, `RETRIEVER`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            LlmKind::Unknown => "UNKNOWN",
            LlmKind::Llm => "LLM",
            LlmKind::Chain => "CHAIN",
            LlmKind::Retriever => "RETRIEVER",
            LlmKind::Embedding => "EMBEDDING",
            LlmKind::Tool => "TOOL",
            LlmKind::Reranker => "RERANKER",
            LlmKind::Agent => "AGENT",
            LlmKind::Guardrail => "GUARDRAIL",
            LlmKind::Evaluator => "EVALUATOR",
        }
    }

    /// Parses a kind case-insensitively; `None` for an unknown word.
    pub fn parse(s: &str) -> Option<LlmKind> {
        LlmKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
    }
}

/// OpenTelemetry span status codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, prost::Enumeration)]
#[repr(i32)]
pub enum StatusCode {
    Unset = 0,
    Ok = 1,
    Error = 2,
}

impl StatusCode {
    pub fn as_str(self) -> &'static str {
        match self {
            StatusCode::Unset => "UNSET",
            StatusCode::Ok => "OK",
            StatusCode::Error => "ERROR",
        }
    }

    pub fn parse(s: &str) -> Option<StatusCode> {
        [StatusCode::Unset, StatusCode::Ok, StatusCode::Error]
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
    }
}

/// OpenTelemetry span kind names, indexed by the OTLP enum value.
pub const SPAN_KIND_NAMES: [&str; 6] = [
    "UNSPECIFIED",
    "INTERNAL",
    "SERVER",
    "CLIENT",
    "PRODUCER",
    "CONSUMER",
];

/// Returns the name of an OTLP span kind value.
pub fn span_kind_name(kind: i32) -> &'static str {
    usize::try_from(kind)
        .ok()
        .and_then(|k| SPAN_KIND_NAMES.get(k))
        .copied()
        .unwrap_or("UNSPECIFIED")
}

/// One normalized span.
///
/// JSON-valued fields (`attributes`, `resource`, `scope`, `events`, `links`) hold the
/// original OTLP data so that nothing a client sent is lost; the typed LLM fields are
/// derived from them by [`crate::normalize`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct SpanRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub span_id: Vec<u8>,
    /// Empty for a root span.
    #[prost(bytes = "vec", tag = "3")]
    pub parent_span_id: Vec<u8>,
    #[prost(string, tag = "4")]
    pub name: String,
    #[prost(string, tag = "5")]
    pub service_name: String,
    /// The OTLP span kind value (see [`span_kind_name`]).
    #[prost(int32, tag = "6")]
    pub span_kind: i32,
    #[prost(enumeration = "LlmKind", tag = "7")]
    pub llm_kind: i32,
    #[prost(fixed64, tag = "8")]
    pub start_ns: u64,
    #[prost(fixed64, tag = "9")]
    pub end_ns: u64,
    #[prost(enumeration = "StatusCode", tag = "10")]
    pub status: i32,
    #[prost(string, tag = "11")]
    pub status_message: String,
    #[prost(string, optional, tag = "12")]
    pub provider: Option<String>,
    #[prost(string, optional, tag = "13")]
    pub request_model: Option<String>,
    #[prost(string, optional, tag = "14")]
    pub response_model: Option<String>,
    #[prost(int64, optional, tag = "15")]
    pub input_tokens: Option<i64>,
    #[prost(int64, optional, tag = "16")]
    pub output_tokens: Option<i64>,
    #[prost(int64, optional, tag = "17")]
    pub total_tokens: Option<i64>,
    #[prost(int64, optional, tag = "18")]
    pub cache_read_tokens: Option<i64>,
    #[prost(int64, optional, tag = "19")]
    pub reasoning_tokens: Option<i64>,
    #[prost(double, optional, tag = "20")]
    pub cost_input_usd: Option<f64>,
    #[prost(double, optional, tag = "21")]
    pub cost_output_usd: Option<f64>,
    #[prost(double, optional, tag = "22")]
    pub cost_total_usd: Option<f64>,
    #[prost(string, optional, tag = "23")]
    pub finish_reason: Option<String>,
    #[prost(string, optional, tag = "24")]
    pub user_id: Option<String>,
    #[prost(string, optional, tag = "25")]
    pub session_id: Option<String>,
    #[prost(string, optional, tag = "26")]
    pub prompt_name: Option<String>,
    #[prost(string, optional, tag = "27")]
    pub prompt_version: Option<String>,
    #[prost(string, optional, tag = "28")]
    pub environment: Option<String>,
    /// The span's input: text, or JSON (e.g. chat messages). Bounded in size.
    #[prost(string, optional, tag = "29")]
    pub input: Option<String>,
    #[prost(string, optional, tag = "30")]
    pub output: Option<String>,
    /// All span attributes as a JSON object (values bounded in size).
    #[prost(string, tag = "31")]
    pub attributes: String,
    /// Resource attributes as a JSON object.
    #[prost(string, tag = "32")]
    pub resource: String,
    /// Instrumentation scope as JSON: `{"name", "version", "attributes"}`.
    #[prost(string, tag = "33")]
    pub scope: String,
    /// Span events as a JSON array of `{"time_ns", "name", "attributes"}`.
    #[prost(string, tag = "34")]
    pub events: String,
    /// Span links as a JSON array of `{"trace_id", "span_id", "attributes"}`.
    #[prost(string, tag = "35")]
    pub links: String,
    /// Where the cost came from: `client` (sent on the span), `computed` (pricing
    /// table entry id), or unset when no cost is known.
    #[prost(string, optional, tag = "36")]
    pub cost_source: Option<String>,
}

impl SpanRecord {
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }

    /// The approximate in-memory size, used for flush thresholds.
    pub fn approx_bytes(&self) -> usize {
        const FIXED: usize = 256;
        FIXED
            + self.name.len()
            + self.service_name.len()
            + self.status_message.len()
            + self.input.as_ref().map_or(0, String::len)
            + self.output.as_ref().map_or(0, String::len)
            + self.attributes.len()
            + self.resource.len()
            + self.scope.len()
            + self.events.len()
            + self.links.len()
    }
}

/// Splits spans into traces, in order of first appearance, keeping span order within
/// each trace.
pub fn group_by_trace(spans: Vec<SpanRecord>) -> Vec<(Vec<u8>, Vec<SpanRecord>)> {
    let mut traces: Vec<(Vec<u8>, Vec<SpanRecord>)> = Vec::new();
    let mut index: std::collections::HashMap<Vec<u8>, usize> = Default::default();
    for span in spans {
        match index.get(&span.trace_id) {
            Some(&i) => traces[i].1.push(span),
            None => {
                index.insert(span.trace_id.clone(), traces.len());
                traces.push((span.trace_id.clone(), vec![span]));
            }
        }
    }
    traces
}

/// A batch of normalized spans of one tenant: the queue payload.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SpanBatch {
    #[prost(string, tag = "1")]
    pub tenant: String,
    #[prost(message, repeated, tag = "2")]
    pub spans: Vec<SpanRecord>,
    /// Scores of traces or spans (see [`crate::score`]).
    #[prost(message, repeated, tag = "3")]
    pub scores: Vec<crate::score::ScoreRecord>,
}

impl SpanBatch {
    pub fn tenant_id(&self) -> Result<TenantId, crate::Error> {
        self.tenant.parse()
    }
}

/// Column names of the span table, in schema order.
pub mod col {
    pub const TRACE_ID: &str = "trace_id";
    pub const SPAN_ID: &str = "span_id";
    pub const PARENT_SPAN_ID: &str = "parent_span_id";
    pub const NAME: &str = "name";
    pub const SERVICE_NAME: &str = "service_name";
    pub const SPAN_KIND: &str = "span_kind";
    pub const LLM_KIND: &str = "llm_kind";
    pub const START_NS: &str = "start_ns";
    pub const END_NS: &str = "end_ns";
    pub const DURATION_NS: &str = "duration_ns";
    pub const STATUS: &str = "status";
    pub const STATUS_MESSAGE: &str = "status_message";
    pub const PROVIDER: &str = "provider";
    pub const REQUEST_MODEL: &str = "request_model";
    pub const RESPONSE_MODEL: &str = "response_model";
    pub const INPUT_TOKENS: &str = "input_tokens";
    pub const OUTPUT_TOKENS: &str = "output_tokens";
    pub const TOTAL_TOKENS: &str = "total_tokens";
    pub const CACHE_READ_TOKENS: &str = "cache_read_tokens";
    pub const REASONING_TOKENS: &str = "reasoning_tokens";
    pub const COST_INPUT_USD: &str = "cost_input_usd";
    pub const COST_OUTPUT_USD: &str = "cost_output_usd";
    pub const COST_TOTAL_USD: &str = "cost_total_usd";
    pub const COST_SOURCE: &str = "cost_source";
    pub const FINISH_REASON: &str = "finish_reason";
    pub const USER_ID: &str = "user_id";
    pub const SESSION_ID: &str = "session_id";
    pub const PROMPT_NAME: &str = "prompt_name";
    pub const PROMPT_VERSION: &str = "prompt_version";
    pub const ENVIRONMENT: &str = "environment";
    pub const INPUT: &str = "input";
    pub const OUTPUT: &str = "output";
    pub const ATTRIBUTES: &str = "attributes";
    pub const RESOURCE: &str = "resource";
    pub const SCOPE: &str = "scope";
    pub const EVENTS: &str = "events";
    pub const LINKS: &str = "links";
}

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    use DataType::*;
    let f = |name: &str, ty: DataType, nullable: bool| Field::new(name, ty, nullable);
    Arc::new(Schema::new(vec![
        f(col::TRACE_ID, FixedSizeBinary(16), false),
        f(col::SPAN_ID, FixedSizeBinary(8), false),
        f(col::PARENT_SPAN_ID, FixedSizeBinary(8), true),
        f(col::NAME, Utf8, false),
        f(col::SERVICE_NAME, Utf8, false),
        f(col::SPAN_KIND, Utf8, false),
        f(col::LLM_KIND, Utf8, false),
        f(col::START_NS, Int64, false),
        f(col::END_NS, Int64, false),
        f(col::DURATION_NS, Int64, false),
        f(col::STATUS, Utf8, false),
        f(col::STATUS_MESSAGE, Utf8, true),
        f(col::PROVIDER, Utf8, true),
        f(col::REQUEST_MODEL, Utf8, true),
        f(col::RESPONSE_MODEL, Utf8, true),
        f(col::INPUT_TOKENS, Int64, true),
        f(col::OUTPUT_TOKENS, Int64, true),
        f(col::TOTAL_TOKENS, Int64, true),
        f(col::CACHE_READ_TOKENS, Int64, true),
        f(col::REASONING_TOKENS, Int64, true),
        f(col::COST_INPUT_USD, Float64, true),
        f(col::COST_OUTPUT_USD, Float64, true),
        f(col::COST_TOTAL_USD, Float64, true),
        f(col::COST_SOURCE, Utf8, true),
        f(col::FINISH_REASON, Utf8, true),
        f(col::USER_ID, Utf8, true),
        f(col::SESSION_ID, Utf8, true),
        f(col::PROMPT_NAME, Utf8, true),
        f(col::PROMPT_VERSION, Utf8, true),
        f(col::ENVIRONMENT, Utf8, true),
        f(col::INPUT, Utf8, true),
        f(col::OUTPUT, Utf8, true),
        f(col::ATTRIBUTES, Utf8, false),
        f(col::RESOURCE, Utf8, false),
        f(col::SCOPE, Utf8, false),
        f(col::EVENTS, Utf8, false),
        f(col::LINKS, Utf8, false),
    ]))
});

/// The Arrow schema of the span table (the Parquet block schema).
pub fn span_schema() -> SchemaRef {
    SCHEMA.clone()
}

fn nanos_i64(ns: u64) -> i64 {
    i64::try_from(ns).unwrap_or(i64::MAX)
}

fn empty_as_null(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// Builds an Arrow batch in [`span_schema`] from spans.
///
/// Ids were validated at ingest; an id of another length (which only a corrupted queue
/// entry could carry) is reported as an error instead of panicking.
///
/// The large text columns are allocated to their exact size, so that the batch's
/// memory size (which drives flushing and backpressure) is what the spans need.
pub fn spans_to_batch(spans: &[SpanRecord]) -> Result<RecordBatch, crate::Error> {
    let n = spans.len();
    let exact =
        |f: fn(&SpanRecord) -> usize| StringBuilder::with_capacity(n, spans.iter().map(f).sum());
    // Empty JSON fields are stored as "{}" or "[]".
    fn json_len(s: &str) -> usize {
        s.len().max(2)
    }
    let mut trace_id = FixedSizeBinaryBuilder::with_capacity(n, 16);
    let mut span_id = FixedSizeBinaryBuilder::with_capacity(n, 8);
    let mut parent = FixedSizeBinaryBuilder::with_capacity(n, 8);
    let str_builder = || StringBuilder::with_capacity(n, n * 16);
    let (mut name, mut service, mut span_kind, mut llm_kind) =
        (str_builder(), str_builder(), str_builder(), str_builder());
    let (mut start, mut end, mut duration) = (
        Int64Builder::with_capacity(n),
        Int64Builder::with_capacity(n),
        Int64Builder::with_capacity(n),
    );
    let (mut status, mut status_message) = (str_builder(), str_builder());
    let (mut provider, mut request_model, mut response_model) =
        (str_builder(), str_builder(), str_builder());
    let mut ints: [Int64Builder; 5] = std::array::from_fn(|_| Int64Builder::with_capacity(n));
    let mut floats: [Float64Builder; 3] = std::array::from_fn(|_| Float64Builder::with_capacity(n));
    let mut opt_strs: [StringBuilder; 9] = [
        str_builder(),
        str_builder(),
        str_builder(),
        str_builder(),
        str_builder(),
        str_builder(),
        str_builder(),
        exact(|s| s.input.as_ref().map_or(0, String::len)),
        exact(|s| s.output.as_ref().map_or(0, String::len)),
    ];
    let mut json_strs: [StringBuilder; 5] = [
        exact(|s| json_len(&s.attributes)),
        exact(|s| json_len(&s.resource)),
        exact(|s| json_len(&s.scope)),
        exact(|s| json_len(&s.events)),
        exact(|s| json_len(&s.links)),
    ];

    for s in spans {
        let bad_id = |what: &str, len: usize| {
            crate::Error::Corrupt(format!("{what} of {len} bytes in a stored span"))
        };
        trace_id
            .append_value(&s.trace_id)
            .map_err(|_| bad_id("trace_id", s.trace_id.len()))?;
        span_id
            .append_value(&s.span_id)
            .map_err(|_| bad_id("span_id", s.span_id.len()))?;
        if s.parent_span_id.is_empty() {
            parent.append_null();
        } else {
            parent
                .append_value(&s.parent_span_id)
                .map_err(|_| bad_id("parent_span_id", s.parent_span_id.len()))?;
        }
        name.append_value(&s.name);
        service.append_value(&s.service_name);
        span_kind.append_value(span_kind_name(s.span_kind));
        llm_kind.append_value(s.llm_kind().as_str());
        start.append_value(nanos_i64(s.start_ns));
        end.append_value(nanos_i64(s.end_ns));
        duration.append_value(nanos_i64(s.duration_ns()));
        status.append_value(s.status().as_str());
        status_message.append_option(empty_as_null(&s.status_message));
        provider.append_option(s.provider.as_deref());
        request_model.append_option(s.request_model.as_deref());
        response_model.append_option(s.response_model.as_deref());
        for (b, v) in ints.iter_mut().zip([
            s.input_tokens,
            s.output_tokens,
            s.total_tokens,
            s.cache_read_tokens,
            s.reasoning_tokens,
        ]) {
            b.append_option(v);
        }
        for (b, v) in floats
            .iter_mut()
            .zip([s.cost_input_usd, s.cost_output_usd, s.cost_total_usd])
        {
            b.append_option(v);
        }
        for (b, v) in opt_strs.iter_mut().zip([
            &s.cost_source,
            &s.finish_reason,
            &s.user_id,
            &s.session_id,
            &s.prompt_name,
            &s.prompt_version,
            &s.environment,
            &s.input,
            &s.output,
        ]) {
            b.append_option(v.as_deref());
        }
        for (b, (v, default)) in json_strs.iter_mut().zip([
            (&s.attributes, "{}"),
            (&s.resource, "{}"),
            (&s.scope, "{}"),
            (&s.events, "[]"),
            (&s.links, "[]"),
        ]) {
            b.append_value(if v.is_empty() { default } else { v.as_str() });
        }
    }

    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(trace_id.finish()),
        Arc::new(span_id.finish()),
        Arc::new(parent.finish()),
        Arc::new(name.finish()),
        Arc::new(service.finish()),
        Arc::new(span_kind.finish()),
        Arc::new(llm_kind.finish()),
        Arc::new(start.finish()),
        Arc::new(end.finish()),
        Arc::new(duration.finish()),
        Arc::new(status.finish()),
        Arc::new(status_message.finish()),
        Arc::new(provider.finish()),
        Arc::new(request_model.finish()),
        Arc::new(response_model.finish()),
    ];
    columns.extend(ints.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    columns.extend(floats.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    columns.extend(
        opt_strs
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef),
    );
    columns.extend(
        json_strs
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef),
    );
    RecordBatch::try_new(span_schema(), columns).map_err(|e| crate::Error::Corrupt(e.to_string()))
}
