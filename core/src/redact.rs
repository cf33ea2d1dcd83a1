//! PII redaction at ingest.
//!
//! Redaction runs on the decoded OTLP request, before normalization, so every field
//! derived from the request (input, output, chat messages, user id…) is built from
//! values already redacted. A project's [`RedactionConfig`] is compiled once into a
//! [`Redactor`], shared by every request of the project.
//!
//! ```yaml
//! redaction:                  # absent = the built-in detectors with their default actions
//!   enabled: true             # false = no redaction for this project
//!   detectors:                # overrides of the default action: off, mask, hash or drop
//!     ip: mask                # off by default
//!     phone: hash             # "[PHONE:<16 hex>]": equal numbers stay joinable
//!     card: drop              # the whole attribute holding a card number is removed
//!   rules:                    # custom patterns (Rust regex syntax)
//!     - name: order           # metric label; the mask is "[ORDER]" unless `replacement` says
//!       pattern: "ORD-[0-9-]+"
//!     - name: ticket
//!       pattern: "TCK[0-9]{6}"
//!       action: hash
//!       replacement: "[TICKET]"
//!   attributes:               # rules on attribute keys (exact match, at any nesting level)
//!     - key: user.email
//!       action: drop
//!     - key: enduser.id
//!       action: hash          # "[HASH:<16 hex>]"
//! ```
//!
//! # Default rules
//!
//! A project without a `redaction:` section masks, in every string value it sends:
//!
//! | detector  | finds                                                         | default | mask       |
//! |-----------|---------------------------------------------------------------|---------|------------|
//! | `email`   | `local@domain.tld`                                            | mask    | `[EMAIL]`  |
//! | `phone`   | E.164 (`+` and 8–15 digits), US and European numbers written with separators | mask | `[PHONE]` |
//! | `card`    | 13–19 digits, grouped or not, passing the Luhn check           | mask    | `[CARD]`   |
//! | `iban`    | IBANs passing the ISO 13616 mod-97 check                      | mask    | `[IBAN]`   |
//! | `us_ssn`  | `AAA-GG-SSSS` outside the never-issued ranges                 | mask    | `[SSN]`    |
//! | `ip`      | IPv4 and IPv6 addresses                                       | **off** | `[IP]`     |
//! | `secrets` | `sk-…` API keys, AWS access key ids, GitHub tokens, `Bearer …`, JWTs, PEM private keys | mask | `[SECRET]` |
//!
//! Candidates found by a detector's pattern are checked in code (Luhn, mod-97, octet
//! ranges, phone number layouts, word boundaries) so that order ids, timestamps, dates,
//! times and version strings are left alone.
//!
//! # Actions
//!
//! - `mask` replaces each match by the rule's token (`[EMAIL]`; a custom rule's
//!   `replacement`, else `[<NAME>]` upper-cased).
//! - `hash` replaces it by `[EMAIL:<hex>]` (custom rules: `[<NAME>:<hex>]`), the first
//!   16 hex digits of HMAC-SHA256(project key, matched text). The project key is
//!   [`project_hash_key`] of the `LOUPE_REDACTION_KEY` master key, so the same value
//!   gives the same token within a project and different tokens across projects.
//! - `drop` removes the whole attribute holding the match. An array element is replaced
//!   by the mask token instead, and a span name, status message or event name, which
//!   cannot be dropped, is masked.
//!
//! Attribute rules match a `KeyValue`'s key exactly, at any level (resource, scope,
//! span, event, link, nested kvlist) and win over the text rules for that value:
//! `mask` sets it to `[REDACTED]`, `hash` to `[HASH:<hex>]` (the same hex a text rule
//! gives for the same string), `drop` removes it.
//!
//! When matches of several rules overlap, custom rules win, then `secrets`, `iban`,
//! `card`, `us_ssn`, `email`, `ip` and `phone`. Replacement text never contains `"` or
//! `\`, and a match never starts or ends inside a `\n`-style escape, so JSON text (chat
//! messages serialized as JSON) stays valid JSON.
//!
//! # Speed
//!
//! Clean text is the common case: it costs one pass and no allocation. Values shorter
//! than 20 bytes without a digit, `@` or `:` are skipped outright. Phone numbers,
//! cards, SSNs, IPv4 addresses and IBANs all contain digits: one scan finds the digit
//! clusters (testing 32-byte blocks at a time for a digit) and each detector looks
//! only there. Emails and secrets are found by regexes whose literal prefilters (`@`,
//! `sk-`, `AKIA`, `Bearer`…) skip clean text. Custom rules go through a `RegexSet`
//! that tells in one pass which of them can match; only those run their own regex. A
//! `RegexSet` over the detectors too was measured 5-10 times slower on clean text:
//! their union has no literal prefix, so it runs the lazy DFA on every byte.
//!
//! # Rule names and counts
//!
//! [`Redactor::rule_names`] lists a label per rule, indexed like the counts that
//! [`Redactor::redact_request`] adds to: first the seven detectors in the order above
//! (`email`, `phone`, `card`, `iban`, `us_ssn`, `ip`, `secrets`, present even when off),
//! then the custom rules by name in config order, then `attribute:<key>` per attribute
//! rule in config order. A count is the number of replacements; a dropped attribute
//! counts once, for the rule that dropped it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;
use std::sync::LazyLock;

use hmac::{Hmac, Mac};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use prost::Message;
use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::{Error, TenantId};

/// The longest custom pattern accepted, in bytes.
pub const MAX_PATTERN_BYTES: usize = 4096;
/// The most custom rules a project may have.
pub const MAX_RULES: usize = 100;
/// The most attribute rules a project may have.
pub const MAX_ATTRIBUTE_RULES: usize = 1000;
/// Bound on one compiled custom pattern.
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Bound on the prefilter compiled from all custom patterns together.
const SET_SIZE_LIMIT: usize = 16 << 20;
const MAX_REPLACEMENT_BYTES: usize = 128;
const MAX_NAME_BYTES: usize = 64;

/// What an attribute rule puts in place of the value it masks.
pub const REDACTED: &str = "[REDACTED]";

fn default_enabled() -> bool {
    true
}

/// Redaction settings of one project (`TraceProject`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactionConfig {
    /// Redact this project's spans at ingest. Default true; false turns redaction off.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Actions that replace the default of a built-in detector (`ip: mask`, `email: off`…).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub detectors: BTreeMap<Detector, DetectorAction>,
    /// Custom patterns, applied to every string value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<PatternRule>,
    /// Rules on attribute keys, applied to the whole value of a matching attribute.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attributes: Vec<AttributeRule>,
}

impl Default for RedactionConfig {
    fn default() -> Self {
        RedactionConfig {
            enabled: true,
            detectors: BTreeMap::new(),
            rules: Vec::new(),
            attributes: Vec::new(),
        }
    }
}

impl RedactionConfig {
    /// Whether this is what a project gets without a `redaction:` section.
    pub fn is_default(&self) -> bool {
        *self == RedactionConfig::default()
    }

    /// Compiles the config without a hash key; errors name the field under `field`
    /// (e.g. `tenants[0].redaction`).
    pub fn validate(&self, field: &str) -> Result<(), Error> {
        Redactor::compile(self, None, false, field).map(drop)
    }
}

/// A built-in detector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    Email,
    Phone,
    Card,
    Iban,
    UsSsn,
    Ip,
    Secrets,
}

impl Detector {
    /// Every detector, in the order of [`Redactor::rule_names`].
    pub const ALL: [Detector; 7] = [
        Detector::Email,
        Detector::Phone,
        Detector::Card,
        Detector::Iban,
        Detector::UsSsn,
        Detector::Ip,
        Detector::Secrets,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Detector::Email => "email",
            Detector::Phone => "phone",
            Detector::Card => "card",
            Detector::Iban => "iban",
            Detector::UsSsn => "us_ssn",
            Detector::Ip => "ip",
            Detector::Secrets => "secrets",
        }
    }

    /// The action a project gets when its config does not name this detector.
    pub fn default_action(self) -> DetectorAction {
        match self {
            Detector::Ip => DetectorAction::Off,
            _ => DetectorAction::Mask,
        }
    }

    /// The mask token.
    pub fn token(self) -> &'static str {
        match self {
            Detector::Email => "[EMAIL]",
            Detector::Phone => "[PHONE]",
            Detector::Card => "[CARD]",
            Detector::Iban => "[IBAN]",
            Detector::UsSsn => "[SSN]",
            Detector::Ip => "[IP]",
            Detector::Secrets => "[SECRET]",
        }
    }

    /// Rank when matches overlap: lower wins (custom rules rank before all of these).
    fn rank(self) -> u8 {
        match self {
            Detector::Secrets => 0,
            // Before cards: 16 digits of an IBAN may pass the Luhn check.
            Detector::Iban => 1,
            Detector::Card => 2,
            Detector::UsSsn => 3,
            Detector::Email => 4,
            Detector::Ip => 5,
            Detector::Phone => 6,
        }
    }
}

impl fmt::Display for Detector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a built-in detector does with its matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectorAction {
    Off,
    Mask,
    Hash,
    Drop,
}

/// What a custom or attribute rule does with its matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    #[default]
    Mask,
    Hash,
    Drop,
}

/// A custom pattern.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternRule {
    /// Metric label of the rule; letters, digits, `_`, `-` and `.`.
    pub name: String,
    /// A Rust regex (<https://docs.rs/regex>), at most 4096 bytes.
    pub pattern: String,
    /// mask (default), hash or drop.
    #[serde(default)]
    pub action: Action,
    /// What `mask` puts in place of a match; default `[<NAME>]` upper-cased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacement: Option<String>,
}

/// A rule on an attribute key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributeRule {
    /// The attribute key, matched exactly (e.g. `user.email`).
    pub key: String,
    /// mask (default: `[REDACTED]`), hash (`[HASH:<hex>]`) or drop.
    #[serde(default)]
    pub action: Action,
}

