//! The real OpenTelemetry Python SDK exporting to `loupe standalone` over gRPC and
//! HTTP (the HTTP case through Langfuse's OTel path with Basic auth).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::harness::Loupe;

/// The Python with the OpenTelemetry SDK, installed by scripts/test.sh.
fn python() -> PathBuf {
    match std::env::var_os("LOUPE_TEST_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => {
            let venv =
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python");
            assert!(
                venv.exists(),
                "the Python OpenTelemetry SDK is needed: run scripts/test.sh (it creates target/test-venv), \
                 or set LOUPE_TEST_PYTHON to a python with requirements from tests/python/requirements.txt"
            );
            venv
        }
    }
}

fn export(args: &[&str]) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/export_traces.py");
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python exporter failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let line = stdout
        .lines()
        .last()
        .expect("the script prints its trace id");
    serde_json::from_str(line).unwrap()
}

fn find<'a>(node: &'a Value, name: &str) -> Option<&'a Value> {
    if node["name"] == name {
        return Some(node);
    }
    node["children"]
        .as_array()?
        .iter()
        .find_map(|c| find(c, name))
}

async fn check(loupe: &Loupe, sent: &Value, service: &str) {
    let trace_id = sent["trace_id"].as_str().unwrap();
    let trace = loupe.trace(trace_id).await;
    assert_eq!(trace["span_count"], 4, "{trace}");
    assert_eq!(trace["root_name"], "rag.query");
    assert_eq!(trace["root_service"], service);
    let root = &trace["roots"][0];
    assert_eq!(root["llm_kind"], "CHAIN");
    assert_eq!(root["user_id"], "u-py");
    assert_eq!(root["session_id"], "s-py");
    assert_eq!(root["span_id"], sent["span_ids"]["rag.query"]);
    let embed = find(root, "embed").unwrap();
    assert_eq!(embed["llm_kind"], "EMBEDDING");
    assert_eq!(embed["request_model"], "text-embedding-3-small");
    let retrieve = find(root, "retrieve").unwrap();
    assert_eq!(retrieve["llm_kind"], "RETRIEVER");
    let llm = find(root, "llm.chat").unwrap();
    assert_eq!(llm["llm_kind"], "LLM");
    assert_eq!(llm["provider"], "openai");
    assert_eq!(llm["request_model"], "gpt-4o-mini");
    assert_eq!(llm["input_tokens"], 1200);
    assert_eq!(llm["output_tokens"], 300);
    assert!(llm["cost_total_usd"].as_f64().unwrap() > 0.0, "{llm}");
    assert_eq!(llm["resource"]["telemetry.sdk.language"], "python");
    let hits = loupe
        .search_ids(&format!("service={service}&user_id=u-py"))
        .await;
    assert_eq!(hits, vec![trace_id.to_owned()]);
}

#[tokio::test]
async fn python_sdk_exports_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let loupe = Loupe::start(dir.path(), &[]);
    let sent = export(&[
        "--protocol",
        "grpc",
        "--endpoint",
        &loupe.grpc,
        "--service",
        "py-grpc",
    ]);
    check(&loupe, &sent, "py-grpc").await;
}

#[tokio::test]
async fn python_sdk_exports_over_http_to_the_langfuse_path() {
    let dir = tempfile::tempdir().unwrap();
    let loupe = Loupe::start(dir.path(), &[]);
    let sent = export(&[
        "--protocol",
        "http",
        "--endpoint",
        &loupe.http,
        "--path",
        "/api/public/otel/v1/traces",
        "--header",
        "Authorization=Basic cGstbGYtMTIzOnNrLWxmLTQ1Ng==",
        "--service",
        "py-http",
    ]);
    check(&loupe, &sent, "py-http").await;
    let sent = export(&[
        "--protocol",
        "http",
        "--endpoint",
        &loupe.http,
        "--service",
        "py-http2",
    ]);
    check(&loupe, &sent, "py-http2").await;
}
