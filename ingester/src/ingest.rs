//! The receive path shared by OTLP/gRPC and OTLP/HTTP: authenticate, validate,
//! normalize, price, and hand the spans to a durable [`SpanSink`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use loupe_core::TenantId;
use std::num::NonZeroU32;

use loupe_core::config::{DataPlaneConfig, Limits, RateLimits};
use loupe_core::keys::{AccessControl, AuthError, Scope};
use loupe_core::normalize::{NormalizeOptions, Normalized, normalize_request};
use loupe_core::pricing::{PriceBook, PriceOutcome};
use loupe_core::redact::{RedactionConfig, Redactor, project_hash_key};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;

use crate::metrics::{IngestMetrics, ProtocolLabels, RedactionLabels, RejectLabels};
use crate::sink::{SinkError, SpanSink};
use crate::usage::UsageSummary;

/// How long clients are asked to wait before retrying when the queue is busy.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Requests larger than this are decoded and normalized on a blocking thread, so a
/// 16 MiB export never stalls the async workers serving other requests.
const INLINE_BYTES: usize = 256 * 1024;

/// An export request as received: encoded OTLP.
#[derive(Clone, Debug)]
pub enum Payload {
    /// `ExportTraceServiceRequest` protobuf (gRPC, or HTTP `application/x-protobuf`).
    Protobuf(bytes::Bytes),
    /// OTLP JSON (HTTP `application/json`).
    Json(bytes::Bytes),
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::Protobuf(b) | Payload::Json(b) => b.len(),
        }
    }

    fn decode(&self) -> Result<ExportTraceServiceRequest, IngestError> {
        match self {
            Payload::Protobuf(b) => ExportTraceServiceRequest::decode(b.as_ref()).map_err(|e| {
                IngestError::InvalidArgument(format!(
                    "request is not a valid OTLP protobuf ExportTraceServiceRequest: {e}"
                ))
            }),
            Payload::Json(b) => serde_json::from_slice(b).map_err(|e| {
                IngestError::InvalidArgument(format!("request is not valid OTLP JSON: {e}"))
            }),
        }
    }
}

/// Why an export request was refused whole. Converted to gRPC / HTTP status codes
/// only at the edge ([`crate::grpc`], [`crate::http`]).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("request of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// Details are logged, never sent to the client.
    #[error("internal error")]
    Internal(String),
    #[error("the project's {what} rate limit is exceeded; retry in {retry_after:?}")]
    RateLimited { what: String, retry_after: Duration },
}

impl IngestError {
    fn reason(&self) -> &'static str {
        match self {
            IngestError::InvalidArgument(_) => "invalid",
            IngestError::TooLarge { .. } => "too_large",
            IngestError::Unavailable(_) => "unavailable",
            IngestError::Unauthenticated(_) => "unauthenticated",
            IngestError::PermissionDenied(_) => "permission_denied",
            IngestError::Internal(_) => "internal",
            IngestError::RateLimited { .. } => "rate_limited",
        }
    }
}

#[derive(Clone)]
struct TenantRuntime {
    pricing: Arc<PriceBook>,
    normalize: NormalizeOptions,
    limiter: Option<Arc<TenantLimiter>>,
    /// `None` when the project turned redaction off.
    redactor: Option<Arc<Redactor>>,
}

type Limiter = governor::RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    governor::clock::DefaultClock,
>;

/// A project's ingest rates (GCRA token buckets, `governor`). Kept across config
/// reloads while the project's limits stay the same.
struct TenantLimiter {
    config: RateLimits,
    clock: governor::clock::DefaultClock,
    spans: Option<Limiter>,
    bytes: Option<Limiter>,
}

impl TenantLimiter {
    fn new(config: &RateLimits, max_request_bytes: usize) -> TenantLimiter {
        let clock = governor::clock::DefaultClock::default();
        // A burst of one second's worth, and room for one request of the largest size.
        let limiter = |rate: Option<u32>, min_burst: u32| {
            let rate = NonZeroU32::new(rate?)?;
            let burst = NonZeroU32::new(rate.get().max(min_burst)).unwrap_or(rate);
            Some(Limiter::direct_with_clock(
                governor::Quota::per_second(rate).allow_burst(burst),
                clock.clone(),
            ))
        };
        TenantLimiter {
            config: config.clone(),
            spans: limiter(config.spans_per_second, 1),
            bytes: limiter(
                config.bytes_per_second,
                u32::try_from(max_request_bytes).unwrap_or(u32::MAX),
            ),
            clock,
        }
    }

