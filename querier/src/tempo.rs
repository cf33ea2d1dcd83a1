//! A Grafana Tempo–compatible query API: the pure part (request parsing and response
//! bodies; no I/O), so that Grafana's Tempo data source can be pointed at the querier.
//!
//! Shapes follow the Tempo HTTP API reference (<https://grafana.com/docs/tempo/latest/api_docs/>,
//! `docs/sources/tempo/api_docs/_index.md` in grafana/tempo), the messages of Tempo's
//! `pkg/tempopb/tempo.proto` (`Trace`, `TraceByIDResponse`, `SearchResponse`,
//! `TraceSearchMetadata`, `SearchTagsV2Response`, `TagValue`), the OTLP trace protos
//! (`opentelemetry/proto/trace/v1/trace.proto`, `common/v1/common.proto`), and what
//! Grafana's Tempo data source (grafana/grafana-tempo-datasource, formerly
//! `pkg/tsdb/tempo` and `public/app/plugins/datasource/tempo` in grafana/grafana) sends
//! and parses:
//!
//! * **Trace by id.** Grafana asks `GET /api/v2/traces/<hex id>` and, on a 404,
//!   `GET /api/traces/<hex id>`, both with `Accept: application/protobuf` and
//!   `start`/`end` (Unix seconds) when the data source shifts the time range; newer
//!   versions add `span_pruning*`, `q`, `keep_hierarchy`, … to the v2 request. It decodes
//!   the body with `proto.Unmarshal` into `tempopb.TraceByIDResponse` (v2) or
//!   `tempopb.Trace` (v1) (`pkg/tempo/trace.go`): **a JSON body does not decode there**,
//!   so [`trace_v2_protobuf`] / [`trace_protobuf`] write the protobuf bodies Grafana
//!   needs, and [`trace_v2_json`] / [`trace_json`] write Tempo's JSON (OTLP/JSON as
//!   gogo `jsonpb` prints it: ids in base64, 64-bit integers as decimal strings, enums by
//!   name; v1 names the resource spans `"batches"`) for every other client. Choose with
//!   [`wants_protobuf`]. Ids are taken in hex ([`parse_trace_id`] also accepts the
//!   shortened ids Tempo prints, left-padding them with zeros).
//! * **Search** (`GET /api/search`). Grafana's backend sends `q` (TraceQL), `limit`,
//!   `spss`, `start`, `end` (Unix seconds) with `Accept: application/json`
//!   (`pkg/tempo/search.go`); older Grafana versions send the tag-based `tags` (logfmt),
//!   `minDuration`, `maxDuration`. [`parse_search`] turns them into a [`SearchQuery`].
//!   Grafana decodes the answer with `jsonpb.Unmarshal` into `tempopb.SearchResponse`,
//!   which rejects unknown fields, so [`search_json`] writes fields of that message only.
//!   With "streaming" enabled in the data source settings Grafana searches over Tempo's
//!   gRPC `StreamingQuerier` instead, which Loupe does not serve: streaming must be off.
//! * **Tags.** Grafana asks `GET /api/v2/search/tags?limit=…` ([`tag_names_v2_json`])
//!   and `GET /api/v2/search/tag/<tag>/values?limit=…&q=…` ([`tag_values_v2_json`]),
//!   with `<tag>` scoped the TraceQL way (`resource.service.name`, `span.user.id`,
//!   `name`); the v1 forms are [`tag_names_json`] and [`tag_values_json`].
//! * **Health.** "Save & test" asks `GET /api/echo` and expects a 200 ([`ECHO_BODY`]);
//!   `GET /api/status/buildinfo` ([`buildinfo_json`]) is served for tools that look.
//!
//! # What search understands
//!
//! Tag search (`tags`) takes space-separated `key=value` pairs (values may be
//! double-quoted). TraceQL (`q`) takes one spanset of conditions joined by `&&`:
//!
//! ```text
//! {}
//! { resource.service.name = "bot" && name = "chat" && status = error && duration > 1.5s }
//! { .user.id = "u-1" && span.gen_ai.request.model = "gpt-4o" && traceDuration <= 2s }
//! ```
//!
//! This is what Grafana's search builder writes when each filter has one value. The
//! fields are those Loupe has columns for (see [`tag_names`]); every attribute key that
//! `loupe_core::normalize` reads into a column may be used, with or without a `.`,
//! `span.` or `resource.` scope. Anything else (`||`, `!=`, regular expressions,
//! parentheses, several spansets, pipelines, other attributes or intrinsics) is an error
//! that names the problem and the supported subset; nothing is silently ignored.
//!
//! Differences from Tempo, all in the direction of Loupe's trace-level search:
//!
//! * Each condition is met by some span of the trace, not necessarily the same span
//!   (TraceQL wants one span meeting the whole spanset).
//! * Attribute conditions compare Loupe's normalized columns, so all keys of a column
//!   are equivalent (`llm.model_name = "x"` matches a span whose normalized model is `x`,
//!   whichever attribute carried it), and model conditions match the request or the
//!   response model. Values match exactly (Tempo's `tags` search matches
//!   case-insensitive substrings).
//! * `duration` is compared with the trace's duration, as `traceDuration`,
//!   `minDuration` and `maxDuration` are: Loupe has no span-duration filter.
//! * `status = ok` selects traces with no span in error (TraceQL: a span whose status is
//!   OK); `status = error` selects traces with a span in error, as in Tempo.
//! * Search results carry no span sets (`spss` is accepted and has no effect).

use std::collections::HashMap;

use base64::Engine as _;
use loupe_core::LlmKind;
use loupe_core::span::col;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList, any_value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, TracesData, span, status,
};
use prost::Message;
use serde_json::{Value, json};

use crate::api::{DEFAULT_LIMIT, DEFAULT_LOOKBACK, MAX_LIMIT, parse_duration, parse_time};
use crate::engine::{SearchQuery, StatusFilter};
use crate::model::{SearchResponse, SpanNode, TraceView};

// ---------------------------------------------------------------------------------------
// Small endpoints
// ---------------------------------------------------------------------------------------

/// The body of `GET /api/echo` (status 200, `text/plain`): Grafana's "Save & test".
pub const ECHO_BODY: &str = "echo";

/// The Tempo version `GET /api/status/buildinfo` reports: a 2.x release, so that tools
/// gating features on the Tempo version see the v2 API that is served here. Grafana's
/// current data source does not read it (streaming is gated by its settings).
pub const TEMPO_API_VERSION: &str = "2.5.0";

/// The body of `GET /api/status/buildinfo` (Tempo's fields: `version`, `revision`,
/// `branch`, `buildDate`, `buildUser`, `goVersion`); Loupe's own version is in
/// `revision`.
pub fn buildinfo_json(loupe_version: &str) -> Value {
    json!({
        "version": TEMPO_API_VERSION,
        "revision": format!("loupe-{loupe_version}"),
        "branch": "loupe",
        "buildDate": "",
        "buildUser": "loupe",
        "goVersion": "",
    })
}

/// Whether a trace-by-id request wants protobuf (`Accept: application/protobuf`, as
/// Grafana sends) rather than JSON.
pub fn wants_protobuf(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.to_ascii_lowercase().contains("application/protobuf"))
}

/// Parses a trace id in hex for the trace-by-id endpoints. Ids may come shortened (Tempo
/// prints them without leading zeros, and Grafana passes on what it is given), so 1 to
/// 32 digits are accepted and left-padded with zeros.
pub fn parse_trace_id(s: &str) -> Result<[u8; 16], String> {
    let s = s.trim();
    let digits: Option<Vec<u8>> = s.bytes().map(nibble).collect();
    let digits = match digits {
        Some(d) if (1..=32).contains(&d.len()) => d,
        _ => {
            return Err(format!(
                "trace id must be 1 to 32 hexadecimal characters, got {:?}",
                s.chars().take(64).collect::<String>()
            ));
        }
    };
    let mut out = [0u8; 16];
    let offset = 32 - digits.len();
    for (i, d) in digits.into_iter().enumerate() {
        let pos = offset + i;
        out[pos / 2] |= if pos % 2 == 0 { d << 4 } else { d };
    }
    Ok(out)
}

fn nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Bytes of an even-length hex string (ids as the engine and `normalize` write them).
fn unhex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks_exact(2)
        .map(|p| Some((nibble(p[0])? << 4) | nibble(p[1])?))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Searchable fields
// ---------------------------------------------------------------------------------------

/// A field of [`SearchQuery`] a tag or TraceQL condition can set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Service,
    Name,
    Status,
    Model,
    LlmKind,
    User,
    Session,
    PromptName,
    PromptVersion,
}

impl Field {
    /// Attribute-backed fields, in the order error messages list them.
    const ATTRIBUTE_FIELDS: [Field; 7] = [
        Field::Service,
        Field::Model,
        Field::LlmKind,
        Field::User,
        Field::Session,
        Field::PromptName,
        Field::PromptVersion,
    ];

    fn label(self) -> &'static str {
        match self {
            Field::Service => "service",
            Field::Name => "name",
            Field::Status => "status",
            Field::Model => "model",
            Field::LlmKind => "LLM kind",
            Field::User => "user",
            Field::Session => "session",
            Field::PromptName => "prompt name",
            Field::PromptVersion => "prompt version",
        }
    }
}

