//! OTLP → [`SpanRecord`] normalization.
//!
//! Every span of an OTLP export request becomes one [`SpanRecord`]. The typed LLM
//! columns (kind, model, provider, tokens, cost, user/session/prompt, input/output) are
//! read from the three attribute conventions that LLM applications actually emit:
//!
//! * **OpenTelemetry GenAI** semantic conventions (`gen_ai.*`): the registry at
//!   `docs/registry/attributes/gen-ai.md`, the spans and events documents, the message JSON
//!   schemas (`gen-ai-input-messages.json`, `gen-ai-output-messages.json`), and the
//!   deprecated forms still in use: the flat `gen_ai.prompt.N.*` / `gen_ai.completion.N.*`
//!   attributes and the v1.28–v1.36 per-message span events (`gen_ai.user.message`, …,
//!   `gen_ai.choice`). Marked `[otel]` below.
//! * **OpenInference** (Arize, `spec/semantic_conventions.md`): `openinference.span.kind`,
//!   `llm.*`, `input.value`, `retrieval.documents.N.document.*`, … Marked `[oi]`.
//! * **OpenLLMetry** (Traceloop, `opentelemetry-semantic-conventions-ai` `SpanAttributes`):
//!   `traceloop.*`, `llm.request.type`, `llm.usage.*`, the flat `gen_ai.prompt.N.*`, …
//!   Marked `[ol]`.
//!
//! Langfuse's OTel attributes (`langfuse.*`, from Langfuse's `LangfuseOtelSpanAttributes`)
//! are read too, marked `[lf]`.
//!
//! Nothing the client sent is dropped: all span attributes go into the `attributes` JSON
//! object (flat keys as sent), resource attributes into `resource`, the scope into `scope`,
//! events and links into `events` / `links`. Only sizes are bounded: a string (or bytes)
//! value longer than [`NormalizeOptions::max_attribute_bytes`] is cut at a UTF-8 character
//! boundary, counted in [`Normalized::truncated_values`], and its key is listed in the
//! span's `loupe.truncated_keys` attribute; `input` / `output` are bounded the same way by
//! [`NormalizeOptions::max_io_bytes`] (listed as `loupe.input` / `loupe.output`).
//!
//! Performance: span attributes are visited once; each key goes through one `match` and,
//! only when no exact key matched, a few prefix checks for the indexed (flattened list)
//! keys. The attribute JSON is written straight into a reused buffer. Resource and scope
//! JSON and the resource-level fields are computed once per `ResourceSpans` /
//! `ScopeSpans`. `serde_json::Value` trees are only built on the rare paths (message
//! JSON attributes, message events, document metadata).
//!
//! Token convention: `input_tokens` includes cached input tokens and `output_tokens`
//! includes reasoning tokens (OpenAI usage semantics, which `[otel]` and `[oi]` also
//! prescribe). A sender whose input count is smaller than its cache-read count evidently
//! excluded the cache (Anthropic-style), so the cache-read count is added; likewise for
//! output and reasoning tokens.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, InstrumentationScope, KeyValue, any_value::Value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
use serde_json::{Map, Value as Json};

use crate::span::{LlmKind, SpanRecord, StatusCode};

/// Default for [`NormalizeOptions::max_attribute_bytes`].
pub const DEFAULT_MAX_ATTRIBUTE_BYTES: usize = 64 * 1024;
/// Default for [`NormalizeOptions::max_io_bytes`].
pub const DEFAULT_MAX_IO_BYTES: usize = 256 * 1024;
/// The attribute listing the keys whose values were cut.
pub const TRUNCATED_KEYS_ATTRIBUTE: &str = "loupe.truncated_keys";
/// `service_name` of spans whose resource names no `service.name`.
pub const UNKNOWN_SERVICE: &str = "unknown_service";

/// Nesting deeper than this (arrays / kvlists in attribute values) is written as `null`
/// and counted as a cut value, so that no input can exhaust the stack.
const MAX_DEPTH: usize = 32;
/// At most this many entries are collected per indexed list (messages, tool calls,
/// documents, …); the rest stays in the attributes JSON and the input/output is marked cut.
const MAX_INDEXED: usize = 2048;
/// Attribute keys longer than this are cut (and counted).
const MAX_KEY_BYTES: usize = 4096;

#[derive(Clone, Debug)]
pub struct NormalizeOptions {
    /// Longest string attribute value kept, in bytes (default 64 KiB); longer values are cut at a char boundary.
    pub max_attribute_bytes: usize,
    /// Longest `input` / `output` kept, in bytes (default 256 KiB).
    pub max_io_bytes: usize,
    /// The project's environment (dev/staging/prod), used when the span/resource names none.
    pub default_environment: Option<String>,
}

impl Default for NormalizeOptions {
    fn default() -> Self {
        NormalizeOptions {
            max_attribute_bytes: DEFAULT_MAX_ATTRIBUTE_BYTES,
            max_io_bytes: DEFAULT_MAX_IO_BYTES,
            default_environment: None,
        }
    }
}

/// One span the request carried that could not be accepted.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    /// Where the span was, e.g. `resource_spans[0].scope_spans[1].spans[3]`.
    pub path: String,
    /// Why, e.g. `trace_id must be 16 bytes, got 15`.
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct Normalized {
    pub spans: Vec<SpanRecord>,
    pub rejected: Vec<Rejection>,
    /// How many attribute / input / output values were cut to the configured bounds.
    pub truncated_values: u64,
}

/// Normalizes every span of an OTLP export request. Never panics on any input.
pub fn normalize_request(req: &ExportTraceServiceRequest, opts: &NormalizeOptions) -> Normalized {
    let mut out = Normalized::default();
    let mut scratch = Scratch::default();
    for (ri, rs) in req.resource_spans.iter().enumerate() {
        let res = ResourceCtx::new(rs.resource.as_ref(), &rs.schema_url, opts, &mut scratch);
        out.truncated_values += res.cut_count;
        for (si, ss) in rs.scope_spans.iter().enumerate() {
            let scope = ScopeCtx::new(ss.scope.as_ref(), &ss.schema_url, opts, &mut scratch);
            out.truncated_values += scope.cut_count;
            for (pi, span) in ss.spans.iter().enumerate() {
                match validate(span) {
                    Ok(()) => {
                        let (record, cut) = normalize_span(span, &res, &scope, opts, &mut scratch);
                        out.truncated_values += cut;
                        out.spans.push(record);
                    }
                    Err(reason) => out.rejected.push(Rejection {
                        path: format!("resource_spans[{ri}].scope_spans[{si}].spans[{pi}]"),
                        reason,
                    }),
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

fn validate(span: &Span) -> Result<(), String> {
    let all_zero = |b: &[u8]| b.iter().all(|&x| x == 0);
    if span.trace_id.len() != 16 {
        return Err(format!(
            "trace_id must be 16 bytes, got {}",
            span.trace_id.len()
        ));
    }
    if all_zero(&span.trace_id) {
        return Err("trace_id must not be all zero".to_owned());
    }
    if span.span_id.len() != 8 {
        return Err(format!(
            "span_id must be 8 bytes, got {}",
            span.span_id.len()
        ));
    }
    if all_zero(&span.span_id) {
        return Err("span_id must not be all zero".to_owned());
    }
    if !span.parent_span_id.is_empty() && span.parent_span_id.len() != 8 {
        return Err(format!(
            "parent_span_id must be empty or 8 bytes, got {}",
            span.parent_span_id.len()
        ));
    }
    if span.end_time_unix_nano < span.start_time_unix_nano {
        return Err("end_time_unix_nano before start_time_unix_nano".to_owned());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Bounding
// ---------------------------------------------------------------------------------------

/// Where a cut value came from, for its name in `loupe.truncated_keys`.
#[derive(Clone, Copy)]
enum Origin {
    Span,
    Resource,
    Scope,
    Event(usize),
    Link(usize),
}

impl Origin {
    fn name(self, key: &str) -> String {
        match self {
            Origin::Span => key.to_owned(),
            Origin::Resource => format!("resource.{key}"),
            Origin::Scope => format!("scope.{key}"),
            Origin::Event(i) => format!("events[{i}].{key}"),
            Origin::Link(i) => format!("links[{i}].{key}"),
        }
    }
}

/// Counts and names the values cut while writing one span (or one resource / scope).
struct Cut {
    max: usize,
    count: u64,
    keys: Vec<String>,
}

impl Cut {
    fn new(max: usize) -> Self {
        Cut {
            max,
            count: 0,
            keys: Vec::new(),
        }
    }

    fn note(&mut self, origin: Origin, key: &str) {
        self.count += 1;
        let name = origin.name(key);
        if !self.keys.contains(&name) {
            self.keys.push(name);
        }
    }

    /// `s` cut to the bound; notes the cut.
    fn str<'s>(&mut self, s: &'s str, origin: Origin, key: &str) -> &'s str {
        if s.len() <= self.max {
            return s;
        }
        self.note(origin, key);
        prefix_at_char_boundary(s, self.max)
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn prefix_at_char_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Cuts an owned string in place; true when it was cut.
fn truncate_string(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let end = prefix_at_char_boundary(s, max).len();
    s.truncate(end);
    true
}

/// A column value taken from an attribute: bounded like the attribute (whose cut was
/// already counted when the attributes JSON was written).
fn clip(s: &str, max: usize) -> String {
    prefix_at_char_boundary(s, max).to_owned()
}

// ---------------------------------------------------------------------------------------
// Direct JSON writing
// ---------------------------------------------------------------------------------------

/// Bytes that need escaping inside a JSON string.
static ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Writes `s` as a JSON string (quoted and escaped like serde_json does).
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !ESCAPE[b as usize] {
            continue;
        }
        // Escaped bytes are ASCII, so `start..i` always lies on char boundaries.
        out.push_str(&s[start..i]);
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 0xf) as usize] as char);
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Writes a double as a JSON number; NaN and infinities as the strings OTLP/JSON uses.
fn push_f64(out: &mut String, d: f64) {
    if d.is_nan() {
        out.push_str("\"NaN\"");
    } else if d.is_infinite() {
        out.push_str(if d > 0.0 {
            "\"Infinity\""
        } else {
            "\"-Infinity\""
        });
    } else {
        // `Debug` prints the shortest representation that round-trips, with an exponent
        // for very large or small magnitudes (`1e300`), which JSON accepts.
        let _ = write!(out, "{d:?}");
    }
}

fn push_display(out: &mut String, v: impl fmt::Display) {
    let _ = write!(out, "{v}");
}

/// Standard base64 with padding (as OTLP/JSON encodes `bytesValue`).
fn push_base64(out: &mut String, bytes: &[u8]) {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode_string(bytes, out);
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 0xf) as usize] as char);
    }
}

/// Writes `,` before every member but the first.
fn sep(out: &mut String, first: &mut bool) {
    if !*first {
        out.push(',');
    }
    *first = false;
}

/// Writes `"key":`, the key bounded by [`MAX_KEY_BYTES`].
fn push_key(out: &mut String, key: &str, cut: &mut Cut, origin: Origin) {
    push_json_str(out, bounded_key(key, cut, origin, key));
    out.push(':');
}

/// An attribute key cut to [`MAX_KEY_BYTES`] (noted as `name`).
fn bounded_key<'k>(key: &'k str, cut: &mut Cut, origin: Origin, name: &str) -> &'k str {
    if key.len() <= MAX_KEY_BYTES {
        return key;
    }
    cut.note(origin, prefix_at_char_boundary(name, MAX_KEY_BYTES));
    prefix_at_char_boundary(key, MAX_KEY_BYTES)
}

/// Writes one attribute value. `key` is the top-level attribute key, used to name cuts
/// made anywhere inside the value.
fn write_any(
    out: &mut String,
    v: Option<&AnyValue>,
    cut: &mut Cut,
    origin: Origin,
    key: &str,
    depth: usize,
) {
    match v.and_then(|v| v.value.as_ref()) {
        None | Some(Value::StringValueStrindex(_)) => out.push_str("null"),
        Some(Value::StringValue(s)) => {
            let s = cut.str(s, origin, key);
            push_json_str(out, s);
        }
        Some(Value::BoolValue(b)) => out.push_str(if *b { "true" } else { "false" }),
        Some(Value::IntValue(i)) => push_display(out, i),
        Some(Value::DoubleValue(d)) => push_f64(out, *d),
        Some(Value::BytesValue(b)) => {
            let b = if b.len() > cut.max {
                cut.note(origin, key);
                &b[..cut.max]
            } else {
                &b[..]
            };
            out.push('"');
            push_base64(out, b);
            out.push('"');
        }
        Some(Value::ArrayValue(a)) => {
            if depth >= MAX_DEPTH {
                cut.note(origin, key);
                out.push_str("null");
                return;
            }
            out.push('[');
            for (i, item) in a.values.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_any(out, Some(item), cut, origin, key, depth + 1);
            }
            out.push(']');
        }
        Some(Value::KvlistValue(kv)) => {
            if depth >= MAX_DEPTH {
                cut.note(origin, key);
                out.push_str("null");
                return;
            }
            write_object(out, &kv.values, cut, origin, Some(key), depth + 1);
        }
    }
}

/// Writes key-values as a JSON object. `top_key` names cuts inside nested values.
fn write_object(
    out: &mut String,
    kvs: &[KeyValue],
    cut: &mut Cut,
    origin: Origin,
    top_key: Option<&str>,
    depth: usize,
) {
    out.push('{');
    let mut first = true;
    for kv in kvs {
        sep(out, &mut first);
        let name = top_key.unwrap_or(&kv.key);
        push_json_str(out, bounded_key(&kv.key, cut, origin, name));
        out.push(':');
        write_any(out, kv.value.as_ref(), cut, origin, name, depth);
    }
    out.push('}');
}

/// Reused buffers, so that each JSON column costs one exact-size allocation.
#[derive(Default)]
struct Scratch {
    attrs: String,
    aux: String,
}

// ---------------------------------------------------------------------------------------
// Resource and scope (once per ResourceSpans / ScopeSpans)
// ---------------------------------------------------------------------------------------

struct ResourceCtx {
    json: String,
    service_name: String,
    user_id: Option<String>,
    session_id: Option<String>,
    prompt_name: Option<String>,
    prompt_version: Option<String>,
    environment: Option<String>,
    cut_keys: Vec<String>,
    cut_count: u64,
}