/// The per-project HMAC key: HMAC-SHA256(master, "loupe redaction v1\0" + tenant id).
pub fn project_hash_key(master: &[u8], tenant: &TenantId) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(master).expect("HMAC takes any key");
    mac.update(b"loupe redaction v1\0");
    mac.update(tenant.as_str().as_bytes());
    mac.finalize().into_bytes().into()
}

// ---------------------------------------------------------------------------------------
// Compiled engine
// ---------------------------------------------------------------------------------------

/// One text rule: a detector or a custom pattern.
struct TextRule {
    /// Index into the counts and [`Redactor::rule_names`].
    label: usize,
    /// A custom rule's pattern; detectors find their matches in code.
    regex: Option<Regex>,
    action: Action,
    /// What `mask` writes.
    token: Box<str>,
    /// What `hash` writes before the hex digits and `]`.
    hash_prefix: Box<str>,
}

/// A match kept for replacement; `rule` indexes `Redactor::rules`, whose order is
/// the overlap rank.
#[derive(Clone, Copy)]
struct Hit {
    start: usize,
    end: usize,
    rule: usize,
}

enum Outcome {
    Clean,
    Replaced(String, u64),
    /// The value must go; the index of the text rule that said so.
    Drop(usize),
}

/// A project's compiled redaction rules. Cheap to share in an `Arc`.
pub struct Redactor {
    names: Vec<String>,
    /// Custom rules first, then detectors by rank: the index is the overlap rank.
    rules: Vec<TextRule>,
    /// How many of `rules` are custom rules.
    customs: usize,
    /// The index in `rules` of each active detector, indexed like [`Detector::ALL`].
    by_detector: [Option<usize>; 7],
    /// One pattern per custom rule: tells in one pass which custom rules may match.
    prefilter: RegexSet,
    /// Texts shorter than this cannot match any rule.
    min_len: usize,
    attributes: HashMap<String, (usize, Action)>,
    mac: Option<Hmac<Sha256>>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field("rules", &self.names)
            .field("has_key", &self.mac.is_some())
            .finish_non_exhaustive()
    }
}

/// Shortest text a valid match of the detector can be.
fn min_len_of(d: Detector) -> usize {
    match d {
        Detector::Email => 6,
        Detector::Phone => 9,
        Detector::Card => 13,
        Detector::Iban => 15,
        Detector::UsSsn => 11,
        Detector::Ip => 7,
        Detector::Secrets => 20,
    }
}

// Candidates of the detectors found with a regex (the others are found in digit
// clusters, see `numeric_clusters`); every candidate is then checked in code.
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+")
        .expect("built-in pattern compiles")
});
static IPV6: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:(?:\.[0-9]{1,3}){3})?")
        .expect("built-in pattern compiles")
});
static SECRETS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r#"-----BEGIN[A-Z ]{0,40} PRIVATE KEY-----[^"]*?-----END[A-Z ]{0,40} PRIVATE KEY-----"#,
        r"|sk-[A-Za-z0-9_\-]{20,}",
        r"|A[KS]IA[A-Z0-9]{16}",
        r"|gh[pousr]_[A-Za-z0-9]{36,}",
        r"|github_pat_[A-Za-z0-9_]{22,}",
        r"|(?i:bearer) +[A-Za-z0-9\-._~+/]{16,}=*",
        r"|eyJ[A-Za-z0-9_\-]{4,}\.eyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*",
    ))
    .expect("built-in pattern compiles")
});

/// Literals of which every secret has one: the secrets detector's prefilter.
static SECRETS_GATE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"sk-|A[KS]IA|gh[pousr]_|github_pat_|(?i:bearer)|eyJ|-----BEGIN")
        .expect("built-in pattern compiles")
});

const HASH_KEY_MISSING: &str = "hash needs a redaction key (LOUPE_REDACTION_KEY)";

fn invalid(field: String, reason: impl Into<String>) -> Error {
    Error::InvalidConfig {
        field,
        reason: reason.into(),
    }
}

impl Redactor {
    /// Compiles a project's config; `None` when redaction is disabled. `hash_key` is the
    /// project's HMAC key ([`project_hash_key`]); a config that hashes without one is an
    /// error naming the field (e.g. `redaction.rules[0].action`).
    pub fn new(
        config: &RedactionConfig,
        hash_key: Option<[u8; 32]>,
    ) -> Result<Option<Redactor>, Error> {
        if !config.enabled {
            return Ok(None);
        }
        Redactor::compile(config, hash_key, true, "redaction").map(Some)
    }

    fn compile(
        config: &RedactionConfig,
        hash_key: Option<[u8; 32]>,
        require_key: bool,
        field: &str,
    ) -> Result<Redactor, Error> {
        let check_key = |action: Action, at: String| {
            if action == Action::Hash && hash_key.is_none() && require_key {
                Err(invalid(at, HASH_KEY_MISSING))
            } else {
                Ok(())
            }
        };
        let mut names: Vec<String> = Detector::ALL.iter().map(|d| d.to_string()).collect();
        let mut rules = Vec::new();
        let mut prefilters: Vec<String> = Vec::new();
        let mut min_len = usize::MAX;

        if config.rules.len() > MAX_RULES {
            return Err(invalid(
                format!("{field}.rules"),
                format!(
                    "{} rules, more than the maximum of {MAX_RULES}",
                    config.rules.len()
                ),
            ));
        }
        let mut seen = HashSet::new();
        for (j, rule) in config.rules.iter().enumerate() {
            let at = |name: &str| format!("{field}.rules[{j}].{name}");
            let name = &rule.name;
            if name.is_empty() {
                return Err(invalid(at("name"), "must not be empty"));
            }
            if name.len() > MAX_NAME_BYTES
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
            {
                return Err(invalid(
                    at("name"),
                    format!("{name:?} is not 1-{MAX_NAME_BYTES} letters, digits, '_', '-' or '.'"),
                ));
            }
            if Detector::ALL.iter().any(|d| d.as_str() == name) {
                return Err(invalid(
                    at("name"),
                    format!("{name:?} is the name of a built-in detector"),
                ));
            }
            if !seen.insert(name.as_str()) {
                return Err(invalid(
                    at("name"),
                    format!("rule {name:?} is listed twice"),
                ));
            }
            if rule.pattern.len() > MAX_PATTERN_BYTES {
                return Err(invalid(
                    at("pattern"),
                    format!(
                        "{} bytes, longer than the maximum of {MAX_PATTERN_BYTES}",
                        rule.pattern.len()
                    ),
                ));
            }
            let regex = RegexBuilder::new(&rule.pattern)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
                .map_err(|e| invalid(at("pattern"), e.to_string()))?;
            if regex.is_match("") {
                return Err(invalid(at("pattern"), "matches the empty text"));
            }
            if let Some(r) = &rule.replacement
                && (r.len() > MAX_REPLACEMENT_BYTES || r.contains(['"', '\\']))
            {
                return Err(invalid(
                    at("replacement"),
                    format!("must be at most {MAX_REPLACEMENT_BYTES} bytes without '\"' or '\\'"),
                ));
            }
            check_key(rule.action, at("action"))?;
            let upper = name.to_ascii_uppercase();
            rules.push(TextRule {
                label: names.len(),
                regex: Some(regex),
                action: rule.action,
                token: rule
                    .replacement
                    .clone()
                    .unwrap_or_else(|| format!("[{upper}]"))
                    .into(),
                hash_prefix: format!("[{upper}:").into(),
            });
            prefilters.push(rule.pattern.clone());
            // Any length: a custom pattern may match a single character.
            min_len = 1;
            names.push(name.clone());
        }

        let mut by_detector = [None; Detector::ALL.len()];
        let mut detectors: Vec<Detector> = Detector::ALL.to_vec();
        detectors.sort_by_key(|d| d.rank());
        for d in detectors {
            let action = match config
                .detectors
                .get(&d)
                .copied()
                .unwrap_or(d.default_action())
            {
                DetectorAction::Off => continue,
                DetectorAction::Mask => Action::Mask,
                DetectorAction::Hash => Action::Hash,
                DetectorAction::Drop => Action::Drop,
            };
            check_key(action, format!("{field}.detectors.{d}"))?;
            let index = Detector::ALL.iter().position(|x| *x == d).expect("listed");
            let token = d.token();
            by_detector[index] = Some(rules.len());
            rules.push(TextRule {
                label: index,
                regex: None,
                action,
                token: token.into(),
                hash_prefix: format!("{}:", &token[..token.len() - 1]).into(),
            });
            min_len = min_len.min(min_len_of(d));
        }

        if config.attributes.len() > MAX_ATTRIBUTE_RULES {
            return Err(invalid(
                format!("{field}.attributes"),
                format!(
                    "{} rules, more than the maximum of {MAX_ATTRIBUTE_RULES}",
                    config.attributes.len()
                ),
            ));
        }
        let mut attributes = HashMap::new();
        for (j, rule) in config.attributes.iter().enumerate() {
            if rule.key.is_empty() {
                return Err(invalid(
                    format!("{field}.attributes[{j}].key"),
                    "must not be empty",
                ));
            }
            if attributes
                .insert(rule.key.clone(), (names.len(), rule.action))
                .is_some()
            {
                return Err(invalid(
                    format!("{field}.attributes[{j}].key"),
                    format!("key {:?} is listed twice", rule.key),
                ));
            }
            check_key(rule.action, format!("{field}.attributes[{j}].action"))?;
            names.push(format!("attribute:{}", rule.key));
        }

        let customs = config.rules.len();
        let prefilter = RegexSetBuilder::new(&prefilters)
            .size_limit(SET_SIZE_LIMIT)
            .build()
            .map_err(|e| {
                invalid(
                    format!("{field}.rules"),
                    format!("the rules together are too large: {e}"),
                )
            })?;
        let mac = hash_key.map(|k| <Hmac<Sha256> as Mac>::new_from_slice(&k).expect("any key"));
        Ok(Redactor {
            names,
            rules,
            customs,
            by_detector,
            prefilter,
            min_len,
            attributes,
            mac,
        })
    }

    /// The metric label of each rule, indexed like the counts: the seven detectors
    /// (`email`, `phone`, `card`, `iban`, `us_ssn`, `ip`, `secrets`, even when off),
    /// then the custom rules by name, then `attribute:<key>` per attribute rule.
    pub fn rule_names(&self) -> &[String] {
        &self.names
    }

