//! Alert rules and their evaluation: one evaluator for `loupe alerts check`, the
//! rules file of `loupe standalone` and the operator's AlertRules.
//!
//! A rule reads the same numbers the metrics and score APIs serve (through
//! [`AlertData`], in process or over HTTP), so an alert and the dashboard behind it
//! never disagree, and sampled-out traffic is extrapolated the way the metrics API
//! does (`estimated.*`).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::scores::ScoreMetrics;
use crate::stats::{MetricsResponse, Series};

/// What a rule watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, Hash)]
pub enum AlertKind {
    /// Cost over `window` against its average over the `baseline` before it
    /// (threshold: the ratio, e.g. 2 for twice).
    #[serde(alias = "cost_spike")]
    CostSpike,
    /// The average of score `scoreName` over `window` against the `baseline` before
    /// it (threshold: the relative drop, e.g. 0.1 for 10 %).
    #[serde(alias = "score_drop")]
    ScoreDrop,
    /// The `percentile` (50, 95 or 99) of trace (or span) latency over `window`
    /// (threshold: milliseconds).
    #[serde(alias = "latency_percentile")]
    LatencyPercentile,
    /// Traces with an error over all traces in `window` (threshold: a fraction).
    #[serde(alias = "error_rate")]
    ErrorRate,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::CostSpike => "cost_spike",
            AlertKind::ScoreDrop => "score_drop",
            AlertKind::LatencyPercentile => "latency_percentile",
            AlertKind::ErrorRate => "error_rate",
        }
    }
}

/// Rows latency is measured over.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum LatencyLevel {
    /// Requests: a trace from its first start to its last end.
    #[default]
    Trace,
    /// LLM and embedding calls.
    Span,
}

/// A rule as written (rules file, AlertRule spec): durations as text, filters by
/// name. [`RuleSpec::validate`] turns it into a [`Rule`], naming any bad field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    pub kind: AlertKind,
    /// The window evaluated, e.g. `15m`, `1h`.
    pub window: String,
    /// CostSpike and ScoreDrop: the period before the window compared with;
    /// default `7d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// In the unit of `kind`: a ratio (CostSpike), a relative drop (ScoreDrop),
    /// milliseconds (LatencyPercentile), a fraction (ErrorRate).
    pub threshold: f64,
    /// How long the condition must hold before the alert fires; default at once.
    #[serde(rename = "for", default, skip_serializing_if = "Option::is_none")]
    pub for_duration: Option<String>,
    /// How long the condition must stay clear before a firing alert resolves;
    /// default `for`, at least one evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolve_after: Option<String>,
    /// ScoreDrop: the score's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_name: Option<String>,
    /// LatencyPercentile: 50, 95 or 99.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentile: Option<f64>,
    /// LatencyPercentile: `trace` (default) or `span`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LatencyLevel>,
    /// CostSpike: the least cost in the window, in USD, that may fire (default 1),
    /// so an idle project does not page over cents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_cost: Option<f64>,
    /// ScoreDrop: the least scores in the window and in the baseline (default 20);
    /// ErrorRate: the least requests in the window (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_count: Option<u64>,
    /// Equality filters of the metrics API: `service`, `name` (a span name), `model`,
    /// `provider`, `feature`, `environment`, `prompt_name`, `prompt_version`,
    /// `user_id`, `session_id`, `llm_kind`. ScoreDrop counts the scores of traces
    /// with a span matching them (not `feature`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub filters: BTreeMap<String, String>,
}

/// Latency percentiles the metrics API serves.
pub const PERCENTILES: [f64; 3] = [50.0, 95.0, 99.0];

/// A validated rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub kind: AlertKind,
    pub window: Duration,
    /// The window as written (`1h`), for messages.
    pub window_text: String,
    pub baseline: Duration,
    pub threshold: f64,
    pub for_duration: Duration,
    pub resolve_after: Duration,
    pub score_name: Option<String>,
    pub percentile: f64,
    pub level: LatencyLevel,
    pub min_cost: f64,
    pub min_count: u64,
    pub filters: BTreeMap<String, String>,
}

/// Firing alerts resolve only once the value is this much on the good side of the
/// threshold (5 %), so a value hovering at the threshold does not flap.
pub const HYSTERESIS: f64 = 0.05;

fn duration(field: &str, s: &str) -> Result<Duration, String> {
    let d = crate::api::parse_duration(s, None).map_err(|e| format!("{field}: {e}"))?;
    if d.is_zero() {
        return Err(format!("{field}: {s:?} must be longer than zero"));
    }
    Ok(d)
}

