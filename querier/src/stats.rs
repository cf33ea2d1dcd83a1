//! LLM metrics over time: request count, error rate, latency percentiles, tokens and
//! cost, bucketed and grouped by model, user, feature and the other dimensions.
//!
//! Computed with DataFusion over the tenant's Parquet blocks (blocks outside the time
//! range are never opened; inside one, row groups are pruned on `start_ns`
//! statistics) and its unflushed head.
//!
//! Two levels:
//! - `span`: every span with a model (LLM and embedding calls), or the spans the
//!   `llm_kind` filter names. Needed for model, provider, span name and prompt.
//! - `trace`: one row per trace (a request to the application), its duration from
//!   first start to last end, tokens and cost summed over its spans, an error when
//!   any span failed. User, session, environment and feature are the trace's; service
//!   and name are its root span's.
//!
//! At span level, user, session and feature fall back to the values of the span's
//! trace (instrumentations often set them on the root span only).
//!
//! Sampling: a block records how many spans tail sampling decided on for the ones it
//! keeps; each stored span is weighted by that ratio, and the `estimated_*` fields
//! extrapolate counts, tokens and cost to everything seen. Error rate and latency are
//! computed over the stored rows, which over-represent what the policy always keeps
//! (errors, slow traces); the response says both.
//!
//! Spans written twice by a crash replay are counted twice until the compactor
//! removes the copies.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use arrow::array::{Array, RecordBatch};
use datafusion::common::ScalarValue;
use loupe_core::{LlmKind, TenantId};
use serde::{Deserialize, Serialize};

use crate::engine::{
    Params, QueryEngine, QueryError, SamplingInfo, StatusFilter, check_range, run,
};
use crate::model::rfc3339;

/// Most buckets one query may ask for.
pub const MAX_BUCKETS: i64 = 10_000;
/// Default and largest number of groups (series) returned; the rest are counted.
pub const DEFAULT_GROUPS: usize = 50;
pub const MAX_GROUPS: usize = 1_000;
/// The attribute whose value is the `feature` dimension unless a query names another.
pub const DEFAULT_FEATURE_ATTRIBUTE: &str = "loupe.feature";
/// Spans this far around the range are read to assemble traces that start in it.
const TRACE_SLACK_NS: i64 = 3_600 * 1_000_000_000;

/// A dimension metrics can be grouped (and filtered) by.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    schemars::JsonSchema,
    Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    Model,
    Provider,
    Service,
    Name,
    LlmKind,
    User,
    Session,
    PromptName,
    PromptVersion,
    Environment,
    Feature,
}

impl Dimension {
    pub const ALL: [Dimension; 11] = [
        Dimension::Model,
        Dimension::Provider,
        Dimension::Service,
        Dimension::Name,
        Dimension::LlmKind,
        Dimension::User,
        Dimension::Session,
        Dimension::PromptName,
        Dimension::PromptVersion,
        Dimension::Environment,
        Dimension::Feature,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Model => "model",
            Dimension::Provider => "provider",
            Dimension::Service => "service",
            Dimension::Name => "name",
            Dimension::LlmKind => "llm_kind",
            Dimension::User => "user",
            Dimension::Session => "session",
            Dimension::PromptName => "prompt_name",
            Dimension::PromptVersion => "prompt_version",
            Dimension::Environment => "environment",
            Dimension::Feature => "feature",
        }
    }

    /// Parses a dimension name; `prompt` is short for prompt name and version.
    pub fn parse(s: &str) -> Option<Vec<Dimension>> {
        let s = s.trim().to_ascii_lowercase();
        let one = match s.as_str() {
            "prompt" => return Some(vec![Dimension::PromptName, Dimension::PromptVersion]),
            "span_name" => Dimension::Name,
            "user_id" => Dimension::User,
            "session_id" => Dimension::Session,
            "service_name" => Dimension::Service,
            "env" => Dimension::Environment,
            other => *Dimension::ALL.iter().find(|d| d.as_str() == other)?,
        };
        Some(vec![one])
    }

    /// Whether the dimension belongs to single spans (and so needs span level).
    pub fn span_only(self) -> bool {
        matches!(
            self,
            Dimension::Model
                | Dimension::Provider
                | Dimension::LlmKind
                | Dimension::PromptName
                | Dimension::PromptVersion
        )
    }
}

