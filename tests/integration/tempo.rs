//! The Tempo-compatible endpoints through the real binary, checked against what
//! Grafana's Tempo data source sends and decodes (see `querier/src/tempo.rs`).

use base64::Engine as _;
use opentelemetry_proto::tonic::trace::v1::TracesData;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message;
use serde_json::Value;

use crate::harness::*;

async fn get(loupe: &Loupe, path: &str, accept: &str) -> (u16, Vec<u8>) {
    let r = reqwest::Client::new()
        .get(format!("{}{path}", loupe.query))
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

/// A path with its query string encoded.
fn with_query(path: &str, params: &[(&str, &str)]) -> String {
    let url = reqwest::Url::parse_with_params(&format!("http://x{path}"), params).unwrap();
    format!("{}?{}", url.path(), url.query().unwrap_or(""))
}

async fn get_json(loupe: &Loupe, path: &str) -> (u16, Value) {
    let (status, body) = get(loupe, path, "application/json").await;
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
    (status, v)
}

#[tokio::test]
async fn grafana_can_test_search_and_open_traces() {
    let dir = tempfile::tempdir().unwrap();
    let loupe = Loupe::start(dir.path(), &[]);
    let mut client = loupe.grpc_client().await;
    let (ok_trace, ok_req) = simple_trace("support-bot", "u-1");
    client.export(ok_req).await.unwrap();
    let (bad_trace, mut bad_req) = simple_trace("support-bot", "u-2");
    let spans = &mut bad_req.resource_spans[0].scope_spans[0].spans;
    spans[1].status = Some(opentelemetry_proto::tonic::trace::v1::Status {
        code: StatusCode::Error as i32,
        message: "429".into(),
    });
    client.export(bad_req).await.unwrap();

    // "Save & test".
    let (status, body) = get(&loupe, "/api/echo", "*/*").await;
    assert_eq!((status, body.as_slice()), (200, &b"echo"[..]));

    // Trace by id as Grafana asks for it: v2, protobuf, `tempopb.TraceByIDResponse`
    // whose field 1 is the trace (wire-identical to OTLP TracesData).
    #[derive(Clone, PartialEq, prost::Message)]
    struct TraceByIdResponse {
        #[prost(message, optional, tag = "1")]
        trace: Option<TracesData>,
    }
    let (status, body) = get(
        &loupe,
        &format!("/api/v2/traces/{}?start=0&end=9999999999", hex(&bad_trace)),
        "application/protobuf",
    )
    .await;
    assert_eq!(status, 200);
    let trace = TraceByIdResponse::decode(body.as_slice())
        .unwrap()
        .trace
        .unwrap();
    let spans: Vec<_> = trace
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| &s.spans)
        .collect();
    assert_eq!(spans.len(), 2);
    assert!(spans.iter().all(|s| s.trace_id == bad_trace));
    let llm = spans.iter().find(|s| s.name == "llm.chat").unwrap();
    assert_eq!(llm.status.as_ref().unwrap().code, StatusCode::Error as i32);
    assert!(
        trace.resource_spans[0]
            .resource
            .as_ref()
            .unwrap()
            .attributes
            .iter()
            .any(|kv| kv.key == "service.name")
    );
    // v1 protobuf is TracesData itself.
    let (status, body) = get(
        &loupe,
        &format!("/api/traces/{}", hex(&ok_trace)),
        "application/protobuf",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        TracesData::decode(body.as_slice())
            .unwrap()
            .resource_spans
            .len(),
        1
    );
    // JSON as Tempo prints it: ids in base64, nanoseconds as strings, enums by name.
    let (status, json) = get_json(&loupe, &format!("/api/traces/{}", hex(&bad_trace))).await;
    assert_eq!(status, 200, "{json}");
    let span = &json["batches"][0]["scopeSpans"][0]["spans"][0];
    let b64 = base64::engine::general_purpose::STANDARD.encode(bad_trace);
    assert_eq!(span["traceId"], b64.as_str(), "{json}");
    assert!(span["startTimeUnixNano"].is_string(), "{span}");
    assert!(
        span["kind"].as_str().unwrap().starts_with("SPAN_KIND_"),
        "{span}"
    );
    let (status, _) = get_json(&loupe, "/api/traces/0123456789abcdef0123456789abcdef").await;
    assert_eq!(status, 404);

    // Search with TraceQL, as Grafana's search builder writes it.
    let q = "{ resource.service.name = \"support-bot\" && status = error }";
    let (start, end) = (
        (now_ns() / 1_000_000_000 - 3600).to_string(),
        (now_ns() / 1_000_000_000 + 60).to_string(),
    );
    let url = with_query(
        "/api/search",
        &[
            ("q", q),
            ("limit", "20"),
            ("spss", "3"),
            ("start", &start),
            ("end", &end),
        ],
    );
    let (status, found) = get_json(&loupe, &url).await;
    assert_eq!(status, 200, "{found}");
    let traces = found["traces"].as_array().unwrap();
    assert_eq!(traces.len(), 1, "{found}");
    assert_eq!(traces[0]["traceID"], hex(&bad_trace).as_str());
    assert_eq!(traces[0]["rootServiceName"], "support-bot");
    assert_eq!(traces[0]["rootTraceName"], "rag.query");
    assert!(traces[0]["startTimeUnixNano"].is_string());
    assert_eq!(traces[0]["durationMs"], 900);
    // The older tag search.
    let (status, found) = get_json(&loupe, "/api/search?tags=service.name%3Dsupport-bot").await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["traces"].as_array().unwrap().len(), 2, "{found}");
    // TraceQL outside the subset is refused, saying why.
    let (status, err) = get_json(
        &loupe,
        &with_query("/api/search", &[("q", "{ name = \"a\" || name = \"b\" }")]),
    )
    .await;
    assert_eq!(status, 400);
    assert!(err["error"].as_str().unwrap().contains("TraceQL"), "{err}");

    // Tags and their values for the search builder's drop-downs.
    let (status, tags) = get_json(&loupe, "/api/v2/search/tags").await;
    assert_eq!(status, 200);
    let resource = tags["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "resource")
        .unwrap();
    assert!(
        resource["tags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "service.name")
    );
    let (status, values) =
        get_json(&loupe, "/api/v2/search/tag/resource.service.name/values").await;
    assert_eq!(status, 200, "{values}");
    assert_eq!(
        values["tagValues"],
        serde_json::json!([{"type": "string", "value": "support-bot"}])
    );
    let (_, values) = get_json(&loupe, "/api/search/tag/status/values").await;
    assert_eq!(values["tagValues"], serde_json::json!(["error", "ok"]));
}
