//! `loupe agent` between real OpenTelemetry SDK exporters (Python, and Rust's tonic
//! client) and a real `loupe standalone`: Kubernetes attributes added, head sampling on
//! the trace id, spans held while the upstream is away and delivered when it is back,
//! and drops beyond the queue bound counted and reported as OTLP partial success.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

fn python() -> PathBuf {
    std::env::var_os("LOUPE_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python")
        })
}

/// Sends `count` traces with the Python SDK; returns their ids.
fn python_send(protocol: &str, endpoint: &str, count: usize) -> Vec<String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/send_traces.py");
    let out = Command::new(python())
        .arg(script)
        .args(["--protocol", protocol, "--endpoint", endpoint])
        .args(["--count", &count.to_string(), "--service", "shop-web"])
        .output()
        .expect("the test Python runs (scripts/test.sh creates target/test-venv)");
    assert!(
        out.status.success(),
        "python exporter failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    v["trace_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn agent(upstream: &str, log_dir: &std::path::Path, extra: &[&str]) -> Loupe {
    let mut args: Vec<String> = [
        "agent",
        "--upstream",
        upstream,
        "--grpc-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--batch-timeout",
        "100ms",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    Loupe::spawn(&args, log_dir, &[], &["otlp-grpc", "otlp-http", "metrics"])
}

/// An agent (logging into `dir/agent`) whose upstream, on a free port, is not started
/// yet: the port, and the agent.
fn agent_before_its_upstream(dir: &std::path::Path, extra: &[&str]) -> (u16, Loupe) {
    let port = free_port();
    let agent = agent(
        &format!("http://127.0.0.1:{port}"),
        &dir.join("agent"),
        extra,
    );
    (port, agent)
}

/// A standalone in `dir` and an agent in front of it (logging into `dir/agent`).
fn standalone_behind_agent(dir: &std::path::Path, extra: &[&str]) -> (Loupe, Loupe) {
    let standalone = Loupe::start(dir, &[]);
    let agent = agent(&standalone.grpc, &dir.join("agent"), extra);
    (standalone, agent)
}

async fn agent_metric(agent: &Loupe, name: &str) -> f64 {
    metric(&agent.metrics().await, name)
}

/// Waits until `loupe` stores exactly the traces `want`.
async fn stores_exactly(loupe: &Loupe, want: &HashSet<String>, timeout: Duration) {
    eventually(timeout, || async {
        let got = stored_ids(loupe).await;
        (&got == want)
            .then_some(())
            .ok_or(format!("{} stored, {} expected", got.len(), want.len()))
    })
    .await;
}

async fn stored_ids(loupe: &Loupe) -> HashSet<String> {
    loupe.search_ids("").await.into_iter().collect()
}

#[tokio::test]
async fn sdk_spans_reach_loupe_through_the_agent_with_kubernetes_attributes() {
    let dir = tempfile::tempdir().unwrap();
    let (standalone, agent) = standalone_behind_agent(
        dir.path(),
        &[
            "--resource-attribute",
            "k8s.pod.name=web-7d9f-x2k4p,k8s.namespace.name=shop,service.name=not-this-one",
        ],
    );
    let by_grpc = python_send("grpc", &agent.grpc, 3);
    let by_http = python_send("http", &agent.http, 3);
    let want: HashSet<String> = by_grpc.iter().chain(&by_http).cloned().collect();
    eventually(Duration::from_secs(15), || async {
        let got = stored_ids(&standalone).await;
        want.is_subset(&got)
            .then_some(())
            .ok_or(format!("{} of {} traces", got.len(), want.len()))
    })
    .await;
    let trace = standalone.trace(&by_http[0]).await;
    let resource = &trace["roots"][0]["resource"];
    assert_eq!(resource["k8s.pod.name"], "web-7d9f-x2k4p", "{resource}");
    assert_eq!(resource["k8s.namespace.name"], "shop");
    // What the application set is never overwritten.
    assert_eq!(trace["root_service"], "shop-web");
    assert_eq!(
        agent_metric(&agent, "loupe_agent_spans_sent_total").await,
        12.0
    );
    // The sidecar's startup probe: `loupe agent --probe` succeeds against a running
    // agent and fails, saying why, where none listens.
    let probe = |addr: &str| {
        Command::new(env!("CARGO_BIN_EXE_loupe"))
            .args(["agent", "--probe", "--metrics-addr", addr])
            .output()
            .unwrap()
    };
    let addr = agent
        .metrics_url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned();
    let addr = addr.as_str();
    let up = probe(addr);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    drop(agent);
    let down = probe(addr);
    assert!(!down.status.success());
    let err = String::from_utf8_lossy(&down.stderr);
    assert!(err.contains("no agent answers at"), "{err}");
}

#[tokio::test]
async fn spans_wait_for_an_upstream_that_comes_back_and_none_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (port, agent) = agent_before_its_upstream(dir.path(), &[]);
    // The upstream is away: the SDK's exports still succeed, the agent holds them.
    let first = python_send("grpc", &agent.grpc, 50);
    eventually(Duration::from_secs(10), || async {
        let r = agent_metric(&agent, "loupe_agent_export_retries_total").await;
        (r >= 2.0).then_some(()).ok_or(format!("{r} retries"))
    })
    .await;
    assert!(agent_metric(&agent, "loupe_agent_queue_bytes").await > 0.0);
    let second = python_send("http", &agent.http, 50);

    let standalone = Loupe::start(dir.path(), &["--grpc-addr", &format!("127.0.0.1:{port}")]);
    let want: HashSet<String> = first.into_iter().chain(second).collect();
    stores_exactly(&standalone, &want, Duration::from_secs(40)).await;
    assert_eq!(
        agent_metric(&agent, "loupe_agent_spans_sent_total").await,
        200.0
    );
    assert_eq!(agent_metric(&agent, "loupe_agent_queue_bytes").await, 0.0);
    let text = agent.metrics().await;
    assert!(
        !text.contains("reason=\"queue_full\""),
        "nothing dropped within the bound"
    );
}

#[tokio::test]
async fn an_upstream_that_goes_away_mid_stream_and_comes_back_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("standalone");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut standalone = Loupe::start(&data, &["--grpc-addr", &addr]);
    let agent = agent(&format!("http://{addr}"), &dir.path().join("agent"), &[]);
    let first = python_send("grpc", &agent.grpc, 30);
    eventually(Duration::from_secs(15), || async {
        let n = agent_metric(&agent, "loupe_agent_spans_sent_total").await;
        (n == 60.0).then_some(()).ok_or(format!("{n} spans sent"))
    })
    .await;
    // The upstream stops (flushing what it took); the application keeps sending.
    standalone.terminate();
    let second = python_send("http", &agent.http, 30);
    eventually(Duration::from_secs(10), || async {
        let r = agent_metric(&agent, "loupe_agent_export_retries_total").await;
        (r >= 1.0).then_some(()).ok_or(format!("{r} retries"))
    })
    .await;
    // Back on the same address, with the same data.
    let standalone = Loupe::start(&data, &["--grpc-addr", &addr]);
    let want: HashSet<String> = first.into_iter().chain(second).collect();
    stores_exactly(&standalone, &want, Duration::from_secs(40)).await;
    assert_eq!(
        agent_metric(&agent, "loupe_agent_spans_sent_total").await,
        120.0
    );
}

