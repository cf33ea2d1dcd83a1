//! Benchmarks of the ingest hot paths, stage by stage, on realistic LLM spans
//! (~1 KB of attributes each): OTLP protobuf decode, normalization + pricing, queue
//! record encoding + Arrow conversion, and Parquet block encoding.
//!
//! `cargo bench --bench hot_paths` prints spans/s, MB/s and per-batch latency
//! percentiles for each stage. End-to-end numbers come from `loupe loadgen` (see
//! docs/benchmarks.md).

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use loupe_core::normalize::{NormalizeOptions, normalize_request};
use loupe_core::pricing::PriceBook;
use loupe_core::span::{SpanBatch, spans_to_batch};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;

const BATCH: usize = 200;
const SPANS_PER_TRACE: usize = 10;

fn kv(k: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

fn s(v: &str) -> any_value::Value {
    any_value::Value::StringValue(v.into())
}

fn request(seed: u64) -> ExportTraceServiceRequest {
    let prompt: String = "Summarise the refund policy for the customer using the passages. "
        .chars()
        .cycle()
        .take(620)
        .collect();
    let spans = (0..BATCH)
        .map(|i| {
            let t = (seed * 1_000 + (i / SPANS_PER_TRACE) as u64 + 1).to_be_bytes();
            let mut trace_id = [7u8; 16];
            trace_id[8..].copy_from_slice(&t);
            let root = i % SPANS_PER_TRACE == 0;
            let mut span_id = [1u8; 8];
            span_id[6..].copy_from_slice(&((i as u16) + 1).to_be_bytes());
            Span {
                trace_id: trace_id.to_vec(),
                span_id: span_id.to_vec(),
                parent_span_id: if root {
                    vec![]
                } else {
                    vec![1, 1, 1, 1, 1, 1, 0, 1]
                },
                name: if root { "rag.query" } else { "llm.chat" }.into(),
                kind: 3,
                start_time_unix_nano: 1_763_700_000_000_000_000 + i as u64 * 1_000_000,
                end_time_unix_nano: 1_763_700_000_500_000_000 + i as u64 * 1_000_000,
                attributes: vec![
                    kv(
                        "openinference.span.kind",
                        s(if root { "CHAIN" } else { "LLM" }),
                    ),
                    kv("llm.model_name", s("gpt-4o-mini")),
                    kv("llm.provider", s("openai")),
                    kv("llm.token_count.prompt", any_value::Value::IntValue(1200)),
                    kv(
                        "llm.token_count.completion",
                        any_value::Value::IntValue(180),
                    ),
                    kv("llm.input_messages.0.message.role", s("system")),
                    kv(
                        "llm.input_messages.0.message.content",
                        s("You are a support assistant."),
                    ),
                    kv("llm.input_messages.1.message.role", s("user")),
                    kv("llm.input_messages.1.message.content", s(&prompt)),
                    kv("llm.output_messages.0.message.role", s("assistant")),
                    kv(
                        "llm.output_messages.0.message.content",
                        s("Refunds are issued within 14 days of purchase."),
                    ),
                    kv("user.id", s("u-1042")),
                    kv("session.id", s("s-77")),
                    kv("llm.prompt_template.version", s("v3")),
                ],
                ..Default::default()
            }
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", s("support-bot")),
                    kv("deployment.environment.name", s("prod")),
                ],
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

/// Runs `f` over and over for about `time`, each call handling `spans` spans of
/// `bytes` bytes, and prints throughput and latency.
fn bench(name: &str, spans: usize, bytes: usize, time: Duration, mut f: impl FnMut()) {
    for _ in 0..3 {
        f();
    }
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds");
    let start = Instant::now();
    let mut n = 0u64;
    while n == 0 || start.elapsed() < time {
        let t = Instant::now();
        f();
        let _ = h.record(t.elapsed().as_nanos() as u64);
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{name:<34} {:>10.0} spans/s {:>8.1} MB/s   per call p50 {:>9.1} µs  p99 {:>9.1} µs",
        (n as usize * spans) as f64 / secs,
        (n as usize * bytes) as f64 / secs / 1e6,
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
    );
}

fn main() {
    // `cargo bench --bench hot_paths -- --quick` for a fast smoke run.
    let quick = std::env::args().any(|a| a == "--quick");
    let time = if quick {
        Duration::from_millis(50)
    } else {
        Duration::from_secs(3)
    };
    let req = request(1);
    let encoded = req.encode_to_vec();
    let bytes = encoded.len();
    println!(
        "batch: {BATCH} spans, {bytes} bytes of OTLP protobuf ({} bytes/span)\n",
        bytes / BATCH
    );

    bench("otlp protobuf decode (prost)", BATCH, bytes, time, || {
        let r = ExportTraceServiceRequest::decode(encoded.as_slice()).expect("decodes");
        std::hint::black_box(r);
    });

    let opts = NormalizeOptions::default();
    bench("normalize", BATCH, bytes, time, || {
        std::hint::black_box(normalize_request(&req, &opts));
    });

    let book = PriceBook::builtin();
    let normalized = normalize_request(&req, &opts).spans;
    bench("price", BATCH, bytes, time, || {
        let mut spans = normalized.clone();
        for s in &mut spans {
            book.apply(s);
        }
        std::hint::black_box(spans);
    });

    bench("decode + normalize + price", BATCH, bytes, time, || {
        let r = ExportTraceServiceRequest::decode(encoded.as_slice()).expect("decodes");
        let mut n = normalize_request(&r, &opts);
        for s in &mut n.spans {
            book.apply(s);
        }
        std::hint::black_box(n);
    });

    let batch = SpanBatch {
        tenant: "default/default".into(),
        spans: normalized.clone(),
    };
    bench("queue record encode (prost)", BATCH, bytes, time, || {
        std::hint::black_box(batch.encode_to_vec());
    });
    bench("arrow record batch", BATCH, bytes, time, || {
        std::hint::black_box(spans_to_batch(&normalized).expect("builds"));
    });

    // A block of 100k spans from 500 requests with distinct trace ids.
    let blocks: Vec<_> = (0..500u64)
        .map(|i| spans_to_batch(&normalize_request(&request(i + 2), &opts).spans).expect("builds"))
        .collect();
    let rows: usize = blocks.iter().map(|b| b.num_rows()).sum();
    let arrow_bytes: usize = blocks.iter().map(|b| b.get_array_memory_size()).sum();
    let mut parquet_bytes = 0;
    let block_time = if quick {
        Duration::ZERO
    } else {
        Duration::from_secs(10)
    };
    bench(
        "parquet block (sort + encode)",
        rows,
        arrow_bytes,
        block_time,
        || {
            let b = loupe_ingester::block::encode(&blocks).expect("encodes");
            parquet_bytes = b.parquet.len();
        },
    );
    println!(
        "\nparquet block: {rows} spans, {:.1} MB in Arrow, {:.1} MB as Parquet ({} bytes/span)",
        arrow_bytes as f64 / 1e6,
        parquet_bytes as f64 / 1e6,
        parquet_bytes / rows.max(1)
    );
}