impl ResourceCtx {
    fn new(
        resource: Option<&Resource>,
        schema_url: &str,
        opts: &NormalizeOptions,
        scratch: &mut Scratch,
    ) -> Self {
        let max = opts.max_attribute_bytes;
        let mut cut = Cut::new(max);
        let mut f = Fields::default();
        let out = &mut scratch.aux;
        out.clear();
        out.push('{');
        let mut first = true;
        let empty = Vec::new();
        let attrs = resource.map_or(&empty, |r| &r.attributes);
        for kv in attrs {
            sep(out, &mut first);
            push_key(out, &kv.key, &mut cut, Origin::Resource);
            write_any(
                out,
                kv.value.as_ref(),
                &mut cut,
                Origin::Resource,
                &kv.key,
                0,
            );
            if let Some(v) = &kv.value {
                f.observe(&kv.key, v);
            }
        }
        if let Some(r) = resource {
            if r.dropped_attributes_count != 0 {
                sep(out, &mut first);
                out.push_str("\"otel.dropped_attributes_count\":");
                push_display(out, r.dropped_attributes_count);
            }
            if !r.entity_refs.is_empty() {
                sep(out, &mut first);
                out.push_str("\"otel.entity_refs\":[");
                for (i, e) in r.entity_refs.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str("{\"type\":");
                    push_json_str(
                        out,
                        cut.str(&e.r#type, Origin::Resource, "otel.entity_refs"),
                    );
                    out.push_str(",\"id_keys\":");
                    push_str_array(
                        out,
                        &e.id_keys,
                        &mut cut,
                        Origin::Resource,
                        "otel.entity_refs",
                    );
                    out.push_str(",\"description_keys\":");
                    push_str_array(
                        out,
                        &e.description_keys,
                        &mut cut,
                        Origin::Resource,
                        "otel.entity_refs",
                    );
                    if !e.schema_url.is_empty() {
                        out.push_str(",\"schema_url\":");
                        push_json_str(
                            out,
                            cut.str(&e.schema_url, Origin::Resource, "otel.entity_refs"),
                        );
                    }
                    out.push('}');
                }
                out.push(']');
            }
        }
        if !schema_url.is_empty() {
            sep(out, &mut first);
            out.push_str("\"otel.schema_url\":");
            push_json_str(
                out,
                cut.str(schema_url, Origin::Resource, "otel.schema_url"),
            );
        }
        out.push('}');

        let owned = |p: &Pick<Cow<'_, str>>| p.v.as_deref().map(|s| clip(s, max));
        ResourceCtx {
            json: out.as_str().to_owned(),
            service_name: f
                .service_name
                .filter(|s| !s.is_empty())
                .map_or_else(|| UNKNOWN_SERVICE.to_owned(), |s| clip(s, max)),
            user_id: owned(&f.user),
            session_id: owned(&f.session),
            prompt_name: owned(&f.prompt_name),
            prompt_version: owned(&f.prompt_version),
            environment: owned(&f.environment),
            cut_keys: cut.keys,
            cut_count: cut.count,
        }
    }
}

fn push_str_array(out: &mut String, items: &[String], cut: &mut Cut, origin: Origin, key: &str) {
    out.push('[');
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(out, cut.str(s, origin, key));
    }
    out.push(']');
}

struct ScopeCtx {
    json: String,
    cut_keys: Vec<String>,
    cut_count: u64,
}

impl ScopeCtx {
    fn new(
        scope: Option<&InstrumentationScope>,
        schema_url: &str,
        opts: &NormalizeOptions,
        scratch: &mut Scratch,
    ) -> Self {
        let mut cut = Cut::new(opts.max_attribute_bytes);
        let out = &mut scratch.aux;
        out.clear();
        out.push_str("{\"name\":");
        push_json_str(
            out,
            cut.str(scope.map_or("", |s| &s.name), Origin::Scope, "name"),
        );
        out.push_str(",\"version\":");
        push_json_str(
            out,
            cut.str(scope.map_or("", |s| &s.version), Origin::Scope, "version"),
        );
        out.push_str(",\"attributes\":");
        write_object(
            out,
            scope.map_or(&[][..], |s| &s.attributes[..]),
            &mut cut,
            Origin::Scope,
            None,
            0,
        );
        if let Some(s) = scope
            && s.dropped_attributes_count != 0
        {
            out.push_str(",\"dropped_attributes_count\":");
            push_display(out, s.dropped_attributes_count);
        }
        if !schema_url.is_empty() {
            out.push_str(",\"schema_url\":");
            push_json_str(out, cut.str(schema_url, Origin::Scope, "schema_url"));
        }
        out.push('}');
        ScopeCtx {
            json: out.as_str().to_owned(),
            cut_keys: cut.keys,
            cut_count: cut.count,
        }
    }
}

// ---------------------------------------------------------------------------------------
// One span
// ---------------------------------------------------------------------------------------

fn normalize_span(
    span: &Span,
    res: &ResourceCtx,
    scope: &ScopeCtx,
    opts: &NormalizeOptions,
    scratch: &mut Scratch,
) -> (SpanRecord, u64) {
    let max = opts.max_attribute_bytes;
    let mut cut = Cut::new(max);
    let mut f = Fields::default();

    // Attributes: one pass, writing JSON and picking the LLM fields.
    let attrs = &mut scratch.attrs;
    attrs.clear();
    attrs.push('{');
    let mut first = true;
    for kv in &span.attributes {
        sep(attrs, &mut first);
        push_key(attrs, &kv.key, &mut cut, Origin::Span);
        write_any(attrs, kv.value.as_ref(), &mut cut, Origin::Span, &kv.key, 0);
        if let Some(v) = &kv.value {
            f.observe(&kv.key, v);
        }
    }
    // OTLP span fields without a column of their own, kept only when set.
    if !span.trace_state.is_empty() {
        sep(attrs, &mut first);
        attrs.push_str("\"otel.trace_state\":");
        push_json_str(
            attrs,
            cut.str(&span.trace_state, Origin::Span, "otel.trace_state"),
        );
    }
    for (key, n) in [
        ("otel.flags", span.flags),
        (
            "otel.dropped_attributes_count",
            span.dropped_attributes_count,
        ),
        ("otel.dropped_events_count", span.dropped_events_count),
        ("otel.dropped_links_count", span.dropped_links_count),
    ] {
        if n != 0 {
            sep(attrs, &mut first);
            push_json_str(attrs, key);
            attrs.push(':');
            push_display(attrs, n);
        }
    }
    let (status_code, status_message) = match &span.status {
        Some(s) => (s.code, s.message.as_str()),
        None => (0, ""),
    };
    let status = match StatusCode::try_from(status_code) {
        Ok(code) => code,
        Err(_) => {
            // An unknown code is kept in the attributes and stored as UNSET.
            sep(attrs, &mut first);
            attrs.push_str("\"otel.status_code\":");
            push_display(attrs, status_code);
            StatusCode::Unset
        }
    };

    // Events.
    let aux = &mut scratch.aux;
    aux.clear();
    aux.push('[');
    for (i, ev) in span.events.iter().enumerate() {
        if i > 0 {
            aux.push(',');
        }
        let origin = Origin::Event(i);
        aux.push_str("{\"time_ns\":");
        push_display(aux, ev.time_unix_nano);
        aux.push_str(",\"name\":");
        push_json_str(aux, cut.str(&ev.name, origin, "name"));
        aux.push_str(",\"attributes\":");
        write_object(aux, &ev.attributes, &mut cut, origin, None, 0);
        if ev.dropped_attributes_count != 0 {
            aux.push_str(",\"dropped_attributes_count\":");
            push_display(aux, ev.dropped_attributes_count);
        }
        aux.push('}');
        f.observe_event(ev);
    }
    aux.push(']');
    let events = aux.as_str().to_owned();

    // Links.
    aux.clear();
    aux.push('[');
    for (i, link) in span.links.iter().enumerate() {
        if i > 0 {
            aux.push(',');
        }
        write_link(aux, link, &mut cut, Origin::Link(i));
    }
    aux.push(']');
    let links = aux.as_str().to_owned();

    // Typed columns.
    let kind = f.kind();
    let (mut input, mut output) = f.io(kind);
    for (value, overflow, key) in [
        (&mut input, f.overflow_in, "loupe.input"),
        (&mut output, f.overflow_out, "loupe.output"),
    ] {
        let cut_now = value
            .as_mut()
            .is_some_and(|s| truncate_string(s, opts.max_io_bytes));
        if cut_now || overflow {
            cut.note(Origin::Span, key);
        }
    }
    let finish_reason = f
        .finish
        .v
        .as_deref()
        .map(|s| clip(s, max))
        .or_else(|| f.output_finish.take().map(|s| clip(&s, max)));
    let tokens = f.tokens();
    let cost = f.cost();
    let (req_model, resp_model) = f.models();
    let pick = |span_pick: &Pick<Cow<'_, str>>, res_val: &Option<String>| {
        span_pick
            .v
            .as_deref()
            .map(|s| clip(s, max))
            .or_else(|| res_val.clone())
    };
    let environment =
        pick(&f.environment, &res.environment).or_else(|| opts.default_environment.clone());

    let name = cut.str(&span.name, Origin::Span, "span.name").to_owned();
    let status_message = cut
        .str(status_message, Origin::Span, "status.message")
        .to_owned();

    // `loupe.truncated_keys`, then close the attributes object.
    let resource_and_scope_cuts = res.cut_keys.iter().chain(&scope.cut_keys);
    if !cut.keys.is_empty() || !res.cut_keys.is_empty() || !scope.cut_keys.is_empty() {
        sep(attrs, &mut first);
        push_json_str(attrs, TRUNCATED_KEYS_ATTRIBUTE);
        attrs.push_str(":[");
        for (i, k) in cut.keys.iter().chain(resource_and_scope_cuts).enumerate() {
            if i > 0 {
                attrs.push(',');
            }
            push_json_str(attrs, k);
        }
        attrs.push(']');
    }
    attrs.push('}');

    let parent_span_id = if span.parent_span_id.iter().all(|&b| b == 0) {
        Vec::new()
    } else {
        span.parent_span_id.clone()
    };

    let record = SpanRecord {
        trace_id: span.trace_id.clone(),
        span_id: span.span_id.clone(),
        parent_span_id,
        name,
        service_name: res.service_name.clone(),
        span_kind: span.kind,
        llm_kind: kind as i32,
        start_ns: span.start_time_unix_nano,
        end_ns: span.end_time_unix_nano,
        status: status as i32,
        status_message,
        provider: f.provider.v.as_deref().map(|s| clip(s, max)),
        request_model: req_model.map(|s| clip(s, max)),
        response_model: resp_model.map(|s| clip(s, max)),
        input_tokens: tokens.input,
        output_tokens: tokens.output,
        total_tokens: tokens.total,
        cache_read_tokens: tokens.cache_read,
        reasoning_tokens: tokens.reasoning,
        cost_input_usd: cost.input,
        cost_output_usd: cost.output,
        cost_total_usd: cost.total,
        cost_source: cost.any().then(|| "client".to_owned()),
        finish_reason,
        user_id: pick(&f.user, &res.user_id),
        session_id: pick(&f.session, &res.session_id),
        prompt_name: pick(&f.prompt_name, &res.prompt_name),
        prompt_version: pick(&f.prompt_version, &res.prompt_version),
        environment,
        input,
        output,
        attributes: attrs.as_str().to_owned(),
        resource: res.json.clone(),
        scope: scope.json.clone(),
        events,
        links,
    };
    (record, cut.count)
}

fn write_link(out: &mut String, link: &Link, cut: &mut Cut, origin: Origin) {
    out.push_str("{\"trace_id\":\"");
    push_hex(out, prefix_bytes(&link.trace_id, cut, origin, "trace_id"));
    out.push_str("\",\"span_id\":\"");
    push_hex(out, prefix_bytes(&link.span_id, cut, origin, "span_id"));
    out.push_str("\",\"attributes\":");
    write_object(out, &link.attributes, cut, origin, None, 0);
    if !link.trace_state.is_empty() {
        out.push_str(",\"trace_state\":");
        push_json_str(out, cut.str(&link.trace_state, origin, "trace_state"));
    }
    if link.flags != 0 {
        out.push_str(",\"flags\":");
        push_display(out, link.flags);
    }
    if link.dropped_attributes_count != 0 {
        out.push_str(",\"dropped_attributes_count\":");
        push_display(out, link.dropped_attributes_count);
    }
    out.push('}');
}

fn prefix_bytes<'b>(b: &'b [u8], cut: &mut Cut, origin: Origin, key: &str) -> &'b [u8] {
    if b.len() > cut.max {
        cut.note(origin, key);
        &b[..cut.max]
    } else {
        b
    }
}

// ---------------------------------------------------------------------------------------
// Attribute value helpers
// ---------------------------------------------------------------------------------------

/// A non-empty string value.
fn str_of(v: &AnyValue) -> Option<&str> {
    match &v.value {
        Some(Value::StringValue(s)) if !s.is_empty() => Some(s),
        _ => None,
    }
}

/// A scalar as text (ids and versions are sometimes sent as numbers).
fn text_of(v: &AnyValue) -> Option<Cow<'_, str>> {
    match v.value.as_ref()? {
        Value::StringValue(s) if !s.is_empty() => Some(Cow::Borrowed(s)),
        Value::IntValue(i) => Some(Cow::Owned(i.to_string())),
        Value::DoubleValue(d) if d.is_finite() => Some(Cow::Owned(d.to_string())),
        Value::BoolValue(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        _ => None,
    }
}

/// Any value as text: strings as they are, everything else as JSON.
fn value_text(v: &AnyValue) -> Option<Cow<'_, str>> {
    match v.value.as_ref()? {
        Value::StringValue(s) => (!s.is_empty()).then_some(Cow::Borrowed(s.as_str())),
        Value::StringValueStrindex(_) => None,
        _ => Some(Cow::Owned(any_to_json(v, 0).to_string())),
    }
}

