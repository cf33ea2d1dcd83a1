//! The HTTP JSON API under `/api/v1`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use loupe_core::keys::{AccessControl, AuthError, Scope};
use loupe_core::{LlmKind, TenantId};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::engine::{QueryEngine, QueryError, SearchQuery, StatusFilter};

/// Default and largest number of traces a search returns.
pub const DEFAULT_LIMIT: usize = 20;
pub const MAX_LIMIT: usize = 1000;
/// Default search window when no time is given.
pub const DEFAULT_LOOKBACK: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
    outcome: &'static str,
}

/// Metrics of the query API.
pub struct QueryMetrics {
    seconds: Family<EndpointLabels, Histogram>,
}

impl QueryMetrics {
    pub fn new(registry: &mut Registry) -> QueryMetrics {
        let seconds = Family::<EndpointLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 15))
        });
        registry.sub_registry_with_prefix("loupe").register(
            "query_seconds",
            "Query API latency by endpoint and outcome",
            seconds.clone(),
        );
        QueryMetrics { seconds }
    }
}

struct ApiState {
    engine: Arc<QueryEngine>,
    auth: Arc<AccessControl>,
    metrics: QueryMetrics,
    alerts: Option<crate::alert_runner::SharedStates>,
    scores: Option<Arc<dyn ScoreWriter>>,
}

/// Writes scores sent to the query API (a person annotating a trace in the web UI)
/// through the process's durable write path.
pub trait ScoreWriter: Send + Sync {
    /// Writes the scores of `body` (as `POST /api/v1/scores` takes them) for `tenant`;
    /// their ids, or the HTTP status and message of the refusal.
    fn write<'a>(
        &'a self,
        tenant: &'a TenantId,
        body: &'a [u8],
    ) -> futures::future::BoxFuture<'a, Result<Vec<String>, (StatusCode, String)>>;
}

/// What a process adds to the query API besides queries.
#[derive(Default)]
pub struct Extras {
    /// The states of the alert rules this process evaluates (served at
    /// `/api/v1/alerts`, each project seeing its own).
    pub alerts: Option<crate::alert_runner::SharedStates>,
    /// Where `POST /api/v1/scores` with a query key writes (`loupe standalone`'s
    /// write-ahead log, or Kafka for `loupe querier --kafka-brokers`).
    pub scores: Option<Arc<dyn ScoreWriter>>,
}

/// The query API routes and the web UI. Every request reads the tenant of its query
/// key.
pub fn router(engine: Arc<QueryEngine>, auth: Arc<AccessControl>, metrics: QueryMetrics) -> Router {
    router_with(engine, auth, metrics, Extras::default())
}

/// [`router`], with what this process adds ([`Extras`]).
pub fn router_with(
    engine: Arc<QueryEngine>,
    auth: Arc<AccessControl>,
    metrics: QueryMetrics,
    extras: Extras,
) -> Router {
    Router::new()
        // Grafana's Tempo data source (see `crate::tempo`).
        .route("/api/echo", get(tempo_echo))
        .route("/api/status/buildinfo", get(tempo_buildinfo))
        .route(
            "/api/traces/{trace_id}",
            get(|s, h, id| tempo_trace(s, h, id, false)),
        )
        .route(
            "/api/v2/traces/{trace_id}",
            get(|s, h, id| tempo_trace(s, h, id, true)),
        )
        .route("/api/search", get(tempo_search))
        .route(
            "/api/search/tags",
            get(|s, h, q| async move { tempo_tags(s, h, q, false) }),
        )
        .route(
            "/api/v2/search/tags",
            get(|s, h, q| async move { tempo_tags(s, h, q, true) }),
        )
        .route(
            "/api/search/tag/{tag}/values",
            get(|s, h, t, q| tempo_values(s, h, t, q, false)),
        )
        .route(
            "/api/v2/search/tag/{tag}/values",
            get(|s, h, t, q| tempo_values(s, h, t, q, true)),
        )
        .route("/api/v1/traces", get(search).delete(delete_user_traces))
        .route("/api/v1/traces/{trace_id}", get(trace).delete(delete_trace))
        .route("/api/v1/deletions", get(list_deletions))
        .route("/api/v1/metrics", get(llm_metrics))
        .route("/api/v1/compare", get(compare))
        .route(
            "/api/v1/sessions",
            get(|s, h, q| list_groups(s, h, q, crate::sessions::GroupBy::Session)),
        )
        .route("/api/v1/sessions/{session_id}", get(session_traces))
        .route(
            "/api/v1/users",
            get(|s, h, q| list_groups(s, h, q, crate::sessions::GroupBy::User)),
        )
        .route("/api/v1/scores", get(list_scores).post(post_scores))
        .route("/api/v1/scores/metrics", get(score_metrics))
        .route("/api/v1/alerts", get(list_alerts))
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/openapi.json", get(openapi))
        .with_state(Arc::new(ApiState {
            engine,
            auth,
            metrics,
            alerts: extras.alerts,
            scores: extras.scores,
        }))
        .merge(crate::ui::router())
}

