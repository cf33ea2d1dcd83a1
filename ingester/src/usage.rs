//! Per-project LLM usage on `/metrics`: calls, errors, tokens, cost and call latency
//! by project and model, counted as spans are acknowledged (before tail sampling, so
//! the series are exact whatever the sampling policy).
//!
//! Off unless the config's `usage_metrics.enabled` says so. Label cardinality is
//! bounded by construction: projects come from the config, and each project gets at
//! most `max_models_per_tenant` model values; later models are counted under
//! `model="other"` (spans without a model under `model="unknown"`).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use loupe_core::span::{LlmKind, StatusCode};
use loupe_core::{SpanRecord, TenantId};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The label of models beyond a project's bound.
pub const OTHER_MODEL: &str = "other";
/// The label of LLM spans that name no model.
pub const UNKNOWN_MODEL: &str = "unknown";
/// Model label values are cut to this many bytes.
const MAX_LABEL_BYTES: usize = 128;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct UsageLabels {
    pub tenant: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct TokenLabels {
    pub tenant: String,
    pub model: String,
    /// `input` or `output`.
    pub direction: &'static str,
}

/// What the LLM spans of one request add up to, per model.
#[derive(Debug, Default, PartialEq)]
pub struct UsageSummary {
    models: Vec<(String, ModelUsage)>,
}

#[derive(Debug, Default, PartialEq)]
struct ModelUsage {
    calls: u64,
    errors: u64,
    input_tokens: u64,
    output_tokens: u64,
    cost_usd: f64,
    durations_s: Vec<f64>,
}

impl UsageSummary {
    /// Sums the LLM spans (`llm_kind = llm`) of a request by model (the response
    /// model, else the request model).
    pub fn of(spans: &[SpanRecord]) -> UsageSummary {
        let mut out = UsageSummary::default();
        for s in spans.iter().filter(|s| s.llm_kind == LlmKind::Llm as i32) {
            let model = s
                .response_model
                .as_deref()
                .or(s.request_model.as_deref())
                .filter(|m| !m.is_empty())
                .map_or(UNKNOWN_MODEL, cut);
            let i = match out.models.iter().position(|(m, _)| m == model) {
                Some(i) => i,
                None => {
                    out.models.push((model.to_owned(), ModelUsage::default()));
                    out.models.len() - 1
                }
            };
            let u = &mut out.models[i].1;
            u.calls += 1;
            u.errors += u64::from(s.status == StatusCode::Error as i32);
            u.input_tokens += s.input_tokens.unwrap_or(0).max(0) as u64;
            u.output_tokens += s.output_tokens.unwrap_or(0).max(0) as u64;
            u.cost_usd += s
                .cost_total_usd
                .filter(|c| c.is_finite() && *c > 0.0)
                .unwrap_or(0.0);
            u.durations_s
                .push(s.end_ns.saturating_sub(s.start_ns) as f64 / 1e9);
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

/// The longest prefix of `s` within [`MAX_LABEL_BYTES`], cut at a char boundary.
fn cut(s: &str) -> &str {
    if s.len() <= MAX_LABEL_BYTES {
        return s;
    }
    let mut end = MAX_LABEL_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The usage series, and the models each project was given a series for.
pub struct UsageMetrics {
    calls: Family<UsageLabels, Counter>,
    errors: Family<UsageLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<UsageLabels, Counter<f64, AtomicU64>>,
    duration: Family<UsageLabels, Histogram>,
    models: Mutex<HashMap<TenantId, HashSet<String>>>,
}

impl UsageMetrics {
    pub fn new(registry: &mut Registry) -> UsageMetrics {
        let m = UsageMetrics {
            calls: Family::default(),
            errors: Family::default(),
            tokens: Family::default(),
            cost: Family::default(),
            duration: Family::new_with_constructor(|| {
                // 0.1 s … 51.2 s: from a cached completion to a long reasoning call.
                Histogram::new(exponential_buckets(0.1, 2.0, 10))
            }),
            models: Mutex::new(HashMap::new()),
        };
        let r = registry.sub_registry_with_prefix("loupe_llm");
        r.register(
            "calls",
            "LLM calls received, by project and model (usage_metrics)",
            m.calls.clone(),
        );
        r.register(
            "errors",
            "LLM calls with status ERROR, by project and model (usage_metrics)",
            m.errors.clone(),
        );
        r.register(
            "tokens",
            "LLM tokens, by project, model and direction (usage_metrics)",
            m.tokens.clone(),
        );
        r.register(
            "cost_usd",
            "Cost of LLM calls in US dollars, by project and model (usage_metrics)",
            m.cost.clone(),
        );
        r.register(
            "call_duration_seconds",
            "Duration of LLM calls, by project and model (usage_metrics)",
            m.duration.clone(),
        );
        m
    }

    /// The label a model gets in `tenant`'s series: itself while the project has
    /// fewer than `max_models` models, [`OTHER_MODEL`] after.
    fn model_label(&self, tenant: &TenantId, model: &str, max_models: usize) -> String {
        let mut models = self.models.lock().expect("usage models lock");
        let seen = models.entry(tenant.clone()).or_default();
        if seen.contains(model) {
            return model.to_owned();
        }
        if seen.len() < max_models {
            seen.insert(model.to_owned());
            return model.to_owned();
        }
        OTHER_MODEL.to_owned()
    }

    /// Adds a request's usage to `tenant`'s series.
    pub fn record(&self, tenant: &TenantId, usage: &UsageSummary, max_models: usize) {
        for (model, u) in &usage.models {
            let labels = UsageLabels {
                tenant: tenant.to_string(),
                model: self.model_label(tenant, model, max_models),
            };
            self.calls.get_or_create(&labels).inc_by(u.calls);
            if u.errors > 0 {
                self.errors.get_or_create(&labels).inc_by(u.errors);
            }
            for (direction, n) in [("input", u.input_tokens), ("output", u.output_tokens)] {
                if n > 0 {
                    self.tokens
                        .get_or_create(&TokenLabels {
                            tenant: labels.tenant.clone(),
                            model: labels.model.clone(),
                            direction,
                        })
                        .inc_by(n);
                }
            }
            if u.cost_usd > 0.0 {
                self.cost.get_or_create(&labels).inc_by(u.cost_usd);
            }
            let histogram = self.duration.get_or_create(&labels);
            for d in &u.durations_s {
                histogram.observe(*d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    fn llm(model: Option<&str>, input: i64, output: i64, cost: f64, error: bool) -> SpanRecord {
        SpanRecord {
            llm_kind: LlmKind::Llm as i32,
            response_model: model.map(str::to_owned),
            input_tokens: Some(input),
            output_tokens: Some(output),
            cost_total_usd: Some(cost),
            status: if error {
                StatusCode::Error as i32
            } else {
                StatusCode::Ok as i32
            },
            start_ns: 1_000_000_000,
            end_ns: 2_500_000_000,
            ..Default::default()
        }
    }

    fn exposition(registry: &Registry) -> String {
        let mut out = String::new();
        encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn sums_llm_spans_by_model_and_ignores_the_rest() {
        let mut chain = llm(Some("gpt-4o"), 100, 100, 1.0, false);
        chain.llm_kind = LlmKind::Chain as i32;
        let spans = vec![
            llm(Some("gpt-4o"), 1000, 200, 0.01, false),
            llm(Some("gpt-4o"), 500, 50, 0.005, true),
            llm(None, 10, 1, 0.0, false),
            chain,
        ];
        let mut registry = Registry::default();
        let m = UsageMetrics::new(&mut registry);
        let tenant: TenantId = "team-a/chat".parse().unwrap();
        m.record(&tenant, &UsageSummary::of(&spans), 20);
        let text = exposition(&registry);
        for line in [
            r#"loupe_llm_calls_total{tenant="team-a/chat",model="gpt-4o"} 2"#,
            r#"loupe_llm_calls_total{tenant="team-a/chat",model="unknown"} 1"#,
            r#"loupe_llm_errors_total{tenant="team-a/chat",model="gpt-4o"} 1"#,
            r#"loupe_llm_tokens_total{tenant="team-a/chat",model="gpt-4o",direction="input"} 1500"#,
            r#"loupe_llm_tokens_total{tenant="team-a/chat",model="gpt-4o",direction="output"} 250"#,
            r#"loupe_llm_cost_usd_total{tenant="team-a/chat",model="gpt-4o"} 0.015"#,
            r#"loupe_llm_call_duration_seconds_count{tenant="team-a/chat",model="gpt-4o"} 2"#,
            r#"loupe_llm_call_duration_seconds_bucket{le="1.6",tenant="team-a/chat",model="gpt-4o"} 2"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(!text.contains("model=\"\""), "{text}");
    }

    #[test]
    fn models_beyond_the_bound_are_folded_into_other_per_project() {
        let mut registry = Registry::default();
        let m = UsageMetrics::new(&mut registry);
        let a: TenantId = "ns/a".parse().unwrap();
        let b: TenantId = "ns/b".parse().unwrap();
        for i in 0..50 {
            let model = format!("model-{i}");
            let spans = vec![llm(Some(&model), 1, 1, 0.0, false)];
            m.record(&a, &UsageSummary::of(&spans), 3);
        }
        // A model admitted earlier keeps its own series after the bound is reached.
        m.record(
            &a,
            &UsageSummary::of(&[llm(Some("model-1"), 1, 1, 0.0, false)]),
            3,
        );
        // Another project has its own bound.
        m.record(
            &b,
            &UsageSummary::of(&[llm(Some("model-49"), 1, 1, 0.0, false)]),
            3,
        );
        let text = exposition(&registry);
        let calls: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("loupe_llm_calls_total{"))
            .collect();
        assert_eq!(calls.len(), 5, "{calls:#?}");
        assert!(text.contains(r#"loupe_llm_calls_total{tenant="ns/a",model="other"} 47"#));
        assert!(text.contains(r#"loupe_llm_calls_total{tenant="ns/a",model="model-1"} 2"#));
        assert!(text.contains(r#"loupe_llm_calls_total{tenant="ns/b",model="model-49"} 1"#));
    }

    #[test]
    fn long_model_names_are_cut_at_a_char_boundary() {
        let long = "é".repeat(100);
        let summary = UsageSummary::of(&[llm(Some(&long), 1, 1, 0.0, false)]);
        assert_eq!(summary.models[0].0.len(), 128);
        assert!(long.starts_with(&summary.models[0].0));
    }
}