/// Attribute keys Loupe can filter on, with the field and the column they land in: the
/// keys `loupe_core::normalize` reads into each column (so all keys of one column are
/// equivalent), then Loupe's own short names.
const ATTRIBUTES: &[(&str, Field, &str)] = &[
    ("service.name", Field::Service, col::SERVICE_NAME),
    ("gen_ai.request.model", Field::Model, col::REQUEST_MODEL),
    ("gen_ai.response.model", Field::Model, col::RESPONSE_MODEL),
    ("llm.model_name", Field::Model, col::REQUEST_MODEL),
    ("llm.request.model_name", Field::Model, col::REQUEST_MODEL),
    ("llm.response.model_name", Field::Model, col::RESPONSE_MODEL),
    ("llm.request.model", Field::Model, col::REQUEST_MODEL),
    ("llm.response.model", Field::Model, col::RESPONSE_MODEL),
    (
        "langfuse.observation.model.name",
        Field::Model,
        col::REQUEST_MODEL,
    ),
    ("embedding.model_name", Field::Model, col::REQUEST_MODEL),
    ("reranker.model_name", Field::Model, col::REQUEST_MODEL),
    ("openinference.span.kind", Field::LlmKind, col::LLM_KIND),
    ("user.id", Field::User, col::USER_ID),
    ("langfuse.user.id", Field::User, col::USER_ID),
    ("enduser.id", Field::User, col::USER_ID),
    ("llm.user", Field::User, col::USER_ID),
    ("gen_ai.user", Field::User, col::USER_ID),
    (
        "traceloop.association.properties.user_id",
        Field::User,
        col::USER_ID,
    ),
    ("session.id", Field::Session, col::SESSION_ID),
    ("langfuse.session.id", Field::Session, col::SESSION_ID),
    ("gen_ai.conversation.id", Field::Session, col::SESSION_ID),
    (
        "traceloop.association.properties.session_id",
        Field::Session,
        col::SESSION_ID,
    ),
    ("gen_ai.prompt.name", Field::PromptName, col::PROMPT_NAME),
    (
        "langfuse.observation.prompt.name",
        Field::PromptName,
        col::PROMPT_NAME,
    ),
    ("langfuse.prompt.name", Field::PromptName, col::PROMPT_NAME),
    ("traceloop.prompt.key", Field::PromptName, col::PROMPT_NAME),
    ("prompt.id", Field::PromptName, col::PROMPT_NAME),
    (
        "llm.prompt_template.version",
        Field::PromptVersion,
        col::PROMPT_VERSION,
    ),
    (
        "langfuse.observation.prompt.version",
        Field::PromptVersion,
        col::PROMPT_VERSION,
    ),
    (
        "langfuse.prompt.version",
        Field::PromptVersion,
        col::PROMPT_VERSION,
    ),
    (
        "traceloop.prompt.version",
        Field::PromptVersion,
        col::PROMPT_VERSION,
    ),
    ("service", Field::Service, col::SERVICE_NAME),
    ("model", Field::Model, col::REQUEST_MODEL),
    ("llm_kind", Field::LlmKind, col::LLM_KIND),
    ("user_id", Field::User, col::USER_ID),
    ("session_id", Field::Session, col::SESSION_ID),
    ("prompt_name", Field::PromptName, col::PROMPT_NAME),
    ("prompt_version", Field::PromptVersion, col::PROMPT_VERSION),
];

/// The field and column of an attribute key, which may carry a TraceQL scope (`.`,
/// `span.`, `resource.`).
fn attribute(key: &str) -> Option<(Field, &'static str)> {
    let key = ["resource.", "span.", "."]
        .iter()
        .find_map(|p| key.strip_prefix(*p))
        .unwrap_or(key);
    ATTRIBUTES
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|&(_, field, column)| (field, column))
}

/// The fields search understands, for error messages.
fn supported_fields() -> String {
    let mut parts = vec![
        "name (the span name)".to_owned(),
        "status (error or ok)".to_owned(),
    ];
    for field in Field::ATTRIBUTE_FIELDS {
        let keys: Vec<&str> = ATTRIBUTES
            .iter()
            .filter(|(_, f, _)| *f == field)
            .map(|(k, _, _)| *k)
            .collect();
        parts.push(format!("{}: {}", field.label(), keys.join(", ")));
    }
    parts.join("; ")
}

/// Resource attributes Loupe can search, as tag names.
const RESOURCE_TAGS: &[&str] = &["service.name"];
/// Span attributes Loupe can search, as tag names (one key per column).
const SPAN_TAGS: &[&str] = &[
    "gen_ai.request.model",
    "gen_ai.response.model",
    "openinference.span.kind",
    "user.id",
    "session.id",
    "gen_ai.prompt.name",
    "llm.prompt_template.version",
];
/// Intrinsics TraceQL search understands.
const INTRINSIC_TAGS: &[&str] = &["duration", "name", "status", "traceDuration"];

/// The tag names Loupe supports, as `GET /api/search/tags` lists them: the attributes
/// (one key per column) and the intrinsics `name` and `status`, all usable in `tags=`.
pub fn tag_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = RESOURCE_TAGS.iter().chain(SPAN_TAGS).copied().collect();
    names.extend(["name", "status"]);
    names
}

/// The tag names by TraceQL scope, as `GET /api/v2/search/tags` lists them (names
/// unscoped; Grafana prefixes them with their scope, except intrinsics).
pub fn tag_scopes() -> Vec<(&'static str, &'static [&'static str])> {
    vec![
        ("resource", RESOURCE_TAGS),
        ("span", SPAN_TAGS),
        ("intrinsic", INTRINSIC_TAGS),
    ]
}

/// Checks the `scope` parameter of the tag endpoints: `None` means every scope.
fn tag_scope(scope: Option<&str>) -> Result<Option<&str>, String> {
    match scope.map(str::trim) {
        None | Some("" | "all" | "none") => Ok(None),
        Some(
            s
            @ ("resource" | "span" | "intrinsic" | "event" | "link" | "instrumentation" | "trace"),
        ) => Ok(Some(s)),
        Some(s) => Err(format!(
            "invalid scope {s:?}; one of resource, span, intrinsic, event, link, \
             instrumentation, or none for all"
        )),
    }
}

/// The body of `GET /api/search/tags[?scope=…]`: `{"tagNames": [...]}`.
pub fn tag_names_json(scope: Option<&str>) -> Result<Value, String> {
    let names: Vec<&str> = match tag_scope(scope)? {
        None => tag_names(),
        Some(s) => tag_scopes()
            .into_iter()
            .filter(|(name, _)| *name == s)
            .flat_map(|(_, tags)| tags.iter().copied())
            .collect(),
    };
    Ok(json!({ "tagNames": names }))
}

/// The body of `GET /api/v2/search/tags[?scope=…]`:
/// `{"scopes": [{"name": "resource", "tags": [...]}, ...]}`.
pub fn tag_names_v2_json(scope: Option<&str>) -> Result<Value, String> {
    let want = tag_scope(scope)?;
    let scopes: Vec<Value> = tag_scopes()
        .into_iter()
        .filter(|(name, _)| want.is_none_or(|w| w == *name))
        .map(|(name, tags)| json!({ "name": name, "tags": tags }))
        .collect();
    Ok(json!({ "scopes": scopes }))
}

/// The column whose distinct values are the values of a tag, for the tag-values
/// endpoints. `tag` may be scoped the TraceQL way (`resource.service.name`,
/// `.service.name`, `span.user.id`, `name`). `None` for a tag with no column: answer
/// the values from [`fixed_tag_values`] if it has some, else an empty list (as Tempo
/// answers for a tag it never saw).
pub fn tag_column(tag: &str) -> Option<&'static str> {
    match tag.trim() {
        "name" | "span:name" => Some(col::NAME),
        t => attribute(t).map(|(_, column)| column),
    }
}

/// The values of `status` Loupe can search.
const STATUS_VALUES: &[&str] = &["error", "ok"];

/// The values of a tag that has a fixed set of them (`status`).
pub fn fixed_tag_values(tag: &str) -> Option<&'static [&'static str]> {
    is_status_tag(tag).then_some(STATUS_VALUES)
}

fn is_status_tag(tag: &str) -> bool {
    matches!(tag.trim(), "status" | "span:status")
}

/// The body of `GET /api/search/tag/<tag>/values`: `{"tagValues": [...]}`.
pub fn tag_values_json<S: AsRef<str>>(values: &[S]) -> Value {
    let values: Vec<&str> = values.iter().map(|v| v.as_ref()).collect();
    json!({ "tagValues": values })
}

/// The body of `GET /api/v2/search/tag/<tag>/values`:
/// `{"tagValues": [{"type": "string", "value": ...}]}`. Status values are typed
/// `keyword`, so that Grafana writes them unquoted (`status=error`), as TraceQL wants.
pub fn tag_values_v2_json<S: AsRef<str>>(tag: &str, values: &[S]) -> Value {
    let kind = if is_status_tag(tag) {
        "keyword"
    } else {
        "string"
    };
    let values: Vec<Value> = values
        .iter()
        .map(|v| json!({ "type": kind, "value": v.as_ref() }))
        .collect();
    json!({ "tagValues": values })
}

// ---------------------------------------------------------------------------------------
// Search requests
// ---------------------------------------------------------------------------------------

/// Parameters `GET /api/search` accepts.
pub const SEARCH_PARAMS: [&str; 8] = [
    "q",
    "tags",
    "minDuration",
    "maxDuration",
    "limit",
    "start",
    "end",
    "spss",
];

/// A Tempo search, as Loupe runs it.
#[derive(Clone, Debug, PartialEq)]
pub struct TempoSearch {
    /// The Loupe search.
    pub query: SearchQuery,
}

