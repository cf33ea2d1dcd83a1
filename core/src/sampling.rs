//! Tail sampling: which complete traces of a tenant are kept.
//!
//! A [`SamplingPolicy`] (configured per tenant by a `SamplingPolicy` resource) is
//! applied to a whole trace once no span of it has arrived for
//! [`SamplingPolicy::decision_wait`]. A trace is kept when any keep rule matches;
//! otherwise a deterministic percentage of the remaining traces is kept
//! ([`probabilistic_keep`]), so that every writer replica takes the same decision.
//!
//! ```yaml
//! decision_wait: 10s          # hold a trace this long after its last span
//! keep_errors: true           # any span with status ERROR
//! root_duration_over: 5s      # root span longer than this
//! trace_duration_over: 30s    # last end - first start longer than this
//! cost_over_usd: 0.5          # summed cost_total_usd
//! tokens_over: 20000          # summed total tokens (or input + output)
//! attributes:                 # any span with one of these values
//!   - key: user.tier
//!     values: [enterprise]
//! percentage: 10              # of the rest, deterministic on the trace id
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, SpanRecord, StatusCode};

/// The longest accepted [`SamplingPolicy::decision_wait`].
pub const MAX_DECISION_WAIT: Duration = Duration::from_secs(10 * 60);

/// How long a trace is held after its last span when the policy does not say.
pub const DEFAULT_DECISION_WAIT: Duration = Duration::from_secs(10);

fn default_decision_wait() -> Duration {
    DEFAULT_DECISION_WAIT
}
fn default_keep_errors() -> bool {
    true
}
fn default_percentage() -> f64 {
    100.0
}

/// Tail-sampling rules of one tenant. A trace is kept when any keep rule matches;
/// otherwise a deterministic percentage of the rest is kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingPolicy {
    /// How long a trace is held after its last span arrived before it is decided. Default 10s.
    #[serde(default = "default_decision_wait", with = "humantime_serde")]
    pub decision_wait: Duration,
    /// Keep every trace with a span whose status is ERROR. Default true.
    #[serde(default = "default_keep_errors")]
    pub keep_errors: bool,
    /// Keep traces whose root span lasts longer than this (humantime string, e.g. "5s").
    #[serde(default, with = "humantime_serde")]
    pub root_duration_over: Option<Duration>,
    /// Keep traces whose whole duration (last end - first start) exceeds this.
    #[serde(default, with = "humantime_serde")]
    pub trace_duration_over: Option<Duration>,
    /// Keep traces whose summed cost_total_usd exceeds this (USD).
    #[serde(default)]
    pub cost_over_usd: Option<f64>,
    /// Keep traces whose summed tokens exceed this (total_tokens, or input+output when total is absent).
    #[serde(default)]
    pub tokens_over: Option<u64>,
    /// Keep traces where any span has one of these attribute values.
    #[serde(default)]
    pub attributes: Vec<AttributeRule>,
    /// Percentage (0..=100) of the remaining traces to keep, deterministic on trace_id. Default 100.
    #[serde(default = "default_percentage")]
    pub percentage: f64,
}

impl Default for SamplingPolicy {
    fn default() -> Self {
        SamplingPolicy {
            decision_wait: default_decision_wait(),
            keep_errors: default_keep_errors(),
            root_duration_over: None,
            trace_duration_over: None,
            cost_over_usd: None,
            tokens_over: None,
            attributes: Vec::new(),
            percentage: default_percentage(),
        }
    }
}

/// Keeps a trace when any of its spans has `key` set to one of `values`.
///
/// The key is looked up first among the normalized span fields by their OTel / Loupe
/// names (`user.id`, `session.id`, `prompt.name`, `prompt.version`, `service.name`,
/// `gen_ai.request.model`, `deployment.environment`), then in the span attributes,
/// then in the resource attributes; the first place that has the key gives the value.
/// A JSON string compares as the string, a number or bool by its JSON text (`3`,
/// `true`), an array when any of its elements matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributeRule {
    pub key: String,
    pub values: Vec<String>,
}

