//! `loupe agent`: the sidecar the operator injects next to an application. It
//! receives OTLP on loopback (gRPC and HTTP), adds the pod's Kubernetes resource
//! attributes, applies the project's head-sampling ratio on the trace id, batches, and
//! forwards to the ingester with the project's ingest key, retrying with backoff.
//!
//! Memory is bounded: requests wait in a queue of at most `--max-queue-bytes`
//! (the batch being sent counts too); what does not fit is dropped, counted
//! (`loupe_agent_spans_dropped_total{reason="queue_full"}`), logged, and reported to the
//! exporting SDK as OTLP partial success.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use prost::Message;
use tonic::codec::CompressionEncoding;

use crate::client::Protocol;
use crate::server::{bind, parse_duration, say, serve, shutdown_signal};

#[derive(clap::Args)]
pub struct Args {
    /// Where spans go: the ingester's OTLP endpoint, gRPC (`http://host:4317`) or
    /// HTTP (`http://host:4318`, with `--upstream-protocol http`).
    #[arg(long, env = "LOUPE_AGENT_UPSTREAM", required_unless_present = "probe")]
    upstream: Option<String>,
    /// The upstream's protocol.
    #[arg(
        long,
        value_enum,
        env = "LOUPE_AGENT_UPSTREAM_PROTOCOL",
        default_value = "grpc"
    )]
    upstream_protocol: Protocol,
    /// The project's ingest key, sent upstream as `Authorization: Bearer`.
    #[arg(long, env = "LOUPE_INGEST_KEY", hide_env_values = true)]
    key: Option<String>,
    /// OTLP/gRPC listen address (loopback only).
    #[arg(long, env = "LOUPE_AGENT_GRPC_ADDR", default_value = "127.0.0.1:4317")]
    grpc_addr: SocketAddr,
    /// OTLP/HTTP listen address (loopback only).
    #[arg(long, env = "LOUPE_AGENT_HTTP_ADDR", default_value = "127.0.0.1:4318")]
    http_addr: SocketAddr,
    /// `/health` and `/metrics` listen address (loopback only).
    #[arg(
        long,
        env = "LOUPE_AGENT_METRICS_ADDR",
        default_value = "127.0.0.1:9464"
    )]
    metrics_addr: SocketAddr,
    /// Check the health of the agent listening on `--metrics-addr` and exit: 0 when
    /// it is up (the sidecar's startup probe, which must run inside the pod since
    /// the agent listens on loopback only).
    #[arg(long)]
    probe: bool,
    /// Share of traces kept, decided on the trace id (the same trace is kept or dropped
    /// by every agent), e.g. `0.25`.
    #[arg(long, env = "LOUPE_SAMPLING_RATIO", default_value_t = 1.0)]
    sampling_ratio: f64,
    /// Most bytes of spans held while the upstream is slow or away, e.g. `64MiB`.
    #[arg(long, env = "LOUPE_AGENT_MAX_QUEUE", default_value = "64MiB", value_parser = parse_bytes)]
    max_queue_bytes: usize,
    /// Largest request accepted from the application, e.g. `4MiB`.
    #[arg(long, default_value = "4MiB", value_parser = parse_bytes)]
    max_request_bytes: usize,
    /// Most spans forwarded in one request.
    #[arg(long, default_value_t = 4096)]
    batch_spans: usize,
    /// Batches on their way upstream at once (each retried on its own), so that one
    /// slow answer does not hold the rest.
    #[arg(long, default_value_t = 4)]
    max_in_flight: usize,
    /// Longest time spans wait for a batch to fill.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    batch_timeout: Duration,
    /// Resource attributes added to every span's resource (when the application set
    /// no value): `k8s.pod.name=web-1,k8s.namespace.name=shop`. Repeatable.
    #[arg(
        long = "resource-attribute",
        env = "LOUPE_AGENT_RESOURCE_ATTRIBUTES",
        value_delimiter = ','
    )]
    resource_attributes: Vec<String>,
    /// How long a stopping agent keeps forwarding what it holds.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
}

