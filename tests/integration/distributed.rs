//! The distributed data path: `ingester --role receive`, `ingester --role write` and
//! `querier` as separate processes around a real Kafka-protocol broker.
//!
//! The broker is librdkafka's mock cluster, hosted in this test process so that
//! killing a Loupe role never kills it (and so that tests can take it down and up),
//! or, when `LOUPE_TEST_KAFKA=host:port` names one, an independent running broker
//! (e.g. tansu; see tests/README.md). Every fault test checks through the query API
//! that each acknowledged span is present exactly once.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loupe_core::sampling::probabilistic_keep;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::harness::*;

pub const PARTITIONS: i32 = 4;

/// A Kafka-protocol broker for one test, with a topic of its own.
pub enum Broker {
    Mock(MockCluster<'static, DefaultProducerContext>),
    External(String),
}

impl Broker {
    pub fn start(topic: &str) -> Broker {
        match std::env::var("LOUPE_TEST_KAFKA") {
            Ok(addr) if !addr.is_empty() => Broker::External(addr),
            _ => {
                let mock = MockCluster::new(1).expect("the mock cluster starts");
                mock.create_topic(topic, PARTITIONS, 1)
                    .expect("the mock cluster creates the topic");
                Broker::Mock(mock)
            }
        }
    }

    pub fn bootstrap(&self) -> String {
        match self {
            Broker::Mock(m) => m.bootstrap_servers(),
            Broker::External(a) => a.clone(),
        }
    }

    /// The mock cluster, for fault injection; `None` (and a message) for an
    /// external broker, which a test cannot stop.
    pub fn mock(&self, test: &str) -> Option<&MockCluster<'static, DefaultProducerContext>> {
        match self {
            Broker::Mock(m) => Some(m),
            Broker::External(a) => {
                eprintln!(
                    "{test}: skipped with LOUPE_TEST_KAFKA={a}: the test stops the broker, which only the in-process mock cluster allows"
                );
                None
            }
        }
    }
}

/// One broker, one topic, one storage directory, and the roles around them.
pub struct Cluster {
    pub broker: Broker,
    pub topic: String,
    group: String,
    pub dir: tempfile::TempDir,
    config: Option<PathBuf>,
}

impl Cluster {
    pub fn new() -> Cluster {
        let suffix = hex(&id::<6>());
        let topic = format!("loupe-test-{suffix}");
        Cluster {
            broker: Broker::start(&topic),
            topic,
            group: format!("loupe-test-{suffix}"),
            dir: tempfile::tempdir().unwrap(),
            config: None,
        }
    }

    /// Uses this data-plane config (YAML) for every role started afterwards.
    pub fn with_config(mut self, yaml: &str) -> Cluster {
        let path = self.dir.path().join("config.yaml");
        std::fs::write(&path, yaml).unwrap();
        self.config = Some(path);
        self
    }

    fn storage(&self) -> String {
        self.dir.path().join("blocks").display().to_string()
    }