/// The project a query key reads (`GET /api/v1/whoami`): what the web UI shows.
#[derive(Serialize, schemars::JsonSchema)]
pub struct WhoAmI {
    /// `namespace/name`.
    pub project: String,
    /// `dev`, `staging` or `prod` (`dev`, the config's default, for a project the
    /// config does not list).
    pub environment: String,
    /// The key's name in the config (`anonymous` when the process serves without
    /// keys).
    pub key_name: String,
    /// Whether this process serves requests without keys.
    pub open: bool,
    /// Whether scores can be written here with the query key (`POST
    /// /api/v1/scores`: standalone, or a querier with Kafka); otherwise they go to the
    /// ingest endpoint with an ingest key.
    pub scores_writable: bool,
}

async fn whoami(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let owner = state.owner(&headers)?;
    Ok(axum::Json(WhoAmI {
        project: owner.tenant.to_string(),
        environment: owner.environment.unwrap_or_default().as_str().to_owned(),
        key_name: owner.name,
        open: state.auth.is_open(),
        scores_writable: state.scores.is_some(),
    })
    .into_response())
}

/// Largest body of `POST /api/v1/scores` on the query API.
const MAX_SCORES_BODY: usize = 1 << 20;

/// `POST /api/v1/scores` with a query key: a person's annotation from the web UI,
/// written through the process's durable path when it has one.
async fn post_scores(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let tenant = state.tenant(&headers)?;
    let Some(writer) = &state.scores else {
        return Err(ApiError(
            StatusCode::METHOD_NOT_ALLOWED,
            "this querier does not write scores: start it with --kafka-brokers (the operator \
             does), or send them to the ingest endpoint (POST /api/v1/scores on the OTLP/HTTP \
             port) with an ingest key"
                .into(),
        ));
    };
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if !json {
        return Err(ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "scores are JSON: send content-type application/json".into(),
        ));
    }
    if body.len() > MAX_SCORES_BODY {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("at most {MAX_SCORES_BODY} bytes of scores per request"),
        ));
    }
    let ids = writer
        .write(&tenant, &body)
        .await
        .map_err(|(status, msg)| ApiError(status, msg))?;
    Ok(axum::Json(serde_json::json!({ "ids": ids })).into_response())
}

/// The alert rules of the caller's project and their states.
#[derive(Serialize, schemars::JsonSchema)]
pub struct AlertList {
    /// Whether this process evaluates alert rules (`loupe standalone --alert-rules`);
    /// on Kubernetes AlertRules show their state in their status instead.
    pub evaluated: bool,
    pub alerts: Vec<crate::alert_runner::RuleState>,
}