    /// Takes `n` units from a bucket, or says how long to wait.
    fn take(&self, limiter: &Option<Limiter>, n: usize, what: &str) -> Result<(), IngestError> {
        use governor::clock::Clock as _;
        let Some(limiter) = limiter else {
            return Ok(());
        };
        let Some(n) = u32::try_from(n).ok().and_then(NonZeroU32::new) else {
            return Ok(());
        };
        match limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(IngestError::RateLimited {
                what: what.to_owned(),
                retry_after: not_until.wait_time_from(self.clock.now()),
            }),
            Err(_) => Err(IngestError::RateLimited {
                what: format!("{what} (this request alone exceeds the burst: split it)"),
                retry_after: Duration::from_secs(1),
            }),
        }
    }
}

/// A decoded, redacted, normalized and priced request.
struct Prepared {
    normalized: Normalized,
    unpriced: u64,
    /// Replacements per redaction rule (indexed like [`Redactor::rule_names`]).
    redactions: Vec<u64>,
}

impl TenantRuntime {
    fn prepare(&self, payload: &Payload) -> Result<Prepared, IngestError> {
        let mut request = payload.decode()?;
        // Before anything else sees the request: no log, queue record or block may
        // ever hold an original value.
        let mut redactions = Vec::new();
        if let Some(r) = &self.redactor {
            redactions = vec![0; r.rule_names().len()];
            r.redact_request(&mut request, &mut redactions);
        }
        let mut normalized = normalize_request(&request, &self.normalize);
        drop(request);
        let mut unpriced = 0;
        for span in &mut normalized.spans {
            if self.pricing.apply(span) == PriceOutcome::Unpriced {
                unpriced += 1;
            }
        }
        Ok(Prepared {
            normalized,
            unpriced,
            redactions,
        })
    }
}

/// What the receive pipeline takes from the config; replaced whole on reload.
struct IngestState {
    limits: Limits,
    /// Models with their own usage series per project; `None` while usage metrics are off.
    usage_max_models: Option<usize>,
    tenants: HashMap<TenantId, TenantRuntime>,
    default_tenant: TenantRuntime,
}

impl IngestState {
    /// The state of a config; limiters of projects whose limits did not change are
    /// taken over from `previous`, so a reload does not refill their buckets.
    fn new(
        config: &DataPlaneConfig,
        previous: Option<&IngestState>,
        redaction_key: Option<&[u8]>,
    ) -> Result<IngestState, loupe_core::Error> {
        let redactor = |tenant: &TenantId, redaction: &RedactionConfig, field: String| {
            let key = redaction_key.map(|k| project_hash_key(k, tenant));
            Redactor::new(redaction, key)
                .map(|r| r.map(Arc::new))
                .map_err(|e| match e {
                    loupe_core::Error::InvalidConfig { field: f, reason } => {
                        loupe_core::Error::InvalidConfig {
                            field: format!("{field}.{}", f.trim_start_matches("redaction.")),
                            reason,
                        }
                    }
                    other => other,
                })
        };
        let normalize = |env: Option<&str>| NormalizeOptions {
            max_attribute_bytes: config.limits.max_attribute_bytes,
            max_io_bytes: config.limits.max_io_bytes,
            default_environment: env.map(str::to_owned),
        };
        let mut tenants = HashMap::new();
        for (i, t) in config.tenants.iter().enumerate() {
            let pricing = if t.pricing.is_empty() {
                PriceBook::builtin()
            } else {
                Arc::new(PriceBook::with_overrides(t.pricing.clone())?)
            };
            let limiter = t.rate_limits.as_ref().map(|limits| {
                previous
                    .and_then(|p| p.tenants.get(&t.id))
                    .and_then(|rt| rt.limiter.clone())
                    .filter(|l| &l.config == limits)
                    .unwrap_or_else(|| {
                        Arc::new(TenantLimiter::new(limits, config.limits.max_request_bytes))
                    })
            });
            tenants.insert(
                t.id.clone(),
                TenantRuntime {
                    pricing,
                    normalize: normalize(Some(t.environment.as_str())),
                    limiter,
                    redactor: redactor(&t.id, &t.redaction, format!("tenants[{i}].redaction"))?,
                },
            );
        }
        Ok(IngestState {
            limits: config.limits.clone(),
            usage_max_models: config
                .usage_metrics
                .enabled
                .then_some(config.usage_metrics.max_models_per_tenant),
            tenants,
            default_tenant: TenantRuntime {
                pricing: PriceBook::builtin(),
                normalize: normalize(None),
                limiter: None,
                // The open project (no config entry) gets the default rules.
                redactor: redactor(
                    &TenantId::default_tenant(),
                    &RedactionConfig::default(),
                    "redaction".into(),
                )?,
            },
        })
    }
}