/// Rows the metrics are computed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, schemars::JsonSchema, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Span,
    Trace,
}

/// A metrics query.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsQuery {
    /// Spans (span level) or traces (trace level) starting in `[start_ns, end_ns)`.
    pub start_ns: i64,
    pub end_ns: i64,
    pub step_ns: i64,
    pub level: Level,
    pub group_by: Vec<Dimension>,
    /// Equality filters.
    pub filters: Vec<(Dimension, String)>,
    pub status: Option<StatusFilter>,
    pub feature_attribute: String,
    pub max_groups: usize,
}

/// Latency percentiles in milliseconds (approximate: t-digest).
#[derive(Clone, Debug, Default, PartialEq, Serialize, schemars::JsonSchema, Deserialize)]
pub struct Latency {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

/// Values extrapolated to every span sampling decided on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, schemars::JsonSchema, Deserialize)]
pub struct Estimated {
    pub requests: f64,
    pub input_tokens: f64,
    pub output_tokens: f64,
    pub cost_usd: f64,
}

/// One time bucket of one group.
#[derive(Clone, Debug, Default, PartialEq, Serialize, schemars::JsonSchema, Deserialize)]
pub struct Point {
    /// Start of the bucket.
    pub time: String,
    pub time_ns: i64,
    /// Stored requests (spans or traces, by level).
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub latency_ms: Latency,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_usd: f64,
    pub estimated: Estimated,
}

/// The points of one group, oldest first, with their sums.
#[derive(Clone, Debug, PartialEq, Serialize, schemars::JsonSchema, Deserialize)]
pub struct Series {
    /// The group's value of each `group_by` dimension (`null` when unset).
    pub group: BTreeMap<String, Option<String>>,
    pub requests: u64,
    pub errors: u64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_usd: f64,
    pub estimated: Estimated,
    pub points: Vec<Point>,
}

/// How the stored rows relate to everything ingested.
#[derive(Clone, Debug, PartialEq, Serialize, schemars::JsonSchema, Deserialize)]
pub struct SamplingNote {
    /// Spans stored and spans decided in the blocks the query read.
    #[serde(flatten)]
    pub counts: SamplingInfo,
    /// Whether `estimated_*` differ from the stored values.
    pub extrapolated: bool,
    pub note: String,
}

/// The answer to a metrics query.
#[derive(Clone, Debug, PartialEq, Serialize, schemars::JsonSchema, Deserialize)]
pub struct MetricsResponse {
    pub level: Level,
    pub start: String,
    pub end: String,
    pub start_ns: i64,
    pub end_ns: i64,
    pub step_seconds: f64,
    pub group_by: Vec<Dimension>,
    /// What a request is at this level (`spans with a model`, `traces`, …).
    pub rows: String,
    /// Groups, most requests first.
    pub series: Vec<Series>,
    /// Groups beyond `max_groups`, left out.
    pub groups_omitted: usize,
    pub sampling: SamplingNote,
}

/// Parameters a metrics query accepts.
pub const METRICS_PARAMS: [&str; 19] = [
    "start",
    "end",
    "since",
    "step",
    "group_by",
    "level",
    "max_groups",
    "feature_attribute",
    "status",
    "model",
    "provider",
    "service",
    "name",
    "llm_kind",
    "user_id",
    "session_id",
    "prompt_name",
    "prompt_version",
    "environment",
];

/// The equality filters of the metrics API (each one names its [`Dimension`]).
pub const FILTER_PARAMS: [(&str, Dimension); 11] = [
    ("model", Dimension::Model),
    ("provider", Dimension::Provider),
    ("service", Dimension::Service),
    ("name", Dimension::Name),
    ("llm_kind", Dimension::LlmKind),
    ("user_id", Dimension::User),
    ("session_id", Dimension::Session),
    ("prompt_name", Dimension::PromptName),
    ("prompt_version", Dimension::PromptVersion),
    ("environment", Dimension::Environment),
    ("feature", Dimension::Feature),
];

/// The names of [`FILTER_PARAMS`], for checks and messages.
pub fn filter_names() -> impl Iterator<Item = &'static str> {
    FILTER_PARAMS.iter().map(|(k, _)| *k)
}