/// A non-negative count sent as int, double or numeric string.
fn int_of(v: &AnyValue) -> Option<i64> {
    let from_f64 = |d: f64| (d.is_finite() && (0.0..9.0e18).contains(&d)).then(|| d.round() as i64);
    match v.value.as_ref()? {
        Value::IntValue(i) => (*i >= 0).then_some(*i),
        Value::DoubleValue(d) => from_f64(*d),
        Value::StringValue(s) => {
            let s = s.trim();
            match s.parse::<i64>() {
                Ok(i) => (i >= 0).then_some(i),
                Err(_) => s.parse::<f64>().ok().and_then(from_f64),
            }
        }
        _ => None,
    }
}

/// A non-negative amount sent as double, int or numeric string.
fn float_of(v: &AnyValue) -> Option<f64> {
    let d = match v.value.as_ref()? {
        Value::DoubleValue(d) => *d,
        Value::IntValue(i) => *i as f64,
        Value::StringValue(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (d.is_finite() && d >= 0.0).then_some(d)
}

fn json_count(v: Option<&Json>) -> Option<i64> {
    match v? {
        Json::Number(n) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|d| d.is_finite())
                    .map(|d| d.round() as i64)
            })
            .filter(|&i| i >= 0),
        Json::String(s) => s.trim().parse::<i64>().ok().filter(|&i| i >= 0),
        _ => None,
    }
}

fn json_amount(v: Option<&Json>) -> Option<f64> {
    let d = match v? {
        Json::Number(n) => n.as_f64()?,
        Json::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (d.is_finite() && d >= 0.0).then_some(d)
}

/// An attribute value as a JSON tree (only on the rare message / document paths).
fn any_to_json(v: &AnyValue, depth: usize) -> Json {
    match &v.value {
        None | Some(Value::StringValueStrindex(_)) => Json::Null,
        Some(Value::StringValue(s)) => Json::String(s.clone()),
        Some(Value::BoolValue(b)) => Json::Bool(*b),
        Some(Value::IntValue(i)) => Json::from(*i),
        Some(Value::DoubleValue(d)) => serde_json::Number::from_f64(*d).map_or_else(
            || {
                Json::String(
                    if d.is_nan() {
                        "NaN"
                    } else if *d > 0.0 {
                        "Infinity"
                    } else {
                        "-Infinity"
                    }
                    .to_owned(),
                )
            },
            Json::Number,
        ),
        Some(Value::BytesValue(b)) => {
            let mut s = String::new();
            push_base64(&mut s, b);
            Json::String(s)
        }
        Some(Value::ArrayValue(a)) if depth < MAX_DEPTH => {
            Json::Array(a.values.iter().map(|x| any_to_json(x, depth + 1)).collect())
        }
        Some(Value::KvlistValue(kv)) if depth < MAX_DEPTH => {
            Json::Object(kvs_to_json(&kv.values, depth + 1))
        }
        Some(_) => Json::Null,
    }
}

fn kvs_to_json(kvs: &[KeyValue], depth: usize) -> Map<String, Json> {
    kvs.iter()
        .map(|kv| {
            let v = kv
                .value
                .as_ref()
                .map_or(Json::Null, |v| any_to_json(v, depth));
            (kv.key.clone(), v)
        })
        .collect()
}

/// A value that may hold JSON structurally (kvlist / array) or as a JSON string.
fn structured(v: &AnyValue) -> Option<Json> {
    match v.value.as_ref()? {
        Value::StringValue(s) => serde_json::from_str(s).ok(),
        Value::ArrayValue(_) | Value::KvlistValue(_) => Some(any_to_json(v, 0)),
        _ => None,
    }
}

fn json_text(v: &Json) -> Option<String> {
    match v {
        Json::Null => None,
        Json::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

// ---------------------------------------------------------------------------------------
// Field picking
// ---------------------------------------------------------------------------------------

/// A value offered by several keys; the lowest priority number wins (ties: first sent).
struct Pick<T> {
    v: Option<T>,
    prio: u8,
}

impl<T> Default for Pick<T> {
    fn default() -> Self {
        Pick { v: None, prio: 0 }
    }
}

impl<T> Pick<T> {
    fn offer(&mut self, prio: u8, v: Option<T>) {
        if let Some(v) = v
            && (self.v.is_none() || prio < self.prio)
        {
            self.v = Some(v);
            self.prio = prio;
        }
    }
}

/// Entries of a flattened list (`prefix.N.…`) in arrival order, read in index order.
///
/// Senders write lists in ascending order, which costs one comparison per key. Out of
/// order keys fall back to a scan of the (contiguous) index vector, so even a hostile
/// order stays at most `MAX_INDEXED²` integer comparisons and never moves entries.
struct Indexed<T> {
    idx: Vec<u32>,
    items: Vec<T>,
    /// `idx` is ascending (so it can be binary-searched).
    sorted: bool,
}

impl<T> Default for Indexed<T> {
    fn default() -> Self {
        Indexed {
            idx: Vec::new(),
            items: Vec::new(),
            sorted: true,
        }
    }
}

impl<T: Default> Indexed<T> {
    /// The entry of index `i`, created if new; `None` (and `overflow` set) when full.
    fn at(&mut self, i: u32, overflow: &mut bool) -> Option<&mut T> {
        let found = match self.idx.last() {
            None => None,
            Some(&j) if j == i => Some(self.idx.len() - 1),
            Some(&j) if j < i && self.sorted => None,
            Some(_) if self.sorted => self.idx.binary_search(&i).ok(),
            Some(_) => self.idx.iter().position(|&j| j == i),
        };
        let pos = match found {
            Some(p) => p,
            None => {
                if self.idx.len() >= MAX_INDEXED {
                    *overflow = true;
                    return None;
                }
                if self.idx.last().is_some_and(|&j| j > i) {
                    self.sorted = false;
                }
                self.idx.push(i);
                self.items.push(T::default());
                self.items.len() - 1
            }
        };
        self.items.get_mut(pos)
    }
}

impl<T> Indexed<T> {
    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn len(&self) -> usize {
        self.items.len()
    }

    /// The entries in index order.
    fn values(&self) -> impl Iterator<Item = &T> {
        let mut order: Vec<usize> = (0..self.items.len()).collect();
        if !self.sorted {
            order.sort_by_key(|&k| self.idx.get(k).copied().unwrap_or(u32::MAX));
        }
        order.into_iter().filter_map(|k| self.items.get(k))
    }
}

/// `"3.rest"` → `(3, "rest")`.
fn split_index(s: &str) -> Option<(u32, &str)> {
    let dot = s.find('.')?;
    let (n, rest) = s.split_at(dot);
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((n.parse().ok()?, &rest[1..]))
}

#[derive(Default)]
struct RawTool<'a> {
    id: Option<Cow<'a, str>>,
    name: Option<Cow<'a, str>>,
    arguments: Option<Cow<'a, str>>,
}

/// A message assembled from flattened attributes.
#[derive(Default)]
struct RawMsg<'a> {
    role: Option<Cow<'a, str>>,
    content: Option<Cow<'a, str>>,
    /// `[oi]` `message.contents.M.message_content.text`
    parts: Indexed<Cow<'a, str>>,
    tool_calls: Indexed<RawTool<'a>>,
    tool_call_id: Option<Cow<'a, str>>,
    finish_reason: Option<Cow<'a, str>>,
    /// `[oi]` `message.function_call_name` / `[ol]` `function_call.name` (legacy OpenAI).
    fn_name: Option<Cow<'a, str>>,
    fn_args: Option<Cow<'a, str>>,
}

#[derive(Default)]
struct RawDoc<'a> {
    id: Option<&'a AnyValue>,
    content: Option<&'a AnyValue>,
    score: Option<&'a AnyValue>,
    metadata: Option<&'a AnyValue>,
}

/// Message events (`[otel]` v1.28–v1.36), kept by reference until the end.
struct EventMsg<'a> {
    role: &'static str,
    event: &'a Event,
}

/// Everything picked from one span's (or resource's) attributes.
#[derive(Default)]
struct Fields<'a> {
    service_name: Option<&'a str>,

    oi_kind: Option<&'a str>,
    langfuse_type: Option<&'a str>,
    traceloop_kind: Option<&'a str>,
    operation: Option<&'a str>,
    request_type: Option<&'a str>,

    provider: Pick<Cow<'a, str>>,
    request_model: Pick<&'a str>,
    response_model: Pick<&'a str>,
    /// A model named without saying request or response (`llm.model_name`, …).
    model: Pick<&'a str>,
    /// Which key `model` came from: 0 LLM, 1 embedding, 2 reranker.
    model_family: u8,

    input_tokens: Pick<i64>,
    output_tokens: Pick<i64>,
    total_tokens: Pick<i64>,
    cache_read_tokens: Pick<i64>,
    reasoning_tokens: Pick<i64>,
    langfuse_usage: Option<&'a AnyValue>,

    cost_input: Pick<f64>,
    cost_output: Pick<f64>,
    cost_total: Pick<f64>,
    langfuse_cost: Option<&'a AnyValue>,

    finish: Pick<Cow<'a, str>>,
    output_finish: Option<String>,

    user: Pick<Cow<'a, str>>,
    session: Pick<Cow<'a, str>>,
    prompt_name: Pick<Cow<'a, str>>,
    prompt_version: Pick<Cow<'a, str>>,
    environment: Pick<Cow<'a, str>>,

    input_value: Pick<&'a AnyValue>,
    output_value: Pick<&'a AnyValue>,
    genai_input: Pick<&'a AnyValue>,
    genai_output: Pick<&'a AnyValue>,
    genai_system: Pick<&'a AnyValue>,
    legacy_prompt: Pick<&'a AnyValue>,
    legacy_completion: Pick<&'a AnyValue>,
    oi_input: Indexed<RawMsg<'a>>,
    oi_output: Indexed<RawMsg<'a>>,
    flat_prompt: Indexed<RawMsg<'a>>,
    flat_completion: Indexed<RawMsg<'a>>,
    oi_prompts: Indexed<Cow<'a, str>>,
    oi_choices: Indexed<Cow<'a, str>>,
    documents: Indexed<RawDoc<'a>>,
    reranked: Indexed<RawDoc<'a>>,
    rerank_query: Option<&'a AnyValue>,
    embedding_texts: Indexed<Cow<'a, str>>,
    event_input: Vec<EventMsg<'a>>,
    event_output: Vec<&'a Event>,
    /// A flattened input / output list had more entries than are collected.
    overflow_in: bool,
    overflow_out: bool,
}

