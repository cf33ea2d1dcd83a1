//! The tenant config of a platform, from its TraceProjects, their SamplingPolicies
//! and their keys: the same `loupe_core` types the data plane parses, so the two
//! cannot drift.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::ResourceExt;
use loupe_core::TenantId;
use loupe_core::config::{DataPlaneConfig, RateLimits, TenantConfig};
use loupe_core::keys::{KeyConfig, KeyHash, Scope};
use loupe_core::pricing::PriceEntry;
use loupe_core::sampling::{AttributeRule, SamplingPolicy as CorePolicy};

use crate::crd::{SamplingPolicy, SamplingRules, TracePlatform, TraceProject, parse_duration};

/// Data keys of a project's key Secret.
pub const INGEST_KEY: &str = "ingest-key";
pub const QUERY_KEY: &str = "query-key";

/// The name of the Secret holding a project's keys, in the project's namespace.
pub fn keys_secret_name(project: &str) -> String {
    format!("{project}-loupe-keys")
}

/// The hashes of a project's two keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProjectKeys {
    pub ingest: KeyHash,
    pub query: KeyHash,
}

/// The tenant id of a project: `<namespace>/<name>`.
pub fn tenant_id(project: &TraceProject) -> Result<TenantId, String> {
    let ns = project.namespace().unwrap_or_default();
    format!("{ns}/{}", project.name_any())
        .parse()
        .map_err(|e| format!("{e}"))
}

/// Whether `project` points at `platform`.
pub fn serves(platform: &TracePlatform, project: &TraceProject) -> bool {
    let r = &project.spec.platform_ref;
    let ns = r.namespace.clone().or_else(|| project.namespace());
    r.name == platform.name_any() && ns == platform.namespace()
}

/// Whether `policy` selects `project` (same namespace; by name or by labels).
pub fn selects(policy: &SamplingPolicy, project: &TraceProject) -> bool {
    if policy.namespace() != project.namespace() {
        return false;
    }
    if let Some(names) = &policy.spec.projects {
        return names.iter().any(|n| *n == project.name_any());
    }
    match &policy.spec.selector {
        Some(sel) => label_selector_matches(sel, project.labels()),
        None => false,
    }
}

/// Kubernetes label-selector semantics: every `matchLabels` pair and every
/// expression must hold; an empty selector matches everything.
pub fn label_selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let pairs = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs = sel.match_expressions.iter().flatten().all(|e| {
        let LabelSelectorRequirement {
            key,
            operator,
            values,
        } = e;
        let values = values.as_deref().unwrap_or_default();
        match operator.as_str() {
            "In" => labels.get(key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(key),
            "DoesNotExist" => !labels.contains_key(key),
            _ => false,
        }
    });
    pairs && exprs
}

/// The policies selecting `project`, the one that applies first: the oldest, then by
/// name, so every reconcile picks the same one.
pub fn policies_for<'a>(
    project: &TraceProject,
    policies: &'a [SamplingPolicy],
) -> Vec<&'a SamplingPolicy> {
    let mut found: Vec<&SamplingPolicy> = policies.iter().filter(|p| selects(p, project)).collect();
    found.sort_by(|a, b| {
        a.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0)
            .cmp(&b.metadata.creation_timestamp.as_ref().map(|t| t.0))
            .then_with(|| a.name_any().cmp(&b.name_any()))
    });
    found
}

/// The data plane's sampling policy from a SamplingPolicy's rules.
pub fn sampling_policy(rules: &SamplingRules) -> Result<CorePolicy, String> {
    let dur = |field: &str, v: &Option<String>| -> Result<Option<std::time::Duration>, String> {
        v.as_deref()
            .map(|s| parse_duration(&format!("rules.{field}"), s))
            .transpose()
    };
    let policy = CorePolicy {
        decision_wait: dur("decisionWait", &rules.decision_wait)?
            .unwrap_or(loupe_core::sampling::DEFAULT_DECISION_WAIT),
        keep_errors: rules.keep_errors,
        root_duration_over: dur("rootDurationOver", &rules.root_duration_over)?,
        trace_duration_over: dur("traceDurationOver", &rules.trace_duration_over)?,
        cost_over_usd: rules.cost_over_usd,
        tokens_over: rules.tokens_over,
        attributes: rules
            .attributes
            .iter()
            .map(|a| AttributeRule {
                key: a.key.clone(),
                values: a.values.clone(),
            })
            .collect(),
        percentage: rules.percentage,
    };
    policy
        .validate("rules")
        .map_err(|e| e.to_string().replace("decision_wait", "decisionWait"))?;
    Ok(policy)
}