/// Parses the parameters of `GET /api/search` (see the module documentation for what
/// `q` and `tags` understand). `start` and `end` are Unix seconds (RFC 3339 is
/// accepted too; `0` means unset, as in Tempo); the range defaults to the
/// [`DEFAULT_LOOKBACK`] before `end`, `end` to `now_ns`. `limit` defaults to
/// [`DEFAULT_LIMIT`] and is capped at [`MAX_LIMIT`]. Unknown parameters, unsupported
/// tags and unsupported TraceQL are errors naming them.
pub fn parse_search(params: &HashMap<String, String>, now_ns: i64) -> Result<TempoSearch, String> {
    for k in params.keys() {
        if !SEARCH_PARAMS.contains(&k.as_str()) {
            return Err(format!(
                "unknown parameter {k:?}; accepted: {}",
                SEARCH_PARAMS.join(", ")
            ));
        }
    }
    let get = |k: &str| params.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let time = |k: &str| -> Result<Option<i64>, String> {
        match get(k) {
            None | Some("0") => Ok(None),
            Some(v) => parse_time(v).map(Some).map_err(|e| format!("{k}: {e}")),
        }
    };
    let end_ns = time("end")?.unwrap_or(now_ns);
    let start_ns = match time("start")? {
        Some(s) => s,
        None => end_ns.saturating_sub(DEFAULT_LOOKBACK.as_nanos() as i64),
    };
    if end_ns <= start_ns {
        return Err(format!(
            "start must be before end (start={start_ns}ns, end={end_ns}ns)"
        ));
    }
    let limit = match get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n > 0 => usize::try_from(n).unwrap_or(MAX_LIMIT).min(MAX_LIMIT),
            _ => return Err(format!("limit must be a positive integer, got {v:?}")),
        },
    };
    if let Some(v) = get("spss")
        && v.parse::<u32>().is_err()
    {
        return Err(format!("spss must be a non-negative integer, got {v:?}"));
    }
    let mut query = SearchQuery {
        start_ns,
        end_ns,
        limit,
        ..SearchQuery::default()
    };
    match (get("q"), get("tags")) {
        (Some(_), Some(_)) => return Err("give either q (TraceQL) or tags, not both".into()),
        (Some(q), None) => apply_traceql(&mut query, q)?,
        (None, Some(tags)) => apply_tags(&mut query, tags)?,
        (None, None) => {}
    }
    for (k, cmp) in [("minDuration", Cmp::Ge), ("maxDuration", Cmp::Le)] {
        if let Some(v) = get(k) {
            let ns = duration_ns(v).map_err(|e| format!("{k}: {e}"))?;
            apply_duration(&mut query, cmp, ns);
        }
    }
    if let (Some(min), Some(max)) = (query.min_duration_ns, query.max_duration_ns)
        && min > max
    {
        return Err(format!(
            "the duration bounds exclude every trace (at least {min}ns and at most {max}ns)"
        ));
    }
    Ok(TempoSearch { query })
}

/// Nanoseconds of a duration with a unit (`250ms`, `1.5s`, `2m`).
fn duration_ns(v: &str) -> Result<i64, String> {
    parse_duration(v, None).map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
}

/// Sets a field once: the same value again is fine, a different one an error.
fn set_once<T: PartialEq + std::fmt::Debug>(
    slot: &mut Option<T>,
    value: T,
    field: Field,
) -> Result<(), String> {
    if let Some(old) = slot.as_ref()
        && *old != value
    {
        return Err(format!(
            "{} is given twice ({old:?} and {value:?}); Loupe matches each field against one value",
            field.label()
        ));
    }
    *slot = Some(value);
    Ok(())
}

/// Applies `field = value`.
fn apply(q: &mut SearchQuery, field: Field, value: &str) -> Result<(), String> {
    let text = |slot: &mut Option<String>| set_once(slot, value.to_owned(), field);
    match field {
        Field::Status => {
            let status = match value.to_ascii_lowercase().as_str() {
                "error" => StatusFilter::Error,
                "ok" => StatusFilter::Ok,
                _ => {
                    return Err(format!(
                        "status must be error (a span in error) or ok (no span in error), got {value:?}"
                    ));
                }
            };
            set_once(&mut q.status, status, field)
        }
        Field::LlmKind => {
            let kind = LlmKind::parse(value).ok_or_else(|| {
                format!(
                    "LLM kind {value:?} is not one of {}",
                    LlmKind::ALL.map(|k| k.as_str()).join(", ")
                )
            })?;
            set_once(&mut q.llm_kind, kind, field)
        }
        Field::Service => text(&mut q.service),
        Field::Name => text(&mut q.name),
        Field::Model => text(&mut q.model),
        Field::User => text(&mut q.user_id),
        Field::Session => text(&mut q.session_id),
        Field::PromptName => text(&mut q.prompt_name),
        Field::PromptVersion => text(&mut q.prompt_version),
    }
}

/// A comparison of a duration condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cmp {
    Eq,
    Gt,
    Ge,
    Lt,
    Le,
}

/// Narrows the trace-duration bounds by `duration <cmp> ns`.
fn apply_duration(q: &mut SearchQuery, cmp: Cmp, ns: i64) {
    let (min, max) = match cmp {
        Cmp::Eq => (Some(ns), Some(ns)),
        Cmp::Gt => (Some(ns.saturating_add(1)), None),
        Cmp::Ge => (Some(ns), None),
        Cmp::Lt => (None, Some(ns.saturating_sub(1))),
        Cmp::Le => (None, Some(ns)),
    };
    if let Some(m) = min {
        q.min_duration_ns = Some(q.min_duration_ns.map_or(m, |old| old.max(m)));
    }
    if let Some(m) = max {
        q.max_duration_ns = Some(q.max_duration_ns.map_or(m, |old| old.min(m)));
    }
}

/// Applies the logfmt `tags` parameter: `key=value` pairs separated by spaces.
fn apply_tags(q: &mut SearchQuery, tags: &str) -> Result<(), String> {
    for (key, value) in parse_logfmt(tags)? {
        if value.is_empty() {
            return Err(format!("tags: {key:?} has an empty value"));
        }
        let field = match key.as_str() {
            "name" => Field::Name,
            "status" => Field::Status,
            k => match attribute(k) {
                Some((field, _)) => field,
                None => {
                    return Err(format!(
                        "unsupported tag {key:?}; Loupe can search {} (attribute keys may \
                         carry a resource. or span. scope)",
                        supported_fields()
                    ));
                }
            },
        };
        apply(q, field, &value).map_err(|e| format!("tags: {e}"))?;
    }
    Ok(())
}

/// Splits logfmt into key-value pairs; a value may be double-quoted (with `\"` and
/// `\\` escapes).
fn parse_logfmt(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        if chars.next_if_eq(&'=').is_none() {
            return Err(format!(
                "tags: {key:?} has no value; write key=value pairs separated by spaces"
            ));
        }
        if key.is_empty() {
            return Err(
                "tags: a value has no key; write key=value pairs separated by spaces".into(),
            );
        }
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                match chars.next() {
                    None => return Err(format!("tags: the quoted value of {key:?} is not closed")),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(format!("tags: the quoted value of {key:?} is not closed"));
                        }
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(c);
            }
        }
        out.push((key, value));
    }
}

// ---------------------------------------------------------------------------------------
// The TraceQL subset
// ---------------------------------------------------------------------------------------

/// What Loupe accepts in `q`, for error messages.
const TRACEQL_SUBSET: &str = "Loupe supports a subset of TraceQL: one spanset { … } whose \
    conditions are joined by &&, each `field = \"value\"`, `status = error|ok`, or `duration` / \
    `traceDuration` compared (=, >, >=, <, <=) with a duration such as 1.5s or 200ms; {} matches \
    every trace. Not supported: ||, !=, regular expressions (=~, !~), parentheses, negation, \
    several spansets, structural operators and pipelines (| …)";

fn unsupported(detail: &str) -> String {
    format!("unsupported TraceQL: {detail}. {TRACEQL_SUBSET}")
}

/// A TraceQL token.
#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Open,
    Close,
    LParen,
    RParen,
    And,
    Or,
    Pipe,
    /// A comparison or another operator (`=`, `!=`, `=~`, `>`, `>>`, `!`, `~`, …).
    Op(&'static str),
    /// A quoted string, unescaped.
    Str(String),
    /// An identifier, keyword, number or duration.
    Word(String),
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '.' | ':' | '-' | '/' | '@' | '+')
}

fn tokenize(q: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = q.chars().peekable();
    while let Some(c) = chars.next() {
        let tok = match c {
            c if c.is_whitespace() => continue,
            '{' => Tok::Open,
            '}' => Tok::Close,
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            '&' if chars.next_if_eq(&'&').is_some() => Tok::And,
            '|' if chars.next_if_eq(&'|').is_some() => Tok::Or,
            '|' => Tok::Pipe,
            '=' if chars.next_if_eq(&'~').is_some() => Tok::Op("=~"),
            '=' => Tok::Op("="),
            '!' if chars.next_if_eq(&'=').is_some() => Tok::Op("!="),
            '!' if chars.next_if_eq(&'~').is_some() => Tok::Op("!~"),
            '!' => Tok::Op("!"),
            '>' if chars.next_if_eq(&'=').is_some() => Tok::Op(">="),
            '>' if chars.next_if_eq(&'>').is_some() => Tok::Op(">>"),
            '>' => Tok::Op(">"),
            '<' if chars.next_if_eq(&'=').is_some() => Tok::Op("<="),
            '<' if chars.next_if_eq(&'<').is_some() => Tok::Op("<<"),
            '<' => Tok::Op("<"),
            '~' => Tok::Op("~"),
            '"' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None => return Err(unsupported("a quoted string is not closed")),
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some('n') => s.push('\n'),
                            Some('t') => s.push('\t'),
                            Some('r') => s.push('\r'),
                            Some(c) => s.push(c),
                            None => return Err(unsupported("a quoted string is not closed")),
                        },
                        Some(c) => s.push(c),
                    }
                }
                Tok::Str(s)
            }
            '`' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None => return Err(unsupported("a quoted string is not closed")),
                        Some('`') => break,
                        Some(c) => s.push(c),
                    }
                }
                Tok::Str(s)
            }
            c if is_word_char(c) => {
                let mut w = String::from(c);
                while let Some(c) = chars.next_if(|c| is_word_char(*c)) {
                    w.push(c);
                }
                Tok::Word(w)
            }
            other => return Err(unsupported(&format!("unexpected character {other:?}"))),
        };
        out.push(tok);
    }
    Ok(out)
}