impl<'a> Fields<'a> {
    /// Looks at one attribute. Exact keys first (one `match`); the indexed list keys only
    /// when nothing matched.
    fn observe(&mut self, key: &'a str, v: &'a AnyValue) {
        match key {
            "service.name" => self.service_name = str_of(v),

            // --- kind hints
            "openinference.span.kind" => self.oi_kind = str_of(v), // [oi]
            "langfuse.observation.type" => self.langfuse_type = str_of(v), // [lf]
            "traceloop.span.kind" => self.traceloop_kind = str_of(v), // [ol]
            "gen_ai.operation.name" => self.operation = str_of(v), // [otel]
            "llm.request.type" => self.request_type = str_of(v),   // [ol]

            // --- provider
            "gen_ai.provider.name" => self.provider.offer(0, text_of(v)), // [otel] current
            "gen_ai.system" => self.provider.offer(1, text_of(v)),        // [otel] deprecated, [ol]
            "llm.provider" => self.provider.offer(2, text_of(v)),         // [oi] hosting provider
            "llm.system" => self.provider.offer(3, text_of(v)),           // [oi] AI product

            // --- models
            "gen_ai.request.model" => self.request_model.offer(0, str_of(v)), // [otel], [ol]
            "llm.request.model_name" => self.request_model.offer(1, str_of(v)), // [oi]
            "llm.request.model" => self.request_model.offer(2, str_of(v)),    // [ol] early versions
            "gen_ai.response.model" => self.response_model.offer(0, str_of(v)), // [otel], [ol]
            "llm.response.model_name" => self.response_model.offer(1, str_of(v)), // [oi]
            "llm.response.model" => self.response_model.offer(2, str_of(v)),  // [ol] early versions
            "llm.model_name" => self.offer_model(0, 0, v),                    // [oi]
            "langfuse.observation.model.name" => self.offer_model(1, 0, v),   // [lf]
            "embedding.model_name" => self.offer_model(2, 1, v),              // [oi]
            "reranker.model_name" => self.offer_model(3, 2, v),               // [oi]

            // --- tokens
            "gen_ai.usage.input_tokens" => self.input_tokens.offer(0, int_of(v)), // [otel], [ol]
            "gen_ai.usage.prompt_tokens" => self.input_tokens.offer(1, int_of(v)), // [otel] deprecated, [ol]
            "llm.token_count.prompt" => self.input_tokens.offer(2, int_of(v)),     // [oi]
            "llm.usage.prompt_tokens" => self.input_tokens.offer(3, int_of(v)), // [ol] early versions
            "gen_ai.usage.output_tokens" => self.output_tokens.offer(0, int_of(v)), // [otel], [ol]
            "gen_ai.usage.completion_tokens" => self.output_tokens.offer(1, int_of(v)), // [otel] deprecated, [ol]
            "llm.token_count.completion" => self.output_tokens.offer(2, int_of(v)),     // [oi]
            "llm.usage.completion_tokens" => self.output_tokens.offer(3, int_of(v)), // [ol] early versions
            "gen_ai.usage.total_tokens" => self.total_tokens.offer(0, int_of(v)), // [ol] (not in [otel])
            "llm.token_count.total" => self.total_tokens.offer(1, int_of(v)),     // [oi]
            "llm.usage.total_tokens" => self.total_tokens.offer(2, int_of(v)),    // [ol]
            "gen_ai.usage.cache_read.input_tokens" => self.cache_read_tokens.offer(0, int_of(v)), // [otel]
            "llm.token_count.prompt_details.cache_read" => {
                self.cache_read_tokens.offer(1, int_of(v)) // [oi]
            }
            "gen_ai.usage.cache_read_input_tokens" => self.cache_read_tokens.offer(2, int_of(v)), // [ol]
            "gen_ai.usage.reasoning.output_tokens" => self.reasoning_tokens.offer(0, int_of(v)), // [otel] newer
            "llm.token_count.completion_details.reasoning" => {
                self.reasoning_tokens.offer(1, int_of(v)) // [oi]
            }
            "gen_ai.usage.reasoning_tokens" => self.reasoning_tokens.offer(2, int_of(v)), // [ol]
            "llm.usage.reasoning_tokens" => self.reasoning_tokens.offer(3, int_of(v)), // [ol] legacy
            "langfuse.observation.usage_details" => self.langfuse_usage = Some(v),     // [lf] JSON

            // --- client cost (USD)
            "llm.cost.total" => self.cost_total.offer(0, float_of(v)), // [oi]
            "gen_ai.usage.cost" => self.cost_total.offer(1, float_of(v)), // [ol] instrumentations
            "llm.cost.prompt" => self.cost_input.offer(0, float_of(v)), // [oi]
            "llm.cost.completion" => self.cost_output.offer(0, float_of(v)), // [oi]
            "langfuse.observation.cost_details" => self.langfuse_cost = Some(v), // [lf] JSON

            // --- finish reason
            "gen_ai.response.finish_reasons" => self.finish.offer(0, first_reason(v)), // [otel]
            "gen_ai.response.finish_reason" => self.finish.offer(1, text_of(v)), // [ol] current
            "llm.response.finish_reason" => self.finish.offer(2, text_of(v)),    // [ol] legacy
            "llm.finish_reason" => self.finish.offer(3, text_of(v)),             // [oi]
            "gen_ai.response.stop_reason" => self.finish.offer(4, text_of(v)),   // [ol]
            "llm.response.stop_reason" => self.finish.offer(5, text_of(v)),      // [ol] legacy

            // --- user / session / prompt
            "user.id" => self.user.offer(0, text_of(v)), // [oi], [lf]
            "langfuse.user.id" => self.user.offer(1, text_of(v)), // [lf] compatibility
            "enduser.id" => self.user.offer(2, text_of(v)), // OpenTelemetry general registry
            "llm.user" | "gen_ai.user" => self.user.offer(4, text_of(v)), // [ol] OpenAI `user`
            "session.id" => self.session.offer(0, text_of(v)), // [oi], [lf], OTel session registry
            "langfuse.session.id" => self.session.offer(1, text_of(v)), // [lf] compatibility
            "gen_ai.conversation.id" => self.session.offer(2, text_of(v)), // [otel]
            "langfuse.observation.prompt.name" => self.prompt_name.offer(0, text_of(v)), // [lf]
            "langfuse.prompt.name" => self.prompt_name.offer(1, text_of(v)), // [lf] older docs
            "gen_ai.prompt.name" => self.prompt_name.offer(2, text_of(v)), // [otel]
            "traceloop.prompt.key" => self.prompt_name.offer(3, text_of(v)), // [ol]
            "prompt.id" => self.prompt_name.offer(4, text_of(v)), // [oi] vendor prompt id
            "llm.prompt_template.version" => self.prompt_version.offer(0, text_of(v)), // [oi]
            "langfuse.observation.prompt.version" => self.prompt_version.offer(1, text_of(v)), // [lf]
            "langfuse.prompt.version" => self.prompt_version.offer(2, text_of(v)), // [lf] older docs
            "traceloop.prompt.version" => self.prompt_version.offer(3, text_of(v)), // [ol]

            // --- environment
            "deployment.environment.name" => self.environment.offer(0, text_of(v)), // OTel registry
            "deployment.environment" => self.environment.offer(1, text_of(v)), // OTel, deprecated
            "langfuse.environment" => self.environment.offer(2, text_of(v)),   // [lf]

            // --- input / output (plain values)
            "input.value" => self.input_value.offer(0, Some(v)), // [oi]
            "langfuse.observation.input" => self.input_value.offer(1, Some(v)), // [lf]
            "traceloop.entity.input" => self.input_value.offer(2, Some(v)), // [ol]
            "gen_ai.tool.call.arguments" => self.input_value.offer(3, Some(v)), // [otel]
            "gen_ai.retrieval.query.text" => self.input_value.offer(4, Some(v)), // [otel]
            "output.value" => self.output_value.offer(0, Some(v)), // [oi]
            "langfuse.observation.output" => self.output_value.offer(1, Some(v)), // [lf]
            "traceloop.entity.output" => self.output_value.offer(2, Some(v)), // [ol]
            "gen_ai.tool.call.result" => self.output_value.offer(3, Some(v)), // [otel]
            "gen_ai.retrieval.documents" => self.output_value.offer(4, Some(v)), // [otel]
            "reranker.query" => self.rerank_query = Some(v),     // [oi]

            // --- messages as one value
            "gen_ai.input.messages" => self.genai_input.offer(0, Some(v)), // [otel]
            "gen_ai.output.messages" => self.genai_output.offer(0, Some(v)), // [otel]
            "gen_ai.system_instructions" => self.genai_system.offer(0, Some(v)), // [otel]
            "gen_ai.prompt" => self.legacy_prompt.offer(0, Some(v)),       // [otel] deprecated JSON
            "gen_ai.completion" => self.legacy_completion.offer(0, Some(v)), // [otel] deprecated JSON

            _ => self.observe_indexed(key, v),
        }
    }

    fn offer_model(&mut self, prio: u8, family: u8, v: &'a AnyValue) {
        let before = self.model.v.is_some().then_some(self.model.prio);
        self.model.offer(prio, str_of(v));
        if self.model.v.is_some() && before != Some(self.model.prio) {
            self.model_family = family;
        }
    }

