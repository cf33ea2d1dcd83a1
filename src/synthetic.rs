//! Synthetic OTLP traffic for the load generator and the benchmarks.

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use rand::Rng;

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn s(v: &str) -> any_value::Value {
    any_value::Value::StringValue(v.into())
}

/// A request of `batch` LLM spans (OpenInference attributes, about `attr_bytes` of them
/// per span) in traces of `spans_per_trace`. Ids and times are set by [`refresh`].
pub fn template(
    batch: usize,
    spans_per_trace: usize,
    attr_bytes: usize,
) -> ExportTraceServiceRequest {
    const WORDS: &str = "the retrieval step returned five passages about the refund policy and the model summarised them for the customer ";
    let filler: String = WORDS
        .chars()
        .cycle()
        .take(attr_bytes.saturating_sub(400))
        .collect();
    let spans = (0..batch)
        .map(|i| {
            let root = i % spans_per_trace == 0;
            let mut attributes = vec![
                kv(
                    "openinference.span.kind",
                    s(if root { "CHAIN" } else { "LLM" }),
                ),
                kv("user.id", s("loadgen-user")),
                kv("session.id", s("loadgen-session")),
            ];
            if !root {
                attributes.extend([
                    kv("llm.model_name", s("gpt-4o-mini")),
                    kv("llm.provider", s("openai")),
                    kv("llm.token_count.prompt", any_value::Value::IntValue(1200)),
                    kv(
                        "llm.token_count.completion",
                        any_value::Value::IntValue(180),
                    ),
                    kv("llm.input_messages.0.message.role", s("user")),
                    kv("llm.input_messages.0.message.content", s(&filler)),
                    kv("llm.output_messages.0.message.role", s("assistant")),
                    kv(
                        "llm.output_messages.0.message.content",
                        s("Refunds are issued within 14 days."),
                    ),
                ]);
            } else {
                attributes.push(kv("input.value", s(&filler)));
            }
            Span {
                name: if root {
                    "rag.query".into()
                } else {
                    "llm.chat".into()
                },
                kind: if root { 2 } else { 3 },
                attributes,
                status: Some(Status::default()),
                ..Default::default()
            }
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", s("loadgen")),
                    kv("deployment.environment.name", s("dev")),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "loupe-loadgen".into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// Gives every trace in the request fresh random ids and current timestamps.
pub fn refresh(req: &mut ExportTraceServiceRequest, spans_per_trace: usize, rng: &mut impl Rng) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let spans = &mut req.resource_spans[0].scope_spans[0].spans;
    let mut trace_id = [0u8; 16];
    let mut root_id = [0u8; 8];
    for (i, span) in spans.iter_mut().enumerate() {
        if i % spans_per_trace == 0 {
            rng.fill(&mut trace_id);
            rng.fill(&mut root_id);
            trace_id[0] |= 1;
            root_id[0] |= 1;
        }
        let mut id = [0u8; 8];
        rng.fill(&mut id);
        id[0] |= 1;
        span.trace_id = trace_id.to_vec();
        if i % spans_per_trace == 0 {
            span.span_id = root_id.to_vec();
            span.parent_span_id.clear();
            span.start_time_unix_nano = now;
            span.end_time_unix_nano = now + 900_000_000;
        } else {
            span.span_id = id.to_vec();
            span.parent_span_id = root_id.to_vec();
            let offset = (i % spans_per_trace) as u64 * 50_000_000;
            span.start_time_unix_nano = now + offset;
            span.end_time_unix_nano = now + offset + 40_000_000;
        }
    }
}
