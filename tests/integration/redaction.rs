//! PII redaction before anything is durable: spans full of personal data go through
//! standalone (write-ahead log, Parquet blocks) and through the receive role (Kafka
//! records), and every byte written is searched for the original values.

use std::time::Duration;

use arrow::array::RecordBatch;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::Event;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Status};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message};

use crate::distributed::Cluster;
use crate::harness::*;

/// Values that must never be stored, and where the request carries them.
const EMAIL: &str = "jane.roe@example.org";
const CARD: &str = "4111 1111 1111 1111";
const PHONE: &str = "+44 20 7946 0958";
const SSN: &str = "536-22-1234";
const IBAN: &str = "DE89 3704 0044 0532 0130 00";
const API_KEY: &str = "sk-proj-Zq3xV9mT2pLk8RwY4nHs6Bd1";
const ORDER: &str = "ORD-2024-555-0100";
const OFFICE_EMAIL: &str = "office-7@example.com";
const ENDUSER: &str = "customer-48151623";

const ORIGINALS: [&str; 9] = [
    EMAIL,
    CARD,
    PHONE,
    SSN,
    IBAN,
    API_KEY,
    ORDER,
    OFFICE_EMAIL,
    ENDUSER,
];

const CONFIG: &str = "tenants:
  - id: default/default
    redaction:
      rules:
        - name: order
          pattern: 'ORD-[0-9-]+'
      attributes:
        - key: user.email
          action: drop
        - key: enduser.id
          action: hash
";

/// One LLM trace carrying every kind of personal data, in every place a span holds
/// text: span name, attributes (chat messages as JSON), events, status message and
/// resource attributes.
fn pii_trace() -> ([u8; 16], ExportTraceServiceRequest) {
    let t = id::<16>();
    let mut s = span(t, id::<8>(), None, &format!("answer {EMAIL}"), 0, 800);
    let messages = format!(
        r#"[{{"role":"user","content":"My card is {CARD}, call me on {PHONE}. Order {ORDER}."}}]"#
    );
    s.attributes = vec![
        kv("openinference.span.kind", "LLM"),
        kv("llm.model_name", "gpt-4o-mini"),
        kv("input.value", messages),
        kv(
            "output.value",
            format!("I emailed {EMAIL} and used key {API_KEY}"),
        ),
        kv("user.email", OFFICE_EMAIL),
        kv("enduser.id", ENDUSER),
    ];
    s.events = vec![Event {
        time_unix_nano: s.start_time_unix_nano + 10,
        name: "retrieval".into(),
        attributes: vec![kv("document", format!("SSN on file: {SSN}"))],
        dropped_attributes_count: 0,
    }];
    s.status = Some(Status {
        message: format!("refund to {IBAN} failed"),
        code: 2,
    });
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", "support-bot"),
                    kv("deployment.contact", PHONE),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![s],
                ..Default::default()
            }],
            schema_url: String::new(),
        }],
    };
    (t, request)
}

/// Every string value of every Parquet file under `dir`, as text.
fn parquet_text(dir: &std::path::Path) -> String {
    let mut out = String::new();
    for path in walk(dir) {
        if !path.to_string_lossy().ends_with(".parquet") {
            continue;
        }
        let bytes = bytes::Bytes::from(std::fs::read(&path).unwrap());
        let batches: Vec<RecordBatch> =
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
                .unwrap()
                .build()
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        out.push_str(
            &arrow::util::pretty::pretty_format_batches(&batches)
                .unwrap()
                .to_string(),
        );
    }
    out
}

fn assert_clean(what: &str, haystack: &[u8]) {
    for value in ORIGINALS {
        assert!(
            !haystack.windows(value.len()).any(|w| w == value.as_bytes()),
            "{what} holds {value:?}"
        );
    }
}

#[tokio::test]
async fn standalone_stores_no_original_value_in_its_log_or_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    let loupe = Loupe::start(
        dir.path(),
        &[
            "--config",
            config.to_str().unwrap(),
            "--flush-interval",
            "200ms",
        ],
    );
    let mut client = loupe.grpc_client().await;
    let (t, req) = pii_trace();
    client.export(req).await.unwrap();
    let blocks = dir.path().join("blocks");
    let text = eventually(Duration::from_secs(20), || async {
        let text = parquet_text(&blocks);
        if text.contains("support-bot") {
            Ok(text)
        } else {
            Err("no block yet".to_string())
        }
    })
    .await;
    // The blocks (decoded, since they are compressed) and the raw log hold none of it.
    for value in ORIGINALS {
        assert!(!text.contains(value), "a block holds {value:?}");
    }
    for path in walk(&dir.path().join("wal")) {
        assert_clean(&path.display().to_string(), &std::fs::read(&path).unwrap());
    }

    // What is stored says what was there.
    let trace = loupe.trace(&hex(&t)).await;
    let shown = trace.to_string();
    assert_clean("the trace view", shown.as_bytes());
    for token in [
        "[EMAIL]", "[CARD]", "[PHONE]", "[ORDER]", "[SECRET]", "[SSN]", "[IBAN]", "[HASH:",
    ] {
        assert!(shown.contains(token), "{token} missing from {shown}");
    }
    assert!(
        !shown.contains("user.email"),
        "the dropped attribute is gone: {shown}"
    );
    // The chat messages are still JSON the UI can render.
    let input = trace["roots"][0]["input"].as_str().unwrap();
    let parsed: serde_json::Value = serde_json::from_str(input).unwrap();
    assert!(parsed[0]["content"].as_str().unwrap().contains("[CARD]"));

    let metrics = loupe.metrics().await;
    for rule in [
        "email",
        "card",
        "phone",
        "order",
        "secrets",
        "attribute:user.email",
    ] {
        let line = format!("loupe_redactions_total{{tenant=\"default/default\",rule=\"{rule}\"}}");
        assert!(metric(&metrics, &line) >= 1.0, "{line} in\n{metrics}");
    }
    assert_clean("the metrics", metrics.as_bytes());
    assert_clean("the log", loupe.log().as_bytes());
}

#[tokio::test]
async fn the_receive_role_writes_no_original_value_to_kafka() {
    let cluster = Cluster::new().with_config(CONFIG);
    // `hash` needs the master key; without it the role refuses the config.
    let receive = cluster.receive_with_env(&[(
        "LOUPE_REDACTION_KEY",
        "0123456789abcdef0123456789abcdef-test",
    )]);
    let mut client = receive.grpc_client().await;
    let (_, req) = pii_trace();
    client.export(req).await.unwrap();

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", cluster.broker.bootstrap())
        .set("group.id", format!("{}-inspect", cluster.topic))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&cluster.topic]).unwrap();
    let mut payloads = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while payloads.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no record in the topic"
        );
        if let Some(m) = consumer.poll(Duration::from_millis(500)) {
            payloads.push(m.unwrap().payload().unwrap_or_default().to_vec());
        }
    }
    while let Some(m) = consumer.poll(Duration::from_millis(500)) {
        payloads.push(m.unwrap().payload().unwrap_or_default().to_vec());
    }
    let all: Vec<u8> = payloads.concat();
    assert!(
        all.windows(b"support-bot".len())
            .any(|w| w == b"support-bot"),
        "the record is the span batch"
    );
    assert_clean("a Kafka record", &all);
    assert!(all.windows(7).any(|w| w == b"[EMAIL]"));
}
