//! OTLP in, traces out: gRPC and HTTP (protobuf, JSON, gzip, the Langfuse path).

use std::io::Write;

use loupe_core::pricing::PriceBook;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message;
use serde_json::Value;

use crate::harness::*;

fn child<'a>(node: &'a Value, name: &str) -> &'a Value {
    node["children"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no child {name} in {node}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

/// The price a user would compute from the published table.
fn expected_cost(model: &str, input: f64, output: f64) -> f64 {
    let today = chrono::Utc::now().date_naive();
    let book = PriceBook::builtin();
    let e = book
        .lookup(model, today)
        .expect("model is in the built-in table");
    (input * e.input + output * e.output) / 1e6
}

#[tokio::test]
async fn grpc_export_returns_the_tree_with_llm_columns_tokens_and_cost() {
    let dir = tempfile::tempdir().unwrap();
    let loupe = Loupe::start(dir.path(), &[]);

    let t = id::<16>();
    let (root, embed, retrieve, llm, tool) = (id(), id(), id(), id(), id());
    let mut s_root = span(t, root, None, "rag.query", 0, 2000);
    s_root.kind = 2;
    s_root.attributes = vec![
        kv("openinference.span.kind", "CHAIN"),
        kv("user.id", "u-42"),
        kv("session.id", "s-7"),
        kv("llm.prompt_template.version", "v3"),
        kv("input.value", "What is the refund policy?"),
    ];
    let mut s_embed = span(t, embed, Some(root), "embed", 10, 90);
    s_embed.attributes = vec![
        kv("openinference.span.kind", "EMBEDDING"),
        kv("embedding.model_name", "text-embedding-3-small"),
        kv("llm.token_count.prompt", 12),
    ];
    let mut s_retrieve = span(t, retrieve, Some(root), "retrieve", 120, 40);
    s_retrieve.attributes = vec![
        kv("openinference.span.kind", "RETRIEVER"),
        kv("retrieval.documents.0.document.id", "doc-1"),
        kv(
            "retrieval.documents.0.document.content",
            "Refunds within 14 days",
        ),
        kv("retrieval.documents.0.document.score", "0.92"),
    ];
    let mut s_llm = span(t, llm, Some(root), "llm.chat", 200, 1500);
    s_llm.kind = 3;
    s_llm.attributes = vec![
        kv("gen_ai.operation.name", "chat"),
        kv("gen_ai.provider.name", "openai"),
        kv("gen_ai.request.model", "gpt-4o-mini"),
        kv("gen_ai.response.model", "gpt-4o-mini-2024-07-18"),
        kv("gen_ai.usage.input_tokens", 1200),
        kv("gen_ai.usage.output_tokens", 300),
    ];
    let mut s_tool = span(t, tool, Some(root), "lookup_order", 1750, 200);
    s_tool.attributes = vec![kv("openinference.span.kind", "TOOL")];
    s_tool.status = Some(opentelemetry_proto::tonic::trace::v1::Status {
        code: StatusCode::Error as i32,
        message: "order service timeout".into(),
    });
    // Sent out of order: the API orders children by start.
    let req = request(
        "support-bot",
        vec![s_tool, s_llm, s_root, s_retrieve, s_embed],
    );

    let mut client = loupe.grpc_client().await;
    let resp = client.export(req).await.unwrap().into_inner();
    assert!(resp.partial_success.is_none(), "{resp:?}");

    let trace = loupe.trace(&hex(&t)).await;
    assert_eq!(trace["span_count"], 5);
    assert_eq!(trace["root_name"], "rag.query");
    assert_eq!(trace["root_service"], "support-bot");
    assert_eq!(trace["error"], true);
    let roots = trace["roots"].as_array().unwrap();
    assert_eq!(roots.len(), 1);
    let r = &roots[0];
    assert_eq!(r["llm_kind"], "CHAIN");
    assert_eq!(r["span_kind"], "SERVER");
    assert_eq!(r["user_id"], "u-42");
    assert_eq!(r["session_id"], "s-7");
    assert_eq!(r["prompt_version"], "v3");
    let names: Vec<_> = r["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["embed", "retrieve", "llm.chat", "lookup_order"]);

    let l = child(r, "llm.chat");
    assert_eq!(l["llm_kind"], "LLM");
    assert_eq!(l["provider"], "openai");
    assert_eq!(l["request_model"], "gpt-4o-mini");
    assert_eq!(l["response_model"], "gpt-4o-mini-2024-07-18");
    assert_eq!(l["input_tokens"], 1200);
    assert_eq!(l["output_tokens"], 300);
    assert_eq!(l["total_tokens"], 1500);
    assert_eq!(l["duration_ms"], 1500.0);
    let llm_cost = expected_cost("gpt-4o-mini-2024-07-18", 1200.0, 300.0);
    assert!(llm_cost > 0.0);
    assert!(
        close(l["cost_total_usd"].as_f64().unwrap(), llm_cost),
        "{l}"
    );
    assert_eq!(l["attributes"]["gen_ai.usage.input_tokens"], 1200);

    let e = child(r, "embed");
    assert_eq!(e["llm_kind"], "EMBEDDING");
    let embed_cost = expected_cost("text-embedding-3-small", 12.0, 0.0);
    assert!(
        close(e["cost_total_usd"].as_f64().unwrap(), embed_cost),
        "{e}"
    );

    let d = child(r, "retrieve");
    assert_eq!(d["llm_kind"], "RETRIEVER");
    let docs: Value = serde_json::from_str(d["output"].as_str().unwrap()).unwrap();
    assert_eq!(docs["documents"][0]["id"], "doc-1");

    let tool = child(r, "lookup_order");
    assert_eq!(tool["status"], "ERROR");
    assert_eq!(tool["status_message"], "order service timeout");

    let total = trace["cost_usd"].as_f64().unwrap();
    assert!(close(total, llm_cost + embed_cost), "{total}");
    assert_eq!(trace["total_tokens"], 1512);

    // Search: every filter finds it, and a non-matching one does not.
    let id_hex = hex(&t);
    for q in [
        "user_id=u-42",
        "session_id=s-7",
        "prompt_version=v3",
        "model=gpt-4o-mini",
        "model=gpt-4o-mini-2024-07-18",
        "llm_kind=TOOL",
        "status=error",
        "service=support-bot",
        "name=retrieve",
        "min_duration=1.5s",
        "max_duration=3s",
        "min_cost=0.0001",
        "user_id=u-42&llm_kind=LLM&model=gpt-4o-mini",
    ] {
        assert_eq!(loupe.search_ids(q).await, vec![id_hex.clone()], "{q}");
    }
    for q in [
        "user_id=u-43",
        "status=ok",
        "min_duration=3s",
        "max_duration=1s",
        "min_cost=1",
        "llm_kind=AGENT",
    ] {
        assert!(loupe.search_ids(q).await.is_empty(), "{q}");
    }
    // The trace started a minute ago: outside the last second.
    let (_, recent) = loupe.get("/api/v1/traces?since=1s").await;
    assert_eq!(recent["traces"].as_array().unwrap().len(), 0, "{recent}");
    let (_, hits) = loupe.get("/api/v1/traces?since=1h").await;
    let hit = &hits["traces"][0];
    assert_eq!(hit["trace_id"], id_hex);
    assert_eq!(hit["span_count"], 5);
    assert_eq!(hit["total_tokens"], 1512);
    assert_eq!(hit["error"], true);
    assert_eq!(hit["root_name"], "rag.query");
    assert!(close(hit["cost_usd"].as_f64().unwrap(), total));
}

#[tokio::test]
async fn http_accepts_protobuf_gzip_json_and_the_langfuse_path() {
    let dir = tempfile::tempdir().unwrap();
    let loupe = Loupe::start(dir.path(), &[]);
    let http = reqwest::Client::new();

    // protobuf + gzip on /v1/traces
    let (t1, req1) = simple_trace("http-svc", "u-gzip");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&req1.encode_to_vec()).unwrap();
    let r = http
        .post(format!("{}/v1/traces", loupe.http))
        .header("content-type", "application/x-protobuf")
        .header("content-encoding", "gzip")
        .body(gz.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-protobuf");

    // OTLP JSON (hex ids, camelCase) on /v1/traces
    let (t2, req2) = simple_trace("http-svc", "u-json");
    let json = serde_json::to_string(&req2).unwrap();
    assert!(json.contains(&hex(&t2)), "OTLP JSON carries hex ids");
    let r = http
        .post(format!("{}/v1/traces", loupe.http))
        .header("content-type", "application/json")
        .body(json)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let body: Value = r.json().await.unwrap();
    assert!(
        body.get("partialSuccess").is_none_or(|p| p.is_null()),
        "{body}"
    );

    // Langfuse's OTel endpoint with Basic auth public:secret
    let (t3, req3) = simple_trace("http-svc", "u-langfuse");
    let r = http
        .post(format!("{}/api/public/otel/v1/traces", loupe.http))
        .basic_auth("pk-lf-public", Some("sk-lf-secret"))
        .header("content-type", "application/x-protobuf")
        .body(req3.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    for (t, user) in [(t1, "u-gzip"), (t2, "u-json"), (t3, "u-langfuse")] {
        let trace = loupe.trace(&hex(&t)).await;
        assert_eq!(trace["span_count"], 2);
        assert_eq!(trace["roots"][0]["user_id"], user);
        assert_eq!(trace["roots"][0]["children"][0]["input_tokens"], 1200);
    }
}

#[tokio::test]
async fn a_retried_export_is_returned_once() {
    let dir = tempfile::tempdir().unwrap();
    let loupe = Loupe::start(dir.path(), &["--flush-interval", "200ms"]);
    let (t, req) = simple_trace("dup-svc", "u-dup");
    let mut client = loupe.grpc_client().await;
    client.export(req.clone()).await.unwrap();
    // Let the first copy reach a block, so the duplicate spans block and memory.
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    client.export(req).await.unwrap();
    let trace = loupe.trace(&hex(&t)).await;
    assert_eq!(trace["span_count"], 2);
    assert_eq!(trace["total_tokens"], 1500);
    let (_, hits) = loupe.get("/api/v1/traces?user_id=u-dup&start=0").await;
    assert_eq!(hits["traces"].as_array().unwrap().len(), 1);
    assert_eq!(hits["traces"][0]["span_count"], 2);
    assert_eq!(hits["traces"][0]["total_tokens"], 1500);
}

#[tokio::test]
async fn unknown_trace_and_bad_query_parameters_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let loupe = Loupe::start(dir.path(), &[]);
    let (status, body) = loupe
        .get("/api/v1/traces/0102030405060708090a0b0c0d0e0f10")
        .await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("not found"));
    let (status, body) = loupe.get("/api/v1/traces/xyz").await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("32 hexadecimal"));
    let (status, body) = loupe.get("/api/v1/traces?min_duraton=1s").await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("min_duraton"));
}