impl RuleSpec {
    /// Checks every field; the error names the field and what it accepts.
    pub fn validate(&self) -> Result<Rule, String> {
        let window = duration("window", &self.window)?;
        if window < Duration::from_secs(60) {
            return Err(format!(
                "window: {:?} is shorter than a minute",
                self.window
            ));
        }
        let baseline = match &self.baseline {
            Some(b) => duration("baseline", b)?,
            None => Duration::from_secs(7 * 86_400),
        };
        if matches!(self.kind, AlertKind::CostSpike | AlertKind::ScoreDrop) && baseline < window {
            return Err(format!(
                "baseline: {} is shorter than the window ({})",
                self.baseline.as_deref().unwrap_or("7d"),
                self.window
            ));
        }
        let for_duration = match &self.for_duration {
            Some(f) if f.trim() == "0s" || f.trim() == "0" => Duration::ZERO,
            Some(f) => duration("for", f)?,
            None => Duration::ZERO,
        };
        let resolve_after = match &self.resolve_after {
            Some(r) => duration("resolveAfter", r)?,
            None => for_duration,
        };
        let t = self.threshold;
        if !t.is_finite() {
            return Err("threshold: must be a number".into());
        }
        match self.kind {
            AlertKind::CostSpike if t <= 1.0 => {
                return Err(format!(
                    "threshold: {t} — CostSpike's threshold is a ratio to the baseline average and must be above 1 (2 = twice)"
                ));
            }
            AlertKind::ScoreDrop | AlertKind::ErrorRate if !(t > 0.0 && t <= 1.0) => {
                return Err(format!(
                    "threshold: {t} — {}'s threshold is a fraction in (0, 1] (0.1 = 10 %)",
                    self.kind.as_str()
                ));
            }
            AlertKind::LatencyPercentile if t <= 0.0 => {
                return Err(format!(
                    "threshold: {t} — LatencyPercentile's threshold is milliseconds above 0"
                ));
            }
            _ => {}
        }
        let score_name = match (self.kind, &self.score_name) {
            (AlertKind::ScoreDrop, None) => {
                return Err("scoreName: ScoreDrop needs the name of the score".into());
            }
            (AlertKind::ScoreDrop, Some(n)) if n.trim().is_empty() => {
                return Err("scoreName: must not be empty".into());
            }
            (_, s) => s.clone(),
        };
        let percentile = match (self.kind, self.percentile) {
            (AlertKind::LatencyPercentile, None) => {
                return Err("percentile: LatencyPercentile needs 50, 95 or 99".into());
            }
            (_, Some(p)) if !PERCENTILES.contains(&p) => {
                return Err(format!("percentile: {p} is not one of 50, 95, 99"));
            }
            (_, p) => p.unwrap_or(99.0),
        };
        for key in self.filters.keys() {
            if !crate::stats::filter_names().any(|f| f == key) {
                return Err(format!(
                    "filters: unknown filter {key:?}; one of {}",
                    crate::stats::filter_names().collect::<Vec<_>>().join(", ")
                ));
            }
        }
        if self.kind == AlertKind::ScoreDrop && self.filters.contains_key("feature") {
            return Err("filters: feature cannot filter scores (ScoreDrop)".into());
        }
        let min_cost = self.min_cost.unwrap_or(1.0);
        if !(min_cost >= 0.0 && min_cost.is_finite()) {
            return Err(format!("minCost: {min_cost} must be 0 or more"));
        }
        let min_count = self.min_count.unwrap_or(match self.kind {
            AlertKind::ErrorRate => 100,
            AlertKind::ScoreDrop => 20,
            _ => 0,
        });
        Ok(Rule {
            kind: self.kind,
            window,
            window_text: self.window.trim().to_owned(),
            baseline,
            threshold: t,
            for_duration,
            resolve_after,
            score_name,
            percentile,
            level: self.level.unwrap_or_default(),
            min_cost,
            min_count,
            filters: self.filters.clone(),
        })
    }
}

/// Where a rule's numbers come from: the query engine in process, or a querier's
/// HTTP API. Both answer the metrics and score-metrics APIs' questions.
pub trait AlertData {
    /// `GET /api/v1/metrics` over `[start_ns, end_ns)` with `params` (step, level,
    /// filters; never a range).
    fn metrics(
        &self,
        range: (i64, i64),
        params: &HashMap<String, String>,
    ) -> impl std::future::Future<Output = Result<MetricsResponse, String>> + Send;
    /// `GET /api/v1/scores/metrics` of score `name` over `[start_ns, end_ns)` in one
    /// bucket of `step_ns`, of the traces matching `filters` (rule filter names:
    /// `name` is a span name).
    fn score_metrics(
        &self,
        range: (i64, i64),
        step_ns: i64,
        name: &str,
        filters: &BTreeMap<String, String>,
    ) -> impl std::future::Future<Output = Result<ScoreMetrics, String>> + Send;
}

/// One evaluation of a rule.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Evaluation {
    /// The value compared with the threshold (`None`: not enough data).
    pub value: Option<f64>,
    pub threshold: f64,
    /// Beyond the threshold (and above the minimum volumes).
    pub breached: bool,
    /// On the good side of the threshold by the hysteresis margin (or no data):
    /// what resolves a firing alert.
    pub clear: bool,
    /// The numbers behind the value, for people: `cost $12.40 in 1h vs $3.10 average`.
    pub summary: String,
    /// The evaluated window, Unix nanoseconds.
    pub start_ns: i64,
    pub end_ns: i64,
    /// Search parameters (`GET /api/v1/traces`) that list the traces behind the value
    /// in the window: the failed, slow, costly or low-scored ones.
    pub traces_query: Vec<(String, String)>,
}