    /// Redacts every text the request carries (resource, scope, span, event and link
    /// attributes, span names, status messages and event names), adding the number of
    /// replacements per rule to `counts` (`len == rule_names().len()`). Returns the total.
    pub fn redact_request(&self, req: &mut ExportTraceServiceRequest, counts: &mut [u64]) -> u64 {
        assert_eq!(counts.len(), self.names.len(), "one count per rule name");
        let mut total = 0;
        for rs in &mut req.resource_spans {
            if let Some(res) = &mut rs.resource {
                total += self.redact_attributes(&mut res.attributes, counts);
            }
            for ss in &mut rs.scope_spans {
                if let Some(scope) = &mut ss.scope {
                    total += self.redact_attributes(&mut scope.attributes, counts);
                }
                for span in &mut ss.spans {
                    total += self.redact_string(&mut span.name, counts);
                    if let Some(status) = &mut span.status {
                        total += self.redact_string(&mut status.message, counts);
                    }
                    total += self.redact_attributes(&mut span.attributes, counts);
                    for event in &mut span.events {
                        total += self.redact_string(&mut event.name, counts);
                        total += self.redact_attributes(&mut event.attributes, counts);
                    }
                    for link in &mut span.links {
                        total += self.redact_attributes(&mut link.attributes, counts);
                    }
                }
            }
        }
        total
    }

    /// Redacts one free text, where a `drop` match is masked. `None` when nothing
    /// matched (without allocating).
    pub fn redact_text(&self, text: &str, counts: &mut [u64]) -> Option<String> {
        match self.scan(text, false, counts) {
            Outcome::Replaced(s, _) => Some(s),
            Outcome::Clean | Outcome::Drop(_) => None,
        }
    }

    fn redact_string(&self, text: &mut String, counts: &mut [u64]) -> u64 {
        match self.scan(text, false, counts) {
            Outcome::Replaced(s, n) => {
                *text = s;
                n
            }
            Outcome::Clean | Outcome::Drop(_) => 0,
        }
    }

    /// Redacts a list of attributes in place, removing the dropped ones.
    fn redact_attributes(&self, attrs: &mut Vec<KeyValue>, counts: &mut [u64]) -> u64 {
        let mut total = 0;
        attrs.retain_mut(|kv| {
            if !self.attributes.is_empty()
                && let Some(&(label, action)) = self.attributes.get(kv.key.as_str())
            {
                return self.apply_attribute_rule(kv, label, action, counts, &mut total);
            }
            match kv.value.as_mut().and_then(|v| v.value.as_mut()) {
                Some(v) => self.redact_value(v, counts, &mut total).is_none(),
                None => true,
            }
        });
        total
    }

    /// Whether the attribute stays.
    fn apply_attribute_rule(
        &self,
        kv: &mut KeyValue,
        label: usize,
        action: Action,
        counts: &mut [u64],
        total: &mut u64,
    ) -> bool {
        let Some(value) = kv.value.as_mut().and_then(|v| v.value.as_mut()) else {
            if action == Action::Drop {
                counts[label] += 1;
                *total += 1;
            }
            return action != Action::Drop;
        };
        counts[label] += 1;
        *total += 1;
        let replacement = match action {
            Action::Drop => return false,
            Action::Mask => REDACTED.to_owned(),
            Action::Hash => {
                let hex = match &*value {
                    Value::StringValue(s) => self.hash_hex(s.as_bytes()),
                    Value::BoolValue(b) => self.hash_hex(b.to_string().as_bytes()),
                    Value::IntValue(i) => self.hash_hex(i.to_string().as_bytes()),
                    Value::DoubleValue(d) => self.hash_hex(d.to_string().as_bytes()),
                    Value::BytesValue(b) => self.hash_hex(b),
                    other => {
                        let encoded = AnyValue {
                            value: Some(other.clone()),
                        }
                        .encode_to_vec();
                        self.hash_hex(&encoded)
                    }
                };
                match hex {
                    Some(hex) => format!("[HASH:{}]", hex_str(&hex)),
                    None => REDACTED.to_owned(),
                }
            }
        };
        *value = Value::StringValue(replacement);
        true
    }

    /// Redacts one value in place. `Some(rule)` when a `drop` rule says the value must
    /// go, `rule` indexing `self.rules`.
    fn redact_value(
        &self,
        value: &mut Value,
        counts: &mut [u64],
        total: &mut u64,
    ) -> Option<usize> {
        match value {
            Value::StringValue(s) => match self.scan(s, true, counts) {
                Outcome::Clean => None,
                Outcome::Replaced(new, n) => {
                    *s = new;
                    *total += n;
                    None
                }
                Outcome::Drop(rule) => {
                    *total += 1;
                    Some(rule)
                }
            },
            Value::ArrayValue(array) => {
                for element in &mut array.values {
                    if let Some(v) = element.value.as_mut()
                        && let Some(rule) = self.redact_value(v, counts, total)
                    {
                        *v = Value::StringValue(self.rules[rule].token.to_string());
                    }
                }
                None
            }
            Value::KvlistValue(list) => {
                *total += self.redact_attributes(&mut list.values, counts);
                None
            }
            Value::BoolValue(_)
            | Value::IntValue(_)
            | Value::DoubleValue(_)
            | Value::BytesValue(_)
            | Value::StringValueStrindex(_) => None,
        }
    }

    /// Finds and replaces every match in `text`. Counts are added only for what is
    /// replaced (or, on `Drop`, once for the dropping rule).
    fn scan(&self, text: &str, allow_drop: bool, counts: &mut [u64]) -> Outcome {
        if text.len() < self.min_len {
            return Outcome::Clean;
        }
        let mut hits: Vec<Hit> = Vec::new();
        if self.customs > 0 && self.prefilter.is_match(text) {
            for k in self.prefilter.matches(text).iter() {
                self.find(k, text, &mut hits);
            }
        }
        if self.customs < self.rules.len() {
            self.find_detected(text, &mut hits);
        }
        if hits.is_empty() {
            return Outcome::Clean;
        }
        // Overlaps: the lower rule index (custom rules, then detectors by rank) wins.
        hits.sort_unstable_by_key(|h| (h.start, h.rule));
        let mut kept = 0;
        for i in 0..hits.len() {
            let h = hits[i];
            if kept > 0 && h.start < hits[kept - 1].end {
                if h.rule < hits[kept - 1].rule {
                    hits[kept - 1] = h;
                }
            } else {
                hits[kept] = h;
                kept += 1;
            }
        }
        hits.truncate(kept);
        if allow_drop
            && let Some(h) = hits
                .iter()
                .find(|h| self.rules[h.rule].action == Action::Drop)
        {
            counts[self.rules[h.rule].label] += 1;
            return Outcome::Drop(h.rule);
        }
        let mut out = String::with_capacity(text.len() + 8 * hits.len());
        let mut pos = 0;
        for h in &hits {
            let rule = &self.rules[h.rule];
            out.push_str(&text[pos..h.start]);
            let hex = match rule.action {
                Action::Hash => self.hash_hex(&text.as_bytes()[h.start..h.end]),
                Action::Mask | Action::Drop => None,
            };
            match hex {
                Some(hex) => {
                    out.push_str(&rule.hash_prefix);
                    out.push_str(hex_str(&hex));
                    out.push(']');
                }
                None => out.push_str(&rule.token),
            }
            counts[rule.label] += 1;
            pos = h.end;
        }
        out.push_str(&text[pos..]);
        Outcome::Replaced(out, hits.len() as u64)
    }

    /// Pushes the matches of custom rule `k` in `text`.
    fn find(&self, k: usize, text: &str, hits: &mut Vec<Hit>) {
        let Some(regex) = &self.rules[k].regex else {
            return;
        };
        let hay = text.as_bytes();
        for m in regex.find_iter(text) {
            let (start, end) = outside_escapes(hay, m.start(), m.end());
            if start < end {
                hits.push(Hit {
                    start,
                    end,
                    rule: k,
                });
            }
        }
    }

    /// Pushes the matches of the active detectors in `text`. Phone numbers, cards,
    /// SSNs, IPv4 addresses and IBANs are looked for in one scan of the digit clusters
    /// (which skips digit-free text in vectorized blocks); emails and secrets by
    /// regexes with literal prefilters (`@`, `sk-`…), IPv6 addresses only in text
    /// with two colons.
    fn find_detected(&self, text: &str, hits: &mut Vec<Hit>) {
        let hay = text.as_bytes();
        // Most attribute values are short words (`openai`, `LLM`, a user id): without
        // digits, `@` or `:` only a secret could match, and secrets are longer.
        if hay.len() < 20
            && hay
                .iter()
                .all(|&b| b.wrapping_sub(b'0') >= 10 && b != b'@' && b != b':')
        {
            return;
        }
        let rule = |d: Detector| self.by_detector[d as usize];
        let mut push = |rule: usize, start: usize, end: usize| {
            let (start, end) = outside_escapes(hay, start, end);
            if start < end {
                hits.push(Hit { start, end, rule });
            }
        };
        let (phone, card, ssn) = (
            rule(Detector::Phone),
            rule(Detector::Card),
            rule(Detector::UsSsn),
        );
        let (ip, iban) = (rule(Detector::Ip), rule(Detector::Iban));
        if phone.is_some() || card.is_some() || ssn.is_some() || ip.is_some() || iban.is_some() {
            numeric_clusters(hay, |cs, first, ce, digits| {
                if let Some(k) = phone
                    && digits >= 8
                {
                    phones(hay, cs, ce, &mut |s, e| push(k, s, e));
                }
                if let Some(k) = card
                    && digits >= 13
                {
                    cards(hay, cs, ce, &mut |s, e| push(k, s, e));
                }
                let seps = &hay[first..ce];
                if let Some(k) = ssn
                    && digits >= 9
                    && seps.contains(&b'-')
                {
                    ssns(hay, cs, ce, &mut |s, e| push(k, s, e));
                }
                if let Some(k) = ip
                    && digits >= 4
                    && seps.contains(&b'.')
                {
                    ipv4s(text, cs, ce, &mut |s, e| push(k, s, e));
                }
                // The check digits of an IBAN follow its two-letter country code.
                if let Some(k) = iban
                    && first >= 2
                    && hay[first - 2].is_ascii_uppercase()
                    && hay[first - 1].is_ascii_uppercase()
                    && byte(hay, first + 1).is_ascii_digit()
                    && let Some(end) = iban_at(hay, first - 2)
                {
                    push(k, first - 2, end);
                }
            });
        }
        // `str::contains(char)` is a memchr: cheaper than a regex call on short text.
        if let Some(k) = rule(Detector::Email)
            && text.contains('@')
        {
            for m in EMAIL.find_iter(text) {
                if let Some(s) = email(hay, m.start(), m.end()) {
                    push(k, s, m.end());
                }
            }
        }
        if let Some(k) = ip
            && hay.iter().fold(0usize, |n, &b| n + usize::from(b == b':')) >= 2
        {
            for m in IPV6.find_iter(text) {
                if self::ip(text, m.start(), m.end()) {
                    push(k, m.start(), m.end());
                }
            }
        }
        if let Some(k) = rule(Detector::Secrets)
            && text.len() >= 20
            && SECRETS_GATE.is_match(text)
        {
            for m in SECRETS.find_iter(text) {
                if secret(hay, m.start(), m.end()) {
                    push(k, m.start(), m.end());
                }
            }
        }
    }