    /// The flattened list keys (rare): checked only for keys no exact arm matched.
    fn observe_indexed(&mut self, key: &'a str, v: &'a AnyValue) {
        let (inp, out) = (&mut self.overflow_in, &mut self.overflow_out);
        match key.as_bytes().first() {
            Some(b'l') => {
                if let Some(rest) = key.strip_prefix("llm.input_messages.") {
                    oi_message(&mut self.oi_input, rest, v, inp); // [oi]
                } else if let Some(rest) = key.strip_prefix("llm.output_messages.") {
                    oi_message(&mut self.oi_output, rest, v, out); // [oi]
                } else if let Some(rest) = key.strip_prefix("llm.prompts.") {
                    if rest.ends_with(".prompt.text") {
                        indexed_text(&mut self.oi_prompts, rest, "prompt.text", v, inp); // [oi]
                    } else {
                        // [ol] before the gen_ai.* rename: llm.prompts.N.{role,content}
                        flat_message(&mut self.flat_prompt, rest, v, inp);
                    }
                } else if let Some(rest) = key.strip_prefix("llm.choices.") {
                    indexed_text(&mut self.oi_choices, rest, "completion.text", v, out); // [oi]
                } else if let Some(rest) = key.strip_prefix("llm.completions.") {
                    flat_message(&mut self.flat_completion, rest, v, out); // [ol] early versions
                }
            }
            Some(b'g') => {
                if let Some(rest) = key.strip_prefix("gen_ai.prompt.") {
                    flat_message(&mut self.flat_prompt, rest, v, inp); // [ol], [otel] old
                } else if let Some(rest) = key.strip_prefix("gen_ai.completion.") {
                    flat_message(&mut self.flat_completion, rest, v, out); // [ol], [otel] old
                }
            }
            Some(b'r') => {
                if let Some(rest) = key.strip_prefix("retrieval.documents.") {
                    document(&mut self.documents, rest, v, out); // [oi]
                } else if let Some(rest) = key.strip_prefix("reranker.output_documents.") {
                    document(&mut self.reranked, rest, v, out); // [oi]
                }
            }
            Some(b'e') => {
                if let Some(rest) = key.strip_prefix("embedding.embeddings.") {
                    indexed_text(&mut self.embedding_texts, rest, "embedding.text", v, inp); // [oi]
                }
            }
            Some(b't') => {
                // [ol] association properties set by `Traceloop.set_association_properties`.
                match key.strip_prefix("traceloop.association.properties.") {
                    Some("user_id") => self.user.offer(3, text_of(v)),
                    Some("session_id") => self.session.offer(3, text_of(v)),
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// Looks at one span event: the `[otel]` message events.
    fn observe_event(&mut self, ev: &'a Event) {
        let role = match ev.name.as_str() {
            "gen_ai.system.message" => "system",
            "gen_ai.user.message" => "user",
            "gen_ai.assistant.message" => "assistant",
            "gen_ai.tool.message" => "tool",
            "gen_ai.choice" => {
                if self.event_output.len() < MAX_INDEXED {
                    self.event_output.push(ev);
                } else {
                    self.overflow_out = true;
                }
                return;
            }
            // v1.27: events carrying the whole prompt / completion as a JSON string.
            "gen_ai.content.prompt" => {
                for kv in &ev.attributes {
                    if kv.key == "gen_ai.prompt" {
                        self.legacy_prompt.offer(1, kv.value.as_ref());
                    }
                }
                return;
            }
            "gen_ai.content.completion" => {
                for kv in &ev.attributes {
                    if kv.key == "gen_ai.completion" {
                        self.legacy_completion.offer(1, kv.value.as_ref());
                    }
                }
                return;
            }
            // Current: the opt-in details event carries the message attributes.
            "gen_ai.client.inference.operation.details" => {
                for kv in &ev.attributes {
                    match kv.key.as_str() {
                        "gen_ai.input.messages" => self.genai_input.offer(1, kv.value.as_ref()),
                        "gen_ai.output.messages" => self.genai_output.offer(1, kv.value.as_ref()),
                        "gen_ai.system_instructions" => {
                            self.genai_system.offer(1, kv.value.as_ref())
                        }
                        _ => {}
                    }
                }
                return;
            }
            _ => return,
        };
        if self.event_input.len() < MAX_INDEXED {
            self.event_input.push(EventMsg { role, event: ev });
        } else {
            self.overflow_in = true;
        }
    }

    // --- resolution -------------------------------------------------------------------

    fn kind(&self) -> LlmKind {
        let hint = self
            .oi_kind
            .and_then(openinference_kind)
            .or_else(|| self.langfuse_type.and_then(langfuse_kind))
            .or_else(|| self.traceloop_kind.and_then(traceloop_kind))
            .or_else(|| self.operation.and_then(operation_kind))
            .or_else(|| self.request_type.and_then(request_type_kind));
        if let Some(kind) = hint {
            return kind;
        }
        if self.request_model.v.is_some() || self.response_model.v.is_some() {
            return LlmKind::Llm;
        }
        if self.model.v.is_some() {
            return match self.model_family {
                1 => LlmKind::Embedding,
                2 => LlmKind::Reranker,
                _ => LlmKind::Llm,
            };
        }
        LlmKind::Unknown
    }

    /// (request model, response model). A model named without a side fills both gaps.
    fn models(&self) -> (Option<&'a str>, Option<&'a str>) {
        (
            self.request_model.v.or(self.model.v),
            self.response_model.v.or(self.model.v),
        )
    }

    fn tokens(&self) -> Tokens {
        let mut input = self.input_tokens.v;
        let mut output = self.output_tokens.v;
        let mut total = self.total_tokens.v;
        if let Some(usage) = self.langfuse_usage.and_then(structured) {
            // [lf] usage_details: {"input": n, "output": n, "total": n, …}
            input = input.or_else(|| json_count(usage.get("input")));
            output = output.or_else(|| json_count(usage.get("output")));
            total = total.or_else(|| json_count(usage.get("total")));
        }
        let cache_read = self.cache_read_tokens.v;
        let reasoning = self.reasoning_tokens.v;
        if let (Some(i), Some(c)) = (input, cache_read)
            && i < c
        {
            input = Some(i.saturating_add(c));
        }
        if let (Some(o), Some(r)) = (output, reasoning)
            && o < r
        {
            output = Some(o.saturating_add(r));
        }
        // The sent total, unless it is smaller than input + output (a sender that
        // excluded cached tokens from both); else input + output.
        let sum = match (input, output) {
            (None, None) => None,
            (i, o) => Some(i.unwrap_or(0).saturating_add(o.unwrap_or(0))),
        };
        let total = match (total, sum) {
            (Some(t), Some(s)) if input.is_some() && output.is_some() => Some(t.max(s)),
            (t, s) => t.or(s),
        };
        Tokens {
            input,
            output,
            total,
            cache_read,
            reasoning,
        }
    }

    fn cost(&self) -> Cost {
        let mut input = self.cost_input.v;
        let mut output = self.cost_output.v;
        let mut total = self.cost_total.v;
        if let Some(c) = self.langfuse_cost.and_then(structured) {
            // [lf] cost_details: {"input": usd, "output": usd, "total": usd}
            input = input.or_else(|| json_amount(c.get("input")));
            output = output.or_else(|| json_amount(c.get("output")));
            total = total.or_else(|| json_amount(c.get("total")));
        }
        if total.is_none()
            && let (Some(i), Some(o)) = (input, output)
        {
            total = Some(i + o);
        }
        Cost {
            input,
            output,
            total,
        }
    }

    /// The span's input and output: chat messages in one shape, documents, or text.
    fn io(&mut self, kind: LlmKind) -> (Option<String>, Option<String>) {
        let input = self
            .input_messages()
            .map_or_else(|| self.input_text(), |m| Some(messages_json(&m)));
        let output = match self.output_messages() {
            Some(m) => {
                self.output_finish = m.iter().find_map(|m| m.finish_reason.clone());
                Some(messages_json(&m))
            }
            None => self.output_text(kind),
        };
        (input, output)
    }

    fn input_messages(&self) -> Option<Vec<Msg>> {
        if !self.oi_input.is_empty() {
            return Some(self.oi_input.values().map(RawMsg::to_msg).collect());
        }
        if self.genai_input.v.is_some() || self.genai_system.v.is_some() {
            let mut msgs = Vec::new();
            if let Some(sys) = self.genai_system.v {
                msgs.extend(system_instructions(sys));
            }
            if let Some(v) = self.genai_input.v {
                match structured(v) {
                    Some(json) => msgs.extend(json_messages(&json, None)),
                    None => msgs.extend(value_text(v).map(|t| Msg::text("user", t.into_owned()))),
                }
            }
            return Some(msgs);
        }
        if !self.flat_prompt.is_empty() {
            return Some(self.flat_prompt.values().map(RawMsg::to_msg).collect());
        }
        if let Some(v) = self.legacy_prompt.v
            && let Some(json) = structured(v)
        {
            return Some(json_messages(&json, None));
        }
        if !self.event_input.is_empty() {
            return Some(
                self.event_input
                    .iter()
                    .filter_map(|e| {
                        let body = event_body(e.event);
                        json_message(&body, Some(e.role))
                    })
                    .collect(),
            );
        }
        None
    }

    fn output_messages(&self) -> Option<Vec<Msg>> {
        if !self.oi_output.is_empty() {
            return Some(self.oi_output.values().map(RawMsg::to_msg).collect());
        }
        if let Some(v) = self.genai_output.v {
            return Some(match structured(v) {
                Some(json) => json_messages(&json, Some("assistant")),
                None => value_text(v)
                    .map(|t| Msg::text("assistant", t.into_owned()))
                    .into_iter()
                    .collect(),
            });
        }
        if !self.flat_completion.is_empty() {
            return Some(self.flat_completion.values().map(RawMsg::to_msg).collect());
        }
        if let Some(v) = self.legacy_completion.v
            && let Some(json) = structured(v)
        {
            return Some(json_messages(&json, Some("assistant")));
        }
        if !self.event_output.is_empty() {
            let mut choices: Vec<(i64, Msg)> = self
                .event_output
                .iter()
                .enumerate()
                .filter_map(|(i, ev)| {
                    choice_message(ev).map(|(idx, m)| (idx.unwrap_or(i as i64), m))
                })
                .collect();
            choices.sort_by_key(|c| c.0);
            return Some(choices.into_iter().map(|c| c.1).collect());
        }
        None
    }

    fn input_text(&self) -> Option<String> {
        if let Some(q) = self.rerank_query.and_then(value_text) {
            return Some(q.into_owned());
        }
        if !self.embedding_texts.is_empty() {
            return Some(texts_json(&self.embedding_texts));
        }
        if !self.oi_prompts.is_empty() {
            return Some(texts_json(&self.oi_prompts));
        }
        self.input_value.v.and_then(value_text).map(Cow::into_owned)
    }

    fn output_text(&self, kind: LlmKind) -> Option<String> {
        if !self.documents.is_empty() {
            return Some(documents_json(&self.documents));
        }
        if !self.reranked.is_empty() {
            return Some(documents_json(&self.reranked));
        }
        if !self.oi_choices.is_empty() {
            return Some(texts_json(&self.oi_choices));
        }
        if kind == LlmKind::Embedding {
            // An embedding span's output is vectors: never copied (they stay in attributes).
            return None;
        }
        let v = self.output_value.v?;
        if self.output_value.prio == 4 {
            // [otel] gen_ai.retrieval.documents: [{"id","score",…}] → the documents shape.
            if let Some(Json::Array(docs)) = structured(v) {
                let mut o = Map::new();
                o.insert("documents".to_owned(), Json::Array(docs));
                return Some(Json::Object(o).to_string());
            }
        }
        value_text(v).map(Cow::into_owned)
    }
}

struct Tokens {
    input: Option<i64>,
    output: Option<i64>,
    total: Option<i64>,
    cache_read: Option<i64>,
    reasoning: Option<i64>,
}

struct Cost {
    input: Option<f64>,
    output: Option<f64>,
    total: Option<f64>,
}

impl Cost {
    fn any(&self) -> bool {
        self.input.is_some() || self.output.is_some() || self.total.is_some()
    }
}

// --- kind tables -----------------------------------------------------------------------

/// `[oi]` `openinference.span.kind`. `PROMPT` (template rendering) counts as a chain step.
fn openinference_kind(s: &str) -> Option<LlmKind> {
    if s.eq_ignore_ascii_case("PROMPT") {
        return Some(LlmKind::Chain);
    }
    LlmKind::parse(s).filter(|k| *k != LlmKind::Unknown)
}

/// `[lf]` `langfuse.observation.type`; `span` and `event` say nothing.
fn langfuse_kind(s: &str) -> Option<LlmKind> {
    if s.eq_ignore_ascii_case("generation") {
        return Some(LlmKind::Llm);
    }
    LlmKind::parse(s).filter(|k| *k != LlmKind::Unknown)
}

/// `[ol]` `traceloop.span.kind` (`TraceloopSpanKindValues`).
fn traceloop_kind(s: &str) -> Option<LlmKind> {
    match s {
        "workflow" | "task" => Some(LlmKind::Chain),
        "agent" => Some(LlmKind::Agent),
        "tool" => Some(LlmKind::Tool),
        _ => None,
    }
}

/// `[otel]` `gen_ai.operation.name` well-known values.
fn operation_kind(s: &str) -> Option<LlmKind> {
    match s {
        "chat" | "text_completion" | "generate_content" => Some(LlmKind::Llm),
        "embeddings" => Some(LlmKind::Embedding),
        "execute_tool" => Some(LlmKind::Tool),
        "invoke_agent" | "create_agent" => Some(LlmKind::Agent),
        "retrieval" => Some(LlmKind::Retriever),
        _ => None,
    }
}

/// `[ol]` `llm.request.type` (`LLMRequestTypeValues`).
fn request_type_kind(s: &str) -> Option<LlmKind> {
    match s {
        "chat" | "completion" => Some(LlmKind::Llm),
        "embedding" => Some(LlmKind::Embedding),
        "rerank" => Some(LlmKind::Reranker),
        _ => None,
    }
}

/// `[otel]` `gen_ai.response.finish_reasons` is a string array: its first entry. Also
/// accepts a plain string or a JSON array sent as a string.
fn first_reason(v: &AnyValue) -> Option<Cow<'_, str>> {
    match v.value.as_ref()? {
        Value::ArrayValue(a) => a.values.iter().find_map(text_of),
        Value::StringValue(s) if s.trim_start().starts_with('[') => {
            match serde_json::from_str::<Vec<Json>>(s) {
                Ok(items) => items.iter().find_map(|j| match j {
                    Json::String(s) if !s.is_empty() => Some(Cow::Owned(s.clone())),
                    _ => None,
                }),
                Err(_) => Some(Cow::Borrowed(s)),
            }
        }
        _ => text_of(v),
    }
}

// --- flattened list parsers ----------------------------------------------------------------

/// `[oi]` `llm.{input,output}_messages.N.<rest>`.
fn oi_message<'a>(
    list: &mut Indexed<RawMsg<'a>>,
    rest: &'a str,
    v: &'a AnyValue,
    overflow: &mut bool,
) {
    let Some((i, field)) = split_index(rest) else {
        return;
    };
    let Some(m) = list.at(i, overflow) else {
        return;
    };
    match field {
        "message.role" => m.role = text_of(v),
        "message.content" => m.content = value_text(v),
        "message.tool_call_id" => m.tool_call_id = text_of(v),
        "message.function_call_name" => m.fn_name = text_of(v),
        "message.function_call_arguments_json" => m.fn_args = value_text(v),
        // Not in the spec, but sent by some instrumentations.
        "message.finish_reason" => m.finish_reason = text_of(v),
        _ => {
            if let Some(rest) = field.strip_prefix("message.contents.") {
                if let Some((j, "message_content.text")) = split_index(rest)
                    && let Some(t) = value_text(v)
                    && let Some(slot) = m.parts.at(j, overflow)
                {
                    *slot = t;
                }
            } else if let Some(rest) = field.strip_prefix("message.tool_calls.")
                && let Some((k, f)) = split_index(rest)
            {
                let Some(tc) = m.tool_calls.at(k, overflow) else {
                    return;
                };
                match f {
                    "tool_call.id" => tc.id = text_of(v),
                    "tool_call.function.name" => tc.name = text_of(v),
                    "tool_call.function.arguments" => tc.arguments = value_text(v),
                    _ => {}
                }
            }
        }
    }
}

/// `[ol]` / old `[otel]` `gen_ai.{prompt,completion}.N.<rest>`.
fn flat_message<'a>(
    list: &mut Indexed<RawMsg<'a>>,
    rest: &'a str,
    v: &'a AnyValue,
    overflow: &mut bool,
) {
    let Some((i, field)) = split_index(rest) else {
        return;
    };
    let Some(m) = list.at(i, overflow) else {
        return;
    };
    match field {
        "role" => m.role = text_of(v),
        "content" => m.content = value_text(v),
        "tool_call_id" => m.tool_call_id = text_of(v),
        "finish_reason" => m.finish_reason = text_of(v),
        "function_call.name" => m.fn_name = text_of(v),
        "function_call.arguments" => m.fn_args = value_text(v),
        _ => {
            if let Some(rest) = field.strip_prefix("tool_calls.")
                && let Some((k, f)) = split_index(rest)
            {
                let Some(tc) = m.tool_calls.at(k, overflow) else {
                    return;
                };
                match f {
                    "id" => tc.id = text_of(v),
                    "name" => tc.name = text_of(v),
                    "arguments" => tc.arguments = value_text(v),
                    _ => {}
                }
            }
        }
    }
}

/// `[oi]` `retrieval.documents.N.document.*` / `reranker.output_documents.N.document.*`.
fn document<'a>(
    list: &mut Indexed<RawDoc<'a>>,
    rest: &'a str,
    v: &'a AnyValue,
    overflow: &mut bool,
) {
    let Some((i, field)) = split_index(rest) else {
        return;
    };
    let slot = match field {
        "document.id" | "document.content" | "document.score" | "document.metadata" => {
            match list.at(i, overflow) {
                Some(d) => d,
                None => return,
            }
        }
        _ => return,
    };
    match field {
        "document.id" => slot.id = Some(v),
        "document.content" => slot.content = Some(v),
        "document.score" => slot.score = Some(v),
        _ => slot.metadata = Some(v),
    }
}

/// `prefix.N.<leaf>` holding text (`[oi]` embedding texts, legacy prompts / choices).
fn indexed_text<'a>(
    list: &mut Indexed<Cow<'a, str>>,
    rest: &'a str,
    leaf: &str,
    v: &'a AnyValue,
    overflow: &mut bool,
) {
    if let Some((i, field)) = split_index(rest)
        && field == leaf
        && let Some(t) = value_text(v)
        && let Some(slot) = list.at(i, overflow)
    {
        *slot = t;
    }
}

// ---------------------------------------------------------------------------------------
// The normalized message shape
// ---------------------------------------------------------------------------------------

/// `{"role","content","tool_calls":[{"id","name","arguments"}],"tool_call_id"}`, empty
/// keys omitted. Tool call arguments are kept as the JSON text the model produced.
#[derive(Debug, Default)]
struct Msg {
    role: Option<String>,
    content: Option<String>,
    tool_calls: Vec<ToolCall>,
    tool_call_id: Option<String>,
    /// Not serialized: feeds the `finish_reason` column when no attribute names one.
    finish_reason: Option<String>,
}

#[derive(Debug, Default)]
struct ToolCall {
    id: Option<String>,
    name: Option<String>,
    arguments: Option<String>,
}

impl Msg {
    fn text(role: &str, content: String) -> Msg {
        Msg {
            role: Some(role.to_owned()),
            content: Some(content),
            ..Msg::default()
        }
    }
}

impl RawMsg<'_> {
    fn to_msg(&self) -> Msg {
        let own = |c: &Option<Cow<'_, str>>| c.as_deref().map(str::to_owned);
        let content = match &self.content {
            Some(c) => Some(c.to_string()),
            None if !self.parts.is_empty() => Some(
                self.parts
                    .values()
                    .map(|p| &**p)
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
            None => None,
        };
        let mut tool_calls: Vec<ToolCall> = self
            .tool_calls
            .values()
            .map(|t| ToolCall {
                id: own(&t.id),
                name: own(&t.name),
                arguments: own(&t.arguments),
            })
            .collect();
        if self.fn_name.is_some() || self.fn_args.is_some() {
            tool_calls.push(ToolCall {
                id: None,
                name: own(&self.fn_name),
                arguments: own(&self.fn_args),
            });
        }
        Msg {
            role: own(&self.role),
            content,
            tool_calls,
            tool_call_id: own(&self.tool_call_id),
            finish_reason: own(&self.finish_reason),
        }
    }
}

fn messages_json(msgs: &[Msg]) -> String {
    let mut out = String::new();
    out.push('[');
    for (i, m) in msgs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('{');
        let mut first = true;
        for (k, v) in [("role", &m.role), ("content", &m.content)] {
            if let Some(v) = v {
                sep(&mut out, &mut first);
                push_json_str(&mut out, k);
                out.push(':');
                push_json_str(&mut out, v);
            }
        }
        if !m.tool_calls.is_empty() {
            sep(&mut out, &mut first);
            out.push_str("\"tool_calls\":[");
            for (j, t) in m.tool_calls.iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                out.push('{');
                let mut tfirst = true;
                for (k, v) in [
                    ("id", &t.id),
                    ("name", &t.name),
                    ("arguments", &t.arguments),
                ] {
                    if let Some(v) = v {
                        sep(&mut out, &mut tfirst);
                        push_json_str(&mut out, k);
                        out.push(':');
                        push_json_str(&mut out, v);
                    }
                }
                out.push('}');
            }
            out.push(']');
        }
        if let Some(id) = &m.tool_call_id {
            sep(&mut out, &mut first);
            out.push_str("\"tool_call_id\":");
            push_json_str(&mut out, id);
        }
        out.push('}');
    }
    out.push(']');
    out
}

/// Texts in index order: one text as is, several as a JSON array of strings.
fn texts_json(list: &Indexed<Cow<'_, str>>) -> String {
    if list.len() == 1
        && let Some(t) = list.values().next()
    {
        return t.to_string();
    }
    let mut out = String::from("[");
    for (i, t) in list.values().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(&mut out, t);
    }
    out.push(']');
    out
}

/// `{"documents":[{"id","content","score","metadata"}]}` in index order.
fn documents_json(list: &Indexed<RawDoc<'_>>) -> String {
    let docs = list
        .values()
        .map(|d| {
            let mut o = Map::new();
            if let Some(id) = d.id {
                o.insert("id".to_owned(), any_to_json(id, 0));
            }
            if let Some(c) = d.content.and_then(value_text) {
                o.insert("content".to_owned(), Json::String(c.into_owned()));
            }
            if let Some(s) = d.score {
                let score = match float_of(s) {
                    Some(f) => serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number),
                    None => any_to_json(s, 0),
                };
                o.insert("score".to_owned(), score);
            }
            if let Some(m) = d.metadata {
                // [oi] metadata is a JSON string; kept as a string when it is not JSON.
                let meta = structured(m).unwrap_or_else(|| any_to_json(m, 0));
                o.insert("metadata".to_owned(), meta);
            }
            Json::Object(o)
        })
        .collect();
    let mut o = Map::new();
    o.insert("documents".to_owned(), Json::Array(docs));
    Json::Object(o).to_string()
}