/// Filters a trace search takes (the others narrow metrics only).
const SEARCH_FILTERS: [&str; 8] = [
    "service",
    "name",
    "model",
    "llm_kind",
    "user_id",
    "session_id",
    "prompt_name",
    "prompt_version",
];

impl Evaluation {
    /// `GET /api/v1/traces?…` for the traces behind this evaluation of `rule`.
    pub fn traces_path(&self, rule: &Rule) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("start", &(self.start_ns / 1_000_000_000).to_string());
        q.append_pair("end", &(self.end_ns / 1_000_000_000).to_string());
        for (k, v) in &rule.filters {
            if SEARCH_FILTERS.contains(&k.as_str()) {
                q.append_pair(k, v);
            }
        }
        for (k, v) in &self.traces_query {
            q.append_pair(k, v);
        }
        q.append_pair("limit", "50");
        format!("/api/v1/traces?{}", q.finish())
    }
}

/// Unit of a kind's value, for display.
pub fn format_value(kind: AlertKind, v: f64) -> String {
    match kind {
        AlertKind::CostSpike => format!("{v:.2}×"),
        AlertKind::ScoreDrop => format!("{:.1} %", v * 100.0),
        AlertKind::LatencyPercentile => format!("{v:.0} ms"),
        AlertKind::ErrorRate => format!("{:.2} %", v * 100.0),
    }
}

fn params(rule: &Rule, step: Duration, level: &str) -> HashMap<String, String> {
    let mut p: HashMap<String, String> = rule
        .filters
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    p.insert("step".into(), format!("{}s", step.as_secs().max(1)));
    p.insert("level".into(), level.into());
    p
}

/// The one series of an ungrouped metrics answer (none when nothing matched).
fn total(m: &MetricsResponse) -> Option<&Series> {
    m.series.first()
}