/// The equality filters of a metrics query (`model=`, `service=`, …), in a fixed
/// order; the caller checks for unknown parameters.
pub fn parse_filters(p: &HashMap<String, String>) -> Result<Vec<(Dimension, String)>, String> {
    let get = |k: &str| p.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let mut filters = Vec::new();
    for (key, dim) in FILTER_PARAMS {
        if let Some(v) = get(key) {
            let v = if dim == Dimension::LlmKind {
                LlmKind::parse(v)
                    .ok_or_else(|| {
                        format!(
                            "llm_kind {v:?} is not one of {}",
                            LlmKind::ALL.map(|k| k.as_str()).join(", ")
                        )
                    })?
                    .as_str()
                    .to_owned()
            } else {
                v.to_owned()
            };
            filters.push((dim, v));
        }
    }
    Ok(filters)
}

/// Parses a metrics query. `range` parses start/end/since the way searches do.
pub fn parse_metrics(
    p: &HashMap<String, String>,
    (start_ns, end_ns): (i64, i64),
) -> Result<MetricsQuery, String> {
    for k in p.keys() {
        if !METRICS_PARAMS.contains(&k.as_str()) && k != "feature" {
            return Err(format!(
                "unknown parameter {k:?}; accepted: {}, feature",
                METRICS_PARAMS.join(", ")
            ));
        }
    }
    let get = |k: &str| p.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let step_ns = parse_step(get("step"), (start_ns, end_ns))?;
    let mut group_by = Vec::new();
    if let Some(v) = get("group_by") {
        for name in v.split(',').filter(|s| !s.trim().is_empty()) {
            let dims = Dimension::parse(name).ok_or_else(|| {
                format!(
                    "group_by: unknown dimension {:?}; one of {}, prompt",
                    name.trim(),
                    Dimension::ALL.map(|d| d.as_str()).join(", ")
                )
            })?;
            for d in dims {
                if !group_by.contains(&d) {
                    group_by.push(d);
                }
            }
        }
    }
    let filters = parse_filters(p)?;
    let span_needed = group_by.iter().any(|d| d.span_only())
        || filters.iter().any(|(d, _)| *d == Dimension::LlmKind);
    let level = match get("level") {
        None => {
            if span_needed {
                Level::Span
            } else {
                Level::Trace
            }
        }
        Some(v) if v.eq_ignore_ascii_case("span") => Level::Span,
        Some(v) if v.eq_ignore_ascii_case("trace") => Level::Trace,
        Some(v) => return Err(format!("level must be span or trace, got {v:?}")),
    };
    if level == Level::Trace
        && let Some(d) = group_by.iter().find(|d| d.span_only())
    {
        return Err(format!(
            "group_by {}: a trace can hold several; group at level=span",
            d.as_str()
        ));
    }
    let status = get("status")
        .map(|v| match v.to_ascii_lowercase().as_str() {
            "error" => Ok(StatusFilter::Error),
            "ok" => Ok(StatusFilter::Ok),
            _ => Err(format!("status must be error or ok, got {v:?}")),
        })
        .transpose()?;
    let max_groups = match get("max_groups") {
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_GROUPS).contains(&n) => n,
            _ => return Err(format!("max_groups must be 1..={MAX_GROUPS}, got {v:?}")),
        },
        None => DEFAULT_GROUPS,
    };
    let feature_attribute = get("feature_attribute")
        .unwrap_or(DEFAULT_FEATURE_ATTRIBUTE)
        .to_owned();
    if feature_attribute.len() > 256 {
        return Err("feature_attribute is longer than 256 bytes".into());
    }
    Ok(MetricsQuery {
        start_ns,
        end_ns,
        step_ns,
        level,
        group_by,
        filters,
        status,
        feature_attribute,
        max_groups,
    })
}

