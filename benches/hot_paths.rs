//! Benchmarks of the ingest hot paths, stage by stage, on the load generator's LLM
//! spans (~1 KB of attributes each): OTLP protobuf decode, normalization + pricing, PII
//! redaction, queue record encoding + Arrow conversion, and Parquet block encoding.
//!
//! `cargo bench --bench hot_paths` prints spans/s, MB/s and per-batch latency
//! percentiles for each stage. End-to-end numbers come from `loupe loadgen` (see
//! docs/benchmarks.md).

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use loupe::synthetic;
use loupe_core::normalize::{NormalizeOptions, normalize_request};
use loupe_core::pricing::PriceBook;
use loupe_core::redact::{RedactionConfig, Redactor};
use loupe_core::span::{SpanBatch, spans_to_batch};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use rand::SeedableRng;
use rand::rngs::StdRng;

const BATCH: usize = 200;
const SPANS_PER_TRACE: usize = 10;
const ATTR_BYTES: usize = 1024;

/// The load generator's request, with ids fixed by `seed`.
fn request(seed: u64) -> ExportTraceServiceRequest {
    let mut req = synthetic::template(BATCH, SPANS_PER_TRACE, ATTR_BYTES);
    synthetic::refresh(&mut req, SPANS_PER_TRACE, &mut StdRng::seed_from_u64(seed));
    req
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
        "{name:<42} {:>10.0} spans/s {:>8.1} MB/s   per call p50 {:>9.1} µs  p99 {:>9.1} µs",
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

    // Redaction with the rules a project gets by default. The synthetic text has no PII,
    // the common case; the redact stages include cloning the request (first line).
    let redactor = Redactor::new(&RedactionConfig::default(), None)
        .expect("the default rules compile")
        .expect("redaction is on by default");
    let mut counts = vec![0u64; redactor.rule_names().len()];
    bench(
        "request clone (in the redact lines)",
        BATCH,
        bytes,
        time,
        || {
            std::hint::black_box(req.clone());
        },
    );
    bench("redact (default rules)", BATCH, bytes, time, || {
        let mut r = req.clone();
        redactor.redact_request(&mut r, &mut counts);
        std::hint::black_box(r);
    });
    // Without the clone: the synthetic request has nothing to redact, so redacting
    // the same request again and again is the cost of one pass over clean text.
    let mut clean = req.clone();
    assert_eq!(redactor.redact_request(&mut clean, &mut counts), 0);
    bench(
        "redact in place (default rules, no PII)",
        BATCH,
        bytes,
        time,
        || {
            std::hint::black_box(redactor.redact_request(&mut clean, &mut counts));
        },
    );
    bench(
        "decode + redact + normalize + price",
        BATCH,
        bytes,
        time,
        || {
            let mut r = ExportTraceServiceRequest::decode(encoded.as_slice()).expect("decodes");
            redactor.redact_request(&mut r, &mut counts);
            let mut n = normalize_request(&r, &opts);
            for s in &mut n.spans {
                book.apply(s);
            }
            std::hint::black_box(n);
        },
    );
    let mut pii = req.clone();
    for span in &mut pii.resource_spans[0].scope_spans[0].spans {
        let text = span
            .attributes
            .iter_mut()
            .find(|kv| kv.key == "input.value" || kv.key.ends_with("message.content"))
            .and_then(|kv| kv.value.as_mut()?.value.as_mut());
        if let Some(Value::StringValue(text)) = text {
            text.insert_str(
                text.len() / 2,
                " mail jane.doe@example.com or call +1 415 555 2671, card 4111 1111 1111 1111 ",
            );
        }
    }
    let pii_bytes = pii.encoded_len();
    let mut replaced = 0;
    bench(
        "redact (default rules, PII in every span)",
        BATCH,
        pii_bytes,
        time,
        || {
            let mut r = pii.clone();
            replaced = redactor.redact_request(&mut r, &mut counts);
            std::hint::black_box(r);
        },
    );
    assert_eq!(replaced, 3 * BATCH as u64, "every span's PII is found");

    let batch = SpanBatch {
        tenant: "default/default".into(),
        spans: normalized.clone(),
        scores: Vec::new(),
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