/// The receive pipeline.
pub struct Ingest {
    sink: Arc<dyn SpanSink>,
    access: Arc<AccessControl>,
    state: RwLock<Arc<IngestState>>,
    metrics: Arc<IngestMetrics>,
    /// The master key of `hash` redaction actions (`LOUPE_REDACTION_KEY`).
    redaction_key: Option<Arc<[u8]>>,
}

impl Ingest {
    /// `redaction_key` is the master key from which each project's key for `hash`
    /// redaction actions derives; a config using `hash` without one is refused.
    pub fn new(
        sink: Arc<dyn SpanSink>,
        config: &DataPlaneConfig,
        access: Arc<AccessControl>,
        metrics: Arc<IngestMetrics>,
        redaction_key: Option<Vec<u8>>,
    ) -> Result<Ingest, loupe_core::Error> {
        let redaction_key: Option<Arc<[u8]>> = redaction_key.map(Into::into);
        Ok(Ingest {
            sink,
            access,
            state: RwLock::new(Arc::new(IngestState::new(
                config,
                None,
                redaction_key.as_deref(),
            )?)),
            metrics,
            redaction_key,
        })
    }

    /// Takes the limits, environments and prices of a new (validated) config. Keys
    /// are reloaded by whoever owns the [`AccessControl`].
    pub fn reload(&self, config: &DataPlaneConfig) -> Result<(), loupe_core::Error> {
        let mut slot = self.state.write().expect("ingest state lock");
        *slot = Arc::new(IngestState::new(
            config,
            Some(&slot),
            self.redaction_key.as_deref(),
        )?);
        Ok(())
    }

    fn state(&self) -> Arc<IngestState> {
        self.state.read().expect("ingest state lock").clone()
    }

    pub fn limits(&self) -> Limits {
        self.state().limits.clone()
    }

    pub fn metrics(&self) -> &IngestMetrics {
        &self.metrics
    }

    /// Finds the tenant a request belongs to from its ingest key (`Authorization:
    /// Bearer` or `x-loupe-key`).
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<TenantId, IngestError> {
        self.access
            .authorize(headers, Scope::Ingest)
            .map_err(|e| match e {
                AuthError::WrongScope { .. } => IngestError::PermissionDenied(e.to_string()),
                _ => IngestError::Unauthenticated(e.to_string()),
            })
    }

    /// Records a request refused before it reached [`Ingest::export`].
    pub fn record_refusal(&self, protocol: &'static str, err: &IngestError) {
        self.metrics
            .requests_rejected
            .get_or_create(&RejectLabels {
                protocol,
                reason: err.reason(),
            })
            .inc();
    }

    /// Accepts an export request for `tenant`. Returns once every valid span is
    /// durable; invalid spans are reported through OTLP partial success.
    pub async fn export(
        &self,
        tenant: &TenantId,
        protocol: &'static str,
        payload: Payload,
    ) -> Result<ExportTraceServiceResponse, IngestError> {
        let started = Instant::now();
        let labels = ProtocolLabels { protocol };
        self.metrics.requests.get_or_create(&labels).inc();
        self.metrics
            .request_bytes
            .get_or_create(&labels)
            .inc_by(payload.len() as u64);
        let result = self.export_inner(tenant, protocol, payload).await;
        match &result {
            Ok(_) => {
                self.metrics
                    .export_seconds
                    .get_or_create(&labels)
                    .observe(started.elapsed().as_secs_f64());
            }
            Err(e) => {
                if let IngestError::Internal(detail) = e {
                    tracing::error!(%tenant, error = %detail, "export failed");
                }
                self.record_refusal(protocol, e);
            }
        }
        result
    }