/// `64MiB`, `512KiB`, `1000000`.
fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mult) = [
        ("GiB", 1u64 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("KB", 1_000),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n.trim(), *m)))
    .unwrap_or((t, 1));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 64MiB, 512KiB or 1000000"))?;
    let bytes = (n * mult as f64).round();
    if !(1024.0..=(16u64 << 30) as f64).contains(&bytes) {
        return Err(format!("{s:?} must be between 1KiB and 16GiB"));
    }
    Ok(bytes as usize)
}

/// Whether the trace is kept at `ratio`: its id's last 56 bits (random in W3C trace
/// ids) below `ratio` × 2^56, as OpenTelemetry's TraceIdRatioBased sampler decides.
pub fn keeps(trace_id: &[u8], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 || trace_id.len() != 16 {
        return false;
    }
    let mut low = [0u8; 8];
    low[1..].copy_from_slice(&trace_id[9..16]);
    let value = u64::from_be_bytes(low);
    (value as f64) < ratio * (1u64 << 56) as f64
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Default)]
struct AgentMetrics {
    received: Counter,
    sent: Counter,
    dropped: Family<Reason, Counter>,
    retries: Counter,
    queue_bytes: Gauge,
}

impl AgentMetrics {
    fn register(registry: &mut Registry) -> AgentMetrics {
        let m = AgentMetrics::default();
        let r = registry.sub_registry_with_prefix("loupe_agent");
        r.register(
            "spans_received",
            "Spans received from applications",
            m.received.clone(),
        );
        r.register("spans_sent", "Spans the upstream accepted", m.sent.clone());
        r.register(
            "spans_dropped",
            "Spans dropped: sampled (head sampling), queue_full, refused (the upstream refused them for good)",
            m.dropped.clone(),
        );
        r.register(
            "export_retries",
            "Exports retried after a retryable failure",
            m.retries.clone(),
        );
        r.register(
            "queue_bytes",
            "Bytes of spans held, the batch being sent included",
            m.queue_bytes.clone(),
        );
        m
    }

    fn drop(&self, reason: &'static str, spans: usize) {
        self.dropped
            .get_or_create(&Reason { reason })
            .inc_by(spans as u64);
    }
}

/// One application request, encoded (protobuf) and ready to forward: what the queue
/// bound counts is what it holds.
struct Item {
    encoded: Bytes,
    spans: usize,
    bytes: usize,
}

/// The bounded queue: waiting items plus the batch in flight, in bytes.
struct Queue {
    inner: Mutex<Held>,
    max_bytes: usize,
    ready: tokio::sync::Notify,
    metrics: AgentMetrics,
}

#[derive(Default)]
struct Held {
    items: VecDeque<Item>,
    /// Bytes of the waiting items and of the batch in flight.
    bytes: usize,
    /// Spans of the waiting items.
    spans: usize,
}

impl Queue {
    fn new(max_bytes: usize, metrics: AgentMetrics) -> Queue {
        Queue {
            inner: Mutex::new(Held::default()),
            max_bytes,
            ready: tokio::sync::Notify::new(),
            metrics,
        }
    }

    /// Adds `item`, or gives it back when it does not fit.
    fn push(&self, item: Item) -> Result<(), Item> {
        let mut held = self.inner.lock().expect("queue lock");
        if held.bytes + item.bytes > self.max_bytes {
            return Err(item);
        }
        held.bytes += item.bytes;
        held.spans += item.spans;
        self.metrics.queue_bytes.set(held.bytes as i64);
        held.items.push_back(item);
        drop(held);
        self.ready.notify_one();
        Ok(())
    }

    fn spans_waiting(&self) -> usize {
        self.inner.lock().expect("queue lock").spans
    }

    /// Takes items up to `max_spans` (at least one); their bytes stay counted until
    /// [`Queue::release`].
    fn take(&self, max_spans: usize) -> Vec<Item> {
        let mut held = self.inner.lock().expect("queue lock");
        let mut out = Vec::new();
        let mut spans = 0;
        while let Some(front) = held.items.front() {
            if !out.is_empty() && spans + front.spans > max_spans {
                break;
            }
            spans += front.spans;
            out.push(held.items.pop_front().expect("front exists"));
        }
        held.spans -= spans;
        out
    }