async fn list_alerts(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let tenant = state.tenant(&headers)?;
    let list = AlertList {
        evaluated: state.alerts.is_some(),
        alerts: state
            .alerts
            .as_ref()
            .map(|a| crate::alert_runner::states_of(a, &tenant))
            .unwrap_or_default(),
    };
    Ok(axum::Json(list).into_response())
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

/// An API error with its HTTP status.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::BadRequest(m) => ApiError(StatusCode::BAD_REQUEST, m),
            other => {
                tracing::error!(error = %other, "query failed");
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "query failed; see the server log".into(),
                )
            }
        }
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn auth_error(e: AuthError) -> ApiError {
    match e {
        AuthError::WrongScope { .. } => ApiError(StatusCode::FORBIDDEN, e.to_string()),
        _ => ApiError(StatusCode::UNAUTHORIZED, e.to_string()),
    }
}

impl ApiState {
    fn tenant(&self, headers: &HeaderMap) -> Result<TenantId, ApiError> {
        self.auth
            .authorize(headers, Scope::Query)
            .map_err(auth_error)
    }

    fn owner(&self, headers: &HeaderMap) -> Result<loupe_core::keys::KeyOwner, ApiError> {
        self.auth.owner(headers, Scope::Query).map_err(auth_error)
    }

    fn observe(&self, endpoint: &'static str, ok: bool, started: Instant) {
        self.metrics
            .seconds
            .get_or_create(&EndpointLabels {
                endpoint,
                outcome: if ok { "ok" } else { "error" },
            })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Parses a 32-hex-digit trace id.
pub fn parse_trace_id(s: &str) -> Result<[u8; 16], String> {
    loupe_core::ids::parse_hex::<16>(s).ok_or_else(|| {
        format!(
            "trace id must be 32 hexadecimal characters, got {:?}",
            s.trim().chars().take(64).collect::<String>()
        )
    })
}

async fn trace(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(trace_id): Path<String>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let tenant = state.tenant(&headers)?;
    let id = parse_trace_id(&trace_id).map_err(bad)?;
    let result = state.engine.trace(&tenant, id).await;
    state.observe("trace", result.is_ok(), started);
    match result? {
        Some(t) => Ok(axum::Json(t).into_response()),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("trace {trace_id} not found"),
        )),
    }
}

/// Answers a recorded deletion with 202 Accepted (hidden now, removed from storage
/// by the next compaction), or 404 when nothing matched.
fn deletion_answer(
    record: Option<loupe_core::deletion::DeletionRecord>,
    missing: String,
) -> Result<Response, ApiError> {
    match record {
        Some(r) => Ok((
            StatusCode::ACCEPTED,
            axum::Json(crate::deletions::DeletionView::from(&r)),
        )
            .into_response()),
        None => Err(ApiError(StatusCode::NOT_FOUND, missing)),
    }
}

async fn delete_trace(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(trace_id): Path<String>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let owner = state.owner(&headers)?;
    let id = parse_trace_id(&trace_id).map_err(bad)?;
    let result = state
        .engine
        .delete(
            &owner.tenant,
            crate::deletions::DeleteTarget::Trace(id),
            &owner.name,
        )
        .await;
    state.observe("delete", result.is_ok(), started);
    deletion_answer(result?, format!("trace {trace_id} not found"))
}

async fn delete_user_traces(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let owner = state.owner(&headers)?;
    if let Some(other) = params.keys().find(|k| k.as_str() != "user_id") {
        return Err(bad(format!(
            "unknown parameter {other:?}: DELETE /api/v1/traces takes only user_id"
        )));
    }
    let user = params
        .get("user_id")
        .map(|u| u.trim())
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            bad("DELETE /api/v1/traces needs ?user_id=<id>; one trace is DELETE /api/v1/traces/{trace_id}")
        })?;
    if user.len() > 1024 {
        return Err(bad("user_id is longer than 1024 bytes"));
    }
    let result = state
        .engine
        .delete(
            &owner.tenant,
            crate::deletions::DeleteTarget::User(user.to_owned()),
            &owner.name,
        )
        .await;
    state.observe("delete", result.is_ok(), started);
    deletion_answer(result?, format!("no trace of user {user:?} found"))
}