    async fn export_inner(
        &self,
        tenant: &TenantId,
        protocol: &'static str,
        payload: Payload,
    ) -> Result<ExportTraceServiceResponse, IngestError> {
        let state = self.state();
        let rt = state.tenants.get(tenant).unwrap_or(&state.default_tenant);
        if let Some(l) = &rt.limiter {
            l.take(&l.bytes, payload.len(), "bytes per second")?;
        }
        let Prepared {
            normalized,
            unpriced,
            redactions,
        } = if payload.len() <= INLINE_BYTES {
            rt.prepare(&payload)?
        } else {
            let rt = rt.clone();
            tokio::task::spawn_blocking(move || rt.prepare(&payload))
                .await
                .map_err(|e| IngestError::Internal(format!("normalization task failed: {e}")))??
        };
        let m = &self.metrics;
        if let Some(r) = &rt.redactor {
            for (rule, &n) in r.rule_names().iter().zip(&redactions) {
                if n > 0 {
                    m.redactions
                        .get_or_create(&RedactionLabels {
                            tenant: tenant.to_string(),
                            rule: rule.clone(),
                        })
                        .inc_by(n);
                }
            }
        }
        if normalized.truncated_values > 0 {
            m.values_truncated.inc_by(normalized.truncated_values);
        }
        let rejected = normalized.rejected.len();
        if rejected > 0 {
            m.spans_rejected
                .get_or_create(&RejectLabels {
                    protocol,
                    reason: "invalid",
                })
                .inc_by(rejected as u64);
        }
        let message = describe_rejections(&normalized.rejected);
        if normalized.spans.is_empty() && rejected > 0 {
            return Err(IngestError::InvalidArgument(message));
        }
        if let Some(l) = &rt.limiter {
            l.take(&l.spans, normalized.spans.len(), "spans per second")?;
        }
        if unpriced > 0 {
            m.spans_unpriced.inc_by(unpriced);
        }
        let accepted = normalized.spans.len();
        let usage = state
            .usage_max_models
            .map(|max| (max, UsageSummary::of(&normalized.spans)));
        self.sink
            .append(tenant, normalized.spans, Vec::new())
            .await
            .map_err(|e| match e {
                SinkError::Unavailable(msg) => IngestError::Unavailable(msg),
                SinkError::Internal(msg) => IngestError::Internal(msg),
            })?;
        m.spans_accepted
            .get_or_create(&ProtocolLabels { protocol })
            .inc_by(accepted as u64);
        if let Some((max_models, usage)) = usage.filter(|(_, u)| !u.is_empty()) {
            m.usage.record(tenant, &usage, max_models);
        }
        Ok(ExportTraceServiceResponse {
            partial_success: (rejected > 0).then_some(ExportTracePartialSuccess {
                rejected_spans: rejected as i64,
                error_message: message,
            }),
        })
    }
}

impl Ingest {
    /// Accepts a JSON body of scores for `tenant` (see [`loupe_core::score::parse_scores`]);
    /// returns their ids once they are durable. Any invalid score refuses the request.
    pub async fn submit_scores(
        &self,
        tenant: &TenantId,
        body: &[u8],
    ) -> Result<Vec<String>, IngestError> {
        let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
        let result = async {
            let scores = loupe_core::score::parse_scores(
                body,
                || loupe_core::ids::to_hex(&rand::random::<[u8; 16]>()),
                now,
            )
            .map_err(IngestError::InvalidArgument)?;
            let ids: Vec<String> = scores.iter().map(|s| s.score_id.clone()).collect();
            self.sink
                .append(tenant, Vec::new(), scores)
                .await
                .map_err(|e| match e {
                    SinkError::Unavailable(msg) => IngestError::Unavailable(msg),
                    SinkError::Internal(msg) => IngestError::Internal(msg),
                })?;
            Ok(ids)
        }
        .await;
        match &result {
            Ok(ids) => {
                self.metrics.scores_accepted.inc_by(ids.len() as u64);
            }
            Err(e) => {
                if let IngestError::Internal(detail) = e {
                    tracing::error!(%tenant, error = %detail, "storing scores failed");
                }
                self.record_refusal("scores", e);
            }
        }
        result
    }
}

/// One line naming the first few rejected spans by their index in the request.
fn describe_rejections(rejected: &[loupe_core::normalize::Rejection]) -> String {
    const SHOWN: usize = 5;
    let mut parts: Vec<String> = rejected
        .iter()
        .take(SHOWN)
        .map(|r| format!("{}: {}", r.path, r.reason))
        .collect();
    if rejected.len() > SHOWN {
        parts.push(format!("and {} more", rejected.len() - SHOWN));
    }
    parts.join("; ")
}