/// A project's entry in the tenant config, or why the project cannot be served.
pub fn tenant_entry(
    project: &TraceProject,
    policy: Option<&SamplingPolicy>,
    keys: ProjectKeys,
) -> Result<TenantConfig, String> {
    let spec = &project.spec;
    let id = tenant_id(project)?;
    let pricing = spec
        .pricing
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let valid_from = chrono::NaiveDate::parse_from_str(&p.valid_from, "%Y-%m-%d")
                .map_err(|e| format!("pricing[{i}].validFrom: {:?} ({e})", p.valid_from))?;
            Ok(PriceEntry {
                id: p.id.clone(),
                pattern: p.pattern.clone(),
                provider: p.provider.clone(),
                input: p.input,
                output: p.output,
                cached_input: p.cached_input,
                reasoning: p.reasoning,
                valid_from,
                note: None,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let redaction = spec
        .redaction
        .as_ref()
        .map(redaction_config)
        .unwrap_or_default();
    let retention = spec
        .retention
        .as_deref()
        .map(|r| parse_duration("retention", r))
        .transpose()?;
    let sampling = policy
        .map(|p| {
            sampling_policy(&p.spec.rules)
                .map_err(|e| format!("SamplingPolicy {}: {e}", p.name_any()))
        })
        .transpose()?;
    let entry = TenantConfig {
        id,
        environment: spec.environment.into(),
        pricing,
        sampling,
        keys: vec![
            KeyConfig {
                name: "project-ingest".into(),
                scope: Scope::Ingest,
                hash: keys.ingest,
            },
            KeyConfig {
                name: "project-query".into(),
                scope: Scope::Query,
                hash: keys.query,
            },
        ],
        retention,
        rate_limits: spec.limits.as_ref().map(|l| RateLimits {
            spans_per_second: l.spans_per_second,
            bytes_per_second: l.bytes_per_second,
        }),
        redaction,
    };
    // The data plane's own validation, on this entry alone: what it would reject is
    // reported on the project instead of breaking every project's config.
    let alone = DataPlaneConfig {
        tenants: vec![entry.clone()],
        ..DataPlaneConfig::default()
    };
    alone.validate().map_err(|e| {
        e.to_string()
            .replace("tenants[0].", "")
            .replace("rate_limits", "limits")
    })?;
    Ok(entry)
}

/// What a platform's tenant config holds and what was left out.
#[derive(Debug, Default)]
pub struct TenantPlan {
    pub config: DataPlaneConfig,
    /// Projects served, by `<namespace>/<name>`, with the policy applied to each.
    pub served: BTreeMap<String, Option<String>>,
    /// Projects left out because their spec is invalid, with the reason.
    pub invalid: BTreeMap<String, String>,
    /// Projects waiting for their key Secret.
    pub waiting_for_keys: Vec<String>,
}

/// The tenant config of `platform`: every project pointing at it that is not being
/// deleted, has keys, and is valid. Projects are sorted by tenant id so the rendered
/// file changes only when its content does.
pub fn plan(
    platform: &TracePlatform,
    projects: &[TraceProject],
    policies: &[SamplingPolicy],
    keys: &BTreeMap<String, ProjectKeys>,
) -> TenantPlan {
    let mut out = TenantPlan::default();
    let mut mine: Vec<&TraceProject> = projects
        .iter()
        .filter(|p| serves(platform, p) && p.metadata.deletion_timestamp.is_none())
        .collect();
    mine.sort_by_key(|p| (p.namespace(), p.name_any()));
    for project in mine {
        let id = format!(
            "{}/{}",
            project.namespace().unwrap_or_default(),
            project.name_any()
        );
        let Some(k) = keys.get(&id) else {
            out.waiting_for_keys.push(id);
            continue;
        };
        let policy = policies_for(project, policies).first().copied();
        match tenant_entry(project, policy, *k) {
            Ok(entry) => {
                out.config.tenants.push(entry);
                out.served.insert(id, policy.map(|p| p.name_any()));
            }
            Err(reason) => {
                out.invalid.insert(id, reason);
            }
        }
    }
    out
}

/// The tenant config file, as the data plane reads it.
pub fn config_yaml(config: &DataPlaneConfig) -> String {
    // Plain data with string keys; serializing cannot fail.
    serde_saphyr::to_string(config).expect("the config serializes")
}

/// A project's redaction spec as the data plane's config.
fn redaction_config(spec: &crate::crd::RedactionSpec) -> loupe_core::redact::RedactionConfig {
    use crate::crd::{DetectorAction as A, RedactionAction};
    use loupe_core::redact::{self as r, Detector};
    let action = |a: RedactionAction| match a {
        RedactionAction::Mask => r::Action::Mask,
        RedactionAction::Hash => r::Action::Hash,
        RedactionAction::Drop => r::Action::Drop,
    };
    let mut detectors = BTreeMap::new();
    if let Some(d) = &spec.detectors {
        for (detector, a) in [
            (Detector::Email, d.email),
            (Detector::Phone, d.phone),
            (Detector::Card, d.card),
            (Detector::Iban, d.iban),
            (Detector::UsSsn, d.us_ssn),
            (Detector::Ip, d.ip),
            (Detector::Secrets, d.secrets),
        ] {
            if let Some(a) = a {
                let a = match a {
                    A::Off => r::DetectorAction::Off,
                    A::Mask => r::DetectorAction::Mask,
                    A::Hash => r::DetectorAction::Hash,
                    A::Drop => r::DetectorAction::Drop,
                };
                detectors.insert(detector, a);
            }
        }
    }
    r::RedactionConfig {
        enabled: spec.enabled.unwrap_or(true),
        detectors,
        rules: spec
            .rules
            .iter()
            .map(|rule| r::PatternRule {
                name: rule.name.clone(),
                pattern: rule.pattern.clone(),
                action: action(rule.action),
                replacement: rule.replacement.clone(),
            })
            .collect(),
        attributes: spec
            .attributes
            .iter()
            .map(|a| r::AttributeRule {
                key: a.key.clone(),
                action: action(a.action),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::*;

    pub(crate) fn platform() -> TracePlatform {
        let mut p = TracePlatform::new(
            "loupe",
            serde_json::from_value(serde_json::json!({
                "kafka": { "bootstrapServers": "kafka:9092" },
                "storage": { "url": "file:///var/lib/loupe", "volumeClaim": "loupe-blocks" },
            }))
            .unwrap(),
        );
        p.metadata.namespace = Some("observability".into());
        p
    }

    pub(crate) fn project(ns: &str, name: &str, env: &str) -> TraceProject {
        let mut p = TraceProject::new(
            name,
            serde_json::from_value(serde_json::json!({
                "platformRef": { "name": "loupe", "namespace": "observability" },
                "environment": env,
            }))
            .unwrap(),
        );
        p.metadata.namespace = Some(ns.into());
        p
    }

    fn keys(seed: &str) -> ProjectKeys {
        ProjectKeys {
            ingest: KeyHash::of(&format!("{seed}-i")),
            query: KeyHash::of(&format!("{seed}-q")),
        }
    }

    fn policy(name: &str, spec: serde_json::Value) -> SamplingPolicy {
        let mut p = SamplingPolicy::new(name, serde_json::from_value(spec).unwrap());
        p.metadata.namespace = Some("team-a".into());
        p
    }

    #[test]
    fn the_rendered_config_is_what_the_data_plane_parses() {
        let mut prod = project("team-a-prod", "chat", "prod");
        prod.spec.retention = Some("30d".into());
        prod.spec.limits = Some(ProjectLimits {
            spans_per_second: Some(5000),
            bytes_per_second: None,
        });
        let dev = project("team-a", "chat", "dev");
        let all_keys = BTreeMap::from([
            ("team-a-prod/chat".to_owned(), keys("prod")),
            ("team-a/chat".to_owned(), keys("dev")),
        ]);
        let plan = plan(&platform(), &[prod, dev], &[], &all_keys);
        assert!(plan.invalid.is_empty(), "{:?}", plan.invalid);
        let text = config_yaml(&plan.config);
        let parsed = DataPlaneConfig::from_yaml(&text).unwrap();
        assert_eq!(parsed, plan.config);
        let ids: Vec<_> = parsed.tenants.iter().map(|t| t.id.to_string()).collect();
        assert_eq!(ids, ["team-a/chat", "team-a-prod/chat"]);
        let prod = &parsed.tenants[1];
        assert_eq!(prod.environment, loupe_core::Environment::Prod);
        assert_eq!(
            prod.retention,
            Some(std::time::Duration::from_secs(30 * 86_400))
        );
        assert_eq!(prod.keys[0].hash, keys("prod").ingest);
        assert_eq!(prod.keys[1].scope, Scope::Query);
    }

    #[test]
    fn projects_of_other_platforms_without_keys_or_being_deleted_are_left_out() {
        let mut other = project("team-a", "other", "dev");
        other.spec.platform_ref.name = "another".into();
        let waiting = project("team-a", "new", "dev");
        let mut deleting = project("team-a", "gone", "dev");
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        let mut same_ns = project("observability", "local", "staging");
        same_ns.spec.platform_ref.namespace = None;
        let all_keys = BTreeMap::from([
            ("team-a/other".to_owned(), keys("a")),
            ("team-a/gone".to_owned(), keys("b")),
            ("observability/local".to_owned(), keys("c")),
        ]);
        let plan = plan(
            &platform(),
            &[other, waiting, deleting, same_ns],
            &[],
            &all_keys,
        );
        assert_eq!(plan.waiting_for_keys, ["team-a/new"]);
        let ids: Vec<_> = plan.served.keys().collect();
        assert_eq!(ids, ["observability/local"]);
    }

    #[test]
    fn redaction_reaches_the_tenant_config_as_the_data_plane_reads_it() {
        use loupe_core::redact::{Action, Detector, DetectorAction};
        let mut p = project("team-a", "chat", "prod");
        p.spec.redaction = Some(
            serde_json::from_value(serde_json::json!({
                "detectors": { "ip": "mask", "usSsn": "off", "email": "hash" },
                "rules": [{ "name": "order", "pattern": "ORD-[0-9]+" }],
                "attributes": [{ "key": "user.email", "action": "drop" }],
            }))
            .unwrap(),
        );
        let mut off = project("team-a", "quiet", "dev");
        off.spec.redaction = Some(RedactionSpec {
            enabled: Some(false),
            ..Default::default()
        });
        let all_keys = BTreeMap::from([
            ("team-a/chat".to_owned(), keys("a")),
            ("team-a/quiet".to_owned(), keys("b")),
        ]);
        let plan = plan(&platform(), &[p, off], &[], &all_keys);
        let back = DataPlaneConfig::from_yaml(&config_yaml(&plan.config)).unwrap();
        let chat = &back.tenants[0].redaction;
        assert!(chat.enabled);
        assert_eq!(
            chat.detectors,
            BTreeMap::from([
                (Detector::Email, DetectorAction::Hash),
                (Detector::UsSsn, DetectorAction::Off),
                (Detector::Ip, DetectorAction::Mask),
            ])
        );
        assert_eq!(chat.rules[0].name, "order");
        assert_eq!(chat.attributes[0].action, Action::Drop);
        assert!(!back.tenants[1].redaction.enabled);
    }

    #[test]
    fn an_invalid_project_is_reported_and_the_others_are_served() {
        let mut bad = project("team-a", "bad", "dev");
        bad.spec.retention = Some("10m".into());
        let mut bad_regex = project("team-a", "regex", "dev");
        bad_regex.spec.redaction = Some(RedactionSpec {
            rules: vec![RedactionRule {
                name: "contact".into(),
                pattern: "([a-z".into(),
                action: Default::default(),
                replacement: None,
            }],
            ..Default::default()
        });
        let good = project("team-a", "good", "dev");
        let all_keys = BTreeMap::from([
            ("team-a/bad".to_owned(), keys("a")),
            ("team-a/regex".to_owned(), keys("b")),
            ("team-a/good".to_owned(), keys("c")),
        ]);
        let plan = plan(&platform(), &[bad, bad_regex, good], &[], &all_keys);
        assert!(
            plan.invalid["team-a/bad"].contains("retention"),
            "{:?}",
            plan.invalid
        );
        assert!(
            plan.invalid["team-a/regex"].contains("redaction.rules[0].pattern"),
            "{:?}",
            plan.invalid
        );
        assert_eq!(plan.served.keys().collect::<Vec<_>>(), ["team-a/good"]);
    }

    #[test]
    fn policies_select_by_name_or_label_and_the_oldest_applies() {
        let mut chat = project("team-a", "chat", "dev");
        chat.metadata.labels = Some(BTreeMap::from([("tier".into(), "gold".into())]));
        let search = project("team-a", "search", "dev");
        let by_name = policy(
            "by-name",
            serde_json::json!({ "projects": ["search"], "rules": { "percentage": 5 } }),
        );
        let mut by_label = policy(
            "by-label",
            serde_json::json!({
                "selector": { "matchExpressions": [{ "key": "tier", "operator": "In", "values": ["gold"] }] },
                "rules": { "percentage": 50, "decisionWait": "20s", "rootDurationOver": "5s" },
            }),
        );
        let mut also_chat = policy(
            "also-chat",
            serde_json::json!({ "projects": ["chat"], "rules": { "percentage": 1 } }),
        );
        let t = |s: i64| {
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(s).unwrap(),
            ))
        };
        by_label.metadata.creation_timestamp = t(100);
        also_chat.metadata.creation_timestamp = t(200);
        let policies = [by_name, also_chat, by_label];
        let names: Vec<String> = policies_for(&chat, &policies)
            .iter()
            .map(|p| p.name_any())
            .collect();
        assert_eq!(names, ["by-label", "also-chat"]);
        let all_keys = BTreeMap::from([
            ("team-a/chat".to_owned(), keys("a")),
            ("team-a/search".to_owned(), keys("b")),
        ]);
        let plan = plan(&platform(), &[chat, search], &policies, &all_keys);
        assert_eq!(plan.served["team-a/chat"].as_deref(), Some("by-label"));
        let chat = plan.config.tenant(&"team-a/chat".parse().unwrap()).unwrap();
        let s = chat.sampling.as_ref().unwrap();
        assert_eq!(s.percentage, 50.0);
        assert_eq!(s.decision_wait, std::time::Duration::from_secs(20));
        assert_eq!(
            s.root_duration_over,
            Some(std::time::Duration::from_secs(5))
        );
        let search = plan
            .config
            .tenant(&"team-a/search".parse().unwrap())
            .unwrap();
        assert_eq!(search.sampling.as_ref().unwrap().percentage, 5.0);
    }

    #[test]
    fn label_selectors_follow_kubernetes_semantics() {
        let labels = BTreeMap::from([("a".to_owned(), "1".to_owned())]);
        let sel = |v: serde_json::Value| -> LabelSelector { serde_json::from_value(v).unwrap() };
        assert!(label_selector_matches(&sel(serde_json::json!({})), &labels));
        assert!(label_selector_matches(
            &sel(serde_json::json!({"matchLabels": {"a": "1"}})),
            &labels
        ));
        assert!(!label_selector_matches(
            &sel(serde_json::json!({"matchLabels": {"a": "2"}})),
            &labels
        ));
        let expr = |op: &str, values: &[&str]| {
            sel(
                serde_json::json!({"matchExpressions": [{"key": "a", "operator": op, "values": values}]}),
            )
        };
        assert!(label_selector_matches(&expr("NotIn", &["2"]), &labels));
        assert!(!label_selector_matches(&expr("NotIn", &["1"]), &labels));
        assert!(label_selector_matches(&expr("Exists", &[]), &labels));
        assert!(!label_selector_matches(&expr("DoesNotExist", &[]), &labels));
        assert!(!label_selector_matches(&expr("Sometimes", &[]), &labels));
    }

    #[test]
    fn bad_sampling_rules_name_the_field() {
        let rules: SamplingRules =
            serde_json::from_value(serde_json::json!({ "decisionWait": "1h" })).unwrap();
        let err = sampling_policy(&rules).unwrap_err();
        assert!(err.contains("decisionWait"), "{err}");
        let rules: SamplingRules =
            serde_json::from_value(serde_json::json!({ "rootDurationOver": "5 seconds" })).unwrap();
        let err = sampling_policy(&rules).unwrap_err();
        assert!(err.contains("rules.rootDurationOver"), "{err}");
    }
}