/// `[otel]` `gen_ai.system_instructions`: parts (`[{"type":"text","content":…}]`) or text.
fn system_instructions(v: &AnyValue) -> Option<Msg> {
    match structured(v) {
        Some(Json::Array(parts)) => {
            let mut m = Msg {
                role: Some("system".to_owned()),
                ..Msg::default()
            };
            let mut texts = Vec::new();
            collect_parts(&parts, &mut texts, &mut m);
            m.content = join_texts(texts);
            Some(m)
        }
        Some(other) => Some(Msg::text("system", json_text(&other)?)),
        None => value_text(v).map(|t| Msg::text("system", t.into_owned())),
    }
}

/// A JSON list of messages (`[otel]` `gen_ai.{input,output}.messages`, the deprecated
/// `gen_ai.prompt` / `gen_ai.completion` JSON, or OpenAI-style messages).
fn json_messages(json: &Json, default_role: Option<&str>) -> Vec<Msg> {
    match json {
        Json::Array(items) => items
            .iter()
            .filter_map(|m| json_message(m, default_role))
            .collect(),
        Json::Object(_) => json_message(json, default_role).into_iter().collect(),
        Json::String(s) => vec![Msg::text(default_role.unwrap_or("user"), s.clone())],
        _ => Vec::new(),
    }
}

/// One message in either the `[otel]` parts shape (`{"role","parts":[…],"finish_reason"}`)
/// or the OpenAI / `[otel]` event-body shape (`{"role","content","tool_calls":[{"id",
/// "function":{"name","arguments"}}],"id"}`).
fn json_message(m: &Json, default_role: Option<&str>) -> Option<Msg> {
    let obj = m.as_object()?;
    let mut msg = Msg {
        role: obj
            .get("role")
            .and_then(Json::as_str)
            .filter(|s| !s.is_empty())
            .or(default_role)
            .map(str::to_owned),
        ..Msg::default()
    };
    let mut texts: Vec<String> = Vec::new();
    match obj.get("content") {
        None | Some(Json::Null) => {}
        Some(Json::String(s)) => texts.push(s.clone()),
        Some(Json::Array(parts)) => collect_parts(parts, &mut texts, &mut msg),
        Some(other) => texts.push(other.to_string()),
    }
    if let Some(Json::Array(parts)) = obj.get("parts") {
        collect_parts(parts, &mut texts, &mut msg);
    }
    if let Some(Json::Array(calls)) = obj.get("tool_calls") {
        for c in calls {
            let function = c.get("function");
            let field = |k: &str| {
                function
                    .and_then(|f| f.get(k))
                    .or_else(|| c.get(k))
                    .and_then(json_text)
            };
            msg.tool_calls.push(ToolCall {
                id: c.get("id").and_then(json_text),
                name: field("name"),
                arguments: field("arguments"),
            });
        }
    }
    if let Some(id) = obj.get("tool_call_id").and_then(json_text) {
        msg.tool_call_id = Some(id);
    } else if msg.tool_call_id.is_none() && msg.role.as_deref() == Some("tool") {
        // [otel] gen_ai.tool.message body: `id` is the tool call answered.
        msg.tool_call_id = obj.get("id").and_then(json_text);
    }
    msg.finish_reason = obj.get("finish_reason").and_then(json_text);
    msg.content = join_texts(texts);
    Some(msg)
}

/// `[otel]` message parts: `text` (and untyped `content` / `text`), `tool_call`,
/// `tool_call_response`; media and reasoning parts are left out of the text.
fn collect_parts(parts: &[Json], texts: &mut Vec<String>, msg: &mut Msg) {
    for p in parts {
        let obj = match p {
            Json::String(s) => {
                texts.push(s.clone());
                continue;
            }
            Json::Object(o) => o,
            _ => continue,
        };
        match obj.get("type").and_then(Json::as_str) {
            None | Some("text") | Some("input_text") | Some("output_text") => {
                if let Some(t) = obj
                    .get("content")
                    .or_else(|| obj.get("text"))
                    .and_then(Json::as_str)
                {
                    texts.push(t.to_owned());
                }
            }
            Some("tool_call") => msg.tool_calls.push(ToolCall {
                id: obj.get("id").and_then(json_text),
                name: obj.get("name").and_then(json_text),
                arguments: obj.get("arguments").and_then(json_text),
            }),
            Some("tool_call_response") => {
                if msg.tool_call_id.is_none() {
                    msg.tool_call_id = obj.get("id").and_then(json_text);
                }
                // The schema names it `response`; registry examples use `result`.
                if let Some(t) = obj
                    .get("response")
                    .or_else(|| obj.get("result"))
                    .and_then(json_text)
                {
                    texts.push(t);
                }
            }
            Some(_) => {}
        }
    }
}

fn join_texts(texts: Vec<String>) -> Option<String> {
    match texts.len() {
        0 => None,
        1 => texts.into_iter().next(),
        _ => Some(texts.join("\n")),
    }
}

/// The body of an `[otel]` v1.28–v1.36 message event recorded as a span event. Span
/// events have no body, so its fields (`content`, `role`, `tool_calls`, `id`, `message`,
/// `finish_reason`, `index`) travel as attributes; some SDKs put the whole body as JSON
/// in `gen_ai.event.content` instead.
fn event_body(ev: &Event) -> Json {
    let mut o = Map::new();
    for kv in &ev.attributes {
        let Some(v) = &kv.value else { continue };
        match kv.key.as_str() {
            "gen_ai.event.content" => {
                if let Some(Json::Object(body)) = structured(v) {
                    for (k, x) in body {
                        o.entry(k).or_insert(x);
                    }
                }
            }
            // Structured body fields, possibly sent as JSON strings.
            "tool_calls" | "message" => {
                let x = structured(v).unwrap_or_else(|| any_to_json(v, 0));
                o.insert(kv.key.clone(), x);
            }
            _ => {
                o.insert(kv.key.clone(), any_to_json(v, 0));
            }
        }
    }
    Json::Object(o)
}