async fn list_deletions(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let tenant = state.tenant(&headers)?;
    let records = state.engine.deletion_requests(&tenant).await?;
    Ok(axum::Json(crate::deletions::DeletionList {
        deletions: records.iter().map(Into::into).collect(),
    })
    .into_response())
}

async fn search(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let tenant = state.tenant(&headers)?;
    let query = parse_search(&params, now_ns())?;
    let result = state.engine.search(&tenant, &query).await;
    state.observe("search", result.is_ok(), started);
    Ok(axum::Json(result?).into_response())
}

async fn compare(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let tenant = state.tenant(&headers)?;
    check_params(&params, &["a", "b"])?;
    let id = |k: &str| -> Result<[u8; 16], ApiError> {
        let v = params
            .get(k)
            .ok_or_else(|| bad(format!("missing parameter {k}: a trace id")))?;
        parse_trace_id(v).map_err(|e| bad(format!("{k}: {e}")))
    };
    let (a, b) = (id("a")?, id("b")?);
    let (ta, tb) = tokio::join!(
        state.engine.trace(&tenant, a),
        state.engine.trace(&tenant, b)
    );
    let result = match (ta, tb) {
        (Ok(Some(ta)), Ok(Some(tb))) => Ok((ta, tb)),
        (Ok(None), _) => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("trace a ({}) not found", crate::engine::hex(&a)),
        )),
        (_, Ok(None)) => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("trace b ({}) not found", crate::engine::hex(&b)),
        )),
        (Err(e), _) | (_, Err(e)) => Err(e.into()),
    };
    state.observe("compare", result.is_ok(), started);
    let (ta, tb) = result?;
    // Large traces take a while to align: off the async workers.
    let comparison = tokio::task::spawn_blocking(move || crate::compare::compare(&ta, &tb))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("compare failed: {e}"),
            )
        })?;
    Ok(axum::Json(comparison).into_response())
}

/// Sessions (most recent first) or users (most expensive first) with their totals.
async fn list_groups(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
    by: crate::sessions::GroupBy,
) -> Result<Response, ApiError> {
    use crate::sessions::{GroupBy, GroupQuery, Order};
    let started = Instant::now();
    let tenant = state.tenant(&headers)?;
    check_params(&params, &crate::openapi::GROUP_PARAMS)?;
    let (start_ns, end_ns) = parse_range(&params, now_ns())?;
    let get = |k: &str| params.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let order = match get("order") {
        Some(v) => Order::parse(v).ok_or_else(|| {
            bad(format!(
                "order must be recent, cost, traces or tokens, got {v:?}"
            ))
        })?,
        None if by == GroupBy::User => Order::Cost,
        None => Order::Recent,
    };
    let query = GroupQuery {
        by,
        start_ns,
        end_ns,
        user_id: get("user_id").map(str::to_owned),
        order,
        limit: parse_limit(get("limit"), 100)?,
    };
    let result = state.engine.groups(&tenant, &query).await;
    let (endpoint, key) = match by {
        GroupBy::Session => ("sessions", "sessions"),
        GroupBy::User => ("users", "users"),
    };
    state.observe(endpoint, result.is_ok(), started);
    Ok(axum::Json(serde_json::json!({ key: result? })).into_response())
}

/// The traces of one session, oldest first (the most recent `limit` when there are
/// more).
async fn session_traces(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(session_id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let tenant = state.tenant(&headers)?;
    check_params(&params, &crate::openapi::SESSION_PARAMS)?;
    let (start_ns, end_ns) = parse_range(&params, now_ns())?;
    let query = SearchQuery {
        start_ns,
        end_ns,
        session_id: Some(session_id.clone()),
        limit: parse_limit(params.get("limit").map(String::as_str), MAX_LIMIT)?,
        ..SearchQuery::default()
    };
    let result = state.engine.search(&tenant, &query).await;
    state.observe("session", result.is_ok(), started);
    let mut traces = result?.traces;
    if traces.is_empty() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no trace of session {session_id:?} in the time range"),
        ));
    }
    traces.reverse();
    Ok(
        axum::Json(serde_json::json!({ "session_id": session_id, "traces": traces }))
            .into_response(),
    )
}