    fn ingester_args(&self, role: &str) -> Vec<String> {
        let mut args: Vec<String> = [
            "ingester",
            "--role",
            role,
            "--kafka-brokers",
            &self.broker.bootstrap(),
            "--kafka-topic",
            &self.topic,
            "--kafka-partitions",
            &PARTITIONS.to_string(),
            "--metrics-addr",
            "127.0.0.1:0",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        if let Some(c) = &self.config {
            args.extend(["--config".into(), c.display().to_string()]);
        }
        args
    }

    pub fn receive(&self) -> Loupe {
        self.receive_with_env(&[])
    }

    pub fn receive_with_env(&self, env: &[(&str, &str)]) -> Loupe {
        let mut args = self.ingester_args("receive");
        args.extend(
            [
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--delivery-timeout",
                "3s",
            ]
            .map(String::from),
        );
        Loupe::spawn(
            &args,
            self.dir.path(),
            env,
            &["otlp-grpc", "otlp-http", "metrics"],
        )
    }

    pub fn writer(&self, env: &[(&str, &str)]) -> Loupe {
        let mut args = self.ingester_args("write");
        args.extend([
            "--storage".into(),
            self.storage(),
            "--kafka-group".into(),
            self.group.clone(),
            "--flush-interval".into(),
            "300ms".into(),
            "--session-timeout".into(),
            "6s".into(),
        ]);
        Loupe::spawn(&args, self.dir.path(), env, &["metrics"])
    }

    pub fn querier(&self) -> Loupe {
        Loupe::querier(&self.storage(), self.dir.path(), &[])
    }

    /// A querier that produces scores written on its query API to the cluster's Kafka.
    pub fn querier_with_kafka(&self) -> Loupe {
        let args: Vec<String> = [
            "querier",
            "--storage",
            &self.storage(),
            "--query-addr",
            "127.0.0.1:0",
            "--refresh",
            "100ms",
            "--kafka-brokers",
            &self.broker.bootstrap(),
            "--kafka-topic",
            &self.topic,
        ]
        .map(String::from)
        .to_vec();
        Loupe::spawn(&args, self.dir.path(), &[], &["query-api"])
    }
}

/// Waits until the querier serves exactly `want` traces of `service`, each with its
/// spans once; panics with what it saw after `timeout`.
pub async fn await_traces(
    querier: &Loupe,
    service: &str,
    want: &BTreeSet<String>,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = querier
            .get(&format!(
                "/api/v1/traces?start=0&limit=1000&service={service}"
            ))
            .await;
        assert_eq!(status, 200, "{body}");
        let traces = body["traces"].as_array().unwrap();
        let found: BTreeSet<String> = traces
            .iter()
            .map(|t| t["trace_id"].as_str().unwrap().to_owned())
            .collect();
        if want.is_subset(&found) {
            for t in traces {
                if want.contains(t["trace_id"].as_str().unwrap()) {
                    assert_eq!(t["span_count"], 2, "each span once: {t}");
                }
            }
            assert_eq!(found.len(), traces.len(), "each trace once");
            return;
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = want.difference(&found).take(5).collect();
            panic!(
                "{} of {} acknowledged traces missing after {timeout:?}, e.g. {missing:?}",
                want.difference(&found).count(),
                want.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Exporters sending 2-span traces until told to stop, remembering which exports
/// were acknowledged and how many failed.
struct Load {
    acked: Arc<Mutex<BTreeSet<String>>>,
    failed: Arc<Mutex<usize>>,
    /// gRPC status codes of failed exports (connection failures excluded).
    codes: Arc<Mutex<Vec<tonic::Code>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(grpc: &str, service: &'static str, exporters: usize) -> Load {
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let failed = Arc::new(Mutex::new(0));
        let codes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..exporters)
            .map(|_| {
                let (acked, failed, stop) = (acked.clone(), failed.clone(), stop.clone());
                let codes = codes.clone();
                let endpoint = grpc.to_owned();
                tokio::spawn(async move {
                    let mut client = None;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if client.is_none() {
                            let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
                                .unwrap()
                                .timeout(Duration::from_secs(10))
                                .connect()
                                .await;
                            match channel {
                                Ok(c) => client = Some(opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient::new(c)),
                                Err(_) => {
                                    *failed.lock().unwrap() += 1;
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                    continue;
                                }
                            }
                        }
                        let (t, req) = simple_trace(service, "load");
                        match client.as_mut().unwrap().export(req).await {
                            Ok(_) => {
                                acked.lock().unwrap().insert(hex(&t));
                            }
                            Err(status) => {
                                *failed.lock().unwrap() += 1;
                                codes.lock().unwrap().push(status.code());
                                client = None;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            acked,
            failed,
            codes,
            stop,
            tasks,
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    async fn wait_acked(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked() < n {
            assert!(
                Instant::now() < deadline,
                "only {} exports acknowledged",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) -> (BTreeSet<String>, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let acked = self.acked.lock().unwrap().clone();
        let failed = *self.failed.lock().unwrap();
        (acked, failed)
    }
}

async fn send(loupe: &Loupe, service: &str, n: usize) -> BTreeSet<String> {
    let mut client = loupe.grpc_client().await;
    let mut ids = BTreeSet::new();
    for _ in 0..n {
        let (t, req) = simple_trace(service, "u");
        client.export(req).await.unwrap();
        ids.insert(hex(&t));
    }
    ids
}

#[tokio::test]
async fn spans_flow_from_receive_through_kafka_to_a_separate_querier() {
    let cluster = Cluster::new();
    let receive = cluster.receive();
    let writer = cluster.writer(&[]);
    let querier = cluster.querier_with_kafka();

    let mut ids = send(&receive, "dist-svc", 30).await;
    // OTLP/HTTP goes the same way.
    for _ in 0..10 {
        let (t, req) = simple_trace("dist-svc", "h");
        assert_eq!(receive.post_protobuf(&req).await.status(), 200);
        ids.insert(hex(&t));
    }
    await_traces(&querier, "dist-svc", &ids, Duration::from_secs(60)).await;

    // The tree and the LLM fields survived the trip through Kafka.
    let first = ids.iter().next().unwrap();
    let one = querier.trace(first).await;
    assert_eq!(one["span_count"], 2);
    assert_eq!(one["input_tokens"], 1200, "{one}");

    // Scores take the same path.
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/scores", receive.http))
        .json(&serde_json::json!({"trace_id": first, "name": "faithfulness", "value": 0.25}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    eventually(Duration::from_secs(60), || async {
        let t = querier.trace(first).await;
        (t["scores"][0]["value"] == 0.25)
            .then_some(())
            .ok_or_else(|| format!("no score yet: {}", t["scores"]))
    })
    .await;

    let m = receive.metrics().await;
    assert_eq!(
        metric(&m, "loupe_ingest_spans_accepted_total{protocol=\"grpc\"}"),
        60.0,
        "{m}"
    );
    let m = writer.metrics().await;
    assert_eq!(
        metric(&m, "loupe_writer_records_consumed_total"),
        41.0,
        "one record per trace, one for the score: {m}"
    );
    assert!(metric(&m, "loupe_blocks_written_total") >= 1.0, "{m}");
    assert!(
        m.contains("loupe_writer_committed_offset{partition="),
        "{m}"
    );

    // A person's score, written on the querier's API (the web UI's annotation), goes
    // through Kafka and the writer too.
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/scores", querier.query))
        .json(&serde_json::json!({"trace_id": first, "name": "helpful", "value": true, "source": "human"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    eventually(Duration::from_secs(60), || async {
        let t = querier.trace(first).await;
        let scores = t["scores"].as_array().cloned().unwrap_or_default();
        scores
            .iter()
            .any(|s| s["name"] == "helpful" && s["source"] == "human" && s["label"] == "true")
            .then_some(())
            .ok_or_else(|| format!("no human score yet: {}", t["scores"]))
    })
    .await;
}

/// A policy and 1,000 traces with a known mix; the kept set is computed from the
/// policy's documented rules, independently of the writer.
const SAMPLING_CONFIG: &str = "\
tenants:
  - id: default/default
    environment: prod
    sampling:
      decision_wait: 10s
      keep_errors: true
      root_duration_over: 5s
      tokens_over: 20000
      attributes:
        - key: user.tier
          values: [enterprise]
      percentage: 10
";

/// Sends the mix: every 10th trace has an error (on its child span, sent in a later
/// export, after up to 20 other traces, so the decision must wait for it; the 10 s
/// wait leaves a loaded machine room to send those 20), every 10th+1 a slow
/// root, every 10th+2 many tokens, every 10th+3 an enterprise user; the rest are
/// plain. Returns (all ids, ids the policy keeps).
async fn send_sampling_mix(loupe: &Loupe, n: usize) -> (BTreeSet<String>, BTreeSet<String>) {
    use opentelemetry_proto::tonic::trace::v1::Status;
    let mut client = loupe.grpc_client().await;
    let (mut all, mut keep) = (BTreeSet::new(), BTreeSet::new());
    let mut late_children = Vec::new();
    for i in 0..n {
        let t = id::<16>();
        let root_id = id::<8>();
        let slow = i % 10 == 1;
        let mut root = span(
            t,
            root_id,
            None,
            "agent.run",
            0,
            if slow { 6_000 } else { 800 },
        );
        let mut child = span(t, id::<8>(), Some(root_id), "llm.chat", 100, 500);
        child.attributes = vec![
            kv("gen_ai.request.model", "gpt-4o-mini"),
            kv(
                "gen_ai.usage.input_tokens",
                if i % 10 == 2 { 30_000 } else { 1_000 },
            ),
            kv("gen_ai.usage.output_tokens", 100),
        ];
        if i % 10 == 3 {
            root.attributes.push(kv("user.tier", "enterprise"));
        } else {
            root.attributes.push(kv("user.tier", "free"));
        }
        let error = i % 10 == 0;
        if error {
            child.status = Some(Status {
                code: StatusCode::Error as i32,
                message: "rate limited".into(),
            });
        }
        let special = i % 10 <= 3;
        if special || probabilistic_keep(&t, 10.0) {
            keep.insert(hex(&t));
        }
        all.insert(hex(&t));
        if error {
            client
                .export(request("sampling-svc", vec![root]))
                .await
                .unwrap();
            late_children.push(child);
        } else {
            client
                .export(request("sampling-svc", vec![root, child]))
                .await
                .unwrap();
        }
        if i % 20 == 19 || i == n - 1 {
            let late = std::mem::take(&mut late_children);
            client.export(request("sampling-svc", late)).await.unwrap();
        }
    }
    (all, keep)
}

async fn search_all(loupe: &Loupe, service: &str) -> BTreeSet<String> {
    loupe
        .search_ids(&format!("service={service}"))
        .await
        .into_iter()
        .collect()
}

/// Waits until the sampler (`decider`: the writer, or standalone) has decided every
/// trace of the mix: kept traces are written at once, dropped ones only after the
/// 10 s decision wait.
async fn await_all_decided(decider: &Loupe, all: usize) {
    eventually(Duration::from_secs(90), || async move {
        let (keep, drop) = decisions(&decider.metrics().await);
        (keep + drop >= all)
            .then_some(())
            .ok_or_else(|| format!("{keep} kept + {drop} dropped of {all} decided"))
    })
    .await;
}

/// Traces kept and dropped, summed over tenants and reasons.
fn decisions(metrics: &str) -> (usize, usize) {
    let sum = |decision: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("loupe_sampling_traces_total{")
                    && l.contains(&format!("decision=\"{decision}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (sum("keep") as usize, sum("drop") as usize)
}

async fn assert_kept_exactly(querier: &Loupe, keep: &BTreeSet<String>, all: &BTreeSet<String>) {
    // Every trace is decided: wait for the kept set, then check nothing else shows.
    await_traces(querier, "sampling-svc", keep, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let found = search_all(querier, "sampling-svc").await;
    let extra: Vec<_> = found.difference(keep).take(5).collect();
    assert!(
        extra.is_empty(),
        "traces kept against the policy: {extra:?}"
    );
    assert_eq!(&found, keep);
    assert!(
        keep.len() > all.len() * 4 / 10 && keep.len() < all.len() * 6 / 10,
        "the mix keeps 40% plus 10% of the rest: {} of {}",
        keep.len(),
        all.len()
    );
}

fn assert_seen_vs_kept(metrics: &str, all: usize, kept: usize) {
    let (keep, drop) = decisions(metrics);
    assert_eq!(keep, kept, "{metrics}");
    assert_eq!(keep + drop, all, "{metrics}");
    assert!(
        metrics.contains("reason=\"error\"") && metrics.contains("reason=\"attribute\""),
        "{metrics}"
    );
}

#[tokio::test]
async fn tail_sampling_keeps_exactly_the_traces_the_policy_selects() {
    let cluster = Cluster::new().with_config(SAMPLING_CONFIG);
    let receive = cluster.receive();
    let writer = cluster.writer(&[]);
    let querier = cluster.querier();
    let (all, keep) = send_sampling_mix(&receive, 1_000).await;
    await_all_decided(&writer, all.len()).await;
    assert_kept_exactly(&querier, &keep, &all).await;
    assert_seen_vs_kept(&writer.metrics().await, all.len(), keep.len());

    // Blocks record what was seen, so sampled-out volume can be extrapolated. The
    // last drops are recorded by the block flushed after them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (mut seen, mut stored) = (0, 0);
        for e in walk(&cluster.dir.path().join("blocks")) {
            if e.to_string_lossy().ends_with(".meta.json") {
                let meta: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&e).unwrap()).unwrap();
                seen += meta["seen_spans"].as_u64().unwrap();
                stored += meta["spans"].as_u64().unwrap();
            }
        }
        assert_eq!(stored, 2 * keep.len() as u64);
        if seen == 2 * all.len() as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "blocks record {seen} seen spans of {}",
            2 * all.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn standalone_applies_the_same_tail_sampling() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, SAMPLING_CONFIG).unwrap();
    let loupe = Loupe::start(
        &dir.path().join("data"),
        &[
            "--config",
            config.to_str().unwrap(),
            "--flush-interval",
            "300ms",
        ],
    );
    let (all, keep) = send_sampling_mix(&loupe, 300).await;
    await_all_decided(&loupe, all.len()).await;
    assert_kept_exactly(&loupe, &keep, &all).await;
    assert_seen_vs_kept(&loupe.metrics().await, all.len(), keep.len());
}

/// Fault 1: SIGKILL while a block is half written (its Parquet file stored, its
/// metadata not yet), then a restart: every acknowledged trace is there once.
#[tokio::test]
async fn writer_killed_in_the_middle_of_a_block_loses_nothing() {
    let cluster = Cluster::new();
    let receive = cluster.receive();
    let querier = cluster.querier();
    // Every block waits 30 s between its data and its metadata.
    let writer = cluster.writer(&[("LOUPE_FAULT_BLOCK_META_DELAY_MS", "30000")]);
    let ids = send(&receive, "crash-svc", 40).await;
    let blocks = cluster.dir.path().join("blocks");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !walk(&blocks)
        .iter()
        .any(|p| p.to_string_lossy().ends_with(".parquet"))
    {
        assert!(
            Instant::now() < deadline,
            "the writer never started a block"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writer.kill9();
    assert!(
        !walk(&blocks)
            .iter()
            .any(|p| p.to_string_lossy().ends_with(".meta.json")),
        "the kill came before any block was complete"
    );
    let (_, body) = querier
        .get("/api/v1/traces?start=0&service=crash-svc")
        .await;
    assert_eq!(
        body["traces"].as_array().unwrap().len(),
        0,
        "half a block is invisible"
    );

    let more = send(&receive, "crash-svc", 10).await;
    let _writer = cluster.writer(&[]);
    let all: BTreeSet<String> = ids.union(&more).cloned().collect();
    await_traces(&querier, "crash-svc", &all, Duration::from_secs(60)).await;
}

/// Fault 2: the broker goes down with exports in flight and comes back. Exports
/// that were not acknowledged got errors; every acknowledged one is stored.
#[tokio::test]
async fn broker_outage_fails_exports_and_loses_no_acknowledged_span() {
    let cluster = Cluster::new();
    let Some(mock) = cluster.broker.mock("broker_outage") else {
        return;
    };
    let receive = cluster.receive();
    let _writer = cluster.writer(&[]);
    let querier = cluster.querier();

    let load = Load::start(&receive.grpc, "outage-svc", 4);
    load.wait_acked(50).await;
    mock.broker_down(1).unwrap();
    let before = load.acked();
    // OTLP/HTTP clients are told to come back later.
    let (_, req) = simple_trace("outage-svc", "http");
    let r = receive.post_protobuf(&req).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let failed_while_down = *load.failed.lock().unwrap();
    let acked_while_down = load.acked() - before;
    mock.broker_up(1).unwrap();
    // The receive role recovers by itself.
    let after = load.acked();
    load.wait_acked(after + 50).await;
    let codes = load.codes.clone();
    let (acked, failed) = load.finish().await;

    assert!(
        failed_while_down > 0,
        "exports during the outage got errors"
    );
    assert!(
        acked_while_down < 20,
        "{acked_while_down} exports acknowledged with the broker down"
    );
    assert!(failed >= failed_while_down);
    let codes = codes.lock().unwrap().clone();
    assert!(
        codes.contains(&tonic::Code::Unavailable),
        "gRPC clients are told to retry: {codes:?}"
    );
    await_traces(&querier, "outage-svc", &acked, Duration::from_secs(90)).await;
}

/// Fault 3: two writers share the partitions; one is killed and the other takes
/// over its partitions.
#[tokio::test]
async fn a_surviving_writer_takes_over_the_partitions_of_a_killed_one() {
    let cluster = Cluster::new();
    let receive = cluster.receive();
    let a = cluster.writer(&[]);
    let b = cluster.writer(&[]);
    let querier = cluster.querier();

    // Both writers own partitions before the kill.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (la, lb) = (a.log(), b.log());
        if la.contains("partitions assigned") && lb.contains("partitions assigned") {
            let owned = |log: &str| {
                log.lines()
                    .rev()
                    .find(|l| l.contains("partitions assigned"))
                    .is_some_and(|l| !l.contains("[]"))
            };
            if owned(&la) && owned(&lb) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "partitions were not shared:\n{la}\n{lb}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let first = send(&receive, "takeover-svc", 40).await;
    a.kill9();
    let second = send(&receive, "takeover-svc", 40).await;
    let all: BTreeSet<String> = first.union(&second).cloned().collect();
    await_traces(&querier, "takeover-svc", &all, Duration::from_secs(90)).await;
    let last_assignment = b
        .log()
        .lines()
        .rev()
        .find(|l| l.contains("partitions assigned"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(
        last_assignment.contains("[0, 1, 2, 3]"),
        "the survivor owns every partition: {last_assignment}"
    );
}

/// Fault 4: the receive role is killed with exports in flight. The clients saw
/// errors for what was not acknowledged; nothing acknowledged is missing.
#[tokio::test]
async fn receive_killed_with_exports_in_flight_loses_no_acknowledged_span() {
    let cluster = Cluster::new();
    let receive = cluster.receive();
    let _writer = cluster.writer(&[]);
    let querier = cluster.querier();

    let load = Load::start(&receive.grpc, "recv-crash-svc", 8);
    load.wait_acked(100).await;
    receive.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (acked, failed) = load.finish().await;
    assert!(failed > 0, "in-flight exports failed at the kill");
    await_traces(&querier, "recv-crash-svc", &acked, Duration::from_secs(60)).await;
}

/// Records the broker deletes (retention) before a writer reads them are lost; the
/// writer must say so — counted and logged — rather than carry on in silence.
#[tokio::test]
async fn records_deleted_by_the_broker_before_they_are_read_are_reported_as_lost() {
    use rand::RngCore;
    use rdkafka::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let cluster = Cluster::new();
    // The mock cluster keeps 5 MB per partition; an external broker keeps more.
    if cluster.broker.mock("retention").is_none() {
        return;
    }
    let receive = cluster.receive();
    let querier = cluster.querier();
    let mut writer = cluster.writer(&[]);
    let first = send(&receive, "retention-svc", 20).await;
    await_traces(&querier, "retention-svc", &first, Duration::from_secs(60)).await;
    // A graceful stop commits everything written.
    writer.terminate();

    // While no writer runs, 8 MB of other records per partition push the log start
    // past the group's commit.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.broker.bootstrap())
        .set("compression.type", "none")
        .create()
        .unwrap();
    let mut payload = vec![0u8; 100 << 10];
    for p in 0..PARTITIONS {
        for _ in 0..80 {
            rand::rng().fill_bytes(&mut payload);
            producer
                .send(
                    FutureRecord::<[u8], [u8]>::to(&cluster.topic)
                        .partition(p)
                        .payload(&payload),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }

    let writer = cluster.writer(&[]);
    let w = &writer;
    eventually(Duration::from_secs(60), || async move {
        let lost = metric(&w.metrics().await, "loupe_writer_records_lost_total");
        (lost > 0.0)
            .then_some(())
            .ok_or_else(|| format!("no loss reported:\n{}", w.log()))
    })
    .await;
    assert!(
        writer
            .log()
            .contains("Kafka deleted records before this writer read them"),
        "{}",
        writer.log()
    );
    // The writer goes on: new spans are stored.
    let later = send(&receive, "retention-svc", 5).await;
    let all: BTreeSet<String> = first.union(&later).cloned().collect();
    await_traces(&querier, "retention-svc", &all, Duration::from_secs(60)).await;
}