    fn release(&self, bytes: usize) {
        let mut held = self.inner.lock().expect("queue lock");
        held.bytes = held.bytes.saturating_sub(bytes);
        self.metrics.queue_bytes.set(held.bytes as i64);
    }
}

/// What the receivers share.
struct Receiver {
    queue: Arc<Queue>,
    ratio: f64,
    attributes: Vec<KeyValue>,
    metrics: AgentMetrics,
    /// Spans dropped for a full queue since the last warning, and when it was.
    unreported: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
}

impl Receiver {
    fn accept(&self, mut req: ExportTraceServiceRequest) -> ExportTraceServiceResponse {
        let mut spans = 0usize;
        let mut sampled_out = 0usize;
        for rs in &mut req.resource_spans {
            for ss in &mut rs.scope_spans {
                let before = ss.spans.len();
                spans += before;
                if self.ratio < 1.0 {
                    ss.spans.retain(|s| keeps(&s.trace_id, self.ratio));
                    sampled_out += before - ss.spans.len();
                }
            }
            rs.scope_spans.retain(|ss| !ss.spans.is_empty());
            let resource = rs.resource.get_or_insert_with(Resource::default);
            for kv in &self.attributes {
                if !resource.attributes.iter().any(|a| a.key == kv.key) {
                    resource.attributes.push(kv.clone());
                }
            }
        }
        req.resource_spans.retain(|rs| !rs.scope_spans.is_empty());
        self.metrics.received.inc_by(spans as u64);
        if sampled_out > 0 {
            self.metrics.drop("sampled", sampled_out);
        }
        let kept = spans - sampled_out;
        if kept == 0 {
            return ExportTraceServiceResponse::default();
        }
        let encoded = Bytes::from(req.encode_to_vec());
        let item = Item {
            bytes: encoded.len(),
            encoded,
            spans: kept,
        };
        match self.queue.push(item) {
            Ok(()) => ExportTraceServiceResponse::default(),
            Err(item) => {
                self.metrics.drop("queue_full", item.spans);
                self.warn_dropped(item.spans);
                ExportTraceServiceResponse {
                    partial_success: Some(ExportTracePartialSuccess {
                        rejected_spans: item.spans as i64,
                        error_message: format!(
                            "the Loupe agent's queue is full ({} MiB held while the upstream is slow or away): spans dropped",
                            self.queue.max_bytes >> 20
                        ),
                    }),
                }
            }
        }
    }

    /// Logs drops at most every 10 s, with the count since the last line.
    fn warn_dropped(&self, spans: usize) {
        self.unreported.fetch_add(spans as u64, Ordering::Relaxed);
        let mut last = self.last_warning.lock().expect("warning lock");
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
            return;
        }
        *last = Some(Instant::now());
        let n = self.unreported.swap(0, Ordering::Relaxed);
        tracing::warn!(
            spans = n,
            max_queue_bytes = self.queue.max_bytes,
            "queue full: spans dropped (the upstream is slow or away)"
        );
    }
}

#[derive(Clone)]
struct GrpcService(Arc<Receiver>);

#[tonic::async_trait]
impl TraceService for GrpcService {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.0.accept(request.into_inner())))
    }
}

/// `POST /v1/traces`: protobuf or JSON, optionally gzip, bounded.
async fn http_export(
    State((receiver, limit)): State<(Arc<Receiver>, usize)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let json = match ct.as_str() {
        "application/x-protobuf" | "application/protobuf" => false,
        "application/json" => true,
        other => {
            return (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("unsupported content-type {other:?}: send application/x-protobuf or application/json"),
            )
                .into_response();
        }
    };
    let raw = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request is over the agent's limit of {limit} bytes"),
            )
                .into_response();
        }
    };
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
    let bytes = if gzip {
        use std::io::Read;
        let mut out = Vec::new();
        let mut decoder = flate2::read::GzDecoder::new(&raw[..]).take(limit as u64 + 1);
        if decoder.read_to_end(&mut out).is_err() {
            return (
                StatusCode::BAD_REQUEST,
                "the gzip body cannot be decompressed",
            )
                .into_response();
        }
        if out.len() > limit {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request is over the agent's limit of {limit} bytes"),
            )
                .into_response();
        }
        Bytes::from(out)
    } else {
        raw
    };
    let request: Result<ExportTraceServiceRequest, String> = if json {
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    } else {
        ExportTraceServiceRequest::decode(bytes).map_err(|e| e.to_string())
    };
    let request = match request {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("the body is not an OTLP trace export: {e}"),
            )
                .into_response();
        }
    };
    let response = receiver.accept(request);
    if json {
        (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_vec(&response).expect("a response serializes"),
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            response.encode_to_vec(),
        )
            .into_response()
    }
}

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Sends an already encoded export request; decodes the response with prost.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct RawEncoder;
struct ResponseDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for ResponseDecoder {
    type Item = ExportTraceServiceResponse;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<ExportTraceServiceResponse>, tonic::Status> {
        ExportTraceServiceResponse::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("the upstream's response: {e}")))
    }
}