/// Parses a bucket size (`1h`, `1d`); by default about 60 buckets over the range, at
/// least a second. At most [`MAX_BUCKETS`] buckets.
pub fn parse_step(v: Option<&str>, (start_ns, end_ns): (i64, i64)) -> Result<i64, String> {
    let span_ns = end_ns.saturating_sub(start_ns);
    let step_ns = match v.map(str::trim).filter(|v| !v.is_empty()) {
        Some(v) => {
            let d = crate::api::parse_duration(v, None).map_err(|e| format!("step: {e}"))?;
            i64::try_from(d.as_nanos()).map_err(|_| format!("step {v:?} is too long"))?
        }
        None => (span_ns / 60).max(1_000_000_000),
    };
    if step_ns < 1_000_000_000 {
        return Err("step must be at least 1s".into());
    }
    if span_ns / step_ns > MAX_BUCKETS {
        return Err(format!(
            "{} buckets of {} over the range; at most {MAX_BUCKETS}: use a larger step",
            span_ns / step_ns,
            humantime_secs(step_ns)
        ));
    }
    Ok(step_ns)
}

fn humantime_secs(ns: i64) -> String {
    humantime_fmt(Duration::from_nanos(ns.max(0) as u64))
}

fn humantime_fmt(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The SQL expression of a dimension over one span row; `p` prefixes columns
/// (`s.` inside a join). The feature is the `feature` column of the `spans` CTE.
pub(crate) fn span_expr(d: Dimension, p: &str) -> String {
    match d {
        Dimension::Model => format!("coalesce({p}response_model, {p}request_model)"),
        Dimension::Provider => format!("{p}provider"),
        Dimension::Service => format!("{p}service_name"),
        Dimension::Name => format!("{p}name"),
        Dimension::LlmKind => format!("{p}llm_kind"),
        Dimension::User => format!("{p}user_id"),
        Dimension::Session => format!("{p}session_id"),
        Dimension::PromptName => format!("{p}prompt_name"),
        Dimension::PromptVersion => format!("{p}prompt_version"),
        Dimension::Environment => format!("{p}environment"),
        Dimension::Feature => format!("{p}feature"),
    }
}

/// Columns read for metrics (the large text columns only when the feature is needed).
fn metric_columns(uses_feature: bool) -> &'static str {
    if uses_feature {
        "trace_id, parent_span_id, name, service_name, llm_kind, start_ns, end_ns, \
         duration_ns, status, provider, request_model, response_model, input_tokens, \
         output_tokens, cost_total_usd, user_id, session_id, prompt_name, prompt_version, \
         environment, attributes, resource"
    } else {
        "trace_id, parent_span_id, name, service_name, llm_kind, start_ns, end_ns, \
         duration_ns, status, provider, request_model, response_model, input_tokens, \
         output_tokens, cost_total_usd, user_id, session_id, prompt_name, prompt_version, \
         environment"
    }
}

impl MetricsQuery {
    fn uses_feature(&self) -> bool {
        self.group_by.contains(&Dimension::Feature)
            || self.filters.iter().any(|(d, _)| *d == Dimension::Feature)
    }
}