/// Why a trace was kept or dropped; the first matching rule, in declaration order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeepReason {
    Error,
    RootDuration,
    TraceDuration,
    Cost,
    Tokens,
    Attribute,
    Probabilistic,
    Dropped,
}

impl KeepReason {
    /// Every reason, in the order the rules are checked.
    pub const ALL: [KeepReason; 8] = [
        KeepReason::Error,
        KeepReason::RootDuration,
        KeepReason::TraceDuration,
        KeepReason::Cost,
        KeepReason::Tokens,
        KeepReason::Attribute,
        KeepReason::Probabilistic,
        KeepReason::Dropped,
    ];

    /// The lowercase label used as a Prometheus label value (`error`, `root_duration`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            KeepReason::Error => "error",
            KeepReason::RootDuration => "root_duration",
            KeepReason::TraceDuration => "trace_duration",
            KeepReason::Cost => "cost",
            KeepReason::Tokens => "tokens",
            KeepReason::Attribute => "attribute",
            KeepReason::Probabilistic => "probabilistic",
            KeepReason::Dropped => "dropped",
        }
    }
}

/// The sampling decision of one trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub keep: bool,
    pub reason: KeepReason,
}

impl Decision {
    fn kept(reason: KeepReason) -> Decision {
        Decision { keep: true, reason }
    }
}

impl SamplingPolicy {
    /// Decides one trace from the spans received for it.
    ///
    /// Rules are checked in the order of [`KeepReason`]; the first match is the reason.
    /// A root span is a span with an empty `parent_span_id`; when `spans` holds none
    /// (an incomplete trace) the root-duration rule does not match.
    pub fn decide(&self, trace_id: &[u8], spans: &[SpanRecord]) -> Decision {
        if self.keep_errors && spans.iter().any(|s| s.status() == StatusCode::Error) {
            return Decision::kept(KeepReason::Error);
        }
        if let Some(limit) = self.root_duration_over {
            let limit = limit.as_nanos();
            if spans
                .iter()
                .any(|s| s.parent_span_id.is_empty() && u128::from(s.duration_ns()) > limit)
            {
                return Decision::kept(KeepReason::RootDuration);
            }
        }
        if let Some(limit) = self.trace_duration_over
            && let Some(first) = spans.iter().map(|s| s.start_ns).min()
        {
            let last = spans.iter().map(|s| s.end_ns).max().unwrap_or(first);
            if u128::from(last.saturating_sub(first)) > limit.as_nanos() {
                return Decision::kept(KeepReason::TraceDuration);
            }
        }
        if let Some(limit) = self.cost_over_usd {
            let cost: f64 = spans
                .iter()
                .filter_map(|s| s.cost_total_usd)
                .filter(|c| c.is_finite())
                .sum();
            if cost > limit {
                return Decision::kept(KeepReason::Cost);
            }
        }
        if let Some(limit) = self.tokens_over
            && trace_tokens(spans) > limit
        {
            return Decision::kept(KeepReason::Tokens);
        }
        if !self.attributes.is_empty() && self.any_attribute_matches(spans) {
            return Decision::kept(KeepReason::Attribute);
        }
        if probabilistic_keep(trace_id, self.percentage) {
            Decision::kept(KeepReason::Probabilistic)
        } else {
            Decision {
                keep: false,
                reason: KeepReason::Dropped,
            }
        }
    }

    /// True when every trace is kept whatever its spans (percentage >= 100): traces
    /// need not wait to be complete before they are written.
    pub fn keeps_everything(&self) -> bool {
        self.percentage >= 100.0
    }