/// Why an export failed.
enum Failure {
    /// Worth retrying, after `after` when the upstream said.
    Retry {
        after: Option<Duration>,
        why: String,
    },
    /// Refused for good (bad key, invalid data).
    Refused(String),
}

#[derive(Clone)]
enum Upstream {
    Grpc {
        client: tonic::client::Grpc<tonic::transport::Channel>,
        key: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    },
    Http {
        client: reqwest::Client,
        url: String,
        key: Option<String>,
    },
}

impl Upstream {
    fn new(endpoint: &str, protocol: Protocol, key: Option<String>) -> anyhow::Result<Upstream> {
        Ok(match protocol {
            Protocol::Grpc => {
                // Connects on first use and reconnects by itself: the agent starts
                // (and buffers) while the upstream is away.
                let channel = tonic::transport::Channel::from_shared(endpoint.to_owned())
                    .with_context(|| format!("invalid upstream {endpoint:?}"))?
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(Duration::from_secs(30))
                    .connect_lazy();
                Upstream::Grpc {
                    client: tonic::client::Grpc::new(channel)
                        .send_compressed(CompressionEncoding::Gzip)
                        .accept_compressed(CompressionEncoding::Gzip),
                    key: key
                        .map(|k| format!("Bearer {k}").parse())
                        .transpose()
                        .context("the ingest key is not a valid header value")?,
                }
            }
            Protocol::Http => {
                let base = endpoint.trim_end_matches('/');
                Upstream::Http {
                    client: reqwest::Client::builder()
                        .timeout(Duration::from_secs(30))
                        .build()?,
                    url: if base.ends_with("/v1/traces") {
                        base.to_owned()
                    } else {
                        format!("{base}/v1/traces")
                    },
                    key,
                }
            }
        })
    }

    /// Sends one request; `Ok` holds the spans the upstream rejected in a partial
    /// success.
    async fn send(&mut self, request: &Bytes) -> Result<i64, Failure> {
        match self {
            Upstream::Grpc { client, key } => {
                let mut r = tonic::Request::new(request.clone());
                if let Some(k) = key {
                    r.metadata_mut().insert("authorization", k.clone());
                }
                if let Err(e) = client.ready().await {
                    return Err(Failure::Retry {
                        after: None,
                        why: format!("cannot connect: {e}"),
                    });
                }
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(EXPORT_PATH);
                let sent: Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> =
                    client.unary(r, path, RawCodec).await;
                match sent {
                    Ok(resp) => Ok(resp
                        .into_inner()
                        .partial_success
                        .map_or(0, |p| p.rejected_spans)),
                    Err(status) => {
                        use tonic::Code;
                        let pushback = status
                            .metadata()
                            .get("grpc-retry-pushback-ms")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok())
                            .map(Duration::from_millis);
                        let why = format!("{:?}: {}", status.code(), status.message());
                        match status.code() {
                            Code::Unavailable
                            | Code::Cancelled
                            | Code::DeadlineExceeded
                            | Code::Aborted
                            | Code::OutOfRange
                            | Code::DataLoss => Err(Failure::Retry {
                                after: pushback,
                                why,
                            }),
                            // Retryable only when the server says when (a rate limit,
                            // not a request too large).
                            Code::ResourceExhausted if pushback.is_some() => Err(Failure::Retry {
                                after: pushback,
                                why,
                            }),
                            _ => Err(Failure::Refused(why)),
                        }
                    }
                }
            }
            Upstream::Http { client, url, key } => {
                let mut post = client
                    .post(url.as_str())
                    .header("content-type", "application/x-protobuf")
                    .body(request.clone());
                if let Some(k) = key {
                    post = post.bearer_auth(k);
                }
                let response = post.send().await.map_err(|e| Failure::Retry {
                    after: None,
                    why: if e.is_timeout() {
                        "timed out".into()
                    } else {
                        "cannot connect".into()
                    },
                })?;
                let status = response.status();
                if status.is_success() {
                    let body = response.bytes().await.unwrap_or_default();
                    return Ok(ExportTraceServiceResponse::decode(body)
                        .ok()
                        .and_then(|r| r.partial_success)
                        .map_or(0, |p| p.rejected_spans));
                }
                let after = response
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let why = format!("HTTP {status}");
                match status.as_u16() {
                    429 | 502 | 503 | 504 => Err(Failure::Retry { after, why }),
                    _ => Err(Failure::Refused(why)),
                }
            }
        }
    }
}