#[tokio::test]
async fn beyond_the_queue_bound_spans_are_dropped_counted_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (port, agent) = agent_before_its_upstream(dir.path(), &["--max-queue-bytes", "8KiB"]);
    let mut client = agent.grpc_client().await;
    let (mut accepted, mut rejected) = (Vec::new(), 0i64);
    for _ in 0..40 {
        let (t, req) = simple_trace("shop-web", "u-1");
        let resp = client.export(req).await.unwrap().into_inner();
        match resp.partial_success {
            Some(p) if p.rejected_spans > 0 => {
                assert_eq!(p.rejected_spans, 2);
                assert!(
                    p.error_message.contains("queue is full"),
                    "{}",
                    p.error_message
                );
                rejected += p.rejected_spans;
            }
            _ => accepted.push(hex(&t)),
        }
    }
    assert!(rejected > 0 && !accepted.is_empty(), "{rejected} rejected");
    let dropped = agent_metric(
        &agent,
        "loupe_agent_spans_dropped_total{reason=\"queue_full\"}",
    )
    .await;
    assert_eq!(dropped, rejected as f64);
    assert!(
        agent.log().contains("queue full: spans dropped"),
        "{}",
        agent.log()
    );

    // What was accepted arrives once the upstream is there.
    let standalone = Loupe::start(dir.path(), &["--grpc-addr", &format!("127.0.0.1:{port}")]);
    let want: HashSet<String> = accepted.into_iter().collect();
    stores_exactly(&standalone, &want, Duration::from_secs(40)).await;
}