    /// Checks the bounds; errors name the field under `field` (e.g.
    /// `tenants[2].sampling.attributes[0].values`).
    pub fn validate(&self, field: &str) -> Result<(), Error> {
        let invalid = |name: &str, reason: String| Error::InvalidConfig {
            field: format!("{field}.{name}"),
            reason,
        };
        if !self.percentage.is_finite() || !(0.0..=100.0).contains(&self.percentage) {
            return Err(invalid(
                "percentage",
                format!("{} is outside 0..=100", self.percentage),
            ));
        }
        if let Some(cost) = self.cost_over_usd
            && (!cost.is_finite() || cost < 0.0)
        {
            return Err(invalid(
                "cost_over_usd",
                format!("{cost} is not a finite amount >= 0"),
            ));
        }
        if self.decision_wait > MAX_DECISION_WAIT {
            return Err(invalid(
                "decision_wait",
                format!(
                    "{:?} is longer than the maximum of {:?}",
                    self.decision_wait, MAX_DECISION_WAIT
                ),
            ));
        }
        for (i, rule) in self.attributes.iter().enumerate() {
            if rule.key.is_empty() {
                return Err(invalid(
                    &format!("attributes[{i}].key"),
                    "the key is empty".into(),
                ));
            }
            if rule.values.is_empty() {
                return Err(invalid(
                    &format!("attributes[{i}].values"),
                    format!("no values given for key {:?}", rule.key),
                ));
            }
        }
        Ok(())
    }

    /// True when a span of the trace matches an attribute rule. Each span's attributes
    /// and resource JSON are parsed at most once, and only when a rule needs them.
    fn any_attribute_matches(&self, spans: &[SpanRecord]) -> bool {
        spans.iter().any(|span| {
            let mut attributes = LazyObject::new(&span.attributes);
            let mut resource = LazyObject::new(&span.resource);
            self.attributes.iter().any(|rule| {
                if let Some(v) = normalized_field(span, &rule.key) {
                    return rule.values.iter().any(|x| x == v);
                }
                match attributes.get(&rule.key) {
                    Some(v) => json_matches(v, &rule.values),
                    None => resource
                        .get(&rule.key)
                        .is_some_and(|v| json_matches(v, &rule.values)),
                }
            })
        })
    }
}

/// Keeps `percentage` percent of trace ids, the same way for every caller.
///
/// The last 8 bytes of the trace id, read as a big-endian u64 (W3C random trace ids
/// are random in their rightmost 7 bytes; OpenTelemetry's `TraceIdRatioBased` sampler
/// uses the lower 8 bytes too), are kept when below `percentage / 100 * 2^64`. 100
/// keeps every id, 0 (or NaN) none. An id shorter than 8 bytes is read as if padded
/// with leading zeros.
pub fn probabilistic_keep(trace_id: &[u8], percentage: f64) -> bool {
    if percentage.is_nan() || percentage <= 0.0 {
        return false;
    }
    if percentage >= 100.0 {
        return true;
    }
    let tail = &trace_id[trace_id.len().saturating_sub(8)..];
    let mut bytes = [0u8; 8];
    bytes[8 - tail.len()..].copy_from_slice(tail);
    let value = u64::from_be_bytes(bytes);
    // 2^64; `as` saturates a float that does not fit.
    let threshold = (percentage / 100.0 * 18_446_744_073_709_551_616.0) as u64;
    value < threshold
}

/// Summed tokens of the spans: `total_tokens`, or input + output when it is absent.
/// Negative counts are ignored.
fn trace_tokens(spans: &[SpanRecord]) -> u64 {
    let count = |v: Option<i64>| v.map_or(0, |n| u64::try_from(n).unwrap_or(0));
    spans
        .iter()
        .map(|s| match s.total_tokens {
            Some(total) => count(Some(total)),
            None => count(s.input_tokens).saturating_add(count(s.output_tokens)),
        })
        .fold(0u64, u64::saturating_add)
}

/// The normalized field behind an OTel / Loupe attribute name, when it is set.
fn normalized_field<'s>(span: &'s SpanRecord, key: &str) -> Option<&'s str> {
    let field = match key {
        "user.id" => &span.user_id,
        "session.id" => &span.session_id,
        "prompt.name" => &span.prompt_name,
        "prompt.version" => &span.prompt_version,
        "gen_ai.request.model" => &span.request_model,
        "deployment.environment" | "deployment.environment.name" => &span.environment,
        "service.name" => {
            return (!span.service_name.is_empty()).then_some(span.service_name.as_str());
        }
        _ => return None,
    };
    field.as_deref()
}