/// How the forwarder sends.
struct Forwarding {
    batch_spans: usize,
    batch_timeout: Duration,
    shutdown_timeout: Duration,
    /// Batches sent at once (each retried on its own).
    max_in_flight: usize,
}

/// Forwards batches until `stop` and the queue is empty (or `shutdown_timeout`
/// passed since `stop`), with up to `max_in_flight` batches on their way.
async fn forward(
    queue: Arc<Queue>,
    upstream: Upstream,
    settings: Forwarding,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let Forwarding {
        batch_spans,
        batch_timeout,
        shutdown_timeout,
        max_in_flight,
    } = settings;
    let slots = Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1)));
    let mut in_flight = tokio::task::JoinSet::new();
    let deadline = Arc::new(Deadline {
        at: std::sync::OnceLock::new(),
        after: shutdown_timeout,
    });
    loop {
        let stopping = deadline.of(&stop).is_some();
        // Finished sends are collected as they end (their panics are bugs: surface them).
        while let Some(done) = in_flight.try_join_next() {
            if let Err(e) = done {
                tracing::error!(error = %e, "a forwarding task failed");
            }
        }
        let waiting = queue.spans_waiting();
        if waiting == 0 {
            if stopping {
                // What is on its way gets its chance until the shutdown deadline.
                while in_flight.join_next().await.is_some() {}
                return;
            }
            tokio::select! {
                _ = queue.ready.notified() => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        // Give a partial batch a moment to fill.
        if waiting < batch_spans && !stopping {
            let fill = tokio::time::sleep(batch_timeout);
            tokio::pin!(fill);
            loop {
                tokio::select! {
                    _ = &mut fill => break,
                    _ = queue.ready.notified() => {
                        if queue.spans_waiting() >= batch_spans { break; }
                    }
                    _ = stop.changed() => break,
                }
            }
        }
        // A free slot first: while every slot retries, spans wait in the (bounded)
        // queue rather than in memory outside it.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let items = queue.take(batch_spans);
        let spans: usize = items.iter().map(|i| i.spans).sum();
        let bytes: usize = items.iter().map(|i| i.bytes).sum();
        // Concatenated export requests are one request holding all their resource
        // spans (a repeated protobuf field): no decoding, no re-encoding.
        let mut request = bytes::BytesMut::with_capacity(bytes);
        for i in &items {
            request.extend_from_slice(&i.encoded);
        }
        drop(items);
        let (queue, upstream, stop) = (queue.clone(), upstream.clone(), stop.clone());
        let deadline = deadline.clone();
        in_flight.spawn(async move {
            deliver(&queue, upstream, request.freeze(), spans, &deadline, stop).await;
            queue.release(bytes);
            drop(slot);
        });
    }
}

/// The end of a shutdown: `after` from when a forwarder first saw the stop signal,
/// the same for every batch.
struct Deadline {
    at: std::sync::OnceLock<tokio::time::Instant>,
    after: Duration,
}

impl Deadline {
    fn of(&self, stop: &tokio::sync::watch::Receiver<bool>) -> Option<tokio::time::Instant> {
        if let Some(at) = self.at.get() {
            return Some(*at);
        }
        (*stop.borrow()).then(|| {
            *self
                .at
                .get_or_init(|| tokio::time::Instant::now() + self.after)
        })
    }
}

/// Sends one batch, retrying with backoff and jitter (or the upstream's Retry-After)
/// until it is taken or refused, or the shutdown deadline passes.
async fn deliver(
    queue: &Queue,
    mut upstream: Upstream,
    request: Bytes,
    spans: usize,
    deadline: &Deadline,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let metrics = &queue.metrics;
    let mut backoff = Duration::from_millis(100);
    loop {
        // Once stopping, even a hanging request ends at the deadline.
        let sent = match deadline.of(&stop) {
            Some(d) => tokio::time::timeout_at(d, upstream.send(&request))
                .await
                .unwrap_or_else(|_| {
                    Err(Failure::Retry {
                        after: None,
                        why: "the upstream did not answer before the shutdown deadline".into(),
                    })
                }),
            None => upstream.send(&request).await,
        };
        match sent {
            Ok(rejected) => {
                let rejected = rejected.clamp(0, spans as i64) as usize;
                metrics.sent.inc_by((spans - rejected) as u64);
                if rejected > 0 {
                    metrics.drop("refused", rejected);
                    tracing::warn!(spans = rejected, "the upstream rejected part of a batch");
                }
                return;
            }
            Err(Failure::Refused(why)) => {
                metrics.drop("refused", spans);
                tracing::error!(spans, reason = %why, "the upstream refused a batch; dropped");
                return;
            }
            Err(Failure::Retry { after, why }) => {
                let deadline = deadline.of(&stop);
                if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    metrics.drop("shutdown", spans);
                    tracing::error!(spans, reason = %why, "stopping with spans the upstream did not take; dropped");
                    return;
                }
                metrics.retries.inc();
                let jitter = backoff.mul_f64(rand::random::<f64>() * 0.5);
                let wait = after.unwrap_or(backoff + jitter);
                tracing::debug!(reason = %why, wait = ?wait, "export failed; retrying");
                let sleep = tokio::time::sleep(wait);
                match deadline {
                    Some(d) => {
                        let _ = tokio::time::timeout_at(d, sleep).await;
                    }
                    None => sleep.await,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

fn loopback(addr: SocketAddr, flag: &str) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        bail!(
            "{flag} {addr}: the agent listens on loopback only (127.0.0.1 or ::1): it serves the applications of its own pod"
        );
    }
    Ok(())
}

/// `--probe`: the agent's `/health` on `addr` answers 200.
async fn probe(addr: SocketAddr) -> anyhow::Result<()> {
    let url = format!("http://{addr}/health");
    let answer = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("no agent answers at {url}"))?;
    if !answer.status().is_success() {
        bail!("{url} answered {}", answer.status());
    }
    Ok(())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.probe {
        return probe(args.metrics_addr).await;
    }
    let Some(upstream_url) = args.upstream.clone() else {
        bail!("--upstream is required");
    };
    let started = Instant::now();
    loopback(args.grpc_addr, "--grpc-addr")?;
    loopback(args.http_addr, "--http-addr")?;
    loopback(args.metrics_addr, "--metrics-addr")?;
    if !(0.0..=1.0).contains(&args.sampling_ratio) {
        bail!(
            "--sampling-ratio {}: must be between 0 and 1",
            args.sampling_ratio
        );
    }
    if args.batch_spans == 0 {
        bail!("--batch-spans must be at least 1");
    }
    if args.max_in_flight == 0 {
        bail!("--max-in-flight must be at least 1");
    }
    let mut attributes = Vec::new();
    for a in args
        .resource_attributes
        .iter()
        .filter(|a| !a.trim().is_empty())
    {
        let (k, v) = a
            .split_once('=')
            .with_context(|| format!("--resource-attribute {a:?} is not key=value"))?;
        attributes.push(KeyValue {
            key: k.trim().to_owned(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.trim().to_owned())),
            }),
            ..Default::default()
        });
    }
    let upstream = Upstream::new(&upstream_url, args.upstream_protocol, args.key.clone())?;

    let mut registry = Registry::default();
    let metrics = AgentMetrics::register(&mut registry);
    let queue = Arc::new(Queue::new(args.max_queue_bytes, metrics.clone()));
    let receiver = Arc::new(Receiver {
        queue: queue.clone(),
        ratio: args.sampling_ratio,
        attributes,
        metrics,
        unreported: AtomicU64::new(0),
        last_warning: Mutex::new(None),
    });

    let grpc = axum::Router::new().route_service(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        TraceServiceServer::new(GrpcService(receiver.clone()))
            .accept_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(args.max_request_bytes),
    );
    let http = axum::Router::new()
        .route("/v1/traces", axum::routing::post(http_export))
        .with_state((receiver, args.max_request_bytes));
    let ops = crate::server::ops_router(registry);

    let (grpc_listener, grpc_local) = bind(args.grpc_addr, "OTLP/gRPC").await?;
    let (http_listener, http_local) = bind(args.http_addr, "OTLP/HTTP").await?;
    let (ops_listener, ops_local) = bind(args.metrics_addr, "metrics").await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let servers = [
        serve(grpc_listener, grpc, &stop_rx),
        serve(http_listener, http, &stop_rx),
    ];
    let ops_server = serve(ops_listener, ops, &stop_rx);
    let forwarder = tokio::spawn(forward(
        queue,
        upstream,
        Forwarding {
            batch_spans: args.batch_spans,
            batch_timeout: args.batch_timeout,
            shutdown_timeout: args.shutdown_timeout,
            max_in_flight: args.max_in_flight,
        },
        stop_rx.clone(),
    ));
    say(&format!(
        "loupe agent is running (started in {} ms)\n  otlp-grpc  {grpc_local}\n  otlp-http  http://{http_local}/v1/traces\n  metrics    http://{ops_local}/metrics\n  upstream   {} ({:?}, sampling ratio {})",
        started.elapsed().as_millis(),
        upstream_url,
        args.upstream_protocol,
        args.sampling_ratio
    ));
    shutdown_signal().await;
    tracing::info!("stopping: no new spans; forwarding what is held");
    let _ = stop_tx.send(true);
    crate::server::drain(servers).await;
    let _ = forwarder.await;
    ops_server.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_bounds() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("2000000"), Ok(2_000_000));
        assert!(
            parse_bytes("12")
                .unwrap_err()
                .contains("between 1KiB and 16GiB")
        );
        assert!(parse_bytes("lots").is_err());
    }

    #[test]
    fn sampling_is_a_pure_function_of_the_trace_id() {
        let ids: Vec<[u8; 16]> = (0..20_000u32)
            .map(|i| {
                let mut id = [0u8; 16];
                // Spread like random ids: a simple hash of i in the low bytes.
                let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                id[8..].copy_from_slice(&h.to_be_bytes());
                id
            })
            .collect();
        let kept = ids.iter().filter(|id| keeps(&id[..], 0.25)).count();
        assert!((4_500..5_500).contains(&kept), "{kept}");
        assert!(ids.iter().all(|id| keeps(&id[..], 1.0)));
        assert!(!ids.iter().any(|id| keeps(&id[..], 0.0)));
        // Lower ratios keep subsets of what higher ones keep.
        assert!(
            ids.iter()
                .filter(|id| keeps(&id[..], 0.1))
                .all(|id| keeps(&id[..], 0.5))
        );
        assert!(!keeps(&[1, 2, 3], 0.5), "malformed ids are not kept");
    }

    fn item(spans: usize, bytes: usize) -> Item {
        Item {
            encoded: Bytes::new(),
            spans,
            bytes,
        }
    }

    #[test]
    fn the_queue_holds_at_most_its_bytes_in_flight_included() {
        let q = Queue::new(100, AgentMetrics::default());
        assert!(q.push(item(10, 60)).is_ok());
        assert!(q.push(item(5, 50)).is_err(), "110 > 100");
        assert!(q.push(item(5, 40)).is_ok());
        let batch = q.take(12);
        assert_eq!(batch.len(), 1, "the second item would pass 12 spans");
        // Taken but not released: still counted.
        assert!(q.push(item(1, 10)).is_err());
        q.release(60);
        assert!(q.push(item(1, 10)).is_ok());
        assert_eq!(q.spans_waiting(), 6);
    }
}