/// Applies a TraceQL query of the supported subset.
fn apply_traceql(q: &mut SearchQuery, text: &str) -> Result<(), String> {
    let toks = tokenize(text)?;
    if toks.first() != Some(&Tok::Open) {
        return Err(unsupported(
            "a query is one spanset in braces, like { name = \"chat\" }",
        ));
    }
    let close = toks
        .iter()
        .position(|t| *t == Tok::Close)
        .ok_or_else(|| unsupported("the spanset has no closing }"))?;
    let body = &toks[1..close];
    if let Some(i) = body.iter().position(|t| *t == Tok::Open) {
        return Err(unsupported(if i > 0 && body[i - 1] == Tok::Op("!") {
            "negation (!) is not supported"
        } else {
            "nested spansets are not supported"
        }));
    }
    if let Some(next) = toks.get(close + 1) {
        return Err(unsupported(match next {
            Tok::Pipe => "pipelines (| …) are not supported",
            Tok::And | Tok::Or | Tok::Op(_) => {
                "operators between spansets (&&, ||, >>, <<, ~, …) are not supported: give one spanset"
            }
            _ => "unexpected text after the closing }",
        }));
    }
    if body.is_empty() || body == [Tok::Word("true".into())] {
        return Ok(());
    }
    let mut k = 0;
    loop {
        let attr = match body.get(k) {
            Some(Tok::Word(w)) => w.as_str(),
            Some(Tok::LParen | Tok::RParen) => {
                return Err(unsupported("parentheses are not supported"));
            }
            Some(Tok::Op("!")) => return Err(unsupported("negation (!) is not supported")),
            Some(Tok::Open) => return Err(unsupported("nested spansets are not supported")),
            Some(Tok::Str(_)) => {
                return Err(unsupported(
                    "a condition starts with a field name (quoted attribute names are not supported)",
                ));
            }
            None => return Err(unsupported("a condition is missing after &&")),
            Some(other) => {
                return Err(unsupported(&format!(
                    "a condition starts with a field name, not {other:?}"
                )));
            }
        };
        let cmp = match body.get(k + 1) {
            Some(Tok::Op("=")) => Cmp::Eq,
            Some(Tok::Op(">")) => Cmp::Gt,
            Some(Tok::Op(">=")) => Cmp::Ge,
            Some(Tok::Op("<")) => Cmp::Lt,
            Some(Tok::Op("<=")) => Cmp::Le,
            Some(Tok::Op("!=")) => return Err(unsupported("!= is not supported")),
            Some(Tok::Op("=~" | "!~")) => {
                return Err(unsupported(
                    "regular expressions (=~, !~) are not supported",
                ));
            }
            Some(Tok::Op(op)) => {
                return Err(unsupported(&format!("the operator {op} is not supported")));
            }
            _ => {
                return Err(unsupported(&format!(
                    "{attr} must be followed by a comparison and a value"
                )));
            }
        };
        let value = match body.get(k + 2) {
            Some(Tok::Str(s)) => Literal::Quoted(s),
            Some(Tok::Word(w)) => Literal::Bare(w),
            _ => return Err(unsupported(&format!("{attr} is compared with nothing"))),
        };
        apply_condition(q, attr, cmp, value)?;
        k += 3;
        match body.get(k) {
            None => return Ok(()),
            Some(Tok::And) => k += 1,
            Some(Tok::Or) => {
                return Err(unsupported(
                    "|| is not supported: conditions can only be joined by &&",
                ));
            }
            Some(_) => return Err(unsupported("conditions must be joined by &&")),
        }
    }
}

/// The value side of a condition.
#[derive(Clone, Copy, Debug)]
enum Literal<'a> {
    Quoted(&'a str),
    Bare(&'a str),
}

impl<'a> Literal<'a> {
    fn text(self) -> &'a str {
        match self {
            Literal::Quoted(s) | Literal::Bare(s) => s,
        }
    }
}

/// Applies one condition `attr cmp value`.
fn apply_condition(
    q: &mut SearchQuery,
    attr: &str,
    cmp: Cmp,
    value: Literal<'_>,
) -> Result<(), String> {
    let field = match attr {
        "duration" | "span:duration" | "traceDuration" | "trace:duration" => {
            let Literal::Bare(v) = value else {
                return Err(unsupported(&format!(
                    "{attr} is compared with an unquoted duration such as 1.5s"
                )));
            };
            let ns = duration_ns(v).map_err(|e| unsupported(&format!("{attr}: {e}")))?;
            apply_duration(q, cmp, ns);
            return Ok(());
        }
        "name" | "span:name" => Field::Name,
        "status" | "span:status" => Field::Status,
        "kind" | "span:kind" => {
            return Err(unsupported(
                "Loupe cannot filter by span kind (kind); openinference.span.kind selects the LLM kind",
            ));
        }
        other => attribute(other).map(|(field, _)| field).ok_or_else(|| {
            unsupported(&format!(
                "{other:?} is not a field Loupe can search; fields: {}, and the intrinsics \
                 duration and traceDuration (attribute keys may carry a ., span. or resource. \
                 scope)",
                supported_fields()
            ))
        })?,
    };
    if cmp != Cmp::Eq {
        return Err(unsupported(&format!("{attr} can only be compared with =")));
    }
    apply(q, field, value.text()).map_err(|e| unsupported(&e))
}

// ---------------------------------------------------------------------------------------
// Search responses
// ---------------------------------------------------------------------------------------

/// The body of `GET /api/search` (`tempopb.SearchResponse`): per trace `traceID` (hex),
/// `rootServiceName`, `rootTraceName`, `startTimeUnixNano` (a decimal string) and
/// `durationMs` (whole milliseconds), newest first as the engine returns them.
pub fn search_json(resp: &SearchResponse) -> Value {
    let traces: Vec<Value> = resp
        .traces
        .iter()
        .map(|t| {
            let duration_ms = t.totals.end_ns.saturating_sub(t.totals.start_ns).max(0) / 1_000_000;
            json!({
                "traceID": t.trace_id,
                "rootServiceName": t.totals.root_service,
                "rootTraceName": t.totals.root_name,
                "startTimeUnixNano": t.totals.start_ns.max(0).to_string(),
                "durationMs": duration_ms.min(i64::from(u32::MAX)),
            })
        })
        .collect();
    json!({ "traces": traces, "metrics": {} })
}

// ---------------------------------------------------------------------------------------
// Traces: OTLP messages (opentelemetry-proto), shared by the JSON and protobuf writers
// ---------------------------------------------------------------------------------------

fn str_of<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.get(key).and_then(Value::as_str)
}

fn u32_of(obj: &Value, key: &str) -> Option<u32> {
    obj.get(key)
        .and_then(Value::as_u64)
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// A JSON value as an OTLP `AnyValue`: integers become `int_value`, other numbers
/// `double_value`, arrays `array_value`, objects `kvlist_value`, null an empty
/// `AnyValue`.
fn to_any_value(v: &Value) -> AnyValue {
    let value = match v {
        Value::Null => None,
        Value::Bool(b) => Some(any_value::Value::BoolValue(*b)),
        Value::Number(n) => n
            .as_i64()
            .map(any_value::Value::IntValue)
            .or_else(|| n.as_f64().map(any_value::Value::DoubleValue)),
        Value::String(s) => Some(any_value::Value::StringValue(s.clone())),
        Value::Array(items) => Some(any_value::Value::ArrayValue(ArrayValue {
            values: items.iter().map(to_any_value).collect(),
        })),
        Value::Object(members) => Some(any_value::Value::KvlistValue(KeyValueList {
            values: members.iter().map(|(k, v)| to_key_value(k, v)).collect(),
        })),
    };
    AnyValue { value }
}

fn to_key_value(key: &str, value: &Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(to_any_value(value)),
        ..KeyValue::default()
    }
}

/// The members of a JSON object as attributes, leaving out `skip`.
fn key_values(obj: &Value, skip: &[&str]) -> Vec<KeyValue> {
    obj.as_object().map_or_else(Vec::new, |m| {
        m.iter()
            .filter(|(k, _)| !skip.contains(&k.as_str()))
            .map(|(k, v)| to_key_value(k, v))
            .collect()
    })
}

/// The attributes of a scope, event or link (its `attributes` object).
fn nested_key_values(obj: &Value) -> Vec<KeyValue> {
    obj.get("attributes")
        .map_or_else(Vec::new, |a| key_values(a, &[]))
}

/// Resource fields `normalize` keeps as `otel.*` attributes; they go back into their
/// fields.
const RESOURCE_DROPPED: &str = "otel.dropped_attributes_count";
const RESOURCE_SCHEMA_URL: &str = "otel.schema_url";

/// Span fields `normalize` keeps as `otel.*` attributes; they go back into their fields
/// when they have the field's type.
const SPAN_TRACE_STATE: &str = "otel.trace_state";
const SPAN_COUNTS: [&str; 4] = [
    "otel.flags",
    "otel.dropped_attributes_count",
    "otel.dropped_events_count",
    "otel.dropped_links_count",
];

/// Values Loupe derived for a span that Grafana should show too (cost is computed from
/// Loupe's pricing table when the client sent none).
fn loupe_attributes(s: &SpanNode) -> Vec<(&'static str, Value)> {
    let mut out = Vec::new();
    if !s.llm_kind.is_empty() && s.llm_kind != LlmKind::Unknown.as_str() {
        out.push(("loupe.llm_kind", Value::from(s.llm_kind.as_str())));
    }
    for (key, cost) in [
        ("loupe.cost.input_usd", s.cost_input_usd),
        ("loupe.cost.output_usd", s.cost_output_usd),
        ("loupe.cost.total_usd", s.cost_total_usd),
    ] {
        if let Some(v) = cost.and_then(serde_json::Number::from_f64) {
            out.push((key, Value::Number(v)));
        }
    }
    if let Some(source) = &s.cost_source {
        out.push(("loupe.cost.source", Value::from(source.as_str())));
    }
    out
}