/// Whether a JSON attribute value equals one of `values`: strings as themselves,
/// numbers and bools by their JSON text, arrays by any element.
fn json_matches(v: &Value, values: &[String]) -> bool {
    match v {
        Value::String(s) => values.iter().any(|x| x == s),
        Value::Bool(b) => {
            let text = if *b { "true" } else { "false" };
            values.iter().any(|x| x == text)
        }
        Value::Number(n) => {
            let text = n.to_string();
            values.contains(&text)
        }
        Value::Array(items) => items
            .iter()
            .any(|item| !item.is_array() && json_matches(item, values)),
        Value::Null | Value::Object(_) => false,
    }
}

/// A JSON object held as text and parsed on first use; text that is not a JSON
/// object reads as an empty object.
struct LazyObject<'a> {
    text: &'a str,
    parsed: Option<Map<String, Value>>,
}

impl<'a> LazyObject<'a> {
    fn new(text: &'a str) -> Self {
        LazyObject { text, parsed: None }
    }

    fn get(&mut self, key: &str) -> Option<&Value> {
        let text = self.text;
        self.parsed
            .get_or_insert_with(|| {
                if text.is_empty() {
                    Map::new()
                } else {
                    serde_json::from_str(text).unwrap_or_default()
                }
            })
            .get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DataPlaneConfig;

    const SEC: u64 = 1_000_000_000;

    fn trace_id(n: u64) -> Vec<u8> {
        let mut id = vec![0u8; 16];
        id[..8].copy_from_slice(&splitmix64(n ^ 0xdead_beef).to_be_bytes());
        id[8..].copy_from_slice(&splitmix64(n).to_be_bytes());
        id
    }

    /// A well-mixed hash of a counter (SplitMix64), for reproducible random ids.
    fn splitmix64(n: u64) -> u64 {
        let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A root span from 0 to `secs` seconds.
    fn root(secs: u64) -> SpanRecord {
        SpanRecord {
            trace_id: trace_id(1),
            span_id: vec![1; 8],
            name: "chat".into(),
            service_name: "svc".into(),
            start_ns: 100 * SEC,
            end_ns: (100 + secs) * SEC,
            attributes: "{}".into(),
            resource: "{}".into(),
            ..Default::default()
        }
    }

    /// A child span of the root, from `start` to `end` seconds.
    fn child(start: u64, end: u64) -> SpanRecord {
        SpanRecord {
            span_id: vec![2; 8],
            parent_span_id: vec![1; 8],
            start_ns: (100 + start) * SEC,
            end_ns: (100 + end) * SEC,
            ..root(0)
        }
    }

    /// Keeps nothing by percentage, so only a rule can keep a trace.
    fn rules_only() -> SamplingPolicy {
        SamplingPolicy {
            percentage: 0.0,
            ..Default::default()
        }
    }

    fn decide(policy: &SamplingPolicy, spans: &[SpanRecord]) -> Decision {
        policy.decide(&trace_id(1), spans)
    }

    const DROPPED: Decision = Decision {
        keep: false,
        reason: KeepReason::Dropped,
    };

    fn kept(reason: KeepReason) -> Decision {
        Decision { keep: true, reason }
    }

    #[test]
    fn error_span_keeps_the_trace() {
        let mut failed = child(1, 2);
        failed.status = StatusCode::Error as i32;
        let policy = rules_only();
        assert_eq!(
            decide(&policy, &[root(3), failed.clone()]),
            kept(KeepReason::Error)
        );
        assert_eq!(decide(&policy, &[root(3), child(1, 2)]), DROPPED);
        let ignore_errors = SamplingPolicy {
            keep_errors: false,
            ..rules_only()
        };
        assert_eq!(decide(&ignore_errors, &[root(3), failed]), DROPPED);
    }

    #[test]
    fn root_duration_over_threshold_keeps() {
        let policy = SamplingPolicy {
            root_duration_over: Some(Duration::from_secs(5)),
            ..rules_only()
        };
        assert_eq!(
            decide(&policy, &[root(6), child(1, 2)]),
            kept(KeepReason::RootDuration)
        );
        assert_eq!(decide(&policy, &[root(4), child(1, 2)]), DROPPED);
        // Exactly at the threshold is not over it.
        assert_eq!(decide(&policy, &[root(5)]), DROPPED);
        // A long child span is not the root.
        assert_eq!(decide(&policy, &[root(1), child(0, 9)]), DROPPED);
    }

    #[test]
    fn root_duration_without_a_root_span_does_not_match() {
        let policy = SamplingPolicy {
            root_duration_over: Some(Duration::from_secs(5)),
            ..rules_only()
        };
        assert_eq!(decide(&policy, &[child(0, 60)]), DROPPED);
        assert_eq!(decide(&policy, &[]), DROPPED);
    }

    #[test]
    fn trace_duration_spans_first_start_to_last_end() {
        let policy = SamplingPolicy {
            trace_duration_over: Some(Duration::from_secs(10)),
            ..rules_only()
        };
        // Root lasts 2s, but a child ends 12s after the root started.
        assert_eq!(
            decide(&policy, &[root(2), child(8, 12)]),
            kept(KeepReason::TraceDuration)
        );
        assert_eq!(decide(&policy, &[root(2), child(8, 9)]), DROPPED);
        // Without the root: 3s..12s is 9s.
        assert_eq!(decide(&policy, &[child(3, 5), child(8, 12)]), DROPPED);
        assert_eq!(decide(&policy, &[]), DROPPED);
    }

    #[test]
    fn cost_is_summed_across_spans() {
        let policy = SamplingPolicy {
            cost_over_usd: Some(0.5),
            ..rules_only()
        };
        let with_cost = |cost: Option<f64>| SpanRecord {
            cost_total_usd: cost,
            ..child(0, 1)
        };
        let spans = [
            root(1),
            with_cost(Some(0.3)),
            with_cost(None),
            with_cost(Some(0.3)),
        ];
        assert_eq!(decide(&policy, &spans), kept(KeepReason::Cost));
        assert_eq!(decide(&policy, &spans[..3]), DROPPED);
        assert_eq!(decide(&policy, &[with_cost(Some(f64::NAN))]), DROPPED);
    }

    #[test]
    fn tokens_use_total_or_input_plus_output() {
        let policy = SamplingPolicy {
            tokens_over: Some(1000),
            ..rules_only()
        };
        let tokens = |input: Option<i64>, output: Option<i64>, total: Option<i64>| SpanRecord {
            input_tokens: input,
            output_tokens: output,
            total_tokens: total,
            ..child(0, 1)
        };
        // Total wins over input + output when present: 600 + 500.
        let spans = [
            tokens(Some(900), Some(900), Some(600)),
            tokens(Some(300), Some(200), None),
        ];
        assert_eq!(decide(&policy, &spans), kept(KeepReason::Tokens));
        // 600 + 400 = 1000 is not over 1000.
        let spans = [
            tokens(Some(900), Some(900), Some(600)),
            tokens(Some(300), Some(100), None),
        ];
        assert_eq!(decide(&policy, &spans), DROPPED);
        // Input alone counts when output and total are absent.
        let spans = [tokens(Some(1001), None, None)];
        assert_eq!(decide(&policy, &spans), kept(KeepReason::Tokens));
        // Negative counts are ignored.
        let spans = [tokens(None, None, Some(-5)), tokens(Some(999), None, None)];
        assert_eq!(decide(&policy, &spans), DROPPED);
    }

    fn attribute_policy(key: &str, values: &[&str]) -> SamplingPolicy {
        SamplingPolicy {
            attributes: vec![AttributeRule {
                key: key.into(),
                values: values.iter().map(|v| v.to_string()).collect(),
            }],
            ..rules_only()
        }
    }

    #[test]
    fn attribute_rule_matches_a_normalized_field() {
        let policy = attribute_policy("user.id", &["alice", "bob"]);
        let span = SpanRecord {
            user_id: Some("bob".into()),
            ..child(0, 1)
        };
        assert_eq!(
            decide(&policy, &[root(1), span]),
            kept(KeepReason::Attribute)
        );
        let span = SpanRecord {
            user_id: Some("carol".into()),
            ..child(0, 1)
        };
        assert_eq!(decide(&policy, &[root(1), span]), DROPPED);

        let policy = attribute_policy("service.name", &["svc"]);
        assert_eq!(decide(&policy, &[root(1)]), kept(KeepReason::Attribute));
        let policy = attribute_policy("gen_ai.request.model", &["gpt-4o"]);
        let span = SpanRecord {
            request_model: Some("gpt-4o".into()),
            ..root(1)
        };
        assert_eq!(decide(&policy, &[span]), kept(KeepReason::Attribute));
    }

    #[test]
    fn normalized_field_takes_precedence_over_the_attributes_json() {
        let policy = attribute_policy("user.id", &["raw"]);
        let span = SpanRecord {
            user_id: Some("normalized".into()),
            attributes: r#"{"user.id":"raw"}"#.into(),
            ..root(1)
        };
        assert_eq!(decide(&policy, &[span]), DROPPED);
        // An unset normalized field falls back to the JSON.
        let span = SpanRecord {
            attributes: r#"{"user.id":"raw"}"#.into(),
            ..root(1)
        };
        assert_eq!(decide(&policy, &[span]), kept(KeepReason::Attribute));
    }

    #[test]
    fn attribute_rule_matches_a_span_attribute() {
        let policy = attribute_policy("user.tier", &["enterprise"]);
        let span = SpanRecord {
            attributes: r#"{"user.tier":"enterprise","x":1}"#.into(),
            ..child(0, 1)
        };
        assert_eq!(
            decide(&policy, &[root(1), span]),
            kept(KeepReason::Attribute)
        );
        let span = SpanRecord {
            attributes: r#"{"user.tier":"free"}"#.into(),
            ..child(0, 1)
        };
        assert_eq!(decide(&policy, &[root(1), span]), DROPPED);
    }

    #[test]
    fn attribute_rule_matches_a_resource_attribute() {
        let policy = attribute_policy("k8s.namespace.name", &["payments"]);
        let span = SpanRecord {
            resource: r#"{"service.name":"svc","k8s.namespace.name":"payments"}"#.into(),
            ..root(1)
        };
        assert_eq!(decide(&policy, &[span]), kept(KeepReason::Attribute));
        // The span attribute shadows the resource attribute of the same key.
        let span = SpanRecord {
            attributes: r#"{"k8s.namespace.name":"other"}"#.into(),
            resource: r#"{"k8s.namespace.name":"payments"}"#.into(),
            ..root(1)
        };
        assert_eq!(decide(&policy, &[span]), DROPPED);
    }

    #[test]
    fn attribute_rule_compares_numbers_bools_and_arrays_by_json_text() {
        let span = SpanRecord {
            attributes: r#"{"retries":3,"cached":true,"ratio":0.5,"tags":["a","vip"]}"#.into(),
            ..root(1)
        };
        let spans = [span];
        for (key, value) in [
            ("retries", "3"),
            ("cached", "true"),
            ("ratio", "0.5"),
            ("tags", "vip"),
        ] {
            let policy = attribute_policy(key, &[value]);
            assert_eq!(
                decide(&policy, &spans),
                kept(KeepReason::Attribute),
                "{key}={value}"
            );
        }
        for (key, value) in [("retries", "4"), ("cached", "false"), ("tags", "b")] {
            let policy = attribute_policy(key, &[value]);
            assert_eq!(decide(&policy, &spans), DROPPED, "{key}={value}");
        }
    }

    #[test]
    fn attribute_rule_without_a_match_drops() {
        let policy = attribute_policy("user.tier", &["enterprise"]);
        let broken = SpanRecord {
            attributes: "not json".into(),
            resource: String::new(),
            ..child(0, 1)
        };
        assert_eq!(decide(&policy, &[root(1), broken]), DROPPED);
        assert_eq!(decide(&policy, &[]), DROPPED);
    }

    #[test]
    fn first_matching_rule_is_the_reason() {
        let policy = SamplingPolicy {
            root_duration_over: Some(Duration::from_secs(1)),
            cost_over_usd: Some(0.1),
            tokens_over: Some(10),
            attributes: vec![AttributeRule {
                key: "user.id".into(),
                values: vec!["alice".into()],
            }],
            ..rules_only()
        };
        let expensive = SpanRecord {
            cost_total_usd: Some(5.0),
            total_tokens: Some(50_000),
            user_id: Some("alice".into()),
            ..child(0, 1)
        };
        let mut failed = expensive.clone();
        failed.status = StatusCode::Error as i32;
        assert_eq!(decide(&policy, &[root(1), failed]), kept(KeepReason::Error));
        assert_eq!(
            decide(&policy, &[root(9), expensive.clone()]),
            kept(KeepReason::RootDuration)
        );
        assert_eq!(
            decide(&policy, &[root(1), expensive.clone()]),
            kept(KeepReason::Cost)
        );
        let cheap = SpanRecord {
            cost_total_usd: None,
            ..expensive
        };
        assert_eq!(
            decide(&policy, &[root(1), cheap.clone()]),
            kept(KeepReason::Tokens)
        );
        let small = SpanRecord {
            total_tokens: None,
            ..cheap
        };
        assert_eq!(
            decide(&policy, &[root(1), small]),
            kept(KeepReason::Attribute)
        );
        // A rule match wins over the percentage, which would also keep the trace.
        let all = SamplingPolicy {
            percentage: 100.0,
            ..policy
        };
        assert_eq!(decide(&all, &[root(9)]), kept(KeepReason::RootDuration));
        assert_eq!(decide(&all, &[root(1)]), kept(KeepReason::Probabilistic));
    }

    #[test]
    fn reason_labels_are_lowercase_snake_case() {
        let labels: Vec<_> = KeepReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "error",
                "root_duration",
                "trace_duration",
                "cost",
                "tokens",
                "attribute",
                "probabilistic",
                "dropped"
            ]
        );
    }

