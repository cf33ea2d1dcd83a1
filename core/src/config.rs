//! Data-plane configuration shared by every role: limits and the tenants served.
//!
//! ```yaml
//! usage_metrics:                   # per-project LLM usage on /metrics (off by default)
//!   enabled: true
//!   max_models_per_tenant: 20       # later models are counted as model="other"
//! limits:
//!   max_request_bytes: 16777216     # one export request, after decompression
//!   max_attribute_bytes: 65536      # one string attribute value; longer ones are cut
//!   max_io_bytes: 262144            # a span's input / output text
//! tenants:
//!   - id: default/default
//!     environment: dev
//!     pricing:                      # entries that beat the built-in table
//!       - id: my-finetune
//!         match: "^ft:gpt-4o-mini:acme"
//!         input: 0.3
//!         output: 1.2
//!         valid_from: 2025-01-01
//!   - id: team-a/chat
//!     environment: prod
//!     retention: 30d                # blocks older than this are deleted
//!     keys:                         # `loupe keys new` prints these lines
//!       - name: chat-backend
//!         scope: ingest             # ingest: send spans and scores; query: read
//!         hash: "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//!       - name: grafana
//!         scope: query
//!         hash: "sha256:60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"
//!     sampling:                     # tail sampling; absent = keep every trace
//!       decision_wait: 10s          # held after its last span, then decided
//!       keep_errors: true
//!       root_duration_over: 5s
//!       cost_over_usd: 0.5
//!       tokens_over: 20000
//!       attributes:
//!         - key: user.tier
//!           values: [enterprise]
//!       percentage: 10              # of the traces no rule kept
//!     redaction:                    # PII redaction at ingest (see `redact`); absent =
//!       detectors:                  # email, phone, card, iban, us_ssn, secrets masked
//!         ip: mask                  # off by default
//!         email: hash               # "[EMAIL:<hex>]"; needs LOUPE_REDACTION_KEY
//!       rules:
//!         - name: order
//!           pattern: "ORD-[0-9-]+"  # masked as [ORDER]
//!       attributes:
//!         - key: user.email
//!           action: drop
//! ```

use serde::{Deserialize, Serialize};

use crate::keys::KeyConfig;
use crate::pricing::PriceEntry;
use crate::redact::RedactionConfig;
use crate::sampling::SamplingPolicy;
use crate::{Environment, Error, TenantId};

fn default_max_request_bytes() -> usize {
    16 << 20
}
fn default_max_attribute_bytes() -> usize {
    64 << 10
}
fn default_max_io_bytes() -> usize {
    256 << 10
}

/// Size bounds on what clients send.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "default_max_request_bytes")]
    pub max_request_bytes: usize,
    #[serde(default = "default_max_attribute_bytes")]
    pub max_attribute_bytes: usize,
    #[serde(default = "default_max_io_bytes")]
    pub max_io_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: default_max_request_bytes(),
            max_attribute_bytes: default_max_attribute_bytes(),
            max_io_bytes: default_max_io_bytes(),
        }
    }
}

impl Limits {
    pub fn validate(&self) -> Result<(), Error> {
        let check = |field: &str, v: usize, min: usize, max: usize| {
            if v < min || v > max {
                Err(Error::InvalidConfig {
                    field: format!("limits.{field}"),
                    reason: format!("{v} is outside {min}..={max}"),
                })
            } else {
                Ok(())
            }
        };
        check("max_request_bytes", self.max_request_bytes, 1024, 1 << 30)?;
        check(
            "max_attribute_bytes",
            self.max_attribute_bytes,
            64,
            64 << 20,
        )?;
        check("max_io_bytes", self.max_io_bytes, 64, 64 << 20)?;
        Ok(())
    }
}

/// One tenant (a `TraceProject`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub id: TenantId,
    #[serde(default)]
    pub environment: Environment,
    /// Pricing entries of this project; they beat the built-in table.
    #[serde(default)]
    pub pricing: Vec<PriceEntry>,
    /// Tail-sampling policy of this project. Absent = keep every trace, decided at once.
    #[serde(default)]
    pub sampling: Option<SamplingPolicy>,
    /// The project's keys, hashed (`loupe keys new` prints the line to add).
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// How long the project's traces are kept; the compactor deletes older blocks.
    /// Absent = kept until deleted by hand.
    #[serde(default, with = "humantime_serde")]
    pub retention: Option<std::time::Duration>,
    /// Ingest rates of this project; beyond them exports are refused with
    /// RESOURCE_EXHAUSTED / 429 and a retry hint. Absent = unlimited.
    #[serde(default)]
    pub rate_limits: Option<RateLimits>,
    /// PII redaction of this project's spans at ingest, before normalization. Absent =
    /// the built-in detectors mask emails, phone numbers, card numbers, IBANs, US SSNs
    /// and secrets; `enabled: false` turns redaction off.
    #[serde(default, skip_serializing_if = "RedactionConfig::is_default")]
    pub redaction: RedactionConfig,
}