/// The OTLP `ResourceSpans` (without spans) for the resource of `s`.
fn otlp_resource(s: &SpanNode) -> ResourceSpans {
    let mut attributes = key_values(&s.resource, &[RESOURCE_DROPPED, RESOURCE_SCHEMA_URL]);
    if s.resource.get("service.name").is_none() {
        attributes.push(to_key_value(
            "service.name",
            &Value::from(s.service_name.as_str()),
        ));
    }
    ResourceSpans {
        resource: Some(Resource {
            attributes,
            dropped_attributes_count: u32_of(&s.resource, RESOURCE_DROPPED).unwrap_or(0),
            ..Resource::default()
        }),
        scope_spans: Vec::new(),
        schema_url: str_of(&s.resource, RESOURCE_SCHEMA_URL)
            .unwrap_or_default()
            .to_owned(),
    }
}

/// The OTLP `ScopeSpans` (without spans) for a span's `scope` object.
fn otlp_scope(scope: &Value) -> ScopeSpans {
    ScopeSpans {
        scope: Some(InstrumentationScope {
            name: str_of(scope, "name").unwrap_or_default().to_owned(),
            version: str_of(scope, "version").unwrap_or_default().to_owned(),
            attributes: nested_key_values(scope),
            dropped_attributes_count: u32_of(scope, "dropped_attributes_count").unwrap_or(0),
        }),
        spans: Vec::new(),
        schema_url: str_of(scope, "schema_url").unwrap_or_default().to_owned(),
    }
}

/// The OTLP `Span` of a Loupe span: `otel.*` attributes go back into their fields,
/// Loupe's derived values ([`loupe_attributes`]) are added unless the span has them.
fn otlp_span(s: &SpanNode, trace_id: &[u8]) -> Span {
    let attrs = &s.attributes;
    let mut lifted: Vec<&str> = Vec::new();
    let trace_state = str_of(attrs, SPAN_TRACE_STATE);
    if trace_state.is_some() {
        lifted.push(SPAN_TRACE_STATE);
    }
    let [flags, dropped_attributes, dropped_events, dropped_links] = SPAN_COUNTS.map(|k| {
        let v = attrs
            .get(k)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok());
        if v.is_some() {
            lifted.push(k);
        }
        v.unwrap_or(0)
    });
    let mut attributes = key_values(attrs, &lifted);
    attributes.extend(
        loupe_attributes(s)
            .into_iter()
            .filter(|(k, _)| attrs.get(*k).is_none())
            .map(|(k, v)| to_key_value(k, &v)),
    );
    let events = s
        .events
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e.is_object())
        .map(|e| span::Event {
            time_unix_nano: e.get("time_ns").and_then(Value::as_u64).unwrap_or(0),
            name: str_of(e, "name").unwrap_or_default().to_owned(),
            attributes: nested_key_values(e),
            dropped_attributes_count: u32_of(e, "dropped_attributes_count").unwrap_or(0),
        })
        .collect();
    let links = s
        .links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l.is_object())
        .map(|l| span::Link {
            trace_id: str_of(l, "trace_id").and_then(unhex).unwrap_or_default(),
            span_id: str_of(l, "span_id").and_then(unhex).unwrap_or_default(),
            trace_state: str_of(l, "trace_state").unwrap_or_default().to_owned(),
            attributes: nested_key_values(l),
            dropped_attributes_count: u32_of(l, "dropped_attributes_count").unwrap_or(0),
            flags: u32_of(l, "flags").unwrap_or(0),
        })
        .collect();
    let kind = span::SpanKind::from_str_name(&format!("SPAN_KIND_{}", s.span_kind))
        .unwrap_or(span::SpanKind::Unspecified);
    let code = match s.status.as_str() {
        "OK" => status::StatusCode::Ok,
        "ERROR" => status::StatusCode::Error,
        _ => status::StatusCode::Unset,
    };
    Span {
        trace_id: trace_id.to_vec(),
        span_id: unhex(&s.span_id).unwrap_or_default(),
        trace_state: trace_state.unwrap_or_default().to_owned(),
        parent_span_id: s
            .parent_span_id
            .as_deref()
            .and_then(unhex)
            .unwrap_or_default(),
        flags,
        name: s.name.clone(),
        kind: kind as i32,
        start_time_unix_nano: u64::try_from(s.start_ns).unwrap_or(0),
        end_time_unix_nano: u64::try_from(s.end_ns).unwrap_or(0),
        attributes,
        dropped_attributes_count: dropped_attributes,
        events,
        dropped_events_count: dropped_events,
        links,
        dropped_links_count: dropped_links,
        status: Some(Status {
            message: s.status_message.clone().unwrap_or_default(),
            code: code as i32,
        }),
    }
}

/// The spans of a trace as OTLP resource spans: all of them (the tree is flattened,
/// parents before children), grouped by resource (and service), then by scope, in the
/// order they are first met. Attribute values keep their JSON types (integer, double,
/// bool, string, array, map); span fields `normalize` kept as `otel.*` attributes go
/// back into their fields, and Loupe's derived values are added as `loupe.*` attributes.
pub fn resource_spans(view: &TraceView) -> Vec<ResourceSpans> {
    let trace_id = unhex(&view.trace_id).unwrap_or_default();
    let mut out: Vec<ResourceSpans> = Vec::new();
    let mut by_resource: HashMap<(String, &str), usize> = HashMap::new();
    let mut by_scope: HashMap<(usize, String), usize> = HashMap::new();
    // Depth-first with an explicit stack: parent links come from clients, and a deep
    // tree must not overflow the call stack.
    let mut stack: Vec<&SpanNode> = view.roots.iter().rev().collect();
    while let Some(s) = stack.pop() {
        stack.extend(s.children.iter().rev());
        let key = (s.resource.to_string(), s.service_name.as_str());
        let r = *by_resource.entry(key).or_insert_with(|| {
            out.push(otlp_resource(s));
            out.len() - 1
        });
        let scopes = &mut out[r].scope_spans;
        let g = *by_scope.entry((r, s.scope.to_string())).or_insert_with(|| {
            scopes.push(otlp_scope(&s.scope));
            scopes.len() - 1
        });
        scopes[g].spans.push(otlp_span(s, &trace_id));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Traces as protobuf
// ---------------------------------------------------------------------------------------

/// `tempopb.TraceByIDResponse`, as far as Loupe writes it: `trace` (1), a
/// `tempopb.Trace`, which is wire-identical to OTLP `TracesData` (`batches` /
/// `resource_spans` = 1). `metrics` (2) is optional and left out; `status` (3) is left
/// at its default, COMPLETE.
#[derive(Clone, PartialEq, prost::Message)]
struct TraceByIdResponse {
    #[prost(message, optional, tag = "1")]
    trace: Option<TracesData>,
}

/// The body of `GET /api/traces/<id>` as protobuf (`tempopb.Trace`), which Grafana asks
/// for with `Accept: application/protobuf`.
pub fn trace_protobuf(view: &TraceView) -> Vec<u8> {
    TracesData {
        resource_spans: resource_spans(view),
    }
    .encode_to_vec()
}

/// The body of `GET /api/v2/traces/<id>` as protobuf (`tempopb.TraceByIDResponse`).
pub fn trace_v2_protobuf(view: &TraceView) -> Vec<u8> {
    TraceByIdResponse {
        trace: Some(TracesData {
            resource_spans: resource_spans(view),
        }),
    }
    .encode_to_vec()
}

// ---------------------------------------------------------------------------------------
// Traces as JSON
// ---------------------------------------------------------------------------------------
//
// opentelemetry-proto's serde writes OTLP/JSON (ids in hex, enums as integers); Tempo
// prints gogo `jsonpb` (ids in base64, enums by name, default values left out).
// `to_jsonpb` turns the one into the other.

/// The body of `GET /api/traces/<id>` as JSON: `{"batches": [ResourceSpans...]}` in
/// OTLP/JSON as Tempo prints it (ids in base64, times as decimal strings of Unix
/// nanoseconds, `kind` and `status.code` by enum name, attribute values as `AnyValue`).
pub fn trace_json(view: &TraceView) -> Value {
    json!({ "batches": resource_spans_json(&resource_spans(view)) })
}

/// The body of `GET /api/v2/traces/<id>` as JSON (`tempopb.TraceByIDResponse`):
/// `{"trace": {"resourceSpans": [...]}, "metrics": {}}`; `status` is left out, as
/// Tempo leaves it out for a complete trace.
pub fn trace_v2_json(view: &TraceView) -> Value {
    json!({
        "trace": { "resourceSpans": resource_spans_json(&resource_spans(view)) },
        "metrics": {},
    })
}

/// Standard base64 with padding, as protobuf JSON encodes `bytes` fields.
fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn resource_spans_json(resource_spans: &[ResourceSpans]) -> Vec<Value> {
    resource_spans
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).expect("OTLP messages serialize");
            to_jsonpb(&mut v);
            v
        })
        .collect()
}

/// The members of `AnyValue`'s oneof: jsonpb prints them even when they hold a
/// default (`""`, `0`, `false`), since which one is set is the value's type.
const ANY_VALUE_KEYS: [&str; 7] = [
    "stringValue",
    "boolValue",
    "intValue",
    "doubleValue",
    "arrayValue",
    "kvlistValue",
    "bytesValue",
];

fn is_default(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Array(a) => a.is_empty(),
        Value::Bool(b) => !b,
        Value::Object(_) => false,
    }
}