    #[test]
    fn probabilistic_zero_keeps_none_and_hundred_keeps_all() {
        for n in 0..1000 {
            let id = trace_id(n);
            assert!(!probabilistic_keep(&id, 0.0));
            assert!(probabilistic_keep(&id, 100.0));
        }
        assert!(!probabilistic_keep(&[0xff; 16], 0.0));
        assert!(!probabilistic_keep(&[0; 16], 0.0));
        assert!(probabilistic_keep(&[0xff; 16], 100.0));
        assert!(!probabilistic_keep(&[0; 16], f64::NAN));
    }

    #[test]
    fn probabilistic_ten_percent_keeps_about_ten_percent() {
        let kept = (0..20_000)
            .filter(|&n| probabilistic_keep(&trace_id(n), 10.0))
            .count();
        assert!((1_800..=2_200).contains(&kept), "kept {kept} of 20000");
    }

    #[test]
    fn probabilistic_is_deterministic_and_uses_the_low_bytes() {
        for n in 0..1000 {
            let id = trace_id(n);
            let first = probabilistic_keep(&id, 37.5);
            assert!((0..5).all(|_| probabilistic_keep(&id, 37.5) == first));
        }
        // Only the last 8 bytes count: the high half does not change the answer.
        let mut low = [0u8; 16];
        low[8..].copy_from_slice(&0x0100_0000_0000_0000u64.to_be_bytes()); // 1/256
        assert!(probabilistic_keep(&low, 1.0));
        low[..8].copy_from_slice(&[0xff; 8]);
        assert!(probabilistic_keep(&low, 1.0));
        assert!(!probabilistic_keep(&low, 0.3));
        // A policy's decision follows the id, not the spans' order or content.
        let policy = SamplingPolicy {
            percentage: 37.5,
            ..Default::default()
        };
        let id = trace_id(42);
        let once = policy.decide(&id, &[root(1)]);
        assert_eq!(policy.decide(&id, &[child(0, 1), root(1)]), once);
    }