/// The OpenAPI document; public, like the shape of any API.
async fn openapi() -> Response {
    static DOCUMENT: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| crate::openapi::document().to_string());
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
        .into_response()
}

async fn tempo_echo(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // Authenticated, so that Grafana's "Save & test" catches a wrong key.
    state.tenant(&headers)?;
    Ok(crate::tempo::ECHO_BODY.into_response())
}

async fn tempo_buildinfo() -> Response {
    axum::Json(crate::tempo::buildinfo_json(env!("CARGO_PKG_VERSION"))).into_response()
}

/// A trace the way Tempo answers: protobuf when asked (Grafana), else Tempo's JSON.
/// Query parameters (`start`, `end`, span pruning) are accepted and have no effect.
async fn tempo_trace(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(trace_id): Path<String>,
    v2: bool,
) -> Result<Response, ApiError> {
    use crate::tempo;
    let started = Instant::now();
    let tenant = state.tenant(&headers)?;
    let id = tempo::parse_trace_id(&trace_id).map_err(bad)?;
    let result = state.engine.trace(&tenant, id).await;
    state.observe("tempo_trace", result.is_ok(), started);
    let Some(view) = result? else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("trace {trace_id} not found"),
        ));
    };
    let accept = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    Ok(if tempo::wants_protobuf(accept) {
        let body = if v2 {
            tempo::trace_v2_protobuf(&view)
        } else {
            tempo::trace_protobuf(&view)
        };
        (
            [(axum::http::header::CONTENT_TYPE, "application/protobuf")],
            body,
        )
            .into_response()
    } else if v2 {
        axum::Json(tempo::trace_v2_json(&view)).into_response()
    } else {
        axum::Json(tempo::trace_json(&view)).into_response()
    })
}

async fn tempo_search(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let tenant = state.tenant(&headers)?;
    let search = crate::tempo::parse_search(&params, now_ns()).map_err(bad)?;
    let result = state.engine.search(&tenant, &search.query).await;
    state.observe("tempo_search", result.is_ok(), started);
    Ok(axum::Json(crate::tempo::search_json(&result?)).into_response())
}

/// The tags Loupe can search by (a fixed set: its columns); `q`, `start`, `end` and
/// `limit` are accepted and have no effect.
fn tempo_tags(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
    v2: bool,
) -> Result<Response, ApiError> {
    state.tenant(&headers)?;
    let scope = params.get("scope").map(String::as_str);
    let body = if v2 {
        crate::tempo::tag_names_v2_json(scope)
    } else {
        crate::tempo::tag_names_json(scope)
    }
    .map_err(bad)?;
    Ok(axum::Json(body).into_response())
}

/// Values of a tag among spans in `start`..`end` (Unix seconds; the last 24 h by
/// default), at most `limit` (default 1000). `q` is accepted and has no effect.
async fn tempo_values(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(tag): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    v2: bool,
) -> Result<Response, ApiError> {
    use crate::tempo;
    let started = Instant::now();
    let tenant = state.tenant(&headers)?;
    let values: Vec<String> = if let Some(fixed) = tempo::fixed_tag_values(&tag) {
        fixed.iter().map(|v| v.to_string()).collect()
    } else if let Some(column) = tempo::tag_column(&tag) {
        let now = now_ns();
        let secs = |k: &str| -> Result<Option<i64>, ApiError> {
            params
                .get(k)
                .filter(|v| !v.trim().is_empty())
                .map(|v| parse_time(v.trim()).map_err(|e| bad(format!("{k}: {e}"))))
                .transpose()
        };
        let end = secs("end")?.unwrap_or(now);
        let start = secs("start")?
            .unwrap_or_else(|| end.saturating_sub(DEFAULT_LOOKBACK.as_nanos() as i64));
        let limit = parse_limit(params.get("limit").map(String::as_str), MAX_LIMIT)?;
        let result = state
            .engine
            .distinct_values(&tenant, column, (start, end), limit)
            .await;
        state.observe("tempo_tag_values", result.is_ok(), started);
        result?
    } else {
        Vec::new()
    };
    Ok(axum::Json(if v2 {
        tempo::tag_values_v2_json(&tag, &values)
    } else {
        tempo::tag_values_json(&values)
    })
    .into_response())
}

