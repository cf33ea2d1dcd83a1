//! Bad input gets a clear error, and nothing already accepted is lost.

use std::io::Write;

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use crate::harness::*;

/// Sends arbitrary bytes as the gRPC request message.
#[derive(Clone, Copy, Default)]
struct RawCodec;
struct RawEnc;
struct RawDec;
impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEnc;
    type Decoder = RawDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RawDec {
        RawDec
    }
}
impl Encoder for RawEnc {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}
impl Decoder for RawDec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, tonic::Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

async fn raw_grpc(loupe: &Loupe, body: Vec<u8>) -> Result<Bytes, tonic::Status> {
    let channel = tonic::transport::Channel::from_shared(loupe.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(Bytes::from(body)),
        tonic::codegen::http::uri::PathAndQuery::from_static(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        ),
        RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

async fn post(loupe: &Loupe, content_type: &str, gzip: bool, body: Vec<u8>) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/traces", loupe.http))
        .header("content-type", content_type);
    let body = if gzip {
        req = req.header("content-encoding", "gzip");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&body).unwrap();
        gz.finish().unwrap()
    } else {
        body
    };
    let r = req.body(body).send().await.unwrap();
    let status = r.status().as_u16();
    let bytes = r.bytes().await.unwrap();
    // Error bodies are google.rpc.Status; its message is readable in either encoding.
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test]
async fn malformed_requests_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let loupe = Loupe::start(dir.path(), &[]);
    let (kept, req) = simple_trace("bad-svc", "u-kept");
    loupe.grpc_client().await.export(req).await.unwrap();

    let garbage = vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01];
    let err = raw_grpc(&loupe, garbage.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("not a valid OTLP protobuf"),
        "{err:?}"
    );

    let (status, body) = post(&loupe, "application/x-protobuf", false, garbage).await;
    assert_eq!(status, 400);
    assert!(body.contains("not a valid OTLP protobuf"), "{body}");

    let (status, body) = post(
        &loupe,
        "application/json",
        false,
        b"{\"resourceSpans\": [".to_vec(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("not valid OTLP JSON"), "{body}");

    let (status, body) = post(&loupe, "text/plain", false, b"hello".to_vec()).await;
    assert_eq!(status, 415);
    assert!(body.contains("unsupported content-type"), "{body}");

    let (status, body) = post(&loupe, "application/x-protobuf", false, vec![]).await;
    assert_eq!(
        status, 200,
        "an empty request is a valid, empty export: {body}"
    );

    // Nothing accepted earlier was affected.
    assert_eq!(loupe.trace(&hex(&kept)).await["span_count"], 2);
    let metrics = loupe.metrics().await;
    assert!(
        metrics.contains(
            "loupe_ingest_requests_rejected_total{protocol=\"grpc\",reason=\"invalid\"} 1"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn ids_of_the_wrong_length_are_rejected_by_index_and_the_rest_stored() {
    let dir = tempfile::tempdir().unwrap();
    let loupe = Loupe::start(dir.path(), &[]);
    let t = id::<16>();
    let good1 = span(t, id(), None, "good-root", 0, 100);
    let mut bad = span(t, id(), None, "bad-trace-id", 0, 100);
    bad.trace_id.pop();
    let mut bad_span = span(t, id(), None, "bad-span-id", 0, 100);
    bad_span.span_id = vec![1, 2, 3];
    let good2 = span(t, id(), None, "good-2", 10, 50);
    let req = request("ids-svc", vec![good1, bad, bad_span, good2]);

    let resp = loupe
        .grpc_client()
        .await
        .export(req)
        .await
        .unwrap()
        .into_inner();
    let partial = resp.partial_success.expect("partial success is reported");
    assert_eq!(partial.rejected_spans, 2);
    let msg = partial.error_message;
    assert!(
        msg.contains("resource_spans[0].scope_spans[0].spans[1]") && msg.contains("trace_id"),
        "{msg}"
    );
    assert!(msg.contains("spans[2]") && msg.contains("span_id"), "{msg}");
    assert_eq!(loupe.trace(&hex(&t)).await["span_count"], 2);

    // A request whose every span is invalid is refused whole.
    let mut only_bad = span(id::<16>(), id(), None, "x", 0, 1);
    only_bad.trace_id = vec![0; 16];
    let err = loupe
        .grpc_client()
        .await
        .export(request("ids-svc", vec![only_bad.clone()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("spans[0]"), "{err:?}");
    let (status, body) = post(
        &loupe,
        "application/x-protobuf",
        false,
        request("ids-svc", vec![only_bad]).encode_to_vec(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn oversized_requests_are_refused_and_long_values_truncated_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("loupe.yaml");
    std::fs::write(
        &config,
        "limits:\n  max_request_bytes: 65536\n  max_attribute_bytes: 256\n",
    )
    .unwrap();
    let loupe = Loupe::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );

    // One span whose attribute is longer than the whole request limit.
    let t = id::<16>();
    let mut big = span(t, id(), None, "big", 0, 10);
    big.attributes = vec![kv("input.value", "x".repeat(100_000))];
    let big_req = request("limits-svc", vec![big]);

    let err = loupe
        .grpc_client()
        .await
        .export(big_req.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let (status, _) = post(
        &loupe,
        "application/x-protobuf",
        false,
        big_req.encode_to_vec(),
    )
    .await;
    assert_eq!(status, 413);
    // Compressed small, large once decompressed: refused without decompressing it all.
    let (status, body) = post(
        &loupe,
        "application/x-protobuf",
        true,
        big_req.encode_to_vec(),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    let (status, body) = loupe.get(&format!("/api/v1/traces/{}", hex(&t))).await;
    assert_eq!(status, 404, "{body}");

    // A value over max_attribute_bytes is cut, kept and counted.
    let t = id::<16>();
    let mut long = span(t, id(), None, "long", 0, 10);
    let text = "é".repeat(1000);
    long.attributes = vec![kv("input.value", text.clone()), kv("note", "short")];
    loupe
        .grpc_client()
        .await
        .export(request("limits-svc", vec![long]))
        .await
        .unwrap();
    let trace = loupe.trace(&hex(&t)).await;
    let s = &trace["roots"][0];
    let kept = s["attributes"]["input.value"].as_str().unwrap();
    assert!(kept.len() <= 256 && kept.len() > 200, "{}", kept.len());
    assert!(text.starts_with(kept));
    assert_eq!(s["attributes"]["note"], "short");
    let truncated = s["attributes"]["loupe.truncated_keys"].to_string();
    assert!(truncated.contains("input.value"), "{truncated}");
    let metrics = loupe.metrics().await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("loupe_ingest_values_truncated_total"))
        .unwrap_or_else(|| panic!("{metrics}"));
    let count: f64 = line.split_whitespace().last().unwrap().parse().unwrap();
    assert!(count >= 1.0, "{line}");
}