    #[test]
    fn short_trace_ids_do_not_panic() {
        for id in [&[][..], &[1][..], &[0xff; 7][..], &[0xff; 8][..]] {
            let _ = probabilistic_keep(id, 50.0);
            let _ = rules_only().decide(id, &[root(1)]);
        }
        // Read as padded with leading zeros: a short id is a small value.
        assert!(probabilistic_keep(&[0xff; 4], 1.0));
        assert!(!probabilistic_keep(&[0xff; 8], 99.0));
    }

    #[test]
    fn keeps_everything_only_at_hundred_percent() {
        assert!(SamplingPolicy::default().keeps_everything());
        assert!(
            !SamplingPolicy {
                percentage: 99.9,
                ..Default::default()
            }
            .keeps_everything()
        );
        assert!(!rules_only().keeps_everything());
    }

    #[test]
    fn parses_a_full_policy_with_humantime_strings() {
        let yaml = "\
decision_wait: 30s
keep_errors: false
root_duration_over: 5s
trace_duration_over: 1m 30s
cost_over_usd: 0.5
tokens_over: 20000
attributes:
  - key: user.tier
    values: [enterprise, pro]
  - key: retries
    values: ['3']
percentage: 12.5
";
        let policy: SamplingPolicy = serde_saphyr::from_str(yaml).unwrap();
        assert_eq!(
            policy,
            SamplingPolicy {
                decision_wait: Duration::from_secs(30),
                keep_errors: false,
                root_duration_over: Some(Duration::from_secs(5)),
                trace_duration_over: Some(Duration::from_secs(90)),
                cost_over_usd: Some(0.5),
                tokens_over: Some(20_000),
                attributes: vec![
                    AttributeRule {
                        key: "user.tier".into(),
                        values: vec!["enterprise".into(), "pro".into()],
                    },
                    AttributeRule {
                        key: "retries".into(),
                        values: vec!["3".into()],
                    },
                ],
                percentage: 12.5,
            }
        );
        policy.validate("sampling").unwrap();
        // Durations serialize back as humantime strings.
        let json = serde_json::to_value(&policy).unwrap();
        assert_eq!(json["decision_wait"], "30s");
        assert_eq!(json["trace_duration_over"], "1m 30s");
        let back: SamplingPolicy = serde_json::from_value(json).unwrap();
        assert_eq!(back, policy);
    }