async fn list_scores(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let tenant = state.tenant(&headers)?;
    check_params(&params, &crate::openapi::SCORE_LIST_PARAMS)?;
    let (start_ns, end_ns) = parse_range(&params, now_ns())?;
    let get = |k: &str| params.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let query = crate::scores::ScoreQuery {
        start_ns,
        end_ns,
        trace_id: get("trace_id")
            .map(|v| parse_trace_id(v).map_err(|e| bad(format!("trace_id: {e}"))))
            .transpose()?,
        name: get("name").map(str::to_owned),
        source: get("source").map(str::to_owned),
        limit: parse_limit(get("limit"), 100)?,
    };
    let result = state.engine.scores(&tenant, &query).await;
    state.observe("scores", result.is_ok(), started);
    Ok(axum::Json(serde_json::json!({ "scores": result? })).into_response())
}

async fn score_metrics(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let tenant = state.tenant(&headers)?;
    check_params(&params, &crate::openapi::SCORE_METRICS_PARAMS)?;
    let (start_ns, end_ns) = parse_range(&params, now_ns())?;
    let step_ns =
        crate::stats::parse_step(params.get("step").map(String::as_str), (start_ns, end_ns))
            .map_err(bad)?;
    let name = params
        .get("name")
        .map(|v| v.trim())
        .filter(|v| !v.is_empty());
    // `name` is the score's; a span name filters as `span_name`.
    let mut span_params = params.clone();
    span_params.remove("name");
    if let Some(v) = span_params.remove("span_name") {
        span_params.insert("name".into(), v);
    }
    let filters = crate::stats::parse_filters(&span_params).map_err(bad)?;
    let result = state
        .engine
        .score_metrics(&tenant, (start_ns, end_ns, step_ns), name, &filters)
        .await;
    state.observe("score_metrics", result.is_ok(), started);
    Ok(axum::Json(result?).into_response())
}

/// Refuses parameters a route does not take, naming the accepted ones.
fn check_params(params: &HashMap<String, String>, accepted: &[&str]) -> Result<(), ApiError> {
    match params.keys().find(|k| !accepted.contains(&k.as_str())) {
        Some(k) => Err(bad(format!(
            "unknown parameter {k:?}; accepted: {}",
            accepted.join(", ")
        ))),
        None => Ok(()),
    }
}

/// Parses a `limit` of 1..=[`MAX_LIMIT`].
fn parse_limit(v: Option<&str>, default: usize) -> Result<usize, ApiError> {
    match v {
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(bad(format!("limit must be 1..={MAX_LIMIT}, got {v:?}"))),
        },
        None => Ok(default),
    }
}

async fn llm_metrics(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let tenant = state.tenant(&headers)?;
    let range = parse_range(&params, now_ns())?;
    let query = crate::stats::parse_metrics(&params, range).map_err(bad)?;
    let result = state.engine.metrics(&tenant, &query).await;
    state.observe("metrics", result.is_ok(), started);
    Ok(axum::Json(result?).into_response())
}

/// Now, Unix nanoseconds.
pub fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// Parameters a search accepts.
pub const SEARCH_PARAMS: [&str; 18] = [
    "score",
    "start",
    "end",
    "since",
    "service",
    "name",
    "llm_kind",
    "model",
    "status",
    "min_duration",
    "max_duration",
    "min_cost",
    "user_id",
    "session_id",
    "prompt_name",
    "prompt_version",
    "limit",
    "order",
];