/// Per-project ingest rates. Each allows a burst of one second's worth (and at least
/// one request of the largest allowed size).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// Spans accepted per second.
    #[serde(default)]
    pub spans_per_second: Option<u32>,
    /// Request bytes (decompressed) accepted per second.
    #[serde(default)]
    pub bytes_per_second: Option<u32>,
}

/// The data-plane configuration file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataPlaneConfig {
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
    /// Per-project LLM usage series on `/metrics` (off by default).
    #[serde(default)]
    pub usage_metrics: UsageMetricsConfig,
}

fn default_max_models() -> usize {
    20
}

/// Per-project LLM usage series (calls, errors, tokens, cost, latency by model) on the
/// receivers' `/metrics`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageMetricsConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Models with their own series per project; later ones count as `model="other"`.
    #[serde(default = "default_max_models")]
    pub max_models_per_tenant: usize,
}

impl Default for UsageMetricsConfig {
    fn default() -> Self {
        UsageMetricsConfig {
            enabled: false,
            max_models_per_tenant: default_max_models(),
        }
    }
}

impl DataPlaneConfig {
    /// Parses and validates a YAML config; errors name the field.
    pub fn from_yaml(text: &str) -> Result<DataPlaneConfig, Error> {
        let cfg: DataPlaneConfig =
            serde_saphyr::from_str(text).map_err(|e| Error::InvalidConfig {
                field: "config".into(),
                reason: e.to_string(),
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), Error> {
        self.limits.validate()?;
        let max_models = self.usage_metrics.max_models_per_tenant;
        if !(1..=1000).contains(&max_models) {
            return Err(Error::InvalidConfig {
                field: "usage_metrics.max_models_per_tenant".into(),
                reason: format!("{max_models} is outside 1..=1000"),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            if !seen.insert(&t.id) {
                return Err(Error::InvalidConfig {
                    field: format!("tenants[{i}].id"),
                    reason: format!("tenant {} is listed twice", t.id),
                });
            }
            crate::pricing::PriceBook::with_overrides(t.pricing.clone()).map_err(|e| {
                Error::InvalidConfig {
                    field: format!("tenants[{i}].pricing"),
                    reason: e.to_string(),
                }
            })?;
            if let Some(sampling) = &t.sampling {
                sampling.validate(&format!("tenants[{i}].sampling"))?;
            }
            if let Some(rl) = &t.rate_limits {
                for (name, v) in [
                    ("spans_per_second", rl.spans_per_second),
                    ("bytes_per_second", rl.bytes_per_second),
                ] {
                    if v == Some(0) {
                        return Err(Error::InvalidConfig {
                            field: format!("tenants[{i}].rate_limits.{name}"),
                            reason: "must be at least 1 (leave it out for no limit)".into(),
                        });
                    }
                }
            }
            t.redaction.validate(&format!("tenants[{i}].redaction"))?;
            if let Some(r) = t.retention
                && r < std::time::Duration::from_secs(3600)
            {
                return Err(Error::InvalidConfig {
                    field: format!("tenants[{i}].retention"),
                    reason: format!(
                        "{} is shorter than the minimum of 1h",
                        humantime_serde::re::humantime::format_duration(r)
                    ),
                });
            }
        }
        crate::keys::validate(self)?;
        Ok(())
    }

    /// The tenant's entry, if configured.
    pub fn tenant(&self, id: &TenantId) -> Option<&TenantConfig> {
        self.tenants.iter().find(|t| &t.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::{Action, Detector, DetectorAction};

    #[test]
    fn parses_the_documented_example() {
        let doc = include_str!("config.rs")
            .lines()
            .skip_while(|l| !l.starts_with("//! ```yaml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.strip_prefix("//! ").unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let cfg = DataPlaneConfig::from_yaml(&doc).unwrap();
        assert_eq!(cfg.limits, Limits::default());
        assert_eq!(cfg.tenants[0].id, TenantId::default_tenant());
        assert_eq!(cfg.tenants[0].pricing[0].id, "my-finetune");
        assert_eq!(cfg.tenants[0].sampling, None);
        let chat = cfg.tenant(&"team-a/chat".parse().unwrap()).unwrap();
        assert_eq!(chat.environment, Environment::Prod);
        assert_eq!(
            chat.sampling,
            Some(SamplingPolicy {
                decision_wait: std::time::Duration::from_secs(10),
                keep_errors: true,
                root_duration_over: Some(std::time::Duration::from_secs(5)),
                trace_duration_over: None,
                cost_over_usd: Some(0.5),
                tokens_over: Some(20_000),
                attributes: vec![crate::sampling::AttributeRule {
                    key: "user.tier".into(),
                    values: vec!["enterprise".into()],
                }],
                percentage: 10.0,
            })
        );
        assert!(cfg.tenants[0].redaction.is_default());
        assert!(cfg.tenants[0].redaction.enabled);
        let redaction = &chat.redaction;
        assert_eq!(
            redaction.detectors,
            std::collections::BTreeMap::from([
                (Detector::Email, DetectorAction::Hash),
                (Detector::Ip, DetectorAction::Mask),
            ])
        );
        assert_eq!(redaction.rules[0].name, "order");
        assert_eq!(redaction.rules[0].action, Action::Mask);
        assert_eq!(redaction.attributes[0].key, "user.email");
        assert_eq!(redaction.attributes[0].action, Action::Drop);
    }

    #[test]
    fn redaction_section() {
        let yaml = "tenants:\n  - id: a/b\n    redaction:\n      enabled: false\n  - id: a/c\n";
        let cfg = DataPlaneConfig::from_yaml(yaml).unwrap();
        assert!(!cfg.tenants[0].redaction.enabled);
        assert_eq!(cfg.tenants[1].redaction, RedactionConfig::default());
        // The default is left out when the operator renders a tenant.
        let rendered = serde_saphyr::to_string(&cfg.tenants[1]).unwrap();
        assert!(!rendered.contains("redaction"), "{rendered}");
        let rendered = serde_saphyr::to_string(&cfg.tenants[0]).unwrap();
        assert!(rendered.contains("redaction"), "{rendered}");

        for (section, field) in [
            (
                "rules: [{ name: order, pattern: 'ORD-(' }]",
                "tenants[0].redaction.rules[0].pattern",
            ),
            (
                "rules: [{ name: '', pattern: x }]",
                "tenants[0].redaction.rules[0].name",
            ),
            (
                "attributes: [{ key: '' }]",
                "tenants[0].redaction.attributes[0].key",
            ),
        ] {
            let yaml = format!("tenants:\n  - id: a/b\n    redaction: {{ {section} }}\n");
            let err = DataPlaneConfig::from_yaml(&yaml).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
        let typo = "tenants:\n  - id: a/b\n    redaction: { detector: {} }\n";
        let err = DataPlaneConfig::from_yaml(typo).unwrap_err();
        assert!(err.to_string().contains("detector"), "{err}");
        // Hashing is valid config; the key is checked when the redactor is built.
        let hash = "tenants:\n  - id: a/b\n    redaction: { detectors: { phone: hash } }\n";
        DataPlaneConfig::from_yaml(hash).unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let err = DataPlaneConfig::from_yaml("limits:\n  max_request_bytes: 10\n").unwrap_err();
        assert!(
            err.to_string().contains("limits.max_request_bytes"),
            "{err}"
        );
        let err = DataPlaneConfig::from_yaml("limits:\n  max_requests: 10\n").unwrap_err();
        assert!(err.to_string().contains("max_requests"), "{err}");
        let err = DataPlaneConfig::from_yaml("tenants:\n  - id: Bad/Id\n").unwrap_err();
        assert!(err.to_string().contains("invalid tenant id"), "{err}");
        let dup = "tenants:\n  - id: a/b\n  - id: a/b\n";
        let err = DataPlaneConfig::from_yaml(dup).unwrap_err();
        assert!(err.to_string().contains("tenants[1].id"), "{err}");
        let zero = "tenants:\n  - id: a/b\n    rate_limits: { spans_per_second: 0 }\n";
        let err = DataPlaneConfig::from_yaml(zero).unwrap_err();
        assert!(
            err.to_string()
                .contains("tenants[0].rate_limits.spans_per_second"),
            "{err}"
        );
        let typo = "tenants:\n  - id: a/b\n    rate_limits: { spans_per_sec: 5 }\n";
        let err = DataPlaneConfig::from_yaml(typo).unwrap_err();
        assert!(err.to_string().contains("spans_per_sec"), "{err}");
    }
}