/// Rewrites OTLP/JSON in place as jsonpb: ids (`traceId`, `spanId`, `parentSpanId`)
/// from hex to base64, span `kind` and status `code` by name, and fields holding
/// their default left out (but the members of an `AnyValue`). Attribute keys are
/// values of `"key"`, never object keys, so they are untouched.
fn to_jsonpb(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, v| ANY_VALUE_KEYS.contains(&k.as_str()) || !is_default(v));
            for (k, child) in m.iter_mut() {
                match (k.as_str(), &*child) {
                    ("traceId" | "spanId" | "parentSpanId", Value::String(h)) => {
                        *child = Value::String(b64(&unhex(h).unwrap_or_default()));
                    }
                    ("kind", Value::Number(n)) => {
                        let kind = n
                            .as_i64()
                            .and_then(|n| span::SpanKind::try_from(n as i32).ok())
                            .unwrap_or(span::SpanKind::Unspecified);
                        *child = Value::String(kind.as_str_name().into());
                    }
                    ("code", Value::Number(n)) => {
                        let code = n
                            .as_i64()
                            .and_then(|n| status::StatusCode::try_from(n as i32).ok())
                            .unwrap_or(status::StatusCode::Unset);
                        *child = Value::String(code.as_str_name().into());
                    }
                    _ => to_jsonpb(child),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(to_jsonpb),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{TraceSummary, TraceTotals};

    const TRACE: &str = "0102030405060708090a0b0c0d0e0f10";

    fn node(id: &str, parent: Option<&str>, start: i64, service: &str) -> SpanNode {
        SpanNode {
            service_name: service.into(),
            resource: json!({ "service.name": service }),
            scope: json!({ "name": "lib", "version": "1.0", "attributes": {} }),
            ..SpanNode::test(id, parent, start, start + 10)
        }
    }

    /// root (bot, SERVER) → llm (bot, CLIENT, error) → tool (tools) ; orphan (bot).
    fn view() -> TraceView {
        let mut root = node("a1a2a3a4a5a6a7a8", None, 1_000, "bot");
        root.span_kind = "SERVER".into();
        let mut llm = node("b1b2b3b4b5b6b7b8", Some("a1a2a3a4a5a6a7a8"), 2_000, "bot");
        llm.span_kind = "CLIENT".into();
        llm.llm_kind = "LLM".into();
        llm.status = "ERROR".into();
        llm.status_message = Some("rate limited".into());
        llm.cost_total_usd = Some(0.25);
        llm.cost_source = Some("computed".into());
        llm.attributes = json!({
            "gen_ai.request.model": "gpt-4o",
            "gen_ai.usage.input_tokens": 12,
            "temperature": 0.5,
            "stream": false,
            "tags": ["a", 1],
            "meta": { "k": "v" },
            "nothing": null,
            "otel.trace_state": "vendor=x",
            "otel.flags": 257,
            "otel.dropped_events_count": 2,
        });
        llm.events = json!([{ "time_ns": 2_005, "name": "retry", "attributes": { "attempt": 2 } }]);
        llm.links =
            json!([{ "trace_id": "ff".repeat(16), "span_id": "ee".repeat(8), "attributes": {} }]);
        let mut tool = node("c1c2c3c4c5c6c7c8", Some("b1b2b3b4b5b6b7b8"), 3_000, "tools");
        tool.scope =
            json!({ "name": "toolkit", "version": "", "attributes": {}, "schema_url": "s" });
        llm.children = vec![tool];
        root.children = vec![llm];
        let orphan = node("d1d2d3d4d5d6d7d8", Some("0000000000000009"), 4_000, "bot");
        TraceView {
            trace_id: TRACE.into(),
            summary: TraceTotals::default(),
            roots: vec![root, orphan],
            scores: Vec::new(),
        }
    }

    fn attr<'v>(attrs: &'v Value, key: &str) -> Option<&'v Value> {
        attrs
            .as_array()?
            .iter()
            .find(|kv| kv["key"] == key)
            .map(|kv| &kv["value"])
    }

    /// All spans of a JSON trace, in order.
    fn spans_of(resource_spans: &Value) -> Vec<&Value> {
        resource_spans
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| r["scopeSpans"].as_array().into_iter().flatten())
            .flat_map(|s| s["spans"].as_array().into_iter().flatten())
            .collect()
    }

    #[test]
    fn base64_and_hex_helpers() {
        assert_eq!(b64(b""), "");
        assert_eq!(b64(b"f"), "Zg==");
        assert_eq!(b64(b"foob"), "Zm9vYg==");
        // Grafana's documented trace JSON: "traceId": "AAAAAAAAAABguiq7RPE+rg==".
        let id = unhex("000000000000000060ba2abb44f13eae").expect("hex");
        assert_eq!(b64(&id), "AAAAAAAAAABguiq7RPE+rg==");
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("abc"), None);
    }

    #[test]
    fn trace_ids_may_be_shortened_like_tempo_prints_them() {
        assert_eq!(
            parse_trace_id(TRACE).unwrap(),
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
        );
        let short = parse_trace_id("d6e9329d67b6146a").unwrap();
        assert_eq!(short[..8], [0; 8]);
        assert_eq!(short[8..], [0xd6, 0xe9, 0x32, 0x9d, 0x67, 0xb6, 0x14, 0x6a]);
        assert_eq!(parse_trace_id("abc").unwrap()[14..], [0x0a, 0xbc]);
        let long = "a".repeat(33);
        for bad in ["", "xyz", long.as_str(), "12 34"] {
            assert!(
                parse_trace_id(bad).unwrap_err().contains("hexadecimal"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn v1_json_groups_spans_by_resource_and_scope_and_flattens_the_tree() {
        let t = trace_json(&view());
        let batches = &t["batches"];
        assert_eq!(batches.as_array().map(Vec::len), Some(2), "bot and tools");
        let bot = &batches[0];
        assert_eq!(
            attr(&bot["resource"]["attributes"], "service.name"),
            Some(&json!({ "stringValue": "bot" }))
        );
        assert_eq!(
            bot["scopeSpans"][0]["scope"],
            json!({ "name": "lib", "version": "1.0" })
        );
        let names: Vec<&str> = bot["scopeSpans"][0]["spans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "span-a1a2a3a4a5a6a7a8",
                "span-b1b2b3b4b5b6b7b8",
                "span-d1d2d3d4d5d6d7d8"
            ]
        );
        let tools = &batches[1];
        assert_eq!(tools["scopeSpans"][0]["scope"]["name"], "toolkit");
        assert_eq!(tools["scopeSpans"][0]["schemaUrl"], "s");
        assert_eq!(
            spans_of(batches).len(),
            4,
            "every span, children and orphans included"
        );
        assert!(t.get("resourceSpans").is_none());
    }

    #[test]
    fn v1_json_span_fields_are_encoded_as_tempo_does() {
        let t = trace_json(&view());
        let spans = spans_of(&t["batches"]);
        let root = spans[0];
        assert_eq!(root["traceId"], "AQIDBAUGBwgJCgsMDQ4PEA==");
        assert_eq!(root["spanId"], "oaKjpKWmp6g=");
        assert!(root.get("parentSpanId").is_none());
        assert_eq!(root["kind"], "SPAN_KIND_SERVER");
        assert_eq!(root["startTimeUnixNano"], "1000");
        assert_eq!(root["endTimeUnixNano"], "1010");
        assert_eq!(root["status"], json!({ "code": "STATUS_CODE_OK" }));

        let llm = spans[1];
        assert_eq!(llm["parentSpanId"], "oaKjpKWmp6g=");
        assert_eq!(llm["spanId"], "sbKztLW2t7g=");
        assert_eq!(llm["kind"], "SPAN_KIND_CLIENT");
        assert_eq!(
            llm["status"],
            json!({ "code": "STATUS_CODE_ERROR", "message": "rate limited" })
        );
        let attrs = &llm["attributes"];
        assert_eq!(
            attr(attrs, "gen_ai.request.model"),
            Some(&json!({ "stringValue": "gpt-4o" }))
        );
        assert_eq!(
            attr(attrs, "gen_ai.usage.input_tokens"),
            Some(&json!({ "intValue": "12" }))
        );
        assert_eq!(
            attr(attrs, "temperature"),
            Some(&json!({ "doubleValue": 0.5 }))
        );
        assert_eq!(attr(attrs, "stream"), Some(&json!({ "boolValue": false })));
        assert_eq!(
            attr(attrs, "tags"),
            Some(
                &json!({ "arrayValue": { "values": [{ "stringValue": "a" }, { "intValue": "1" }] } })
            )
        );
        assert_eq!(
            attr(attrs, "meta"),
            Some(
                &json!({ "kvlistValue": { "values": [{ "key": "k", "value": { "stringValue": "v" } }] } })
            )
        );
        assert_eq!(attr(attrs, "nothing"), Some(&json!({})));
        // Loupe's derived values are added; OTLP span fields kept as otel.* go back.
        assert_eq!(
            attr(attrs, "loupe.llm_kind"),
            Some(&json!({ "stringValue": "LLM" }))
        );
        assert_eq!(
            attr(attrs, "loupe.cost.total_usd"),
            Some(&json!({ "doubleValue": 0.25 }))
        );
        assert_eq!(
            attr(attrs, "loupe.cost.source"),
            Some(&json!({ "stringValue": "computed" }))
        );
        for lifted in [
            "otel.trace_state",
            "otel.flags",
            "otel.dropped_events_count",
        ] {
            assert_eq!(attr(attrs, lifted), None, "{lifted}");
        }
        assert_eq!(llm["traceState"], "vendor=x");
        assert_eq!(llm["flags"], 257);
        assert_eq!(llm["droppedEventsCount"], 2);
        assert_eq!(
            llm["events"],
            json!([{
                "timeUnixNano": "2005",
                "name": "retry",
                "attributes": [{ "key": "attempt", "value": { "intValue": "2" } }],
            }])
        );
        assert_eq!(llm["links"][0]["traceId"], b64(&[0xff; 16]));
        assert_eq!(llm["links"][0]["spanId"], b64(&[0xee; 8]));
    }

    #[test]
    fn a_resource_without_service_name_gets_the_span_service() {
        let mut v = view();
        v.roots.truncate(1);
        v.roots[0].children.clear();
        v.roots[0].resource =
            json!({ "host.name": "h", "otel.schema_url": "u", "otel.dropped_attributes_count": 3 });
        let t = trace_json(&v);
        let batch = &t["batches"][0];
        let attrs = &batch["resource"]["attributes"];
        assert_eq!(
            attr(attrs, "service.name"),
            Some(&json!({ "stringValue": "bot" }))
        );
        assert_eq!(
            attr(attrs, "host.name"),
            Some(&json!({ "stringValue": "h" }))
        );
        assert_eq!(attr(attrs, "otel.schema_url"), None);
        assert_eq!(batch["schemaUrl"], "u");
        assert_eq!(batch["resource"]["droppedAttributesCount"], 3);
    }

    #[test]
    fn v2_json_wraps_resource_spans_in_trace() {
        let t = trace_v2_json(&view());
        assert_eq!(spans_of(&t["trace"]["resourceSpans"]).len(), 4);
        assert!(t.get("batches").is_none());
        assert!(
            t.get("status").is_none(),
            "COMPLETE is left out, as Tempo does"
        );
    }

    /// A string `AnyValue`, and any other.
    fn string(s: &str) -> AnyValue {
        any(any_value::Value::StringValue(s.into()))
    }

    fn any(v: any_value::Value) -> AnyValue {
        AnyValue { value: Some(v) }
    }

    /// The value of the attribute `key`.
    fn value_of<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a AnyValue> {
        attrs
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
    }

    /// All spans of decoded resource spans, in order.
    fn proto_spans(resource_spans: &[ResourceSpans]) -> Vec<&Span> {
        resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .collect()
    }

    #[test]
    fn json_values_become_typed_any_values() {
        assert_eq!(
            to_any_value(&json!(-1)),
            any(any_value::Value::IntValue(-1))
        );
        assert_eq!(
            to_any_value(&json!(u64::MAX)),
            any(any_value::Value::DoubleValue(u64::MAX as f64))
        );
        assert_eq!(to_any_value(&Value::Null), AnyValue { value: None });
        assert_eq!(
            to_any_value(&json!({ "k": ["v"] })),
            any(any_value::Value::KvlistValue(KeyValueList {
                values: vec![to_key_value("k", &json!(["v"]))],
            }))
        );
        let kv = KeyValue {
            key: "k".into(),
            value: Some(any(any_value::Value::BytesValue(b"foo".to_vec()))),
            ..Default::default()
        };
        let mut kv = serde_json::to_value(&kv).unwrap();
        to_jsonpb(&mut kv);
        assert_eq!(kv["value"], json!({ "bytesValue": "Zm9v" }));
    }

    #[test]
    fn protobuf_trace_is_otlp_traces_data() {
        let body = trace_protobuf(&view());
        let trace = TracesData::decode(body.as_slice()).expect("a tempopb.Trace");
        assert_eq!(trace.resource_spans.len(), 2, "bot and tools");
        let resource = trace.resource_spans[0]
            .resource
            .as_ref()
            .expect("a resource");
        assert_eq!(
            value_of(&resource.attributes, "service.name"),
            Some(&string("bot"))
        );

        let spans = proto_spans(&trace.resource_spans);
        assert_eq!(spans.len(), 4);
        let root = spans[0];
        assert_eq!(root.trace_id, (1..=16).collect::<Vec<u8>>());
        assert_eq!(
            root.span_id,
            [0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8]
        );
        assert!(root.parent_span_id.is_empty(), "a root has no parent");
        assert_eq!(root.name, "span-a1a2a3a4a5a6a7a8");
        assert_eq!(root.kind(), span::SpanKind::Server);
        assert_eq!(
            (root.start_time_unix_nano, root.end_time_unix_nano),
            (1_000, 1_010)
        );
        assert_eq!(
            root.status.as_ref().map(Status::code),
            Some(status::StatusCode::Ok)
        );

        let llm = spans[1];
        assert_eq!(llm.parent_span_id, root.span_id);
        assert_eq!(llm.kind(), span::SpanKind::Client);
        assert_eq!(llm.trace_state, "vendor=x");
        assert_eq!(llm.dropped_events_count, 2);
        assert_eq!(llm.flags, 257);
        assert_eq!(
            llm.status,
            Some(Status {
                message: "rate limited".into(),
                code: status::StatusCode::Error as i32,
            })
        );
        assert_eq!(llm.events.len(), 1);
        assert_eq!(llm.events[0].time_unix_nano, 2_005);
        assert_eq!(llm.events[0].name, "retry");
        assert_eq!(
            value_of(&llm.events[0].attributes, "attempt"),
            Some(&any(any_value::Value::IntValue(2)))
        );
        assert_eq!(llm.links.len(), 1);
        assert_eq!(llm.links[0].trace_id, [0xff; 16]);
        assert_eq!(llm.links[0].span_id, [0xee; 8]);
        // Attribute values keep their types; the oneof member survives at its default.
        let attrs = &llm.attributes;
        assert_eq!(
            value_of(attrs, "gen_ai.usage.input_tokens"),
            Some(&any(any_value::Value::IntValue(12)))
        );
        assert_eq!(
            value_of(attrs, "stream"),
            Some(&any(any_value::Value::BoolValue(false)))
        );
        assert_eq!(
            value_of(attrs, "temperature"),
            Some(&any(any_value::Value::DoubleValue(0.5)))
        );
        assert_eq!(value_of(attrs, "nothing"), Some(&AnyValue { value: None }));
        assert_eq!(
            value_of(attrs, "tags"),
            Some(&any(any_value::Value::ArrayValue(ArrayValue {
                values: vec![string("a"), any(any_value::Value::IntValue(1))],
            })))
        );
        assert_eq!(value_of(attrs, "loupe.llm_kind"), Some(&string("LLM")));
        for lifted in [
            "otel.trace_state",
            "otel.flags",
            "otel.dropped_events_count",
        ] {
            assert_eq!(value_of(attrs, lifted), None, "{lifted}");
        }

        let tools = &trace.resource_spans[1].scope_spans[0];
        assert_eq!(
            tools.scope.as_ref().map(|s| s.name.as_str()),
            Some("toolkit")
        );
        assert_eq!(tools.schema_url, "s");
    }

    #[test]
    fn protobuf_v2_wraps_the_trace_in_field_one() {
        let v = view();
        let body = trace_v2_protobuf(&v);
        assert_eq!(body[0], (1 << 3) | 2, "trace: field 1, length-delimited");
        let resp = TraceByIdResponse::decode(body.as_slice()).expect("a TraceByIDResponse");
        let trace = TracesData::decode(trace_protobuf(&v).as_slice()).expect("a tempopb.Trace");
        assert_eq!(resp.trace.as_ref(), Some(&trace));
        // Decoding drops fields it does not know: re-encoding gives the same bytes, so
        // the body holds only the trace (status COMPLETE is the default).
        assert_eq!(resp.encode_to_vec(), body);
    }

    #[test]
    fn search_json_has_only_fields_of_tempos_message() {
        let resp = SearchResponse {
            traces: vec![TraceSummary {
                trace_id: TRACE.into(),
                totals: TraceTotals {
                    root_name: "chat".into(),
                    root_service: "bot".into(),
                    start_ns: 1_684_778_327_699_392_724,
                    end_ns: 1_684_778_327_699_392_724 + 557_900_000,
                    cost_usd: 1.5,
                    ..TraceTotals::default()
                },
            }],
            start_ns: 0,
            end_ns: 1,
            limit: 20,
        };
        assert_eq!(
            search_json(&resp),
            json!({
                "traces": [{
                    "traceID": TRACE,
                    "rootServiceName": "bot",
                    "rootTraceName": "chat",
                    "startTimeUnixNano": "1684778327699392724",
                    "durationMs": 557,
                }],
                "metrics": {},
            })
        );
    }

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn search(pairs: &[(&str, &str)]) -> Result<SearchQuery, String> {
        parse_search(&params(pairs), NOW).map(|s| s.query)
    }

    const NOW: i64 = 2_000_000_000 * 1_000_000_000;
    const S: i64 = 1_000_000_000;
    const MS: i64 = 1_000_000;

    #[test]
    fn search_defaults_and_time_range() {
        let q = search(&[]).unwrap();
        assert_eq!(q.end_ns, NOW);
        assert_eq!(q.start_ns, NOW - 24 * 3600 * S);
        assert_eq!(q.limit, DEFAULT_LIMIT);
        assert_eq!(
            q,
            SearchQuery {
                start_ns: q.start_ns,
                end_ns: NOW,
                limit: 20,
                ..SearchQuery::default()
            }
        );

        let q = search(&[
            ("start", "1700000000"),
            ("end", "1700000600"),
            ("limit", "5"),
            ("spss", "3"),
        ])
        .unwrap();
        assert_eq!(
            (q.start_ns, q.end_ns, q.limit),
            (1_700_000_000 * S, 1_700_000_600 * S, 5)
        );
        assert_eq!(search(&[("start", "0"), ("end", "0")]).unwrap().end_ns, NOW);
        assert_eq!(search(&[("limit", "100000")]).unwrap().limit, MAX_LIMIT);
    }

    #[test]
    fn bad_search_parameters_are_named() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("servce", "x")], "unknown parameter \"servce\""),
            (&[("limit", "0")], "limit must be"),
            (&[("limit", "ten")], "limit must be"),
            (&[("spss", "-1")], "spss must be"),
            (&[("start", "yesterday")], "start:"),
            (
                &[("start", "1700000600"), ("end", "1700000000")],
                "start must be before end",
            ),
            (&[("q", "{}"), ("tags", "name=x")], "either q"),
            (&[("minDuration", "5")], "minDuration:"),
            (
                &[("minDuration", "2s"), ("maxDuration", "1s")],
                "exclude every trace",
            ),
        ];
        for (p, want) in cases {
            let err = search(p).expect_err("an error");
            assert!(err.contains(*want), "{p:?}: {err}");
        }
    }

    #[test]
    fn tags_map_to_loupe_fields() {
        let q = search(&[
            (
                "tags",
                r#"service.name=bot name="chat turn" status=error llm.model_name=gpt-4o user.id=u1 langfuse.session.id=s1 openinference.span.kind=llm gen_ai.prompt.name=greet llm.prompt_template.version=3"#,
            ),
            ("minDuration", "100ms"),
            ("maxDuration", "2s"),
        ])
        .unwrap();
        assert_eq!(q.service.as_deref(), Some("bot"));
        assert_eq!(q.name.as_deref(), Some("chat turn"));
        assert_eq!(q.status, Some(StatusFilter::Error));
        assert_eq!(q.model.as_deref(), Some("gpt-4o"));
        assert_eq!(q.user_id.as_deref(), Some("u1"));
        assert_eq!(q.session_id.as_deref(), Some("s1"));
        assert_eq!(q.llm_kind, Some(LlmKind::Llm));
        assert_eq!(q.prompt_name.as_deref(), Some("greet"));
        assert_eq!(q.prompt_version.as_deref(), Some("3"));
        assert_eq!(q.min_duration_ns, Some(100 * MS));
        assert_eq!(q.max_duration_ns, Some(2 * S));

        let q = search(&[("tags", r#"resource.service.name="a \"b\"" status=OK"#)]).unwrap();
        assert_eq!(q.service.as_deref(), Some(r#"a "b""#));
        assert_eq!(q.status, Some(StatusFilter::Ok));
    }

    #[test]
    fn bad_tags_are_errors_that_name_them() {
        let err = search(&[("tags", "http.status_code=500")]).unwrap_err();
        assert!(
            err.contains("unsupported tag \"http.status_code\""),
            "{err}"
        );
        assert!(
            err.contains("gen_ai.request.model") && err.contains("user.id"),
            "{err}"
        );
        for (tags, want) in [
            ("service.name", "has no value"),
            ("=x", "has no key"),
            ("name=\"open", "not closed"),
            ("name=", "empty value"),
            ("status=unset", "status must be error"),
            ("llm_kind=robot", "LLM kind \"robot\""),
            ("name=a name=b", "name is given twice"),
        ] {
            let err = search(&[("tags", tags)]).unwrap_err();
            assert!(err.contains(want), "{tags:?}: {err}");
        }
        // The same value twice is fine.
        assert!(search(&[("tags", "user.id=u enduser.id=u")]).is_ok());
    }

    fn traceql(q: &str) -> Result<SearchQuery, String> {
        search(&[("q", q)])
    }

    #[test]
    fn traceql_subset_parses() {
        for empty in ["{}", "{ }", "{true}", ""] {
            let q = traceql(empty).unwrap();
            assert_eq!(
                q,
                SearchQuery {
                    start_ns: q.start_ns,
                    end_ns: NOW,
                    limit: 20,
                    ..SearchQuery::default()
                }
            );
        }
        // What Grafana's search builder writes.
        let q = traceql(
            r#"{resource.service.name="bot" && name="chat" && status=error && duration>1.5s}"#,
        )
        .unwrap();
        assert_eq!(q.service.as_deref(), Some("bot"));
        assert_eq!(q.name.as_deref(), Some("chat"));
        assert_eq!(q.status, Some(StatusFilter::Error));
        assert_eq!(q.min_duration_ns, Some(1_500 * MS + 1));
        assert_eq!(q.max_duration_ns, None);

        let q = traceql(
            r#"{ .user.id = "u-1" && span.gen_ai.request.model = `gpt-4o` && span.openinference.span.kind = "llm" && traceDuration <= 2s && duration >= 100ms && trace:duration < 3s }"#,
        )
        .unwrap();
        assert_eq!(q.user_id.as_deref(), Some("u-1"));
        assert_eq!(q.model.as_deref(), Some("gpt-4o"));
        assert_eq!(q.llm_kind, Some(LlmKind::Llm));
        assert_eq!(q.min_duration_ns, Some(100 * MS));
        assert_eq!(q.max_duration_ns, Some(2 * S), "the tighter bound wins");

        let q = traceql(r#"{span:status = ok && span.session.id = 42 && duration = 1s}"#).unwrap();
        assert_eq!(q.status, Some(StatusFilter::Ok));
        assert_eq!(q.session_id.as_deref(), Some("42"));
        assert_eq!((q.min_duration_ns, q.max_duration_ns), (Some(S), Some(S)));

        let q = traceql(r#"{ name = "say \"hi\"\n" }"#).unwrap();
        assert_eq!(q.name.as_deref(), Some("say \"hi\"\n"));
    }

    #[test]
    fn traceql_outside_the_subset_is_rejected_with_the_reason() {
        for (q, want) in [
            (r#"{name="a" || name="b"}"#, "|| is not supported"),
            (
                r#"{(resource.service.name="a" || resource.service.name="b")}"#,
                "parentheses",
            ),
            ("{} | count() > 2", "pipelines"),
            (r#"{name="a"} && {name="b"}"#, "operators between spansets"),
            (r#"{name="a"} >> {name="b"}"#, "operators between spansets"),
            (r#"{name=~"chat.*"}"#, "regular expressions"),
            (r#"{name!="chat"}"#, "!= is not supported"),
            ("{kind=server}", "span kind"),
            (
                "{.http.status_code=500}",
                "\".http.status_code\" is not a field",
            ),
            (
                "{rootServiceName=\"bot\"}",
                "\"rootServiceName\" is not a field",
            ),
            (r#"{name > "a"}"#, "name can only be compared with ="),
            ("{duration > \"1s\"}", "unquoted duration"),
            ("{duration > 5}", "needs a unit"),
            ("{status = unset}", "status must be error"),
            (r#"{name="a" name="b"}"#, "joined by &&"),
            (r#"{name="a" &&}"#, "missing after &&"),
            ("{name}", "followed by a comparison"),
            ("{name=}", "compared with nothing"),
            (r#"{name="a""#, "no closing }"),
            (r#"name="a""#, "one spanset in braces"),
            (r#"{name="a"#, "not closed"),
            (r#"{!{name="a"}}"#, "negation"),
            (r#"{name="a" && name="b"}"#, "name is given twice"),
            ("{name=\"a\" ; }", "unexpected character ';'"),
        ] {
            let err = traceql(q).unwrap_err();
            assert!(err.contains(want), "{q}: {err}");
            assert!(err.contains("subset of TraceQL"), "{q}: {err}");
        }
    }

    #[test]
    fn tag_lists_and_values() {
        let names = tag_names();
        assert!(names.contains(&"service.name") && names.contains(&"name"));
        assert_eq!(
            tag_names_json(Some("resource")).unwrap(),
            json!({ "tagNames": ["service.name"] })
        );
        assert_eq!(
            tag_names_json(Some("event")).unwrap(),
            json!({ "tagNames": [] })
        );
        let v2 = tag_names_v2_json(None).unwrap();
        let scopes: Vec<&str> = v2["scopes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(scopes, ["resource", "span", "intrinsic"]);
        assert_eq!(v2["scopes"][0]["tags"], json!(["service.name"]));
        assert_eq!(
            tag_names_v2_json(Some("intrinsic")).unwrap()["scopes"][0]["tags"],
            json!(["duration", "name", "status", "traceDuration"])
        );
        assert!(
            tag_names_v2_json(Some("spans"))
                .unwrap_err()
                .contains("invalid scope")
        );

        // Every listed tag is searchable, and those with a column have values.
        for (scope, tags) in tag_scopes() {
            for tag in tags {
                let scoped = if scope == "intrinsic" {
                    tag.to_string()
                } else {
                    format!("{scope}.{tag}")
                };
                if !tag.contains("uration") {
                    let q = format!(
                        "{{{scoped} = {}}}",
                        if *tag == "status" { "error" } else { "\"x\"" }
                    );
                    let q = if *tag == "openinference.span.kind" {
                        q.replace("\"x\"", "\"llm\"")
                    } else {
                        q
                    };
                    assert!(traceql(&q).is_ok(), "{q}");
                    assert!(
                        tag_column(&scoped).is_some() || fixed_tag_values(&scoped).is_some(),
                        "{scoped}"
                    );
                }
            }
        }
        assert_eq!(tag_column("resource.service.name"), Some(col::SERVICE_NAME));
        assert_eq!(tag_column(".service.name"), Some(col::SERVICE_NAME));
        assert_eq!(tag_column("service.name"), Some(col::SERVICE_NAME));
        assert_eq!(
            tag_column("span.gen_ai.response.model"),
            Some(col::RESPONSE_MODEL)
        );
        assert_eq!(tag_column("name"), Some(col::NAME));
        assert_eq!(tag_column("http.method"), None);
        assert_eq!(fixed_tag_values("status"), Some(&["error", "ok"][..]));

        assert_eq!(
            tag_values_json(&["a".to_string()]),
            json!({ "tagValues": ["a"] })
        );
        assert_eq!(
            tag_values_v2_json("resource.service.name", &["bot"]),
            json!({ "tagValues": [{ "type": "string", "value": "bot" }] })
        );
        assert_eq!(
            tag_values_v2_json("status", &["error"]),
            json!({ "tagValues": [{ "type": "keyword", "value": "error" }] })
        );
    }

    #[test]
    fn small_endpoints() {
        assert!(wants_protobuf(Some("application/protobuf")));
        assert!(wants_protobuf(Some(
            "Application/Protobuf, application/json;q=0.5"
        )));
        assert!(!wants_protobuf(Some("application/json")));
        assert!(!wants_protobuf(None));
        let info = buildinfo_json("0.1.0");
        for k in [
            "version",
            "revision",
            "branch",
            "buildDate",
            "buildUser",
            "goVersion",
        ] {
            assert!(info.get(k).is_some(), "{k}");
        }
        assert_eq!(info["revision"], "loupe-0.1.0");
        assert_eq!(ECHO_BODY, "echo");
    }
}