fn ns(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// `ns` rounded up to a whole second: ranges end there, so HTTP (whole seconds) and
/// in-process evaluation read the same range and nothing of the last second is left
/// out.
pub fn whole_seconds_after(ns: i64) -> i64 {
    let s = 1_000_000_000;
    ns + (s - ns.rem_euclid(s)) % s
}

/// Evaluates `rule` for the window ending at `now_ns` (rounded up to a second).
pub async fn evaluate(
    rule: &Rule,
    data: &impl AlertData,
    now_ns: i64,
) -> Result<Evaluation, String> {
    let end = whole_seconds_after(now_ns);
    let start = end - ns(rule.window);
    let base_start = start - ns(rule.baseline);
    let t = rule.threshold;
    let window_text = &rule.window_text;
    let mut eval = Evaluation {
        value: None,
        threshold: t,
        breached: false,
        clear: true,
        summary: String::new(),
        start_ns: start,
        end_ns: end,
        traces_query: Vec::new(),
    };
    match rule.kind {
        AlertKind::CostSpike => {
            let now = data
                .metrics((start, end), &params(rule, rule.window, "trace"))
                .await?;
            let before = data
                .metrics((base_start, start), &params(rule, rule.baseline, "trace"))
                .await?;
            let cost = total(&now).map_or(0.0, |s| s.estimated.cost_usd);
            let windows = rule.baseline.as_secs_f64() / rule.window.as_secs_f64();
            let average = total(&before).map_or(0.0, |s| s.estimated.cost_usd) / windows;
            if average <= 0.0 {
                eval.summary = format!(
                    "cost ${cost:.2} in {window_text}; no cost in the baseline to compare with"
                );
                return Ok(eval);
            }
            let ratio = cost / average;
            eval.value = Some(ratio);
            // The traces costlier than the window's average one.
            let traces = total(&now).map_or(0.0, |s| s.estimated.requests);
            if traces > 0.0 {
                eval.traces_query
                    .push(("min_cost".into(), format!("{:.6}", cost / traces)));
            }
            eval.breached = ratio > t && cost >= rule.min_cost;
            eval.clear = ratio < t * (1.0 - HYSTERESIS) || cost < rule.min_cost;
            eval.summary = format!(
                "cost ${cost:.2} in {window_text} is {ratio:.2}× the baseline average of ${average:.2} (threshold {t}×{})",
                if cost < rule.min_cost {
                    format!(", below the minimum of ${:.2}", rule.min_cost)
                } else {
                    String::new()
                }
            );
        }
        AlertKind::ScoreDrop => {
            let name = rule.score_name.as_deref().unwrap_or_default();
            let now = data
                .score_metrics((start, end), ns(rule.window), name, &rule.filters)
                .await?;
            let before = data
                .score_metrics((base_start, start), ns(rule.baseline), name, &rule.filters)
                .await?;
            let pick = |m: &ScoreMetrics| {
                m.series
                    .iter()
                    .find(|s| s.name == name)
                    .map(|s| (s.avg, s.count))
                    .unwrap_or((None, 0))
            };
            let ((avg, count), (base_avg, base_count)) = (pick(&now), pick(&before));
            let (Some(avg), Some(base_avg)) = (avg, base_avg) else {
                eval.summary = format!(
                    "{count} {name} scores in {window_text}, {base_count} in the baseline: no average to compare"
                );
                return Ok(eval);
            };
            if count < rule.min_count || base_count < rule.min_count || base_avg == 0.0 {
                eval.summary = format!(
                    "{count} {name} scores in {window_text} and {base_count} in the baseline; at least {} each are needed",
                    rule.min_count
                );
                return Ok(eval);
            }
            let drop = (base_avg - avg) / base_avg.abs();
            eval.value = Some(drop);
            // The traces scored below the window's average.
            eval.traces_query
                .push(("score".into(), format!("{name}<{avg:.6}")));
            eval.breached = drop > t;
            eval.clear = drop < t * (1.0 - HYSTERESIS);
            eval.summary = format!(
                "average {name} {avg:.3} over {count} scores in {window_text}, {base_avg:.3} over {base_count} before: {} (threshold a {:.1} % drop)",
                if drop >= 0.0 {
                    format!("down {:.1} %", drop * 100.0)
                } else {
                    format!("up {:.1} %", -drop * 100.0)
                },
                t * 100.0
            );
        }
        AlertKind::LatencyPercentile => {
            let level = match rule.level {
                LatencyLevel::Trace => "trace",
                LatencyLevel::Span => "span",
            };
            let now = data
                .metrics((start, end), &params(rule, rule.window, level))
                .await?;
            let point = total(&now).and_then(|s| s.points.first());
            let value = point.and_then(|p| match rule.percentile as u32 {
                50 => p.latency_ms.p50,
                95 => p.latency_ms.p95,
                _ => p.latency_ms.p99,
            });
            let requests = point.map_or(0, |p| p.requests);
            let Some(v) = value else {
                eval.summary = format!("no {level}s in {window_text}");
                return Ok(eval);
            };
            eval.value = Some(v);
            eval.breached = v > t && requests >= rule.min_count;
            eval.traces_query
                .push(("min_duration".into(), format!("{}ms", t.round())));
            eval.clear = v < t * (1.0 - HYSTERESIS);
            eval.summary = format!(
                "p{} {level} latency {v:.0} ms over {requests} {level}s in {window_text} (threshold {t:.0} ms)",
                rule.percentile
            );
        }
        AlertKind::ErrorRate => {
            let now = data
                .metrics((start, end), &params(rule, rule.window, "trace"))
                .await?;
            let (requests, errors, estimated) = total(&now).map_or((0, 0, 0.0), |s| {
                (s.requests, s.errors, s.estimated.requests)
            });
            if requests == 0 {
                eval.summary = format!("no requests in {window_text}");
                return Ok(eval);
            }
            let rate = errors as f64 / requests as f64;
            eval.value = Some(rate);
            eval.traces_query.push(("status".into(), "error".into()));
            // The minimum volume counts every request, sampled out or not.
            let enough = estimated.max(requests as f64) >= rule.min_count as f64;
            eval.breached = rate > t && enough;
            eval.clear = rate < t * (1.0 - HYSTERESIS) || !enough;
            eval.summary = format!(
                "{errors} of {requests} requests failed in {window_text}: {:.2} % (threshold {:.2} %{})",
                rate * 100.0,
                t * 100.0,
                if enough {
                    String::new()
                } else {
                    format!(", at least {} requests are needed", rule.min_count)
                }
            );
        }
    }
    Ok(eval)
}

/// Where an alert is.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum AlertState {
    #[default]
    Inactive,
    /// Breached, waiting for `for` to pass.
    Pending,
    Firing,
    /// Was firing, now clear (until it breaches again).
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Inactive => "Inactive",
            AlertState::Pending => "Pending",
            AlertState::Firing => "Firing",
            AlertState::Resolved => "Resolved",
        }
    }
}

/// What an evaluator keeps of a rule between evaluations.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertStatus {
    pub state: AlertState,
    /// When the current state began, Unix nanoseconds.
    pub since_ns: i64,
    /// Since when a firing alert has been clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear_since_ns: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    pub last_evaluation_ns: i64,
    /// The last evaluation's error, if it failed (the state is then kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Computes the next status from an evaluation (or its error). Returns the new
