//! Starting and stopping `loupe` processes, and small OTLP builders.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use serde_json::Value;

/// Installs the process's TLS provider for reqwest (once; later calls do nothing).
pub fn tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Runs `loupe <args>` to completion with extra environment and returns its stdout;
/// fails the test with its stderr when it fails.
pub fn loupe_ok_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_loupe"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "loupe {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `loupe <args>` to completion and returns its stdout.
pub fn loupe_ok(args: &[&str]) -> String {
    loupe_ok_env(args, &[])
}

/// A running `loupe` process (standalone or one role).
pub struct Loupe {
    child: Option<Child>,
    pub grpc: String,
    pub http: String,
    pub query: String,
    pub metrics_url: String,
    log: PathBuf,
}

impl Loupe {
    /// Starts standalone with its data in `data`, on free ports, and waits until it
    /// prints its addresses (which it does once the write-ahead log is replayed).
    pub fn start(data: &Path, extra: &[&str]) -> Loupe {
        Loupe::start_with_env(data, extra, &[])
    }

    /// [`Loupe::start`] with extra environment (object-store credentials, keys).
    pub fn start_with_env(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Loupe {
        let mut args: Vec<String> = vec!["standalone".into(), "--data-dir".into()];
        args.push(data.display().to_string());
        // Free ports, unless `extra` names an address.
        for flag in ["--grpc-addr", "--http-addr", "--query-addr"] {
            if !extra.contains(&flag) {
                args.push(flag.into());
                args.push("127.0.0.1:0".into());
            }
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut loupe = Loupe::spawn(&args, data, env, &["otlp-grpc", "otlp-http", "query-api"]);
        loupe.metrics_url = format!("{}/metrics", loupe.query);
        loupe
    }

    /// Starts `loupe querier` over `storage` (listing it every 100 ms), logging into
    /// `log_dir`.
    pub fn querier(storage: &str, log_dir: &Path, env: &[(&str, &str)]) -> Loupe {
        let args: Vec<String> = [
            "querier",
            "--storage",
            storage,
            "--query-addr",
            "127.0.0.1:0",
            "--refresh",
            "100ms",
        ]
        .map(String::from)
        .to_vec();
        Loupe::spawn(&args, log_dir, env, &["query-api"])
    }

    /// Starts `loupe <args>` with extra environment, logging into `log_dir`, and
    /// waits until it has printed an address line for every name in `wanted`
    /// (`otlp-grpc`, `otlp-http`, `query-api`, `metrics`).
    pub fn spawn(args: &[String], log_dir: &Path, env: &[(&str, &str)], wanted: &[&str]) -> Loupe {
        tls();
        std::fs::create_dir_all(log_dir).unwrap();
        let log = log_dir.join(format!(
            "loupe-{}-{}.log",
            args[0],
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut child = Command::new(env!("CARGO_BIN_EXE_loupe"))
            .args(args)
            .env("LOUPE_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("the loupe binary starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Read stdout to the end, so the server never writes into a closed pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut found: std::collections::HashMap<String, String> = Default::default();
        let deadline = Instant::now() + Duration::from_secs(60);
        while wanted.iter().any(|w| !found.contains_key(*w)) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "loupe {} did not report its addresses; log:\n{}",
                        args.join(" "),
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            };
            let mut words = line.split_whitespace();
            if let (Some(name), Some(addr)) = (words.next(), words.next()) {
                found.insert(name.to_owned(), addr.to_owned());
            }
        }
        let get = |k: &str| found.get(k).cloned().unwrap_or_default();
        Loupe {
            child: Some(child),
            grpc: match found.get("otlp-grpc") {
                Some(a) => format!("http://{a}"),
                None => String::new(),
            },
            http: get("otlp-http").trim_end_matches("/v1/traces").to_owned(),
            query: get("query-api")
                .trim_end_matches("/api/v1/traces")
                .to_owned(),
            metrics_url: get("metrics"),
            log,
        }
    }

    /// Kills the process with SIGKILL: no flush, no cleanup.
    pub fn kill9(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Stops the process with SIGTERM and waits for it to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        child.wait().unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn grpc_client(&self) -> TraceServiceClient<tonic::transport::Channel> {
        TraceServiceClient::connect(self.grpc.clone())
            .await
            .unwrap()
    }

    /// POSTs an export as OTLP/HTTP protobuf to `/v1/traces`.
    pub async fn post_protobuf(&self, req: &ExportTraceServiceRequest) -> reqwest::Response {
        use prost::Message;
        reqwest::Client::new()
            .post(format!("{}/v1/traces", self.http))
            .header("content-type", "application/x-protobuf")
            .body(req.encode_to_vec())
            .send()
            .await
            .unwrap()
    }

    /// GET a query API path; returns the status and the JSON body.
    pub async fn get(&self, path_and_query: &str) -> (u16, Value) {
        let r = reqwest::get(format!("{}{path_and_query}", self.query))
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    /// The trace as the API returns it; panics when it is missing.
    pub async fn trace(&self, trace_id: &str) -> Value {
        let (status, body) = self.get(&format!("/api/v1/traces/{trace_id}")).await;
        assert_eq!(status, 200, "trace {trace_id}: {body}");
        body
    }

    /// Trace ids a search returns (over all time).
    pub async fn search_ids(&self, query: &str) -> Vec<String> {
        let (status, body) = self
            .get(&format!("/api/v1/traces?start=0&limit=1000&{query}"))
            .await;
        assert_eq!(status, 200, "search {query}: {body}");
        body["traces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["trace_id"].as_str().unwrap().to_owned())
            .collect()
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(&self.metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Loupe {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let exited = c.try_wait().ok().flatten();
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!(
                    "--- loupe ({}) log {} ---\n{}",
                    match exited {
                        Some(status) => format!("had exited: {status}"),
                        None => "was running".into(),
                    },
                    self.log.display(),
                    self.log()
                );
            }
        }
    }
}

/// Polls `check` every 200 ms until it returns `Ok`, and returns that value; after
/// `timeout`, fails with the last error it returned.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let why = match check().await {
            Ok(v) => return v,
            Err(why) => why,
        };
        assert!(Instant::now() < deadline, "after {timeout:?}: {why}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The value of a metric line (`name{labels}` as printed), 0 when absent.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Every file under `dir`, recursively.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

pub fn kv(key: &str, value: impl Into<Val>) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(value.into().0),
        }),
        ..Default::default()
    }
}

pub struct Val(any_value::Value);

impl From<&str> for Val {
    fn from(v: &str) -> Val {
        Val(any_value::Value::StringValue(v.into()))
    }
}
impl From<String> for Val {
    fn from(v: String) -> Val {
        Val(any_value::Value::StringValue(v))
    }
}
impl From<i64> for Val {
    fn from(v: i64) -> Val {
        Val(any_value::Value::IntValue(v))
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A random non-zero id of `N` bytes.
pub fn id<const N: usize>() -> [u8; N] {
    let mut b: [u8; N] = rand::random();
    b[0] |= 1;
    b
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A span builder with sensible defaults.
pub fn span(
    trace: [u8; 16],
    id: [u8; 8],
    parent: Option<[u8; 8]>,
    name: &str,
    start_ms: u64,
    dur_ms: u64,
) -> Span {
    let base = now_ns() - 60_000_000_000;
    Span {
        trace_id: trace.to_vec(),
        span_id: id.to_vec(),
        parent_span_id: parent.map(|p| p.to_vec()).unwrap_or_default(),
        name: name.into(),
        kind: 1,
        start_time_unix_nano: base + start_ms * 1_000_000,
        end_time_unix_nano: base + (start_ms + dur_ms) * 1_000_000,
        status: Some(Status::default()),
        ..Default::default()
    }
}

pub fn request(service: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", service)],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "loupe-tests".into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// A small trace: a CHAIN root with an LLM child (gpt-4o-mini, 1200 in / 300 out).
pub fn simple_trace(service: &str, user: &str) -> ([u8; 16], ExportTraceServiceRequest) {
    let t = id::<16>();
    let root = id::<8>();
    let mut r = span(t, root, None, "rag.query", 0, 900);
    r.attributes = vec![kv("openinference.span.kind", "CHAIN"), kv("user.id", user)];
    let mut llm = span(t, id::<8>(), Some(root), "llm.chat", 100, 700);
    llm.attributes = vec![
        kv("openinference.span.kind", "LLM"),
        kv("llm.model_name", "gpt-4o-mini"),
        kv("llm.token_count.prompt", 1200),
        kv("llm.token_count.completion", 300),
    ];
    (t, request(service, vec![r, llm]))
}