    #[test]
    fn parses_a_minimal_policy_with_defaults() {
        let policy: SamplingPolicy = serde_saphyr::from_str("percentage: 10\n").unwrap();
        assert_eq!(
            policy,
            SamplingPolicy {
                percentage: 10.0,
                ..Default::default()
            }
        );
        assert_eq!(policy.decision_wait, Duration::from_secs(10));
        assert!(policy.keep_errors);
        assert!(policy.root_duration_over.is_none());
        assert!(policy.attributes.is_empty());
    }

    fn tenant_config_error(sampling: &str) -> String {
        let yaml = format!("tenants:\n  - id: a/b\n  - id: a/c\n    sampling:\n{sampling}");
        DataPlaneConfig::from_yaml(&yaml).unwrap_err().to_string()
    }

    #[test]
    fn validation_errors_name_the_field() {
        let err = tenant_config_error("      percentage: 150\n");
        assert!(err.contains("tenants[1].sampling.percentage"), "{err}");
        let err = tenant_config_error("      percentage: 10\n      keep_error: true\n");
        assert!(err.contains("keep_error"), "{err}");
        let err = tenant_config_error(
            "      attributes:\n        - key: user.tier\n          values: []\n",
        );
        assert!(
            err.contains("tenants[1].sampling.attributes[0].values"),
            "{err}"
        );
        let err =
            tenant_config_error("      attributes:\n        - key: ''\n          values: [x]\n");
        assert!(
            err.contains("tenants[1].sampling.attributes[0].key"),
            "{err}"
        );
        let err = tenant_config_error("      cost_over_usd: -1\n");
        assert!(err.contains("tenants[1].sampling.cost_over_usd"), "{err}");
        let err = tenant_config_error("      decision_wait: 1h\n");
        assert!(err.contains("tenants[1].sampling.decision_wait"), "{err}");
        let err = tenant_config_error("      decision_wait: soon\n");
        assert!(
            err.contains("decision_wait") || err.contains("soon"),
            "{err}"
        );

        let nan = SamplingPolicy {
            percentage: f64::NAN,
            ..Default::default()
        };
        let err = nan.validate("tenants[2].sampling").unwrap_err().to_string();
        assert!(err.contains("tenants[2].sampling.percentage"), "{err}");
    }
}