/// Parses search parameters; unknown names and bad values are errors naming them.
pub fn parse_search(p: &HashMap<String, String>, now_ns: i64) -> Result<SearchQuery, ApiError> {
    check_params(p, &SEARCH_PARAMS)?;
    let get = |k: &str| p.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let text = |k: &str| get(k).map(str::to_owned);
    let (start_ns, end_ns) = parse_range(p, now_ns)?;
    let duration = |k: &str| -> Result<Option<i64>, ApiError> {
        get(k)
            .map(|v| {
                parse_duration(v, Some(Duration::from_millis(1)))
                    .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
                    .map_err(|e| bad(format!("{k}: {e}")))
            })
            .transpose()
    };
    let limit = parse_limit(get("limit"), DEFAULT_LIMIT)?;
    let llm_kind = get("llm_kind")
        .map(|v| {
            LlmKind::parse(v).ok_or_else(|| {
                bad(format!(
                    "llm_kind {v:?} is not one of {}",
                    LlmKind::ALL.map(|k| k.as_str()).join(", ")
                ))
            })
        })
        .transpose()?;
    let status = get("status")
        .map(|v| match v.to_ascii_lowercase().as_str() {
            "error" => Ok(StatusFilter::Error),
            "ok" => Ok(StatusFilter::Ok),
            _ => Err(bad(format!("status must be error or ok, got {v:?}"))),
        })
        .transpose()?;
    let min_cost_usd = get("min_cost")
        .map(|v| match v.trim_start_matches('$').parse::<f64>() {
            Ok(c) if c.is_finite() && c >= 0.0 => Ok(c),
            _ => Err(bad(format!(
                "min_cost must be a non-negative number of USD, got {v:?}"
            ))),
        })
        .transpose()?;
    Ok(SearchQuery {
        start_ns,
        end_ns,
        service: text("service"),
        name: text("name"),
        llm_kind,
        model: text("model"),
        status,
        min_duration_ns: duration("min_duration")?,
        max_duration_ns: duration("max_duration")?,
        min_cost_usd,
        user_id: text("user_id"),
        session_id: text("session_id"),
        prompt_name: text("prompt_name"),
        prompt_version: text("prompt_version"),
        scores: match get("score") {
            Some(v) => crate::scores::parse_score_filters(v).map_err(bad)?,
            None => Vec::new(),
        },
        limit,
        order: get("order")
            .map(crate::engine::SearchOrder::parse)
            .transpose()
            .map_err(bad)?
            .unwrap_or_default(),
    })
}

/// Parses a time range from `start` and `end` (RFC 3339 or Unix seconds) or `since`
/// (a duration before `end`); the default is the last [`DEFAULT_LOOKBACK`] before now.
pub fn parse_range(p: &HashMap<String, String>, now_ns: i64) -> Result<(i64, i64), ApiError> {
    let get = |k: &str| p.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let end_ns = match get("end") {
        Some(v) => parse_time(v).map_err(|e| bad(format!("end: {e}")))?,
        None => now_ns,
    };
    let start_ns = match (get("start"), get("since")) {
        (Some(_), Some(_)) => return Err(bad("give either start or since, not both")),
        (Some(v), None) => parse_time(v).map_err(|e| bad(format!("start: {e}")))?,
        (None, Some(v)) => {
            let d = parse_duration(v, None).map_err(|e| bad(format!("since: {e}")))?;
            end_ns.saturating_sub(d.as_nanos().min(i64::MAX as u128) as i64)
        }
        (None, None) => end_ns.saturating_sub(DEFAULT_LOOKBACK.as_nanos() as i64),
    };
    Ok((start_ns, end_ns))
}