    /// The first 8 bytes of HMAC-SHA256(project key, data), as 16 hex digits; `None`
    /// without a key (only in validation, which never redacts).
    fn hash_hex(&self, data: &[u8]) -> Option<[u8; 16]> {
        let mut mac = self.mac.clone()?;
        mac.update(data);
        let digest = mac.finalize().into_bytes();
        let mut hex = [0u8; 16];
        for (i, b) in digest[..8].iter().enumerate() {
            hex[2 * i] = HEX[(b >> 4) as usize];
            hex[2 * i + 1] = HEX[(b & 15) as usize];
        }
        Some(hex)
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_str(hex: &[u8; 16]) -> &str {
    std::str::from_utf8(hex).expect("hex digits are ASCII")
}

// ---------------------------------------------------------------------------------------
// Detectors: checks on the candidates the patterns find
// ---------------------------------------------------------------------------------------

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Whether the byte at `pos` follows an odd number of backslashes, i.e. is the second
/// character of an escape like `\n` in serialized text.
fn escaped(hay: &[u8], pos: usize) -> bool {
    hay[..pos].iter().rev().take_while(|&&c| c == b'\\').count() % 2 == 1
}

/// Whether the text before `pos` ends in a word character. The letter of an escape
/// (`\n`, `\t`) does not count: serialized text often puts one right before a value.
fn word_before(hay: &[u8], pos: usize) -> bool {
    pos > 0 && is_word(hay[pos - 1]) && !escaped(hay, pos - 1)
}

fn word_after(hay: &[u8], end: usize) -> bool {
    end < hay.len() && is_word(hay[end])
}

fn byte(hay: &[u8], i: usize) -> u8 {
    hay.get(i).copied().unwrap_or(0)
}

/// Shrinks a match so that it neither starts nor ends inside an escape sequence
/// (`\n`, `\"`, `\u00e9`): a replacement must not leave half an escape behind.
fn outside_escapes(hay: &[u8], mut start: usize, mut end: usize) -> (usize, usize) {
    // A backslash before a non-ASCII character is no escape: leave the match alone
    // (moving by one byte would split the character).
    if start > 0 && start < end && hay[start].is_ascii() && escaped(hay, start) {
        let unicode = hay[start] == b'u'
            && hay.len() >= start + 5
            && hay[start + 1..start + 5].iter().all(u8::is_ascii_hexdigit);
        start += if unicode { 5 } else { 1 };
    }
    let mut p = end.saturating_sub(5).max(start);
    while p < end {
        if hay[p] == b'\\' && !escaped(hay, p) {
            let len = if byte(hay, p + 1) == b'u' { 6 } else { 2 };
            if p + len > end {
                end = p;
                break;
            }
            p += len;
        } else {
            p += 1;
        }
    }
    (start, end.max(start))
}

/// The start of a valid email in candidate `[s, e)`, past any leading dots.
fn email(hay: &[u8], s: usize, e: usize) -> Option<usize> {
    let at = s + hay[s..e].iter().position(|&b| b == b'@')?;
    let mut start = s;
    while start < at && hay[start] == b'.' {
        start += 1;
    }
    let local = &hay[start..at];
    if local.is_empty()
        || local.len() > 64
        || local.ends_with(b".")
        || local.windows(2).any(|w| w == b"..")
    {
        return None;
    }
    let domain = &hay[at + 1..e];
    if domain.len() > 253 {
        return None;
    }
    let mut labels = domain.split(|&b| b == b'.');
    let tld = labels.next_back()?;
    if !(2..=63).contains(&tld.len()) || !tld.iter().all(u8::is_ascii_alphabetic) {
        return None;
    }
    // `icon@2x.png`: an image name, not an address.
    const FILE_TYPES: [&[u8]; 6] = [b"png", b"jpg", b"jpeg", b"gif", b"svg", b"webp"];
    if FILE_TYPES.iter().any(|t| tld.eq_ignore_ascii_case(t)) {
        return None;
    }
    for label in labels {
        if label.is_empty() || label.len() > 63 || label.starts_with(b"-") || label.ends_with(b"-")
        {
            return None;
        }
    }
    Some(start)
}

/// Splits `[s, e)` at single spaces and emits the longest runs of at most `max_parts`
/// parts that `valid(start, end)` accepts, left to right.
fn runs(
    hay: &[u8],
    s: usize,
    e: usize,
    max_parts: usize,
    valid: &mut impl FnMut(usize, usize) -> Option<usize>,
    emit: &mut impl FnMut(usize, usize),
) {
    let mut start = s;
    let mut ends = [0usize; 8];
    let max_parts = max_parts.min(ends.len());
    while start < e {
        let mut n = 0;
        let mut p = start;
        while n < max_parts && p < e {
            let end = hay[p..e]
                .iter()
                .position(|&b| b == b' ')
                .map_or(e, |k| p + k);
            ends[n] = end;
            n += 1;
            p = end + 1;
        }
        let found = ends[..n]
            .iter()
            .rev()
            .find_map(|&end| valid(start, end).map(|st| (st, end)));
        match found {
            Some((st, end)) => {
                emit(st, end);
                start = end + 1;
            }
            None => start = ends[0] + 1,
        }
    }
}

/// Emits the phone numbers in a candidate (digit groups with separators).
fn phones(hay: &[u8], cs: usize, ce: usize, emit: &mut impl FnMut(usize, usize)) {
    let mut valid = |s: usize, e: usize| {
        // The number must stand alone: not `x415-555-2671`, `ORD-2024-555-0100`,
        // `1.415.555.2671`, `415-555-2671/2` nor the date of `2024-01-15:12`.
        let after = byte(hay, e);
        if word_after(hay, e) || (matches!(after, b'/' | b':') && byte(hay, e + 1).is_ascii_digit())
        {
            return None;
        }
        let alone = |s: usize| {
            s == 0 || (!word_before(hay, s) && !matches!(hay[s - 1], b'.' | b'-' | b'/' | b'@'))
        };
        // Part of a longer run of space-separated digit groups (`3704 0044 0532 0130 00`):
        // only a number that does not itself use spaces stands out of it.
        let spaced = |s: usize| {
            hay[s..e]
                .iter()
                .enumerate()
                .any(|(i, &b)| b == b' ' && (i == 0 || hay[s + i - 1] != b')'))
        };
        if (s > cs || e < ce) && spaced(s) {
            return None;
        }
        if alone(s) && phone_ok(&hay[s..e]) {
            return Some(s);
        }
        // `(415-555-2671`: the parenthesis is not part of the number.
        if hay[s] == b'(' && s + 1 < e && phone_ok(&hay[s + 1..e]) {
            return Some(s + 1);
        }
        None
    };
    runs(hay, cs, ce, 6, &mut valid, emit);
}

/// Whether `p` is laid out like a phone number: E.164, a US number or a European
/// national number.
fn phone_ok(p: &[u8]) -> bool {
    let plus = p.first() == Some(&b'+');
    let mut i = usize::from(plus);
    // Digit groups: (length, in parentheses, separator before it).
    let mut groups = [(0usize, false, 0u8); 8];
    let mut n = 0;
    let mut parens = 0;
    let mut digits = 0;
    let mut sep = 0u8;
    loop {
        let paren = byte(p, i) == b'(';
        i += usize::from(paren);
        let len = p[i.min(p.len())..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if len == 0 || n == groups.len() {
            return false;
        }
        i += len;
        if paren {
            if byte(p, i) != b')' {
                return false;
            }
            i += 1;
            parens += 1;
        }
        groups[n] = (len, paren, sep);
        n += 1;
        digits += len;
        if i >= p.len() {
            break;
        }
        sep = 0;
        if matches!(p[i], b' ' | b'.' | b'-') {
            sep = p[i];
            i += 1;
        } else if !(paren || p[i] == b'(') {
            return false;
        }
    }
    let groups = &groups[..n];
    let digit_at = |k: usize| p.iter().filter(|b| b.is_ascii_digit()).nth(k).copied();
    if plus {
        return (8..=15).contains(&digits) && digit_at(0) != Some(b'0') && parens <= 1;
    }
    // Only the first group of a national number may be in parentheses.
    if n < 2 || parens > 1 || groups[1..].iter().any(|g| g.1) {
        return false;
    }
    // US: (415) 555-2671, (415)555-2671, 415-555-2671, 415.555.2671, 415 555 2671,
    // 1-800-555-0199.
    let trunk = usize::from(n == 4 && groups[0].0 == 1 && digit_at(0) == Some(b'1'));
    let us = &groups[trunk..];
    if us.len() == 3 && us[0].0 == 3 && us[1].0 == 3 && us[2].0 == 4 {
        let layout_ok = if us[0].1 {
            trunk == 0 && matches!(us[1].2, 0 | b' ') && matches!(us[2].2, b'-' | b' ' | b'.')
        } else {
            us[1].2 != 0 && us[2].2 == us[1].2 && (trunk == 0 || us[0].2 == us[1].2)
        };
        if layout_ok
            && matches!(digit_at(trunk), Some(b'2'..=b'9'))
            && matches!(digit_at(trunk + 3), Some(b'2'..=b'9'))
        {
            return true;
        }
    }
    // European national numbers: a trunk 0, then 9-12 digits in 2-5 groups split by
    // one kind of separator (030 1234 5678, 020 7946 0958, 06-12345678, 06.12.34.56.78).
    !groups[0].1
        && digit_at(0) == Some(b'0')
        && digit_at(1).is_some_and(|d| d != b'0')
        && (9..=12).contains(&digits)
        && (2..=5).contains(&n)
        && (2..=5).contains(&groups[0].0)
        && groups[1..].iter().all(|g| g.0 >= 2 && g.2 == groups[1].2)
        && groups[1].2 != 0
}

/// The position of the first ASCII digit at or after `from`.
fn next_digit(hay: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    // Whole blocks are tested without an early exit, which vectorizes.
    while i + 32 <= hay.len() {
        let block = &hay[i..i + 32];
        if block
            .iter()
            .fold(false, |any, b| any | (b.wrapping_sub(b'0') < 10))
        {
            break;
        }
        i += 32;
    }
    hay[i..].iter().position(u8::is_ascii_digit).map(|k| i + k)
}

/// Calls `f(start, first_digit, end, digits)` for each digit cluster: runs of digits joined by
/// one of ` `, `.`, `-`, maybe with a parenthesis (`(415) 555-2671`, `2024-01-15`,
/// `4111 1111 1111 1111`, `10.0.0.1`), with a `+` or `(` just before it. Phone
/// numbers, cards, SSNs and IPv4 addresses are all looked for in clusters.
fn numeric_clusters(hay: &[u8], mut f: impl FnMut(usize, usize, usize, usize)) {
    let is_digit = |i: usize| byte(hay, i).is_ascii_digit();
    let mut i = 0;
    while let Some(first) = next_digit(hay, i) {
        let mut start = first;
        if start > 0 && matches!(hay[start - 1], b'+' | b'(') {
            start -= 1;
        }
        let (mut j, mut digits) = (first, 0);
        loop {
            let run = hay[j..].iter().take_while(|b| b.is_ascii_digit()).count();
            digits += run;
            j += run;
            let sep = match (byte(hay, j), byte(hay, j + 1)) {
                (b')', b' ' | b'.' | b'-') if is_digit(j + 2) => 2,
                (b')', _) if is_digit(j + 1) => 1,
                (b' ' | b'.' | b'-', b'(') if is_digit(j + 2) => 2,
                (b' ' | b'.' | b'-', _) if is_digit(j + 1) => 1,
                _ => 0,
            };
            if sep == 0 {
                break;
            }
            j += sep;
        }
        f(start, first, j, digits);
        i = j;
    }
}

/// The digit runs of `[s, e)`, as `(start, end)`.
fn digit_groups(hay: &[u8], s: usize, e: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut i = s;
    std::iter::from_fn(move || {
        while i < e && !hay[i].is_ascii_digit() {
            i += 1;
        }
        if i >= e {
            return None;
        }
        let start = i;
        while i < e && hay[i].is_ascii_digit() {
            i += 1;
        }
        Some((start, i))
    })
}

/// Emits the card numbers in a digit cluster.
fn cards(hay: &[u8], cs: usize, ce: usize, emit: &mut impl FnMut(usize, usize)) {
    let alone = |s: usize, e: usize| {
        let glued_before = word_before(hay, s) || (s > 0 && matches!(hay[s - 1], b'.' | b','));
        let glued_after = word_after(hay, e)
            || (matches!(byte(hay, e), b'.' | b',') && byte(hay, e + 1).is_ascii_digit());
        !glued_before && !glued_after
    };
    let mut from = cs;
    for (s, _) in digit_groups(hay, cs, ce) {
        if s < from {
            continue;
        }
        // A card is at most 7 groups (4-4-4-4-3, 4-6-5, or one run of digits).
        let found = digit_groups(hay, s, ce)
            .take(7)
            .map(|(_, e)| e)
            .collect::<ArrayVec7>()
            .rev()
            .find(|&e| alone(s, e) && card_ok(&hay[s..e]));
        if let Some(e) = found {
            emit(s, e);
            from = e;
        }
    }
}

/// Up to seven positions, without allocating.
struct ArrayVec7 {
    items: [usize; 7],
    len: usize,
}

impl FromIterator<usize> for ArrayVec7 {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
        let mut v = ArrayVec7 {
            items: [0; 7],
            len: 0,
        };
        for x in iter.into_iter().take(7) {
            v.items[v.len] = x;
            v.len += 1;
        }
        v
    }
}

impl ArrayVec7 {
    fn rev(self) -> impl Iterator<Item = usize> {
        let ArrayVec7 { items, len } = self;
        items.into_iter().take(len).rev()
    }
}

/// Emits the US SSNs (`AAA-GG-SSSS`) in a digit cluster.
fn ssns(hay: &[u8], cs: usize, ce: usize, emit: &mut impl FnMut(usize, usize)) {
    let mut groups = digit_groups(hay, cs, ce);
    let (Some(mut a), Some(mut b)) = (groups.next(), groups.next()) else {
        return;
    };
    for c in groups {
        let joined = |x: (usize, usize), y: (usize, usize)| y.0 == x.1 + 1 && hay[x.1] == b'-';
        if a.1 - a.0 == 3
            && b.1 - b.0 == 2
            && c.1 - c.0 == 4
            && joined(a, b)
            && joined(b, c)
            && us_ssn(hay, a.0, c.1)
        {
            emit(a.0, c.1);
        }
        (a, b) = (b, c);
    }
}

/// Emits the IPv4 addresses in a digit cluster.
fn ipv4s(text: &str, cs: usize, ce: usize, emit: &mut impl FnMut(usize, usize)) {
    let hay = text.as_bytes();
    let mut from = cs;
    for (s, _) in digit_groups(hay, cs, ce) {
        if s < from {
            continue;
        }
        // Four runs of 1-3 digits joined by single dots.
        let mut end = s;
        let mut n = 0;
        for (gs, ge) in digit_groups(hay, s, ce).take(4) {
            if ge - gs > 3 || (n > 0 && (gs != end + 1 || hay[end] != b'.')) {
                break;
            }
            end = ge;
            n += 1;
        }
        if n == 4 && ip(text, s, end) {
            emit(s, end);
            from = end;
        }
    }
}

/// Whether `c` (digits, maybe grouped by one kind of separator) is a card number:
/// 13-19 digits, a card network's first digit, plausible grouping, Luhn-valid.
fn card_ok(c: &[u8]) -> bool {
    let digits = c.iter().filter(|b| b.is_ascii_digit()).count();
    if !(13..=19).contains(&digits) || !matches!(c[0], b'2'..=b'6') {
        return false;
    }
    let sep = c.iter().find(|b| !b.is_ascii_digit()).copied();
    if let Some(sep) = sep {
        if !matches!(sep, b' ' | b'-') || c.iter().any(|&b| !b.is_ascii_digit() && b != sep) {
            return false;
        }
        // 4111 1111 1111 1111, 3782 822463 10005, 4222 2222 2222 2.
        let groups: [usize; 7] = {
            let mut g = [0; 7];
            for (i, part) in c.split(|&b| b == sep).enumerate().take(7) {
                g[i] = part.len();
            }
            g
        };
        let n = c.split(|&b| b == sep).count();
        if n > 7
            || groups[0] != 4
            || groups[1..n - 1].iter().any(|&l| !(4..=6).contains(&l))
            || !(1..=6).contains(&groups[n - 1])
        {
            return false;
        }
    }
    luhn(c.iter().filter(|b| b.is_ascii_digit()).map(|b| b - b'0'))
}

fn luhn(digits: impl DoubleEndedIterator<Item = u8>) -> bool {
    let sum: u32 = digits
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let d = d * 2;
                if d > 9 { d - 9 } else { d }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// The end of a valid IBAN at `i`, where two capitals and two digits are: then
/// 11-30 capitals and digits, or groups of up to 4 of them after single spaces.
fn iban_at(hay: &[u8], i: usize) -> Option<usize> {
    let alnum = |b: &u8| b.is_ascii_uppercase() || b.is_ascii_digit();
    let run = hay[i + 4..].iter().take_while(|b| alnum(b)).count();
    let e = if run >= 11 {
        i + 4 + run.min(30)
    } else {
        let mut p = i + 4;
        while byte(hay, p) == b' ' {
            let group = hay[p + 1..].iter().take(4).take_while(|b| alnum(b)).count();
            if group == 0 {
                break;
            }
            p += 1 + group;
        }
        p
    };
    if e == i + 4 { None } else { iban(hay, i, e) }
}

/// The end of a valid IBAN starting at candidate `[s, e)`, compact or in groups of 4.
fn iban(hay: &[u8], s: usize, e: usize) -> Option<usize> {
    if word_before(hay, s) {
        return None;
    }
    let c = &hay[s..e];
    if !c.contains(&b' ') {
        return (!word_after(hay, e) && iban_ok(c)).then_some(e);
    }
    // Grouped: DE89 3704 0044 0532 0130 00; try the longest prefix of whole groups.
    let mut end = e;
    loop {
        let part = &hay[s..end];
        let groups_ok = {
            let mut parts = part.split(|&b| b == b' ').peekable();
            let mut ok = true;
            while let Some(g) = parts.next() {
                let last = parts.peek().is_none();
                ok &= if last {
                    (1..=4).contains(&g.len())
                } else {
                    g.len() == 4
                };
            }
            ok
        };
        if groups_ok && !word_after(hay, end) && iban_ok(part) {
            return Some(end);
        }
        end = s + part.iter().rposition(|&b| b == b' ')?;
    }
}

/// ISO 13616: 15-34 characters whose mod-97 check (country and check digits moved to
/// the end, letters as 10-35) is 1.
fn iban_ok(c: &[u8]) -> bool {
    let chars = || c.iter().copied().filter(|&b| b != b' ');
    let len = chars().count();
    if !(15..=34).contains(&len) {
        return false;
    }
    let mut rem = 0u32;
    for b in chars().skip(4).chain(chars().take(4)) {
        rem = match b {
            b'0'..=b'9' => (rem * 10 + u32::from(b - b'0')) % 97,
            b'A'..=b'Z' => (rem * 100 + u32::from(b - b'A') + 10) % 97,
            _ => return false,
        };
    }
    rem == 1
}

/// Whether `[s, e)` (`AAA-GG-SSSS`) is a US SSN standing alone, outside the
/// never-issued ranges.
fn us_ssn(hay: &[u8], s: usize, e: usize) -> bool {
    let before = if s > 0 { hay[s - 1] } else { 0 };
    if word_before(hay, s) || matches!(before, b'-' | b'.') {
        return false;
    }
    if word_after(hay, e)
        || (matches!(byte(hay, e), b'-' | b'.') && byte(hay, e + 1).is_ascii_digit())
    {
        return false;
    }
    let num = |r: std::ops::Range<usize>| {
        hay[s + r.start..s + r.end]
            .iter()
            .fold(0u32, |n, b| n * 10 + u32::from(b - b'0'))
    };
    let (area, group, serial) = (num(0..3), num(4..6), num(7..11));
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

/// Whether `[s, e)` is an IPv4 address (not part of a longer dotted number) or an
/// IPv6 address.
fn ip(text: &str, s: usize, e: usize) -> bool {
    let hay = text.as_bytes();
    let before = if s > 0 { hay[s - 1] } else { 0 };
    if word_before(hay, s) || word_after(hay, e) {
        return false;
    }
    let cand = &text[s..e];
    if cand.contains(':') {
        if before == b':' || byte(hay, e) == b':' || byte(hay, e) == b'.' {
            return false;
        }
        // `a::b` or `1:2:3:4:5:6:7:8` parse, but nobody writes an address without a
        // group of 3+ digits or an IPv4 tail.
        let long_group = cand.split([':', '.']).any(|g| g.len() >= 3);
        return long_group && Ipv6Addr::from_str(cand).is_ok();
    }
    if before == b'.' || (byte(hay, e) == b'.' && byte(hay, e + 1).is_ascii_digit()) {
        return false;
    }
    cand.split('.').all(|o| {
        o.len() <= 3
            && (o.len() == 1 || !o.starts_with('0'))
            && o.parse::<u16>().is_ok_and(|v| v <= 255)
    })
}

/// Whether a random-looking token: has a digit, or both cases (an English phrase
/// with dashes has neither).
fn looks_random(t: &[u8]) -> bool {
    t.iter().any(u8::is_ascii_digit)
        || (t.iter().any(u8::is_ascii_uppercase) && t.iter().any(u8::is_ascii_lowercase))
}

/// Whether `[s, e)`, found by the secrets pattern, is a secret.
fn secret(hay: &[u8], s: usize, e: usize) -> bool {
    let c = &hay[s..e];
    if c.starts_with(b"-----BEGIN") {
        return true;
    }
    if word_before(hay, s) {
        return false;
    }
    if let Some(body) = c.strip_prefix(b"sk-") {
        if s > 0 && hay[s - 1] == b'-' {
            return false;
        }
        let body = body
            .strip_prefix(b"proj-")
            .or_else(|| body.strip_prefix(b"ant-"))
            .unwrap_or(body);
        return body.len() >= 20 && looks_random(body);
    }
    if c.starts_with(b"AKIA") || c.starts_with(b"ASIA") {
        return !word_after(hay, e);
    }
    if c.len() > 6 && c[..6].eq_ignore_ascii_case(b"bearer") {
        let token = c[6..].trim_ascii_start();
        return looks_random(token);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{ArrayValue, KeyValueList};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

    const KEY: [u8; 32] = [7; 32];

    fn redactor(yaml: &str) -> Redactor {
        let config: RedactionConfig = serde_saphyr::from_str(yaml).unwrap();
        Redactor::new(&config, Some(KEY)).unwrap().unwrap()
    }

    fn default_redactor() -> Redactor {
        Redactor::new(&RedactionConfig::default(), None)
            .unwrap()
            .unwrap()
    }

    /// The text after redaction, with the counts per rule name that changed.
    fn redact(r: &Redactor, text: &str) -> (String, Vec<(String, u64)>) {
        let mut counts = vec![0; r.rule_names().len()];
        let out = r.redact_text(text, &mut counts);
        let changed = r
            .rule_names()
            .iter()
            .zip(&counts)
            .filter(|(_, n)| **n > 0)
            .map(|(name, n)| (name.clone(), *n))
            .collect();
        (out.unwrap_or_else(|| text.to_owned()), changed)
    }

    fn masked(r: &Redactor, text: &str) -> String {
        redact(r, text).0
    }

    fn assert_untouched(r: &Redactor, texts: &[&str]) {
        for text in texts {
            let mut counts = vec![0; r.rule_names().len()];
            assert_eq!(
                r.redact_text(text, &mut counts),
                None,
                "{text:?} was redacted"
            );
            assert!(counts.iter().all(|&n| n == 0), "{text:?}");
        }
    }

    fn s(v: &str) -> Option<AnyValue> {
        Some(AnyValue {
            value: Some(Value::StringValue(v.into())),
        })
    }

    fn kv(key: &str, value: Option<AnyValue>) -> KeyValue {
        KeyValue {
            key: key.into(),
            value,
            ..Default::default()
        }
    }

    fn string_of(attrs: &[KeyValue], key: &str) -> Option<String> {
        attrs.iter().find(|kv| kv.key == key).map(|kv| {
            match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                other => panic!("{key}: {other:?}"),
            }
        })
    }

    #[test]
    fn email() {
        let r = default_redactor();
        assert_eq!(
            masked(&r, "write to jane.doe+news@mail.example.co.uk today"),
            "write to [EMAIL] today"
        );
        assert_eq!(
            masked(&r, "<bob@example.com>, x@y.io."),
            "<[EMAIL]>, [EMAIL]."
        );
        assert_untouched(
            &r,
            &[
                "user@localhost",
                "icon@2x.png",
                "@mention and foo@ bar",
                "a@b.c",
                "peer dependency @types/node@20.1.0",
            ],
        );
    }

    #[test]
    fn phone() {
        let r = default_redactor();
        for (text, want) in [
            ("call +14155552671 now", "call [PHONE] now"),
            ("call +1 (415) 555-2671.", "call [PHONE]."),
            ("+44 20 7946 0958", "[PHONE]"),
            (
                "+49-30-1234-5678 or +33 6 12 34 56 78",
                "[PHONE] or [PHONE]",
            ),
            ("tel: (415) 555-2671", "tel: [PHONE]"),
            ("415-555-2671, 415.555.2671", "[PHONE], [PHONE]"),
            (
                "Berlin 030 1234 5678, London 020 7946 0958",
                "Berlin [PHONE], London [PHONE]",
            ),
            ("mobile 06-12345678", "mobile [PHONE]"),
            (
                "on 2024-01-15 call 415-555-2671 2024",
                "on 2024-01-15 call [PHONE] 2024",
            ),
            ("(415-555-2671)", "([PHONE])"),
            ("toll-free 1-800-555-0199", "toll-free [PHONE]"),
            ("UK mobile 07700 900123", "UK mobile [PHONE]"),
        ] {
            assert_eq!(masked(&r, text), want, "{text}");
        }
        assert_untouched(
            &r,
            &[
                "order 12345678901 shipped",
                "ts 1718000000123",
                "on 2024-01-15 at 12:30:45",
                "01.02.2024 and 2024.01.15",
                "version 1.2.3 and v10.11.12.13",
                "15.5 16.25 3.14159",
                "ORD-2024-555-0100",
                "x415-555-2671",
                "items 1 2 3 4 5 6 7 8 9 10",
                "+1",
                "10 000 000 people",
                "ISBN 978-3-16-148410-0, ports 8000-8080",
                "at 52.520008, 13.404954",
                "1 800 555 01999",
                "id 12345678-1234-1234-1234-123456789012",
                // Inside a longer run of digit groups (an IBAN with a wrong check digit).
                "DE88 3704 0044 0532 0130 00",
            ],
        );
        assert_eq!(masked(&r, "123-45-6789"), "[SSN]");
    }

    #[test]
    fn card() {
        let r = default_redactor();
        for (text, want) in [
            ("card 4111111111111111 ok", "card [CARD] ok"),
            ("4111 1111 1111 1111", "[CARD]"),
            ("5555-5555-5555-4444", "[CARD]"),
            ("amex 3782 822463 10005.", "amex [CARD]."),
            (
                "ref 1234 4111 1111 1111 1111 exp 12/29",
                "ref 1234 [CARD] exp 12/29",
            ),
        ] {
            assert_eq!(masked(&r, text), want, "{text}");
        }
        assert_untouched(
            &r,
            &[
                // Luhn-invalid.
                "4111111111111112",
                "4111 1111 1111 1112",
                // Nanosecond timestamps, long ids, mixed separators.
                "1718000000000000000",
                "order 41111111111111111111111 done",
                "4111-1111 1111-1111",
                "0.4111111111111111",
            ],
        );
    }

    #[test]
    fn iban() {
        let r = default_redactor();
        for (text, want) in [
            ("IBAN DE89370400440532013000.", "IBAN [IBAN]."),
            (
                "pay to DE89 3704 0044 0532 0130 00 please",
                "pay to [IBAN] please",
            ),
            ("GB82 WEST 1234 5698 7654 32", "[IBAN]"),
            ("BE68 5390 0754 7034 THEN", "[IBAN] THEN"),
            // Its first 16 digits after the check digits pass the Luhn check.
            ("DE04 4514 0604 5246 1416 38", "[IBAN]"),
        ] {
            assert_eq!(masked(&r, text), want, "{text}");
        }
        assert_untouched(
            &r,
            &[
                // Wrong check digits.
                "DE88370400440532013000",
                "DE88 3704 0044 0532 0130 00",
                "GB82 WEST 1234 5698 7654 33",
                "XDE89370400440532013000",
                "AB12 CDEF",
            ],
        );
    }

    #[test]
    fn us_ssn() {
        let r = default_redactor();
        assert_eq!(masked(&r, "ssn 123-45-6789."), "ssn [SSN].");
        assert_eq!(masked(&r, "\"078-05-1120\""), "\"[SSN]\"");
        assert_untouched(
            &r,
            &[
                "000-12-3456",
                "666-12-3456",
                "912-12-3456",
                "123-00-4567",
                "123-45-0000",
                "1123-45-6789",
                "ORD-123-45-6789",
                "123-45-6789-1",
            ],
        );
    }

    #[test]
    fn ip_is_opt_in() {
        let off = default_redactor();
        assert_untouched(&off, &["from 192.168.1.10"]);
        let r = redactor("detectors: { ip: mask }");
        for (text, want) in [
            ("from 192.168.1.10.", "from [IP]."),
            ("10.0.0.1:8080", "[IP]:8080"),
            ("peer 2001:db8::8a2e:370:7334 up", "peer [IP] up"),
            ("fe80::1ff:fe23:4567:890a", "[IP]"),
            ("::ffff:192.0.2.128", "[IP]"),
        ] {
            assert_eq!(masked(&r, text), want, "{text}");
        }
        assert_untouched(
            &r,
            &[
                "version 1.2.3",
                "999.1.1.1",
                "1.2.3.4.5",
                "01.02.03.04",
                "at 12:30:45",
                "std::fmt::Debug and a::b",
                "00:1A:2B:3C:4D:5E",
                "1:2:3:4:5:6:7:8",
            ],
        );
    }

    #[test]
    fn secrets() {
        let r = default_redactor();
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7b\nq0x==\n-----END RSA PRIVATE KEY-----";
        for (text, want) in [
            ("key sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t ok", "key [SECRET] ok"),
            ("sk-ant-api03-x9Yz8Wv7Ut6Sr5Qp4On3Ml2Kj1", "[SECRET]"),
            (
                "OPENAI_API_KEY=sk-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c",
                "OPENAI_API_KEY=[SECRET]",
            ),
            ("aws AKIAIOSFODNN7EXAMPLE.", "aws [SECRET]."),
            ("ghp_1234567890abcdefghijABCDEFGHIJ123456", "[SECRET]"),
            (
                "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuv",
                "[SECRET]",
            ),
            (
                "Authorization: Bearer abcDEF123456ghiJKL789",
                "Authorization: [SECRET]",
            ),
            (
                "authorization: bearer 0a1b2c3d4e5f6a7b8c9d",
                "authorization: [SECRET]",
            ),
            (
                "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U end",
                "jwt [SECRET] end",
            ),
        ] {
            assert_eq!(masked(&r, text), want, "{text}");
        }
        assert_eq!(
            masked(&r, &format!("key:\n{pem}\nthanks")),
            "key:\n[SECRET]\nthanks"
        );
        assert_untouched(
            &r,
            &[
                "task-management-and-planning-tools",
                "sk-learn-compatible-estimator-api-docs",
                "sk-short123",
                "bearer tokens are described in the spec",
                "Bearer authentication_mechanism",
                "AKIAIOSFODNN7EXAMPLEXYZ",
                "ghp_short",
                "eyJhbGciOiJIUzI1NiJ9",
            ],
        );
    }

    #[test]
    fn custom_rule_wins_over_detectors() {
        let r = redactor(
            "rules:\n  - name: order\n    pattern: 'ORD-[0-9-]+'\n  - name: ticket\n    pattern: 'TCK[0-9]{6}'\n    replacement: '<ticket>'\n",
        );
        assert_eq!(
            redact(
                &r,
                "order ORD-2024-555-0100 for 415-555-2671, ticket TCK123456"
            ),
            (
                "order [ORDER] for [PHONE], ticket <ticket>".to_owned(),
                vec![
                    ("phone".to_owned(), 1),
                    ("order".to_owned(), 1),
                    ("ticket".to_owned(), 1)
                ]
            )
        );
        assert_eq!(
            r.rule_names(),
            [
                "email", "phone", "card", "iban", "us_ssn", "ip", "secrets", "order", "ticket"
            ]
        );
        // A custom rule over a phone number takes the whole match.
        let r = redactor("rules: [{ name: num, pattern: 'tel [0-9-]+' }]");
        assert_eq!(masked(&r, "tel 415-555-2671"), "[NUM]");
    }

    #[test]
    fn hash_is_keyed_and_joinable() {
        let yaml = "detectors: { email: hash }\nattributes: [{ key: enduser.id, action: hash }]";
        let config: RedactionConfig = serde_saphyr::from_str(yaml).unwrap();
        let a = Redactor::new(&config, Some(KEY)).unwrap().unwrap();
        let one = masked(&a, "from jane@example.com");
        assert!(one.starts_with("from [EMAIL:"), "{one}");
        assert_eq!(one.len(), "from [EMAIL:]".len() + 16);
        assert_eq!(masked(&a, "to jane@example.com"), one.replace("from", "to"));
        assert_ne!(masked(&a, "from john@example.com"), one);
        // Another project's key gives another token.
        let other = project_hash_key(b"master", &"team-b/chat".parse().unwrap());
        assert_ne!(
            other,
            project_hash_key(b"master", &"team-a/chat".parse().unwrap())
        );
        let b = Redactor::new(&config, Some(other)).unwrap().unwrap();
        assert_ne!(masked(&b, "from jane@example.com"), one);

        // Attribute hash and text hash of the same value share the hex.
        let mut attrs = vec![
            kv("enduser.id", s("jane@example.com")),
            kv("other", s("jane@example.com")),
        ];
        let mut counts = vec![0; a.rule_names().len()];
        assert_eq!(a.redact_attributes(&mut attrs, &mut counts), 2);
        let hex = &one["from [EMAIL:".len()..one.len() - 1];
        assert_eq!(
            string_of(&attrs, "enduser.id").unwrap(),
            format!("[HASH:{hex}]")
        );
        assert_eq!(
            string_of(&attrs, "other").unwrap(),
            format!("[EMAIL:{hex}]")
        );
    }

    #[test]
    fn attribute_rules() {
        let r = redactor(
            "attributes:\n  - { key: user.email, action: drop }\n  - { key: enduser.id, action: hash }\n  - { key: user.name }\n",
        );
        let mut attrs = vec![
            kv("user.email", s("jane@example.com")),
            kv("enduser.id", s("u-42")),
            kv("user.name", s("Jane")),
            kv(
                "nested",
                Some(AnyValue {
                    value: Some(Value::KvlistValue(KeyValueList {
                        values: vec![kv("user.email", s("x")), kv("keep", s("y"))],
                    })),
                }),
            ),
            kv(
                "count",
                Some(AnyValue {
                    value: Some(Value::IntValue(3)),
                }),
            ),
        ];
        let mut counts = vec![0; r.rule_names().len()];
        assert_eq!(r.redact_attributes(&mut attrs, &mut counts), 4);
        let keys: Vec<_> = attrs.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, ["enduser.id", "user.name", "nested", "count"]);
        let hashed = string_of(&attrs, "enduser.id").unwrap();
        assert!(
            hashed.starts_with("[HASH:") && hashed.len() == 23,
            "{hashed}"
        );
        assert_eq!(string_of(&attrs, "user.name").unwrap(), "[REDACTED]");
        let Some(Value::KvlistValue(nested)) = attrs[2].value.as_ref().unwrap().value.as_ref()
        else {
            panic!()
        };
        assert_eq!(nested.values.len(), 1);
        assert_eq!(nested.values[0].key, "keep");
        let named: Vec<_> = r
            .rule_names()
            .iter()
            .zip(&counts)
            .filter(|c| *c.1 > 0)
            .collect();
        assert_eq!(
            named,
            [
                (&"attribute:user.email".to_owned(), &2),
                (&"attribute:enduser.id".to_owned(), &1),
                (&"attribute:user.name".to_owned(), &1)
            ]
        );
        // Same input, same token.
        let mut again = vec![kv("enduser.id", s("u-42"))];
        r.redact_attributes(&mut again, &mut counts);
        assert_eq!(string_of(&again, "enduser.id").unwrap(), hashed);
    }

    #[test]
    fn drop_removes_the_attribute() {
        let r = redactor("detectors: { card: drop }");
        let array = AnyValue {
            value: Some(Value::ArrayValue(ArrayValue {
                values: vec![s("4111 1111 1111 1111").unwrap(), s("fine").unwrap()],
            })),
        };
        let mut attrs = vec![
            kv(
                "payment",
                s("paid with 4111 1111 1111 1111 and jane@example.com"),
            ),
            kv("cards", Some(array)),
            kv("note", s("mail jane@example.com")),
        ];
        let mut counts = vec![0; r.rule_names().len()];
        assert_eq!(r.redact_attributes(&mut attrs, &mut counts), 3);
        assert_eq!(attrs.len(), 2);
        assert_eq!(string_of(&attrs, "note").unwrap(), "mail [EMAIL]");
        let Some(Value::ArrayValue(a)) = attrs[0].value.as_ref().unwrap().value.as_ref() else {
            panic!()
        };
        assert_eq!(a.values[0], s("[CARD]").unwrap());
        assert_eq!(a.values[1], s("fine").unwrap());
        assert_eq!(counts[2], 2, "card");
        assert_eq!(counts[0], 1, "email");
        // Free text cannot be dropped: it is masked.
        assert_eq!(masked(&r, "card 4111111111111111"), "card [CARD]");
    }

    #[test]
    fn nested_values() {
        let r = default_redactor();
        let value = AnyValue {
            value: Some(Value::KvlistValue(KeyValueList {
                values: vec![
                    kv("a", s("mail bob@example.com")),
                    kv(
                        "b",
                        Some(AnyValue {
                            value: Some(Value::ArrayValue(ArrayValue {
                                values: vec![
                                    s("call 415-555-2671").unwrap(),
                                    AnyValue {
                                        value: Some(Value::IntValue(4111111111111111)),
                                    },
                                    AnyValue {
                                        value: Some(Value::KvlistValue(KeyValueList {
                                            values: vec![kv("c", s("ssn 123-45-6789"))],
                                        })),
                                    },
                                ],
                            })),
                        }),
                    ),
                ],
            })),
        };
        let mut attrs = vec![kv("payload", Some(value))];
        let mut counts = vec![0; r.rule_names().len()];
        assert_eq!(r.redact_attributes(&mut attrs, &mut counts), 3);
        let json = serde_json::to_string(&attrs[0].value).unwrap();
        assert!(json.contains("mail [EMAIL]"), "{json}");
        assert!(json.contains("call [PHONE]"), "{json}");
        assert!(json.contains("ssn [SSN]"), "{json}");
        assert!(
            json.contains("4111111111111111"),
            "ints are left alone: {json}"
        );
    }

    #[test]
    fn json_text_stays_valid() {
        let r = redactor("detectors: { ip: mask, phone: hash }");
        let messages = serde_json::json!([
            {"role": "system", "content": "Contact:\nbob@example.com\n415-555-2671\tcard 4111 1111 1111 1111"},
            {"role": "user", "content": "my key is \"sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t\" and é\u{e9}jane@example.com, ip \"10.1.2.3\""},
            {"role": "user", "content": "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----"},
        ]);
        for text in [
            serde_json::to_string(&messages).unwrap(),
            serde_json::to_string_pretty(&messages).unwrap(),
            // ASCII-only JSON, with \u escapes right before values.
            serde_json::to_string(&messages)
                .unwrap()
                .replace('é', "\\u00e9"),
        ] {
            let (out, counts) = redact(&r, &text);
            let parsed: serde_json::Value =
                serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
            let contents: Vec<&str> = parsed
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["content"].as_str().unwrap())
                .collect();
            assert_eq!(contents[0].lines().nth(1), Some("[EMAIL]"), "{out}");
            assert!(contents[0].contains("\n[PHONE:"), "{out}");
            assert!(contents[0].ends_with("card [CARD]"), "{out}");
            assert!(contents[1].contains("\"[SECRET]\""), "{out}");
            assert!(contents[1].contains("[EMAIL], ip \"[IP]\""), "{out}");
            assert_eq!(contents[2], "[SECRET]");
            assert_eq!(counts.iter().map(|c| c.1).sum::<u64>(), 7, "{counts:?}");
        }
    }

    #[test]
    fn escapes_are_never_split() {
        assert_eq!(outside_escapes(br"\nbob", 1, 5), (2, 5));
        assert_eq!(outside_escapes(br"\u00e9bob", 1, 9), (6, 9));
        assert_eq!(outside_escapes(br"ab\", 0, 3), (0, 2));
        assert_eq!(outside_escapes(br"ab\u00", 0, 6), (0, 2));
        assert_eq!(outside_escapes(br"ab\\", 0, 4), (0, 4));
        assert_eq!(outside_escapes(br"\\x", 2, 3), (2, 3));
        assert_eq!(outside_escapes("\\é".as_bytes(), 1, 3), (1, 3));
        let r = redactor("rules: [{ name: acc, pattern: 'é+' }]");
        assert_eq!(masked(&r, "\\éé"), "\\[ACC]");
        // A custom pattern that stops at quotes may still end inside an escape.
        let r = redactor("rules: [{ name: word, pattern: 'secret[^ \"]*' }]");
        let json = r#"{"a":"secret\"","b":"secret\u00e9"}"#;
        let out = masked(&r, json);
        serde_json::from_str::<serde_json::Value>(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    }

    #[test]
    fn disabled_and_keys() {
        let off: RedactionConfig = serde_saphyr::from_str("enabled: false").unwrap();
        assert!(Redactor::new(&off, None).unwrap().is_none());

        for (yaml, field) in [
            (
                "rules: [{ name: a, pattern: x, action: hash }]",
                "redaction.rules[0].action",
            ),
            ("detectors: { phone: hash }", "redaction.detectors.phone"),
            (
                "attributes: [{ key: k, action: mask }, { key: j, action: hash }]",
                "redaction.attributes[1].action",
            ),
        ] {
            let config: RedactionConfig = serde_saphyr::from_str(yaml).unwrap();
            let err = Redactor::new(&config, None).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
            assert!(err.contains("LOUPE_REDACTION_KEY"), "{err}");
            // Validation does not need the key.
            config.validate("redaction").unwrap();
            assert!(Redactor::new(&config, Some(KEY)).unwrap().is_some());
        }
    }

    #[test]
    fn invalid_configs_name_the_field() {
        for (yaml, field, reason) in [
            (
                "rules: [{ name: '', pattern: x }]",
                "r.rules[0].name",
                "empty",
            ),
            (
                "rules: [{ name: a, pattern: x }, { name: a, pattern: y }]",
                "r.rules[1].name",
                "twice",
            ),
            (
                "rules: [{ name: 'a b', pattern: x }]",
                "r.rules[0].name",
                "letters",
            ),
            (
                "rules: [{ name: email, pattern: x }]",
                "r.rules[0].name",
                "built-in",
            ),
            (
                "rules: [{ name: a, pattern: '(' }]",
                "r.rules[0].pattern",
                "unclosed",
            ),
            (
                "rules: [{ name: a, pattern: 'x*' }]",
                "r.rules[0].pattern",
                "empty text",
            ),
            (
                "rules: [{ name: a, pattern: '(?:\\w{100}){100}' }]",
                "r.rules[0].pattern",
                "size limit",
            ),
            (
                "rules: [{ name: a, pattern: x, replacement: '\"x' }]",
                "r.rules[0].replacement",
                "without",
            ),
            ("attributes: [{ key: '' }]", "r.attributes[0].key", "empty"),
            (
                "attributes: [{ key: a }, { key: a, action: drop }]",
                "r.attributes[1].key",
                "twice",
            ),
        ] {
            let config: RedactionConfig = serde_saphyr::from_str(yaml).unwrap();
            let err = config.validate("r").unwrap_err().to_string();
            assert!(err.contains(field) && err.contains(reason), "{yaml}: {err}");
        }
        let long = format!("rules: [{{ name: a, pattern: '{}' }}]", "x".repeat(4097));
        let config: RedactionConfig = serde_saphyr::from_str(&long).unwrap();
        let err = config.validate("r").unwrap_err().to_string();
        assert!(
            err.contains("r.rules[0].pattern") && err.contains("4096"),
            "{err}"
        );
        assert!(serde_saphyr::from_str::<RedactionConfig>("detectors: { mail: mask }").is_err());
        assert!(serde_saphyr::from_str::<RedactionConfig>("rule: []").is_err());
    }

    #[test]
    fn clean_text_is_untouched() {
        let r = default_redactor();
        assert_untouched(
            &r,
            &[
                "",
                "ok",
                "the retrieval step returned five passages about the refund policy",
                "Zürich, 東京 and Ελλάδα: non-ASCII text costs nothing more",
                "gpt-4o-mini-2024-07-18",
            ],
        );
    }

    #[test]
    fn redact_request_covers_every_text() {
        let r =
            redactor("detectors: { ip: mask }\nattributes: [{ key: user.email, action: drop }]");
        let span = Span {
            name: "lookup bob@example.com".into(),
            status: Some(Status {
                message: "card 4111111111111111 declined".into(),
                code: 2,
            }),
            attributes: vec![
                kv("input.value", s("my phone is +44 20 7946 0958")),
                kv("user.email", s("bob@example.com")),
                kv("llm.model_name", s("gpt-4o")),
            ],
            events: vec![Event {
                name: "retry from 10.0.0.7".into(),
                attributes: vec![kv(
                    "exception.message",
                    s("bad token Bearer abcDEF123456ghiJKL789"),
                )],
                ..Default::default()
            }],
            links: vec![Link {
                attributes: vec![kv("peer", s("ssn 123-45-6789"))],
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        kv("host.owner", s("ops@example.com")),
                        kv("service.name", s("chat")),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![span],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let mut counts = vec![0; r.rule_names().len()];
        let total = r.redact_request(&mut req, &mut counts);
        let by_name: BTreeMap<_, _> = r
            .rule_names()
            .iter()
            .map(String::as_str)
            .zip(counts.iter().copied())
            .collect();
        assert_eq!(
            by_name,
            BTreeMap::from([
                ("email", 2),
                ("phone", 1),
                ("card", 1),
                ("iban", 0),
                ("us_ssn", 1),
                ("ip", 1),
                ("secrets", 1),
                ("attribute:user.email", 1),
            ])
        );
        assert_eq!(total, 8);
        let rs = &req.resource_spans[0];
        let res = &rs.resource.as_ref().unwrap().attributes;
        assert_eq!(string_of(res, "host.owner").unwrap(), "[EMAIL]");
        assert_eq!(string_of(res, "service.name").unwrap(), "chat");
        let span = &rs.scope_spans[0].spans[0];
        assert_eq!(span.name, "lookup [EMAIL]");
        assert_eq!(
            span.status.as_ref().unwrap().message,
            "card [CARD] declined"
        );
        assert_eq!(
            string_of(&span.attributes, "input.value").unwrap(),
            "my phone is [PHONE]"
        );
        assert_eq!(string_of(&span.attributes, "user.email"), None);
        assert_eq!(
            string_of(&span.attributes, "llm.model_name").unwrap(),
            "gpt-4o"
        );
        assert_eq!(span.events[0].name, "retry from [IP]");
        assert_eq!(
            string_of(&span.events[0].attributes, "exception.message").unwrap(),
            "bad token [SECRET]"
        );
        assert_eq!(
            string_of(&span.links[0].attributes, "peer").unwrap(),
            "ssn [SSN]"
        );
    }

    #[test]
    fn redactor_is_shareable() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Redactor>();
    }
}