/// The sampling rule, as documented: the trace id's last 7 bytes below ratio × 2^56.
fn kept(trace_id: &str, ratio: f64) -> bool {
    let bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let mut low = [0u8; 8];
    low[1..].copy_from_slice(&bytes[9..]);
    (u64::from_be_bytes(low) as f64) < ratio * (1u64 << 56) as f64
}

#[tokio::test]
async fn head_sampling_keeps_exactly_the_traces_its_ratio_selects() {
    let dir = tempfile::tempdir().unwrap();
    let (standalone, agent) = standalone_behind_agent(dir.path(), &["--sampling-ratio", "0.25"]);
    let sent = python_send("grpc", &agent.grpc, 200);
    let want: HashSet<String> = sent.iter().filter(|t| kept(t, 0.25)).cloned().collect();
    assert!((20..80).contains(&want.len()), "{}", want.len());
    stores_exactly(&standalone, &want, Duration::from_secs(15)).await;
    let sampled = agent_metric(
        &agent,
        "loupe_agent_spans_dropped_total{reason=\"sampled\"}",
    )
    .await;
    assert_eq!(sampled, 2.0 * (200 - want.len()) as f64);
}

#[test]
fn the_agent_refuses_to_listen_beyond_loopback() {
    let out = Command::new(env!("CARGO_BIN_EXE_loupe"))
        .args([
            "agent",
            "--upstream",
            "http://127.0.0.1:4317",
            "--grpc-addr",
            "0.0.0.0:4317",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listens on loopback only"), "{err}");
}

#[tokio::test]
async fn several_batches_travel_at_once_to_a_slow_upstream() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // An OTLP/HTTP upstream that answers each request after a second, counting the
    // requests it holds at once and the spans it was sent.
    #[derive(Clone, Default)]
    struct Seen {
        now: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
        spans: Arc<AtomicUsize>,
    }
    let seen = Seen::default();
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(
                |axum::extract::State(seen): axum::extract::State<Seen>, body: axum::body::Bytes| async move {
                    use prost::Message;
                    let n = seen.now.fetch_add(1, Ordering::SeqCst) + 1;
                    seen.most.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let req = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(body)
                        .unwrap();
                    let spans: usize = req
                        .resource_spans
                        .iter()
                        .flat_map(|r| &r.scope_spans)
                        .map(|s| s.spans.len())
                        .sum();
                    seen.spans.fetch_add(spans, Ordering::SeqCst);
                    seen.now.fetch_sub(1, Ordering::SeqCst);
                    ([("content-type", "application/x-protobuf")], Vec::<u8>::new())
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let agent = agent(
        &format!("http://{upstream}"),
        dir.path(),
        &["--upstream-protocol", "http", "--batch-spans", "1"],
    );
    // Twelve requests of two spans: twelve batches (a batch holds whole requests).
    for _ in 0..12 {
        let (_, req) = simple_trace("slow-upstream", "u");
        assert_eq!(agent.post_protobuf(&req).await.status(), 200);
    }
    eventually(Duration::from_secs(30), || async {
        let n = seen.spans.load(Ordering::SeqCst);
        (n == 24)
            .then_some(())
            .ok_or(format!("{n} of 24 spans upstream"))
    })
    .await;
    // The default --max-in-flight: four batches at once, never more.
    assert_eq!(seen.most.load(Ordering::SeqCst), 4);
}