/// status and the state entered, if it changed.
pub fn advance(
    prev: &AlertStatus,
    rule: &Rule,
    eval: Result<&Evaluation, &str>,
    now_ns: i64,
) -> (AlertStatus, Option<AlertState>) {
    let mut next = prev.clone();
    next.last_evaluation_ns = now_ns;
    let eval = match eval {
        Ok(e) => e,
        Err(err) => {
            next.last_error = Some(err.to_owned());
            return (next, None);
        }
    };
    next.last_error = None;
    next.value = eval.value;
    let enter = |s: &mut AlertStatus, state: AlertState| {
        s.state = state;
        s.since_ns = now_ns;
        s.clear_since_ns = None;
    };
    let held = |since: i64, d: Duration| now_ns.saturating_sub(since) >= ns(d);
    match prev.state {
        AlertState::Inactive | AlertState::Resolved if eval.breached => {
            if rule.for_duration.is_zero() {
                enter(&mut next, AlertState::Firing);
            } else {
                enter(&mut next, AlertState::Pending);
            }
        }
        AlertState::Pending if eval.breached => {
            if held(prev.since_ns, rule.for_duration) {
                enter(&mut next, AlertState::Firing);
            }
        }
        AlertState::Pending => enter(&mut next, AlertState::Inactive),
        AlertState::Firing if eval.clear => {
            let since = prev.clear_since_ns.unwrap_or(now_ns);
            if held(since, rule.resolve_after) {
                enter(&mut next, AlertState::Resolved);
            } else {
                next.clear_since_ns = Some(since);
            }
        }
        AlertState::Firing => next.clear_since_ns = None,
        AlertState::Inactive | AlertState::Resolved => {}
    }
    let changed = (next.state != prev.state).then_some(next.state);
    (next, changed)
}

/// A rules file (`loupe alerts check --rules`): `rules:`, a list of [`RuleSpec`]
/// fields plus `name` and an optional `project`.
pub struct RulesFile;

/// One rule of a rules file.
#[derive(Clone, Debug, Serialize)]
pub struct NamedRule {
    pub name: String,
    /// The project (`<namespace>/<project>`), when the file names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<loupe_core::TenantId>,
    #[serde(flatten)]
    pub spec: RuleSpec,
    /// Where notifications go.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<crate::notify::Target>,
    /// `notify`, validated.
    #[serde(skip)]
    pub sinks: Vec<crate::notify::Sink>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    rules: Vec<serde_json::Map<String, serde_json::Value>>,
}

impl RulesFile {
    /// Parses and validates a rules file; errors name the rule and the field, and an
    /// unknown field (a typo) is an error rather than a default.
    pub fn parse(text: &str) -> Result<Vec<(NamedRule, Rule)>, String> {
        let raw: RawRules = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, mut fields) in raw.rules.into_iter().enumerate() {
            let text_field = |v: Option<serde_json::Value>, what: &str| match v {
                None => Ok(None),
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(Some(s)),
                Some(_) => Err(format!("rules[{i}]: {what} must be a non-empty string")),
            };
            let name = text_field(fields.remove("name"), "name")?
                .ok_or_else(|| format!("rules[{i}]: every rule needs a name"))?;
            let project = text_field(fields.remove("project"), "project")?
                .map(|p| p.parse::<loupe_core::TenantId>())
                .transpose()
                .map_err(|e| format!("rules[{i}] ({name}): project: {e}"))?;
            let notify: Vec<crate::notify::Target> = match fields.remove("notify") {
                None => Vec::new(),
                Some(v) => serde_json::from_value(v)
                    .map_err(|e| format!("rules[{i}] ({name}): notify: {e}"))?,
            };
            let sinks = notify
                .iter()
                .enumerate()
                .map(|(j, t)| {
                    t.validate()
                        .map_err(|e| format!("rules[{i}] ({name}): notify[{j}]: {e}"))
                })
                .collect::<Result<Vec<_>, String>>()?;
            if !names.insert(name.clone()) {
                return Err(format!("rules[{i}]: the name {name:?} is used twice"));
            }
            let spec: RuleSpec = serde_json::from_value(serde_json::Value::Object(fields))
                .map_err(|e| format!("rules[{i}] ({name}): {e}"))?;
            let rule = spec
                .validate()
                .map_err(|e| format!("rules[{i}] ({name}): {e}"))?;
            out.push((
                NamedRule {
                    name,
                    project,
                    spec,
                    notify,
                    sinks,
                },
                rule,
            ));
        }
        Ok(out)
    }
}