/// Parses RFC 3339 (`2026-11-21T10:00:00Z`) or Unix seconds (`1763719200`, `1763719200.5`).
pub fn parse_time(v: &str) -> Result<i64, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(v) {
        return t
            .timestamp_nanos_opt()
            .ok_or_else(|| format!("{v:?} is out of range"));
    }
    match v.parse::<f64>() {
        Ok(secs) if secs.is_finite() && (0.0..9.2e9).contains(&secs) => Ok((secs * 1e9) as i64),
        _ => Err(format!(
            "{v:?} is neither an RFC 3339 time nor Unix seconds"
        )),
    }
}

/// Parses `250ms`, `1.5s`, `10m`, `2h`, `7d`; a bare number uses `bare_unit` if given.
pub fn parse_duration(v: &str, bare_unit: Option<Duration>) -> Result<Duration, String> {
    let v = v.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{v:?} is not a duration like 250ms, 2s, 5m, 1h, 7d or 2w"))?;
    let unit_secs = match unit.trim() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        "w" => 7.0 * 86400.0,
        "" => match bare_unit {
            Some(u) => u.as_secs_f64(),
            None => return Err(format!("{v:?} needs a unit: ms, s, m, h, d or w")),
        },
        other => return Err(format!("unknown duration unit {other:?} in {v:?}")),
    };
    Duration::try_from_secs_f64(n * unit_secs).map_err(|_| format!("{v:?} is out of range"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn durations_take_units_from_nanoseconds_to_weeks() {
        let d = |v| parse_duration(v, None);
        assert_eq!(d("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(d("8w"), Ok(Duration::from_secs(8 * 7 * 86400)));
        assert_eq!(d("1.5h"), Ok(Duration::from_secs(5400)));
        assert!(d("3y").unwrap_err().contains("unknown duration unit"));
    }

    /// Query parameters from pairs.
    pub(crate) fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_a_full_search() {
        let now = 10_000_000_000_000;
        let q = parse_search(
            &params(&[
                ("since", "1h"),
                ("service", "bot"),
                ("llm_kind", "llm"),
                ("status", "ERROR"),
                ("min_duration", "1.5s"),
                ("max_duration", "200"),
                ("min_cost", "0.01"),
                ("limit", "5"),
            ]),
            now,
        )
        .unwrap_or_else(|e| panic!("{}", e.1));
        assert_eq!(q.end_ns, now);
        assert_eq!(q.start_ns, now - 3_600_000_000_000);
        assert_eq!(q.llm_kind, Some(LlmKind::Llm));
        assert_eq!(q.status, Some(StatusFilter::Error));
        assert_eq!(q.min_duration_ns, Some(1_500_000_000));
        assert_eq!(q.max_duration_ns, Some(200_000_000));
        assert_eq!(q.min_cost_usd, Some(0.01));
        assert_eq!(q.limit, 5);
    }

    #[test]
    fn bad_parameters_are_named() {
        let cases = [
            (vec![("servce", "x")], "unknown parameter \"servce\""),
            (vec![("limit", "0")], "limit must be"),
            (vec![("llm_kind", "robot")], "llm_kind \"robot\""),
            (vec![("since", "5")], "since: \"5\" needs a unit"),
            (vec![("start", "yesterday")], "start: \"yesterday\""),
            (vec![("min_cost", "-1")], "min_cost must be"),
            (vec![("status", "fine")], "status must be"),
            (
                vec![("start", "0"), ("since", "1h")],
                "either start or since",
            ),
        ];
        for (p, want) in cases {
            let err = parse_search(&params(&p), 0).expect_err("an error");
            assert_eq!(err.0, StatusCode::BAD_REQUEST);
            assert!(err.1.contains(want), "{p:?}: {}", err.1);
        }
    }

    #[test]
    fn parses_times_and_ids() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z").unwrap(), 1_000_000_000);
        assert_eq!(parse_time("2.5").unwrap(), 2_500_000_000);
        assert_eq!(
            parse_trace_id("0102030405060708090a0b0c0d0e0f10").unwrap(),
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
        );
        assert!(
            parse_trace_id("0102")
                .unwrap_err()
                .contains("32 hexadecimal")
        );
        assert!(parse_trace_id(&"zz".repeat(16)).is_err());
    }
}