/// A regular expression finding a string attribute's value in the attributes JSON
/// (written compactly by normalization: `"key":"value"`).
pub fn attribute_pattern(key: &str) -> String {
    let json_key = serde_json::to_string(key).expect("a string serializes");
    format!(r#"{}:"((?:[^"\\]|\\.)*)""#, regex::escape(&json_key))
}

/// Builds the SQL of a metrics query and its parameters.
fn metrics_sql(q: &MetricsQuery, union: &str, mut params: Params) -> (String, Vec<ScalarValue>) {
    let feature = if q.uses_feature() {
        let pattern = params.text(&attribute_pattern(&q.feature_attribute));
        format!(
            "coalesce(regexp_match(attributes, {pattern})[1], regexp_match(resource, {pattern})[1])"
        )
    } else {
        "CAST(NULL AS VARCHAR)".into()
    };
    let start = params.int(q.start_ns);
    let end = params.int(q.end_ns);
    let step = params.int(q.step_ns);
    let dims: Vec<Dimension> = q.group_by.clone();
    let dim_cols: String = (0..dims.len()).map(|i| format!(", d{i}")).collect();
    let status_cond = match q.status {
        Some(StatusFilter::Error) => " AND err = 1",
        Some(StatusFilter::Ok) => " AND err = 0",
        None => "",
    };
    let aggregates = "count(*) AS requests, sum(w) AS est_requests, \
        CAST(sum(err) AS BIGINT) AS errors, \
        approx_percentile_cont(0.5) WITHIN GROUP (ORDER BY dur) AS p50, \
        approx_percentile_cont(0.95) WITHIN GROUP (ORDER BY dur) AS p95, \
        approx_percentile_cont(0.99) WITHIN GROUP (ORDER BY dur) AS p99, \
        sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, \
        sum(cost) AS cost, sum(input_tokens * w) AS est_input_tokens, \
        sum(output_tokens * w) AS est_output_tokens, sum(cost * w) AS est_cost";
    let sql = match q.level {
        Level::Span => {
            // Trace-wide values of user, session and feature, for spans without them.
            let needs_trace = dims
                .iter()
                .chain(q.filters.iter().map(|(d, _)| d))
                .any(|d| matches!(d, Dimension::User | Dimension::Session | Dimension::Feature));
            let value = |d: Dimension| -> String {
                match d {
                    Dimension::User | Dimension::Session | Dimension::Feature if needs_trace => {
                        format!("coalesce({}, {})", span_expr(d, "s."), span_expr(d, "t."))
                    }
                    _ => span_expr(d, "s."),
                }
            };
            let mut conds = vec![
                format!("s.start_ns >= {start}"),
                format!("s.start_ns < {end}"),
            ];
            if !q.filters.iter().any(|(d, _)| *d == Dimension::LlmKind) {
                conds.push("coalesce(s.response_model, s.request_model) IS NOT NULL".into());
            }
            for (d, v) in &q.filters {
                let p = params.text(v);
                conds.push(format!("{} = {p}", value(*d)));
            }
            let select_dims: String = dims
                .iter()
                .enumerate()
                .map(|(i, d)| format!(", {} AS d{i}", value(*d)))
                .collect();
            let trace_cte = if needs_trace {
                "traces AS (SELECT trace_id, max(user_id) AS user_id, \
                    max(session_id) AS session_id, max(feature) AS feature \
                    FROM spans GROUP BY trace_id), "
                    .to_string()
            } else {
                String::new()
            };
            let join = if needs_trace {
                "LEFT JOIN traces t ON s.trace_id = t.trace_id"
            } else {
                ""
            };
            format!(
                "WITH spans AS (SELECT *, {feature} AS feature FROM ({union})), {trace_cte}\
                 rows AS (SELECT {start} + ((s.start_ns - {start}) / {step}) * {step} AS bucket \
                    {select_dims}, s.duration_ns AS dur, \
                    CASE WHEN s.status = 'ERROR' THEN 1 ELSE 0 END AS err, \
                    s.input_tokens AS input_tokens, s.output_tokens AS output_tokens, \
                    s.cost_total_usd AS cost, s.w AS w \
                    FROM spans s {join} WHERE {}) \
                 SELECT bucket {dim_cols}, {aggregates} FROM rows WHERE 1 = 1{status_cond} \
                 GROUP BY bucket {dim_cols} ORDER BY bucket {dim_cols}",
                conds.join(" AND ")
            )
        }
        Level::Trace => {
            let trace_value = |d: Dimension| -> String {
                match d {
                    Dimension::Service => {
                        "coalesce(max(CASE WHEN parent_span_id IS NULL THEN service_name END), \
                         min(service_name))"
                            .into()
                    }
                    Dimension::Name => {
                        "coalesce(max(CASE WHEN parent_span_id IS NULL THEN name END), min(name))"
                            .into()
                    }
                    other => format!("max({})", span_expr(other, "")),
                }
            };
            let mut flags = String::new();
            let mut conds = vec![format!("start_ns >= {start}"), format!("start_ns < {end}")];
            for (i, (d, v)) in q.filters.iter().enumerate() {
                let p = params.text(v);
                if d.span_only() {
                    // Any span of the trace matches.
                    flags.push_str(&format!(
                        ", max(CASE WHEN {} = {p} THEN 1 ELSE 0 END) AS f{i}",
                        span_expr(*d, "")
                    ));
                } else {
                    flags.push_str(&format!(", {} AS f{i}", trace_value(*d)));
                    conds.push(format!("f{i} = {p}"));
                    continue;
                }
                conds.push(format!("f{i} = 1"));
            }
            let select_dims: String = dims
                .iter()
                .enumerate()
                .map(|(i, d)| format!(", {} AS d{i}", trace_value(*d)))
                .collect();
            format!(
                "WITH spans AS (SELECT *, {feature} AS feature FROM ({union})), \
                 traces AS (SELECT trace_id, min(start_ns) AS start_ns, \
                    max(end_ns) - min(start_ns) AS dur, \
                    max(CASE WHEN status = 'ERROR' THEN 1 ELSE 0 END) AS err, \
                    sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, \
                    sum(cost_total_usd) AS cost, max(w) AS w {select_dims} {flags} \
                    FROM spans GROUP BY trace_id), \
                 rows AS (SELECT {start} + ((start_ns - {start}) / {step}) * {step} AS bucket, * \
                    FROM traces WHERE {}) \
                 SELECT bucket {dim_cols}, {aggregates} FROM rows WHERE 1 = 1{status_cond} \
                 GROUP BY bucket {dim_cols} ORDER BY bucket {dim_cols}",
                conds.join(" AND ")
            )
        }
    };
    (sql, params.0)
}

impl QueryEngine {
    /// Metrics of a tenant over time.
    pub async fn metrics(
        &self,
        tenant: &TenantId,
        q: &MetricsQuery,
    ) -> Result<MetricsResponse, QueryError> {
        check_range(q.start_ns, q.end_ns)?;
        let scan = match q.level {
            Level::Span => (q.start_ns, q.end_ns),
            Level::Trace => (
                q.start_ns.saturating_sub(TRACE_SLACK_NS),
                q.end_ns.saturating_add(TRACE_SLACK_NS),
            ),
        };
        let spans = self
            .weighted_spans(tenant, scan, metric_columns(q.uses_feature()))
            .await?;
        let params = Params(vec![
            ScalarValue::Int64(Some(scan.0)),
            ScalarValue::Int64(Some(scan.1)),
        ]);
        let (sql, params) = metrics_sql(q, &spans.sql, params);
        let batches = run(&spans.ctx, &sql, params).await?;
        let (series, groups_omitted) = collect_series(q, &batches)?;
        let counts = spans.sampling;
        let extrapolated = counts.seen_spans > counts.kept_spans;
        Ok(MetricsResponse {
            level: q.level,
            start: rfc3339(q.start_ns),
            end: rfc3339(q.end_ns),
            start_ns: q.start_ns,
            end_ns: q.end_ns,
            step_seconds: q.step_ns as f64 / 1e9,
            group_by: q.group_by.clone(),
            rows: match q.level {
                Level::Trace => "traces".into(),
                Level::Span if q.filters.iter().any(|(d, _)| *d == Dimension::LlmKind) => {
                    "spans of the llm_kind".into()
                }
                Level::Span => "spans with a model (LLM and embedding calls)".into(),
            },
            series,
            groups_omitted,
            sampling: SamplingNote {
                counts,
                extrapolated,
                note: if extrapolated {
                    format!(
                        "tail sampling stored {} of {} spans in this range; estimated values \
                         weight each stored span by its block's seen/kept ratio; error rate and \
                         latency are over stored rows, which over-represent what the policy \
                         always keeps (errors, slow traces)",
                        counts.kept_spans, counts.seen_spans
                    )
                } else {
                    "nothing in this range was sampled out; estimated values equal stored ones"
                        .into()
                },
            },
        })
    }
}

/// Turns result rows (`bucket, d0.., aggregates`) into series, most requests first.
fn collect_series(
    q: &MetricsQuery,
    batches: &[RecordBatch],
) -> Result<(Vec<Series>, usize), QueryError> {
    use crate::engine::{floats, ints, opt_f64, strings};
    let mut groups: HashMap<Vec<Option<String>>, Series> = HashMap::new();
    for b in batches {
        let bucket = ints(b, "bucket")?;
        let dims = (0..q.group_by.len())
            .map(|i| strings(b, &format!("d{i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let requests = ints(b, "requests")?;
        let errors = ints(b, "errors")?;
        let (tin, tout) = (ints(b, "input_tokens")?, ints(b, "output_tokens")?);
        let cost = floats(b, "cost")?;
        let (p50, p95, p99) = (floats(b, "p50")?, floats(b, "p95")?, floats(b, "p99")?);
        let est = [
            floats(b, "est_requests")?,
            floats(b, "est_input_tokens")?,
            floats(b, "est_output_tokens")?,
            floats(b, "est_cost")?,
        ];
        for r in 0..b.num_rows() {
            let key: Vec<Option<String>> =
                dims.iter().map(|a| crate::engine::opt_str(a, r)).collect();
            let series = groups.entry(key.clone()).or_insert_with(|| Series {
                group: q
                    .group_by
                    .iter()
                    .zip(&key)
                    .map(|(d, v)| (d.as_str().to_owned(), v.clone()))
                    .collect(),
                requests: 0,
                errors: 0,
                input_tokens: 0,
                output_tokens: 0,
                cost_usd: 0.0,
                estimated: Estimated::default(),
                points: Vec::new(),
            });
            let n = requests.value(r).max(0) as u64;
            let e = if errors.is_null(r) {
                0
            } else {
                errors.value(r).max(0) as u64
            };
            let ms = |a: &arrow::array::Float64Array| opt_f64(a, r).map(|ns| ns / 1e6);
            let point = Point {
                time: rfc3339(bucket.value(r)),
                time_ns: bucket.value(r),
                requests: n,
                errors: e,
                error_rate: if n == 0 { 0.0 } else { e as f64 / n as f64 },
                latency_ms: Latency {
                    p50: ms(&p50),
                    p95: ms(&p95),
                    p99: ms(&p99),
                },
                input_tokens: if tin.is_null(r) { 0 } else { tin.value(r) },
                output_tokens: if tout.is_null(r) { 0 } else { tout.value(r) },
                cost_usd: opt_f64(&cost, r).unwrap_or(0.0),
                estimated: Estimated {
                    requests: opt_f64(&est[0], r).unwrap_or(0.0),
                    input_tokens: opt_f64(&est[1], r).unwrap_or(0.0),
                    output_tokens: opt_f64(&est[2], r).unwrap_or(0.0),
                    cost_usd: opt_f64(&est[3], r).unwrap_or(0.0),
                },
            };
            series.requests += point.requests;
            series.errors += point.errors;
            series.input_tokens += point.input_tokens;
            series.output_tokens += point.output_tokens;
            series.cost_usd += point.cost_usd;
            series.estimated.requests += point.estimated.requests;
            series.estimated.input_tokens += point.estimated.input_tokens;
            series.estimated.output_tokens += point.estimated.output_tokens;
            series.estimated.cost_usd += point.estimated.cost_usd;
            series.points.push(point);
        }
    }
    let mut series: Vec<Series> = groups.into_values().collect();
    series.sort_by(|a, b| {
        b.requests
            .cmp(&a.requests)
            .then_with(|| a.group.cmp(&b.group))
    });
    let omitted = series.len().saturating_sub(q.max_groups);
    series.truncate(q.max_groups);
    for s in &mut series {
        s.points.sort_by_key(|p| p.time_ns);
    }
    Ok((series, omitted))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tests::params;

    const HOUR: i64 = 3_600 * 1_000_000_000;

    #[test]
    fn the_level_follows_the_dimensions() {
        let q = parse_metrics(&params(&[("group_by", "model")]), (0, HOUR)).unwrap();
        assert_eq!(q.level, Level::Span);
        let q = parse_metrics(&params(&[("group_by", "user,feature")]), (0, HOUR)).unwrap();
        assert_eq!(q.level, Level::Trace);
        assert_eq!(q.group_by, [Dimension::User, Dimension::Feature]);
        let q = parse_metrics(&params(&[("group_by", "prompt")]), (0, HOUR)).unwrap();
        assert_eq!(
            q.group_by,
            [Dimension::PromptName, Dimension::PromptVersion]
        );
        assert_eq!(q.step_ns, HOUR / 60);
    }

    #[test]
    fn bad_queries_are_named() {
        let cases = [
            (vec![("group_by", "colour")], "unknown dimension \"colour\""),
            (
                vec![("group_by", "model"), ("level", "trace")],
                "group at level=span",
            ),
            (vec![("step", "1ms")], "at least 1s"),
            (vec![("step", "1s")], "at most 10000"),
            (vec![("level", "row")], "level must be"),
            (vec![("llm_kind", "bot")], "llm_kind \"bot\""),
            (vec![("max_groups", "0")], "max_groups"),
            (vec![("colour", "red")], "unknown parameter \"colour\""),
        ];
        for (p, want) in cases {
            let err = parse_metrics(&params(&p), (0, 10 * HOUR)).expect_err("an error");
            assert!(err.contains(want), "{p:?}: {err}");
        }
    }

    #[test]
    fn filter_values_travel_as_parameters() {
        let q = parse_metrics(
            &params(&[("group_by", "model,user"), ("user_id", "x' OR 1=1 --")]),
            (0, HOUR),
        )
        .unwrap();
        let (sql, params) = metrics_sql(&q, "SELECT 1", Params(vec![]));
        assert!(!sql.contains("OR 1=1"));
        assert!(params.contains(&ScalarValue::Utf8(Some("x' OR 1=1 --".into()))));
    }

    #[test]
    fn the_attribute_pattern_finds_escaped_values() {
        let re = regex::Regex::new(&attribute_pattern("loupe.feature")).unwrap();
        let json = r#"{"a":"b","loupe.feature":"check \"out\"","loupeXfeature":"no"}"#;
        let found = re.captures(json).unwrap();
        assert_eq!(&found[1], r#"check \"out\""#);
        assert!(re.captures(r#"{"loupeXfeature":"no"}"#).is_none());
    }

    #[test]
    fn steps_are_printed_in_their_largest_unit() {
        assert_eq!(humantime_fmt(Duration::from_secs(86_400)), "1d");
        assert_eq!(humantime_fmt(Duration::from_secs(7_200)), "2h");
        assert_eq!(humantime_fmt(Duration::from_secs(90)), "90s");
    }
}