/// [`AlertData`] over a querier's HTTP API, with a project's query key.
#[derive(Clone)]
pub struct HttpData {
    client: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl HttpData {
    pub fn new(base_url: &str, key: Option<String>) -> HttpData {
        let _ = rustls::crypto::ring::default_provider().install_default();
        HttpData {
            client: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(60))
                .build()
                .expect("an HTTP client with default settings builds"),
            base: base_url.trim_end_matches('/').to_owned(),
            key,
        }
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, String> {
        let url = format!("{}{path}", self.base);
        let mut request = self.client.get(&url).query(query);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| {
            format!(
                "cannot reach the query API at {}: {}",
                self.base,
                if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "connection refused or unreachable"
                } else {
                    "request failed"
                }
            )
        })?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| format!("reading the answer of {url}: {e}"))?;
        if !status.is_success() {
            let msg = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or(body);
            return Err(format!("{status}: {msg}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("unexpected answer from {url}: {e}"))
    }
}

fn secs(ns: i64) -> String {
    (ns / 1_000_000_000).to_string()
}

impl AlertData for HttpData {
    async fn metrics(
        &self,
        range: (i64, i64),
        params: &HashMap<String, String>,
    ) -> Result<MetricsResponse, String> {
        let mut query = vec![("start", secs(range.0)), ("end", secs(range.1))];
        query.extend(params.iter().map(|(k, v)| (k.as_str(), v.clone())));
        self.get("/api/v1/metrics", &query).await
    }

    async fn score_metrics(
        &self,
        range: (i64, i64),
        step_ns: i64,
        name: &str,
        filters: &BTreeMap<String, String>,
    ) -> Result<ScoreMetrics, String> {
        let mut query = vec![
            ("start", secs(range.0)),
            ("end", secs(range.1)),
            ("step", format!("{}s", (step_ns / 1_000_000_000).max(1))),
            ("name", name.to_owned()),
        ];
        // The score API's `name` is the score's: a span name goes as `span_name`.
        for (k, v) in filters {
            let k = if k == "name" { "span_name" } else { k.as_str() };
            query.push((k, v.clone()));
        }
        self.get("/api/v1/scores/metrics", &query).await
    }
}

/// [`AlertData`] from the query engine in process (standalone), for one tenant.
pub struct EngineData {
    pub engine: std::sync::Arc<crate::QueryEngine>,
    pub tenant: loupe_core::TenantId,
}

impl AlertData for EngineData {
    async fn metrics(
        &self,
        range: (i64, i64),
        params: &HashMap<String, String>,
    ) -> Result<MetricsResponse, String> {
        let q = crate::stats::parse_metrics(params, range)?;
        self.engine
            .metrics(&self.tenant, &q)
            .await
            .map_err(|e| e.to_string())
    }

    async fn score_metrics(
        &self,
        range: (i64, i64),
        step_ns: i64,
        name: &str,
        filters: &BTreeMap<String, String>,
    ) -> Result<ScoreMetrics, String> {
        let filters = crate::stats::parse_filters(
            &filters
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )?;
        self.engine
            .score_metrics(
                &self.tenant,
                (range.0, range.1, step_ns),
                Some(name),
                &filters,
            )
            .await
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;

    const S: i64 = 1_000_000_000;
    const NOW: i64 = 1_800_000_000 * S;

    fn spec(v: serde_json::Value) -> RuleSpec {
        serde_json::from_value(v).unwrap()
    }

    fn rule(v: serde_json::Value) -> Rule {
        spec(v).validate().unwrap()
    }

    #[test]
    fn bad_rules_are_refused_naming_the_field() {
        let err = |v: serde_json::Value| spec(v).validate().unwrap_err();
        assert!(
            err(json!({ "kind": "CostSpike", "window": "1h", "threshold": 0.5 }))
                .starts_with("threshold: 0.5 — CostSpike")
        );
        assert_eq!(
            err(json!({ "kind": "score_drop", "window": "1h", "threshold": 0.1 })),
            "scoreName: ScoreDrop needs the name of the score"
        );
        assert_eq!(
            err(
                json!({ "kind": "LatencyPercentile", "window": "1h", "threshold": 500, "percentile": 90 })
            ),
            "percentile: 90 is not one of 50, 95, 99"
        );
        assert!(
            err(json!({ "kind": "ErrorRate", "window": "1h", "threshold": 0.01, "filters": { "colour": "red" } }))
                .starts_with("filters: unknown filter \"colour\"")
        );
        assert!(
            err(json!({ "kind": "ErrorRate", "window": "soon", "threshold": 0.01 }))
                .starts_with("window: ")
        );
        assert!(
            err(json!({ "kind": "CostSpike", "window": "2d", "baseline": "1d", "threshold": 2 }))
                .starts_with("baseline: 1d is shorter than the window")
        );
    }

    #[test]
    fn a_rules_file_names_the_rule_of_an_error_and_refuses_unknown_fields() {
        let ok = RulesFile::parse(
            "rules:\n- name: cost\n  project: team-a/chat\n  kind: cost_spike\n  window: 1h\n  threshold: 2\n  for: 15m\n",
        )
        .unwrap();
        assert_eq!(
            ok[0].0.project.as_ref().map(ToString::to_string).as_deref(),
            Some("team-a/chat")
        );
        assert_eq!(ok[0].1.for_duration, Duration::from_secs(900));
        assert_eq!(ok[0].1.baseline, Duration::from_secs(7 * 86_400));
        let typo = RulesFile::parse(
            "rules:\n- name: cost\n  kind: CostSpike\n  window: 1h\n  threshold: 2\n  treshold: 3\n",
        )
        .unwrap_err();
        assert!(typo.contains("treshold"), "{typo}");
        let bad = RulesFile::parse(
            "rules:\n- name: a\n  kind: ErrorRate\n  window: 1h\n  threshold: 0.01\n- name: b\n  kind: ErrorRate\n  window: 1h\n  threshold: 5\n",
        )
        .unwrap_err();
        assert!(bad.starts_with("rules[1] (b): threshold: 5"), "{bad}");
    }

    fn eval(breached: bool, clear: bool) -> Evaluation {
        Evaluation {
            value: Some(1.0),
            threshold: 1.0,
            breached,
            clear,
            summary: String::new(),
            start_ns: 0,
            end_ns: 0,
            traces_query: Vec::new(),
        }
    }

    #[test]
    fn an_alert_fires_after_for_and_resolves_only_when_clear_for_long_enough() {
        let r = rule(
            json!({ "kind": "ErrorRate", "window": "5m", "threshold": 0.01, "for": "2m", "resolveAfter": "3m" }),
        );
        let min = 60 * S;
        let mut st = AlertStatus::default();
        let mut seen = Vec::new();
        // t=0 breach → pending; t=1m still pending; t=2m firing.
        for (t, e) in [
            (0, eval(true, false)),
            (min, eval(true, false)),
            (2 * min, eval(true, false)),
            // Between the threshold and the hysteresis margin: stays firing.
            (3 * min, eval(false, false)),
            // Clear from 4m; resolves at 7m, not before.
            (4 * min, eval(false, true)),
            (6 * min, eval(false, true)),
            (7 * min, eval(false, true)),
            // Breached again: pending, then a blip of clear goes back to inactive.
            (8 * min, eval(true, false)),
            (9 * min, eval(false, true)),
        ] {
            let (next, changed) = advance(&st, &r, Ok(&e), t);
            seen.push((t / min, next.state, changed.is_some()));
            st = next;
        }
        use AlertState::*;
        assert_eq!(
            seen,
            [
                (0, Pending, true),
                (1, Pending, false),
                (2, Firing, true),
                (3, Firing, false),
                (4, Firing, false),
                (6, Firing, false),
                (7, Resolved, true),
                (8, Pending, true),
                (9, Inactive, true),
            ]
        );
        assert_eq!(st.since_ns, 9 * min);
        // A failed evaluation keeps the state and records the error.
        let (failed, changed) = advance(&st, &r, Err("querier unreachable"), 10 * min);
        assert_eq!((failed.state, changed), (Inactive, None));
        assert_eq!(failed.last_error.as_deref(), Some("querier unreachable"));
    }

    #[test]
    fn without_for_a_breach_fires_at_once() {
        let r = rule(json!({ "kind": "ErrorRate", "window": "5m", "threshold": 0.01 }));
        let (st, changed) = advance(&AlertStatus::default(), &r, Ok(&eval(true, false)), S);
        assert_eq!(changed, Some(AlertState::Firing));
        // Resolves at the first clear evaluation (resolveAfter defaults to for = 0).
        let (st, changed) = advance(&st, &r, Ok(&eval(false, true)), 2 * S);
        assert_eq!(
            (st.state, changed),
            (AlertState::Resolved, Some(AlertState::Resolved))
        );
    }

    /// A metrics question: range start, end and parameters.
    type Asked = (i64, i64, HashMap<String, String>);

    /// Canned answers: one ungrouped series per range start.
    #[derive(Default)]
    struct Canned {
        series: Mutex<HashMap<i64, serde_json::Value>>,
        scores: Mutex<HashMap<i64, (f64, u64)>>,
        asked: Mutex<Vec<Asked>>,
    }

    fn response(series: Option<serde_json::Value>) -> MetricsResponse {
        serde_json::from_value(json!({
            "level": "trace", "start": "", "end": "", "start_ns": 0, "end_ns": 0,
            "step_seconds": 60.0, "group_by": [], "rows": "traces",
            "series": series.into_iter().collect::<Vec<_>>(), "groups_omitted": 0,
            "sampling": { "kept_spans": 0, "seen_spans": 0, "extrapolated": false, "note": "" },
        }))
        .unwrap()
    }

    fn series(requests: u64, errors: u64, cost: f64, p99: f64) -> serde_json::Value {
        let est = json!({ "requests": requests as f64, "input_tokens": 0.0, "output_tokens": 0.0, "cost_usd": cost });
        json!({
            "group": {}, "requests": requests, "errors": errors, "input_tokens": 0,
            "output_tokens": 0, "cost_usd": cost, "estimated": est,
            "points": [{
                "time": "", "time_ns": 0, "requests": requests, "errors": errors,
                "error_rate": 0.0, "latency_ms": { "p50": 1.0, "p95": 2.0, "p99": p99 },
                "input_tokens": 0, "output_tokens": 0, "cost_usd": cost, "estimated": est,
            }],
        })
    }

    impl AlertData for Canned {
        async fn metrics(
            &self,
            range: (i64, i64),
            params: &HashMap<String, String>,
        ) -> Result<MetricsResponse, String> {
            self.asked
                .lock()
                .unwrap()
                .push((range.0, range.1, params.clone()));
            Ok(response(self.series.lock().unwrap().get(&range.0).cloned()))
        }

        async fn score_metrics(
            &self,
            range: (i64, i64),
            _step_ns: i64,
            name: &str,
            _filters: &BTreeMap<String, String>,
        ) -> Result<ScoreMetrics, String> {
            let got = self.scores.lock().unwrap().get(&range.0).copied();
            Ok(serde_json::from_value(json!({
                "start": "", "end": "", "step_seconds": 1.0,
                "series": got.map(|(avg, count)| json!({ "name": name, "data_type": "numeric", "count": count, "avg": avg, "points": [] })).into_iter().collect::<Vec<_>>(),
            }))
            .unwrap())
        }
    }

    #[tokio::test]
    async fn cost_spike_compares_the_window_with_the_baseline_average() {
        let r = rule(
            json!({ "kind": "CostSpike", "window": "1h", "threshold": 2, "filters": { "model": "gpt-4o" } }),
        );
        let hour = 3600 * S;
        let data = Canned::default();
        // $30 this hour; $1680 over the 168 hours before: $10 an hour on average.
        data.series
            .lock()
            .unwrap()
            .insert(NOW - hour, series(100, 0, 30.0, 0.0));
        data.series
            .lock()
            .unwrap()
            .insert(NOW - hour - 168 * hour, series(100, 0, 1680.0, 0.0));
        let e = evaluate(&r, &data, NOW - 123).await.unwrap();
        assert_eq!(e.value, Some(3.0));
        assert!(e.breached && !e.clear);
        assert!(
            e.summary
                .starts_with("cost $30.00 in 1h is 3.00× the baseline average of $10.00"),
            "{}",
            e.summary
        );
        let asked = data.asked.lock().unwrap().clone();
        assert_eq!(
            (asked[0].0, asked[0].1),
            (NOW - hour, NOW),
            "whole seconds, up to the next one after now"
        );
        assert_eq!(asked[0].2["model"], "gpt-4o");
        assert_eq!(asked[0].2["step"], "3600s");
        assert_eq!(asked[1].2["step"], format!("{}s", 168 * 3600));

        // Below the minimum cost nothing fires, whatever the ratio.
        let small =
            rule(json!({ "kind": "CostSpike", "window": "1h", "threshold": 2, "minCost": 50 }));
        let e = evaluate(&small, &data, NOW).await.unwrap();
        assert!(!e.breached && e.clear);
        // No baseline: no value, nothing fires.
        let fresh = Canned::default();
        fresh
            .series
            .lock()
            .unwrap()
            .insert(NOW - hour, series(100, 0, 30.0, 0.0));
        let e = evaluate(&r, &fresh, NOW).await.unwrap();
        assert_eq!((e.value, e.breached), (None, false));
    }

    #[tokio::test]
    async fn error_rate_latency_and_score_drop_read_their_numbers() {
        let m5 = 300 * S;
        let data = Canned::default();
        data.series
            .lock()
            .unwrap()
            .insert(NOW - m5, series(200, 5, 1.0, 12_500.0));
        let errors = rule(json!({ "kind": "ErrorRate", "window": "5m", "threshold": 0.01 }));
        let e = evaluate(&errors, &data, NOW).await.unwrap();
        assert_eq!(e.value, Some(0.025));
        assert!(e.breached);
        // Too few requests to judge.
        let strict = rule(
            json!({ "kind": "ErrorRate", "window": "5m", "threshold": 0.01, "minCount": 1000 }),
        );
        assert!(!evaluate(&strict, &data, NOW).await.unwrap().breached);

        let slow = rule(
            json!({ "kind": "LatencyPercentile", "window": "5m", "threshold": 10000, "percentile": 99 }),
        );
        let e = evaluate(&slow, &data, NOW).await.unwrap();
        assert_eq!(e.value, Some(12_500.0));
        assert!(e.breached);
        let p50 = rule(
            json!({ "kind": "LatencyPercentile", "window": "5m", "threshold": 10000, "percentile": 50 }),
        );
        assert_eq!(evaluate(&p50, &data, NOW).await.unwrap().value, Some(1.0));

        let drop = rule(
            json!({ "kind": "ScoreDrop", "window": "1h", "baseline": "1d", "threshold": 0.1, "scoreName": "faithfulness" }),
        );
        let hour = 3600 * S;
        data.scores.lock().unwrap().insert(NOW - hour, (0.72, 40));
        data.scores
            .lock()
            .unwrap()
            .insert(NOW - hour - 24 * hour, (0.9, 400));
        let e = evaluate(&drop, &data, NOW).await.unwrap();
        assert!((e.value.unwrap() - 0.2).abs() < 1e-9, "{e:?}");
        assert!(e.breached, "{}", e.summary);
        // Not enough scores in the window.
        data.scores.lock().unwrap().insert(NOW - hour, (0.1, 3));
        let e = evaluate(&drop, &data, NOW).await.unwrap();
        assert!(!e.breached && e.value.is_none(), "{}", e.summary);
    }
}