/// An `[otel]` `gen_ai.choice` event: `{"index","finish_reason","message":{…}}`.
fn choice_message(ev: &Event) -> Option<(Option<i64>, Msg)> {
    let body = event_body(ev);
    let inner = match body.get("message") {
        Some(m @ Json::Object(_)) => m,
        _ => &body,
    };
    let mut msg = json_message(inner, Some("assistant"))?;
    if let Some(f) = body.get("finish_reason").and_then(json_text) {
        msg.finish_reason = Some(f);
    }
    Some((json_count(body.get("index")), msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{ArrayValue, KeyValueList};
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Status};
    use serde_json::json;

    const TRACE: [u8; 16] = [
        0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47,
        0x36,
    ];
    const SPAN: [u8; 8] = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];

    // Not `SpanRecord::llm_kind()`: prost also generates a getter of that name.
    fn kind(r: &SpanRecord) -> LlmKind {
        LlmKind::try_from(r.llm_kind).unwrap_or(LlmKind::Unknown)
    }

    fn status(r: &SpanRecord) -> StatusCode {
        StatusCode::try_from(r.status).unwrap_or(StatusCode::Unset)
    }

    fn load(json: &str) -> ExportTraceServiceRequest {
        serde_json::from_str(json).expect("fixture is valid OTLP/JSON")
    }

    fn normalize(json: &str) -> Normalized {
        let n = normalize_request(&load(json), &NormalizeOptions::default());
        assert!(n.rejected.is_empty(), "{:?}", n.rejected);
        n
    }

    fn parse(s: &Option<String>) -> Json {
        serde_json::from_str(s.as_deref().expect("value present")).expect("valid JSON")
    }

    fn attrs(r: &SpanRecord) -> Json {
        serde_json::from_str(&r.attributes).expect("attributes are JSON")
    }

    fn kv(key: &str, value: Value) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        }
    }

    fn s(v: &str) -> Value {
        Value::StringValue(v.to_owned())
    }

    fn span(attributes: Vec<KeyValue>) -> Span {
        Span {
            trace_id: TRACE.to_vec(),
            span_id: SPAN.to_vec(),
            name: "span".to_owned(),
            start_time_unix_nano: 1_000,
            end_time_unix_nano: 2_000,
            attributes,
            ..Default::default()
        }
    }

    fn request(spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", s("svc"))],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn one(span: Span, opts: &NormalizeOptions) -> (SpanRecord, u64) {
        let mut n = normalize_request(&request(vec![span]), opts);
        assert!(n.rejected.is_empty(), "{:?}", n.rejected);
        assert_eq!(n.spans.len(), 1);
        (n.spans.remove(0), n.truncated_values)
    }

    // --- conventions ------------------------------------------------------------------

    #[test]
    fn otel_genai_flat_prompt_form() {
        let n = normalize(include_str!("../tests/fixtures/otel_genai_flat.json"));
        let r = &n.spans[0];
        assert_eq!(kind(r), LlmKind::Llm);
        assert_eq!(r.service_name, "chat-api");
        assert_eq!(r.span_kind, 3);
        assert_eq!(r.provider.as_deref(), Some("openai"));
        assert_eq!(r.request_model.as_deref(), Some("gpt-4o"));
        assert_eq!(r.response_model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!(r.input_tokens, Some(52));
        assert_eq!(r.output_tokens, Some(20));
        assert_eq!(r.total_tokens, Some(72));
        assert_eq!(r.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(
            r.session_id.as_deref(),
            Some("conv_5j66UpCpwteGg4YSxUnt7lPY")
        );
        assert_eq!(r.user_id.as_deref(), Some("user-42"));
        assert_eq!(r.environment.as_deref(), Some("production"));
        assert_eq!(r.cost_source, None);
        assert_eq!(
            parse(&r.input),
            json!([
                {"role": "system", "content": "You are a weather bot."},
                {"role": "user", "content": "Weather in Paris?"}
            ])
        );
        assert_eq!(
            parse(&r.output),
            json!([{
                "role": "assistant",
                "tool_calls": [{
                    "id": "call_VSPygqKTWdrhaFErNvMV18Yl",
                    "name": "get_weather",
                    "arguments": "{\"location\":\"Paris\"}"
                }]
            }])
        );
        assert_eq!(status(r), StatusCode::Ok);
    }

    #[test]
    fn otel_genai_current_attributes_form() {
        let n = normalize(include_str!("../tests/fixtures/otel_genai_current.json"));
        let r = &n.spans[0];
        assert_eq!(kind(r), LlmKind::Llm);
        assert_eq!(r.provider.as_deref(), Some("openai"));
        assert_eq!(r.request_model.as_deref(), Some("gpt-4"));
        assert_eq!(r.response_model.as_deref(), Some("gpt-4-0613"));
        assert_eq!(r.input_tokens, Some(97));
        assert_eq!(r.output_tokens, Some(52));
        assert_eq!(r.total_tokens, Some(149));
        assert_eq!(r.cache_read_tokens, Some(50));
        assert_eq!(r.reasoning_tokens, Some(12));
        assert_eq!(r.finish_reason.as_deref(), Some("stop"));
        assert_eq!(r.session_id.as_deref(), Some("conv_1"));
        assert_eq!(r.prompt_name.as_deref(), Some("weather-agent"));
        assert_eq!(
            parse(&r.input),
            json!([
                {"role": "system", "content": "You are a helpful bot"},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "tool_calls": [{
                    "id": "call_VSPygqKTWdrhaFErNvMV18Yl",
                    "name": "get_weather",
                    "arguments": "{\"location\":\"Paris\"}"
                }]},
                {"role": "tool", "content": "rainy, 57°F", "tool_call_id": "call_VSPygqKTWdrhaFErNvMV18Yl"}
            ])
        );
        assert_eq!(
            parse(&r.output),
            json!([{"role": "assistant", "content": "The weather in Paris is currently rainy with a temperature of 57°F."}])
        );
    }

    #[test]
    fn otel_genai_message_events_form() {
        let n = normalize(include_str!("../tests/fixtures/otel_genai_current.json"));
        let r = &n.spans[1];
        assert_eq!(kind(r), LlmKind::Llm);
        assert_eq!(r.provider.as_deref(), Some("openai"));
        assert_eq!(r.finish_reason.as_deref(), Some("stop"));
        assert_eq!(
            parse(&r.input),
            json!([
                {"role": "system", "content": "You're a helpful bot"},
                {"role": "user", "content": "What's the weather in Paris?"},
                {"role": "assistant", "tool_calls": [{
                    "id": "call_VSPygqKTWdrhaFErNvMV18Yl",
                    "name": "get_weather",
                    "arguments": "{\"location\":\"Paris\"}"
                }]},
                {"role": "tool", "content": "rainy, 57°F", "tool_call_id": "call_VSPygqKTWdrhaFErNvMV18Yl"}
            ])
        );
        assert_eq!(
            parse(&r.output),
            json!([{"role": "assistant", "content": "The weather in Paris is rainy and overcast, with temperatures around 57°F"}])
        );
        // The events themselves are kept.
        let events: Json = serde_json::from_str(&r.events).unwrap();
        assert_eq!(events.as_array().unwrap().len(), 5);
        assert_eq!(events[4]["name"], "gen_ai.choice");
        assert_eq!(events[4]["time_ns"], 1_730_000_000_900_000_000u64);
    }

    #[test]
    fn otel_genai_tool_and_agent_spans() {
        let n = normalize(include_str!("../tests/fixtures/otel_genai_current.json"));
        let tool = &n.spans[2];
        assert_eq!(kind(tool), LlmKind::Tool);
        assert_eq!(parse(&tool.input), json!({"location": "Paris"}));
        assert_eq!(
            parse(&tool.output),
            json!({"conditions": "rainy", "temperature": 57})
        );
        let agent = &n.spans[3];
        assert_eq!(kind(agent), LlmKind::Agent);
        assert_eq!(
            agent.parent_span_id,
            Vec::<u8>::new(),
            "all-zero parent is root"
        );
        assert_eq!(tool.parent_span_id, agent.span_id);
    }

    #[test]
    fn openinference_llm_span() {
        let n = normalize(include_str!("../tests/fixtures/openinference_llm.json"));
        let r = &n.spans[0];
        assert_eq!(kind(r), LlmKind::Llm);
        assert_eq!(r.service_name, "rag-app");
        assert_eq!(r.provider.as_deref(), Some("azure"));
        assert_eq!(r.request_model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(r.response_model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(r.input_tokens, Some(120));
        assert_eq!(r.output_tokens, Some(45));
        assert_eq!(r.total_tokens, Some(165));
        assert_eq!(r.cache_read_tokens, Some(64));
        assert_eq!(r.reasoning_tokens, Some(30));
        assert_eq!(r.cost_input_usd, Some(0.0021));
        assert_eq!(r.cost_output_usd, Some(0.0045));
        assert_eq!(r.cost_total_usd, Some(0.0066));
        assert_eq!(r.cost_source.as_deref(), Some("client"));
        assert_eq!(
            r.user_id.as_deref(),
            Some("9328ae73-7141-4f45-a044-8e06192aa465")
        );
        assert_eq!(
            r.session_id.as_deref(),
            Some("26bcd3d2-cad2-443d-a23c-625e47f3324a")
        );
        assert_eq!(r.prompt_version.as_deref(), Some("v1.0"));
        assert_eq!(r.prompt_name.as_deref(), Some("weather-prompt"));
        assert_eq!(r.environment.as_deref(), Some("staging"));
        assert_eq!(r.finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(status(r), StatusCode::Error);
        assert_eq!(r.status_message, "rate limited once");
        assert_eq!(
            parse(&r.input),
            json!([
                {"role": "system", "content": "You are a weather assistant."},
                {"role": "user", "content": "What's the weather in Paris?\nAnswer briefly."},
                {"role": "assistant", "tool_calls": [{"id": "call_1", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}]},
                {"role": "tool", "content": "rainy, 14C", "tool_call_id": "call_1"}
            ])
        );
        assert_eq!(
            parse(&r.output),
            json!([{
                "role": "assistant",
                "tool_calls": [
                    {"id": "call_2", "name": "get_forecast", "arguments": "{\"city\": \"Paris\", \"days\": 2}"},
                    {"id": "call_3", "name": "get_alerts", "arguments": "{}"}
                ]
            }])
        );
        let links: Json = serde_json::from_str(&r.links).unwrap();
        assert_eq!(
            links,
            json!([{
                "trace_id": "0af7651916cd43dd8448eb211c80319c",
                "span_id": "b7ad6b7169203331",
                "attributes": {"link.reason": "retry"},
                "trace_state": "rojo=00f067aa0ba902b7"
            }])
        );
        let scope: Json = serde_json::from_str(&r.scope).unwrap();
        assert_eq!(
            scope,
            json!({"name": "openinference.instrumentation.openai", "version": "0.1.18", "attributes": {}})
        );
    }

    #[test]
    fn openinference_retriever_reranker_embedding() {
        let n = normalize(include_str!(
            "../tests/fixtures/openinference_retriever.json"
        ));
        let r = &n.spans[0];
        assert_eq!(kind(r), LlmKind::Retriever);
        assert_eq!(r.input.as_deref(), Some("How do I format a timestamp?"));
        assert_eq!(
            parse(&r.output),
            json!({"documents": [
                {"id": "doc-7", "content": "Use strftime.", "score": 0.92, "metadata": {"source": "docs/time.md"}},
                {"id": 12, "content": "chrono::DateTime::format", "score": 0.85, "metadata": "not json"},
                {"id": "doc-3", "content": "ISO 8601.", "score": 0.5}
            ]})
        );
        let rr = &n.spans[1];
        assert_eq!(kind(rr), LlmKind::Reranker);
        assert_eq!(
            rr.request_model.as_deref(),
            Some("cross-encoder/ms-marco-MiniLM-L-12-v2")
        );
        assert_eq!(rr.input.as_deref(), Some("How do I format a timestamp?"));
        assert_eq!(
            parse(&rr.output),
            json!({"documents": [
                {"id": "doc-7", "content": "Use strftime.", "score": 0.99},
                {"id": "doc-3", "content": "ISO 8601.", "score": 0.41}
            ]})
        );
        let e = &n.spans[2];
        assert_eq!(kind(e), LlmKind::Embedding);
        assert_eq!(e.request_model.as_deref(), Some("text-embedding-3-small"));
        assert_eq!(
            parse(&e.input),
            json!(["hello world", "timestamp formatting"])
        );
        assert_eq!(e.output, None, "vectors are never copied into output");
        assert_eq!(e.input_tokens, Some(6));
        assert_eq!(e.total_tokens, Some(6));
    }

    #[test]
    fn openllmetry_chat_and_workflow() {
        let n = normalize_request(
            &load(include_str!("../tests/fixtures/openllmetry_chat.json")),
            &dev_opts(),
        );
        assert!(n.rejected.is_empty());
        let r = &n.spans[0];
        assert_eq!(kind(r), LlmKind::Llm);
        assert_eq!(r.provider.as_deref(), Some("Anthropic"));
        assert_eq!(r.request_model.as_deref(), Some("claude-3-5-sonnet"));
        assert_eq!(
            r.response_model.as_deref(),
            Some("claude-3-5-sonnet-20241022")
        );
        // Sent as a numeric string and a double; the sender excluded cached tokens.
        assert_eq!(r.input_tokens, Some(1_230));
        assert_eq!(r.cache_read_tokens, Some(1_200));
        assert_eq!(r.output_tokens, Some(15));
        assert_eq!(r.total_tokens, Some(1_245));
        assert_eq!(r.finish_reason.as_deref(), Some("end_turn"));
        assert_eq!(r.user_id.as_deref(), Some("u-17"));
        assert_eq!(r.session_id.as_deref(), Some("s-99"));
        assert_eq!(r.prompt_name.as_deref(), Some("joke-prompt"));
        assert_eq!(r.prompt_version.as_deref(), Some("3"));
        assert_eq!(r.environment.as_deref(), Some("dev"), "default_environment");
        assert_eq!(
            parse(&r.input),
            json!([
                {"role": "system", "content": "You are funny."},
                {"role": "user", "content": "Tell me a joke about OpenTelemetry"}
            ])
        );
        assert_eq!(
            parse(&r.output),
            json!([{"role": "assistant", "content": "Why did the span cross the road?"}])
        );
        let w = &n.spans[1];
        assert_eq!(kind(w), LlmKind::Chain);
        assert_eq!(
            parse(&w.input),
            json!({"args": ["OpenTelemetry"], "kwargs": {}})
        );
        assert_eq!(
            w.output.as_deref(),
            Some("\"Why did the span cross the road?\"")
        );
        assert_eq!(w.request_model, None);
        let old = &n.spans[2];
        assert_eq!(kind(old), LlmKind::Embedding);
        assert_eq!(old.request_model.as_deref(), Some("text-embedding-ada-002"));
        assert_eq!(old.input_tokens, Some(8));
        assert_eq!(old.output_tokens, Some(0));
        assert_eq!(old.total_tokens, Some(8));
        assert_eq!(
            parse(&old.input),
            json!([{"content": "Tell me a joke about OpenTelemetry"}])
        );
        assert_eq!(old.output, None);
    }

    fn dev_opts() -> NormalizeOptions {
        NormalizeOptions {
            default_environment: Some("dev".to_owned()),
            ..NormalizeOptions::default()
        }
    }

    #[test]
    fn langfuse_attributes() {
        let (r, _) = one(
            span(vec![
                kv("langfuse.observation.type", s("generation")),
                kv("langfuse.observation.model.name", s("gpt-4.1")),
                kv(
                    "langfuse.observation.usage_details",
                    s(r#"{"input": 10, "output": 5}"#),
                ),
                kv(
                    "langfuse.observation.cost_details",
                    s(r#"{"input": 0.001, "output": 0.002, "total": 0.003}"#),
                ),
                kv("langfuse.user.id", s("lf-user")),
                kv("langfuse.session.id", s("lf-session")),
                kv("langfuse.observation.prompt.name", s("movie-critic")),
                kv("langfuse.observation.prompt.version", Value::IntValue(4)),
                kv("langfuse.environment", s("prod")),
                kv("langfuse.observation.input", s("hi")),
            ]),
            &dev_opts(),
        );
        assert_eq!(kind(&r), LlmKind::Llm);
        assert_eq!(r.request_model.as_deref(), Some("gpt-4.1"));
        assert_eq!(r.response_model.as_deref(), Some("gpt-4.1"));
        assert_eq!(
            (r.input_tokens, r.output_tokens, r.total_tokens),
            (Some(10), Some(5), Some(15))
        );
        assert_eq!(r.cost_input_usd, Some(0.001));
        assert_eq!(r.cost_output_usd, Some(0.002));
        assert_eq!(r.cost_total_usd, Some(0.003));
        assert_eq!(r.cost_source.as_deref(), Some("client"));
        assert_eq!(r.user_id.as_deref(), Some("lf-user"));
        assert_eq!(r.session_id.as_deref(), Some("lf-session"));
        assert_eq!(r.prompt_name.as_deref(), Some("movie-critic"));
        assert_eq!(r.prompt_version.as_deref(), Some("4"));
        assert_eq!(r.environment.as_deref(), Some("prod"));
        assert_eq!(r.input.as_deref(), Some("hi"));
    }

    #[test]
    fn kind_hints_and_precedence() {
        let kind_of =
            |attrs: Vec<KeyValue>| kind(&one(span(attrs), &NormalizeOptions::default()).0);
        assert_eq!(kind_of(vec![]), LlmKind::Unknown);
        assert_eq!(kind_of(vec![kv("http.method", s("GET"))]), LlmKind::Unknown);
        assert_eq!(
            kind_of(vec![kv("openinference.span.kind", s("guardrail"))]),
            LlmKind::Guardrail
        );
        assert_eq!(
            kind_of(vec![kv("openinference.span.kind", s("EVALUATOR"))]),
            LlmKind::Evaluator
        );
        assert_eq!(
            kind_of(vec![kv("traceloop.span.kind", s("task"))]),
            LlmKind::Chain
        );
        assert_eq!(
            kind_of(vec![kv("traceloop.span.kind", s("agent"))]),
            LlmKind::Agent
        );
        assert_eq!(
            kind_of(vec![kv("llm.request.type", s("rerank"))]),
            LlmKind::Reranker
        );
        assert_eq!(
            kind_of(vec![kv("gen_ai.operation.name", s("embeddings"))]),
            LlmKind::Embedding
        );
        assert_eq!(
            kind_of(vec![kv("gen_ai.operation.name", s("create_agent"))]),
            LlmKind::Agent
        );
        assert_eq!(
            kind_of(vec![kv("langfuse.observation.type", s("retriever"))]),
            LlmKind::Retriever
        );
        assert_eq!(
            kind_of(vec![kv("langfuse.observation.type", s("span"))]),
            LlmKind::Unknown
        );
        assert_eq!(
            kind_of(vec![kv("llm.model_name", s("gpt-4"))]),
            LlmKind::Llm
        );
        // OpenInference's explicit kind wins over model-based guessing and other hints.
        assert_eq!(
            kind_of(vec![
                kv("gen_ai.request.model", s("gpt-4")),
                kv("gen_ai.operation.name", s("chat")),
                kv("openinference.span.kind", s("AGENT")),
            ]),
            LlmKind::Agent
        );
    }

    #[test]
    fn span_attributes_win_over_resource_and_default_environment() {
        let mut req = request(vec![
            span(vec![kv("user.id", s("span-user"))]),
            span(vec![]),
        ]);
        req.resource_spans[0]
            .resource
            .as_mut()
            .unwrap()
            .attributes
            .extend([
                kv("user.id", s("resource-user")),
                kv("session.id", s("resource-session")),
                kv("deployment.environment", s("staging")),
            ]);
        let n = normalize_request(&req, &dev_opts());
        assert_eq!(n.spans[0].user_id.as_deref(), Some("span-user"));
        assert_eq!(n.spans[1].user_id.as_deref(), Some("resource-user"));
        assert_eq!(n.spans[1].session_id.as_deref(), Some("resource-session"));
        assert_eq!(n.spans[1].environment.as_deref(), Some("staging"));
        let resource: Json = serde_json::from_str(&n.spans[0].resource).unwrap();
        assert_eq!(resource["service.name"], "svc");
        assert_eq!(resource["deployment.environment"], "staging");
    }

    // --- validation -------------------------------------------------------------------

    #[test]
    fn invalid_spans_are_rejected_with_paths() {
        let good = span(vec![]);
        let mut short_trace = span(vec![]);
        short_trace.trace_id.pop();
        let mut zero_trace = span(vec![]);
        zero_trace.trace_id = vec![0; 16];
        let mut no_span_id = span(vec![]);
        no_span_id.span_id.clear();
        let mut zero_span = span(vec![]);
        zero_span.span_id = vec![0; 8];
        let mut bad_parent = span(vec![]);
        bad_parent.parent_span_id = vec![1, 2, 3, 4];
        let mut backwards = span(vec![]);
        backwards.end_time_unix_nano = 999;
        let mut zero_parent = span(vec![]);
        zero_parent.parent_span_id = vec![0; 8];

        let mut req = request(vec![good.clone(), short_trace, zero_trace]);
        req.resource_spans[0].scope_spans.push(ScopeSpans {
            spans: vec![no_span_id, zero_span, bad_parent, backwards, zero_parent],
            ..Default::default()
        });
        req.resource_spans.push(ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![good],
                ..Default::default()
            }],
            ..Default::default()
        });
        let n = normalize_request(&req, &NormalizeOptions::default());
        let rej = |path: &str, reason: &str| Rejection {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        assert_eq!(
            n.rejected,
            vec![
                rej(
                    "resource_spans[0].scope_spans[0].spans[1]",
                    "trace_id must be 16 bytes, got 15"
                ),
                rej(
                    "resource_spans[0].scope_spans[0].spans[2]",
                    "trace_id must not be all zero"
                ),
                rej(
                    "resource_spans[0].scope_spans[1].spans[0]",
                    "span_id must be 8 bytes, got 0"
                ),
                rej(
                    "resource_spans[0].scope_spans[1].spans[1]",
                    "span_id must not be all zero"
                ),
                rej(
                    "resource_spans[0].scope_spans[1].spans[2]",
                    "parent_span_id must be empty or 8 bytes, got 4"
                ),
                rej(
                    "resource_spans[0].scope_spans[1].spans[3]",
                    "end_time_unix_nano before start_time_unix_nano"
                ),
            ]
        );
        assert_eq!(n.spans.len(), 3);
        assert!(
            n.spans[1].parent_span_id.is_empty(),
            "all-zero parent is a root"
        );
        assert_eq!(n.spans[2].service_name, UNKNOWN_SERVICE);
        assert_eq!(n.spans[2].resource, "{}");
        assert_eq!(
            n.spans[2].scope,
            r#"{"name":"","version":"","attributes":{}}"#
        );
    }

    #[test]
    fn empty_request_and_span_without_attributes() {
        let n = normalize_request(
            &ExportTraceServiceRequest::default(),
            &NormalizeOptions::default(),
        );
        assert!(n.spans.is_empty() && n.rejected.is_empty());
        assert_eq!(n.truncated_values, 0);
        let n = normalize(include_str!("../tests/fixtures/empty_request.json"));
        assert!(n.spans.is_empty());

        let (r, cut) = one(span(vec![]), &NormalizeOptions::default());
        assert_eq!(cut, 0);
        assert_eq!(r.attributes, "{}");
        assert_eq!(r.events, "[]");
        assert_eq!(r.links, "[]");
        assert_eq!(kind(&r), LlmKind::Unknown);
        assert_eq!(status(&r), StatusCode::Unset);
        assert_eq!(r.service_name, "svc");
        assert_eq!(r.trace_id, TRACE);
        assert_eq!(r.span_id, SPAN);
        assert_eq!((r.start_ns, r.end_ns), (1_000, 2_000));
        assert_eq!(r.input, None);
        assert_eq!(r.output, None);
        assert_eq!(r.input_tokens, None);
        assert_eq!(r.total_tokens, None);
        assert_eq!(r.cost_source, None);
        assert_eq!(r.environment, None);
    }

    // --- attributes JSON ------------------------------------------------------------------

    #[test]
    fn attribute_json_round_trip() {
        let nested = KeyValueList {
            values: vec![
                kv("a", Value::IntValue(1)),
                kv(
                    "b",
                    Value::ArrayValue(ArrayValue {
                        values: vec![AnyValue {
                            value: Some(s("x")),
                        }],
                    }),
                ),
                KeyValue {
                    key: "empty".to_owned(),
                    value: None,
                    ..Default::default()
                },
            ],
        };
        let attributes = vec![
            kv(
                "str",
                s("quote \" backslash \\ newline \n tab \t ctl \u{1} é 😀 \u{2028}"),
            ),
            kv("bool", Value::BoolValue(true)),
            kv("int", Value::IntValue(-9_007_199_254_740_993)),
            kv("double", Value::DoubleValue(0.1)),
            kv("big", Value::DoubleValue(1e300)),
            kv("tiny", Value::DoubleValue(-2.5e-8)),
            kv("nan", Value::DoubleValue(f64::NAN)),
            kv("inf", Value::DoubleValue(f64::INFINITY)),
            kv("ninf", Value::DoubleValue(f64::NEG_INFINITY)),
            kv("bytes", Value::BytesValue(vec![0, 1, 2, 0xfe, 0xff])),
            kv("bytes2", Value::BytesValue(b"ab".to_vec())),
            kv(
                "array",
                Value::ArrayValue(ArrayValue {
                    values: vec![
                        AnyValue {
                            value: Some(s("x")),
                        },
                        AnyValue {
                            value: Some(Value::IntValue(2)),
                        },
                        AnyValue {
                            value: Some(Value::DoubleValue(3.5)),
                        },
                        AnyValue {
                            value: Some(Value::BoolValue(false)),
                        },
                        AnyValue { value: None },
                    ],
                }),
            ),
            kv("kvlist", Value::KvlistValue(nested)),
            kv("dotted.key.name", s("v")),
        ];
        let mut sp = span(attributes);
        sp.trace_state = "congo=t61rcWkgMzE".to_owned();
        sp.dropped_attributes_count = 3;
        let (r, cut) = one(sp, &NormalizeOptions::default());
        assert_eq!(cut, 0);
        assert_eq!(
            attrs(&r),
            json!({
                "str": "quote \" backslash \\ newline \n tab \t ctl \u{1} é 😀 \u{2028}",
                "bool": true,
                "int": -9_007_199_254_740_993i64,
                "double": 0.1,
                "big": 1e300,
                "tiny": -2.5e-8,
                "nan": "NaN",
                "inf": "Infinity",
                "ninf": "-Infinity",
                "bytes": "AAEC/v8=",
                "bytes2": "YWI=",
                "array": ["x", 2, 3.5, false, null],
                "kvlist": {"a": 1, "b": ["x"], "empty": null},
                "dotted.key.name": "v",
                "otel.trace_state": "congo=t61rcWkgMzE",
                "otel.dropped_attributes_count": 3
            })
        );
    }

    #[test]
    fn json_strings_match_serde_json() {
        let samples = [
            "",
            "plain",
            "\u{0}\u{7}\u{8}\u{b}\u{c}\u{1f}\u{7f}",
            "\"\\/",
            "multi\nline\r\n",
            "日本語 🎉",
        ];
        for sample in samples {
            let mut out = String::new();
            push_json_str(&mut out, sample);
            assert_eq!(out, serde_json::to_string(sample).unwrap());
        }
        for bytes in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar"] {
            let mut out = String::new();
            push_base64(&mut out, bytes);
            let expected = [
                "", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy",
            ];
            assert_eq!(out, expected[bytes.len()]);
        }
    }

    // --- truncation --------------------------------------------------------------------

    #[test]
    fn long_values_are_cut_counted_and_listed() {
        let opts = NormalizeOptions {
            max_attribute_bytes: 8,
            max_io_bytes: 10,
            default_environment: None,
        };
        let mut sp = span(vec![
            kv("short", s("12345678")),
            kv("long", s("123456789")),
            kv(
                "list",
                Value::ArrayValue(ArrayValue {
                    values: vec![
                        AnyValue {
                            value: Some(s("abcdefghij")),
                        },
                        AnyValue {
                            value: Some(s("klmnopqrstu")),
                        },
                    ],
                }),
            ),
            kv("bin", Value::BytesValue(vec![7; 9])),
            kv("input.value", s("0123456789abcdef")),
        ]);
        sp.events.push(Event {
            time_unix_nano: 1_500,
            name: "log".to_owned(),
            attributes: vec![kv("message", s("way too long"))],
            dropped_attributes_count: 0,
        });
        let (r, cut) = one(sp, &opts);
        let a = attrs(&r);
        assert_eq!(a["short"], "12345678");
        assert_eq!(a["long"], "12345678");
        assert_eq!(a["list"], json!(["abcdefgh", "klmnopqr"]));
        assert_eq!(a["bin"], "BwcHBwcHBwc=");
        assert_eq!(a["input.value"], "01234567");
        assert_eq!(r.input.as_deref(), Some("0123456789"));
        let events: Json = serde_json::from_str(&r.events).unwrap();
        assert_eq!(events[0]["attributes"]["message"], "way too ");
        assert_eq!(
            a[TRUNCATED_KEYS_ATTRIBUTE],
            json!([
                "long",
                "list",
                "bin",
                "input.value",
                "events[0].message",
                "loupe.input"
            ])
        );
        // long, list×2, bin, input.value, the event value, the input column.
        assert_eq!(cut, 7);
    }

    #[test]
    fn cuts_never_split_a_character() {
        // "é" is 2 bytes, "😀" is 4: a bound falling inside either backs off to the
        // previous boundary, so the result is always valid UTF-8.
        assert_eq!(prefix_at_char_boundary("aé", 2), "a");
        assert_eq!(prefix_at_char_boundary("aé", 3), "aé");
        assert_eq!(prefix_at_char_boundary("😀😀", 7), "😀");
        assert_eq!(prefix_at_char_boundary("😀", 3), "");
        assert_eq!(prefix_at_char_boundary("😀", 0), "");
        let opts = NormalizeOptions {
            max_attribute_bytes: 5,
            max_io_bytes: 6,
            default_environment: None,
        };
        let (r, cut) = one(
            span(vec![
                kv("k", s("ab😀cd")),
                kv("input.value", s("aaaaa€")),
                kv("output.value", s("a€€")),
            ]),
            &opts,
        );
        let a = attrs(&r);
        assert_eq!(a["k"], "ab");
        assert_eq!(a["input.value"], "aaaaa");
        assert_eq!(a["output.value"], "a€");
        assert_eq!(r.input.as_deref(), Some("aaaaa"));
        assert_eq!(r.output.as_deref(), Some("a€"));
        assert_eq!(cut, 5);
        assert_eq!(
            a[TRUNCATED_KEYS_ATTRIBUTE],
            json!([
                "k",
                "input.value",
                "output.value",
                "loupe.input",
                "loupe.output"
            ])
        );
    }

    #[test]
    fn resource_cuts_counted_once_and_listed_on_every_span() {
        let mut req = request(vec![span(vec![]), span(vec![])]);
        req.resource_spans[0]
            .resource
            .as_mut()
            .unwrap()
            .attributes
            .push(kv("host.description", s("0123456789")));
        let opts = NormalizeOptions {
            max_attribute_bytes: 4,
            ..NormalizeOptions::default()
        };
        let n = normalize_request(&req, &opts);
        assert_eq!(n.truncated_values, 1);
        for r in &n.spans {
            assert_eq!(
                attrs(r)[TRUNCATED_KEYS_ATTRIBUTE],
                json!(["resource.host.description"])
            );
            assert_eq!(r.service_name, "svc");
        }
    }

    // --- robustness --------------------------------------------------------------------

    #[test]
    fn hostile_input_does_not_panic() {
        // Deep nesting, huge indices, reversed indices, odd values, unknown status code.
        let mut deep = AnyValue {
            value: Some(s("leaf")),
        };
        for _ in 0..200 {
            deep = AnyValue {
                value: Some(Value::ArrayValue(ArrayValue { values: vec![deep] })),
            };
        }
        let mut attributes = vec![
            KeyValue {
                key: "deep".to_owned(),
                value: Some(deep),
                ..Default::default()
            },
            kv("llm.input_messages.4294967295.message.role", s("user")),
            kv("llm.input_messages.99999999999.message.role", s("user")),
            kv("llm.input_messages.x.message.role", s("user")),
            kv("llm.input_messages.", s("user")),
            kv("gen_ai.prompt.", s("?")),
            kv("gen_ai.usage.input_tokens", s("-5")),
            kv("gen_ai.usage.output_tokens", Value::DoubleValue(f64::NAN)),
            kv("gen_ai.response.finish_reasons", s("[not json")),
            kv(
                "gen_ai.output.messages",
                s("{\"role\": 7, \"parts\": \"x\"}"),
            ),
            kv("llm.cost.total", s("-1")),
        ];
        for i in (0..3000).rev() {
            attributes.push(kv(&format!("gen_ai.completion.{i}.content"), s("c")));
        }
        let mut sp = span(attributes);
        sp.status = Some(Status {
            message: String::new(),
            code: 7,
        });
        sp.kind = 99;
        sp.links.push(Link {
            trace_id: vec![1, 2, 3],
            ..Default::default()
        });
        let (r, cut) = one(sp, &NormalizeOptions::default());
        let a = attrs(&r);
        assert_eq!(a["otel.status_code"], 7);
        assert_eq!(status(&r), StatusCode::Unset);
        assert_eq!(r.span_kind, 99);
        assert_eq!(r.input_tokens, None);
        assert_eq!(r.output_tokens, None);
        assert_eq!(r.cost_total_usd, None);
        assert_eq!(r.finish_reason.as_deref(), Some("[not json"));
        assert!(cut >= 2, "deep nesting and indexed overflow are counted");
        // Index 4294967295 is kept; an index beyond u32 and non-numeric ones are not.
        assert_eq!(parse(&r.input), json!([{"role": "user"}]));
        // gen_ai.output.messages (malformed parts) wins over the flat completions.
        assert_eq!(parse(&r.output), json!([{"role": "assistant"}]));
        assert_eq!(
            attrs(&r)[TRUNCATED_KEYS_ATTRIBUTE],
            json!(["deep", "loupe.output"])
        );
        let links: Json = serde_json::from_str(&r.links).unwrap();
        assert_eq!(links[0]["trace_id"], "010203");
    }

    /// Throughput on a typical LLM span with ~1 KB of attributes. Run with
    /// `cargo test -p loupe-core --release normalize::tests::throughput -- --ignored --nocapture`.
    #[test]
    #[ignore = "measurement, run by hand in release mode"]
    fn throughput() {
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(7);
        let attributes = vec![
            kv("openinference.span.kind", s("LLM")),
            kv("llm.provider", s("openai")),
            kv("llm.model_name", s("gpt-4o-mini-2024-07-18")),
            kv(
                "llm.invocation_parameters",
                s("{\"temperature\": 0.2, \"max_tokens\": 512}"),
            ),
            kv("llm.token_count.prompt", Value::IntValue(812)),
            kv("llm.token_count.completion", Value::IntValue(96)),
            kv("llm.token_count.total", Value::IntValue(908)),
            kv("llm.input_messages.0.message.role", s("user")),
            kv("llm.input_messages.0.message.content", s(&text)),
            kv("llm.output_messages.0.message.role", s("assistant")),
            kv("llm.output_messages.0.message.content", s(&text)),
            kv("session.id", s("26bcd3d2-cad2-443d-a23c-625e47f3324a")),
            kv("user.id", s("9328ae73-7141-4f45-a044-8e06192aa465")),
            kv("http.status_code", Value::IntValue(200)),
            kv(
                "metadata",
                s("{\"team\": \"core\", \"feature\": \"search\"}"),
            ),
        ];
        let one_span = span(attributes);
        let req = request(vec![one_span; 1_000]);
        let opts = NormalizeOptions::default();
        let rounds = 100;
        let start = std::time::Instant::now();
        let mut n = 0;
        for _ in 0..rounds {
            n += normalize_request(&req, &opts).spans.len();
        }
        let secs = start.elapsed().as_secs_f64();
        println!("{n} spans in {secs:.3}s: {:.0} spans/s", n as f64 / secs);
        assert_eq!(n, rounds * 1_000);
    }
}
