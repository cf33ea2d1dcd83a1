//! Model pricing: turns a span's model and token counts into a cost in US dollars.
//!
//! A [`PriceBook`] holds pricing entries in layers: a project's own overrides first,
//! then the built-in table (`core/pricing/models.yaml`, embedded at build time). Each
//! [`PriceEntry`] has a regex (`match`) searched in the lower-cased model id, prices
//! in USD per 1M tokens and the date from which the price applies.
//!
//! # Which entry prices a span
//!
//! The model is the span's `response_model`, else its `request_model`, lower-cased.
//! The date is the UTC calendar day of the span's `start_ns` (today for a span without
//! a start time). Any matching override entry beats every built-in entry. Within a
//! layer, among the matching entries whose `valid_from` is on or before that date, the
//! newest `valid_from` wins, ties going to the entry that comes first in the file. An
//! entry not yet valid on the date is skipped (an older one may apply). With no valid
//! entry the span stays unpriced: a price is never guessed.
//!
//! # Token arithmetic (Loupe convention)
//!
//! Loupe follows OpenAI's usage semantics: `input_tokens` *includes*
//! `cache_read_tokens`, and `output_tokens` *includes* `reasoning_tokens`. So
//!
//! ```text
//! cost_input  = (input − cached) × input_rate + cached × (cached_input rate, else input rate)
//! cost_output = (output − reasoning) × output_rate + reasoning × (reasoning rate, else output rate)
//! cost_total  = cost_input + cost_output                 (rates are per 1M tokens)
//! ```
//!
//! and no token is counted twice. When `cache_read_tokens > input_tokens`, the client
//! evidently reported input exclusive of the cache (Anthropic style): all
//! `input_tokens` are then uncached and the cached tokens are added on top. The same
//! holds for `reasoning_tokens > output_tokens` (Gemini reports thinking tokens apart
//! from candidate tokens). A missing input or output count is 0 when the other is
//! known; negative counts are 0. Cache *writes* (Anthropic's 1.25× surcharge), batch
//! discounts and long-context tiers are not modelled; projects that need them override
//! the entry.
//!
//! A span that already carries a cost (`cost_total_usd`, `cost_input_usd` or
//! `cost_output_usd`) keeps it: see [`PriceOutcome::ClientCost`].
//!
//! # Performance
//!
//! [`PriceBook::apply`] runs once per ingested span. Each layer's regexes are compiled
//! into one [`RegexSet`], and the candidate entries of a model id (already sorted for
//! the date rule) are cached in a bounded map, so a repeated model id costs one hash
//! lookup under a read lock.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, LazyLock, PoisonError, RwLock};

use chrono::NaiveDate;
use regex::{RegexBuilder, RegexSet, RegexSetBuilder};

use crate::{Error, SpanRecord};

/// The built-in pricing table.
const BUILTIN_YAML: &str = include_str!("../pricing/models.yaml");

/// The cache of model id → candidates is cleared when it grows past this many ids, so a
/// client sending random model names cannot grow memory without bound.
const CACHE_MAX_IDS: usize = 10_000;

/// Model ids longer than this are priced without being cached.
const CACHE_MAX_ID_LEN: usize = 256;

/// Regex size limit for one entry (and for a layer's set), in bytes of compiled program.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// One row of a pricing table. Prices are USD per 1 million tokens.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PriceEntry {
    /// Unique within its table; written to a priced span's `cost_source`.
    pub id: String,
    /// Regex searched (unanchored unless it says `^`/`$`) in the lower-cased model id;
    /// compiled case-insensitively, so an upper-case override still matches.
    #[serde(rename = "match")]
    pub pattern: String,
    pub provider: Option<String>,
    /// USD per 1M uncached input tokens.
    pub input: f64,
    /// USD per 1M output tokens.
    pub output: f64,
    /// USD per 1M input tokens read from the prompt cache; `None`: the input rate.
    pub cached_input: Option<f64>,
    /// USD per 1M reasoning tokens; `None`: the output rate.
    pub reasoning: Option<f64>,
    /// First day (UTC) on which this price applies.
    pub valid_from: NaiveDate,
    pub note: Option<String>,
}

/// What pricing did to a span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PriceOutcome {
    /// The span carried a cost: kept as-is.
    ClientCost,
    /// The cost was computed from a pricing entry.
    Computed,
    /// Tokens and a model but no matching entry: cost left `None`.
    Unpriced,
    /// No tokens or no model: nothing to price.
    NoUsage,
}

/// A matching entry of a model id, ordered for the date rule.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    layer: u32,
    index: u32,
    valid_from: NaiveDate,
}

/// One table (overrides or built-in) with its compiled regexes.
struct Layer {
    entries: Vec<PriceEntry>,
    set: RegexSet,
}

impl Layer {
    fn new(entries: Vec<PriceEntry>) -> Result<Layer, Error> {
        let set = validate(&entries)?;
        Ok(Layer { entries, set })
    }
}

/// A pricing table: a project's overrides (if any) over the built-in entries.
///
/// Cheap to share (`Arc`) and safe to use from many threads.
pub struct PriceBook {
    /// In precedence order: overrides first, built-in last.
    layers: Vec<Arc<Layer>>,
    /// Lower-cased model id → its matching entries, sorted by precedence.
    cache: RwLock<HashMap<Box<str>, Arc<[Candidate]>>>,
}

static BUILTIN: LazyLock<Arc<PriceBook>> = LazyLock::new(|| {
    let entries = PriceBook::parse_entries(BUILTIN_YAML)
        .unwrap_or_else(|e| panic!("built-in pricing table core/pricing/models.yaml: {e}"));
    let layer = Layer::new(entries)
        .unwrap_or_else(|e| panic!("built-in pricing table core/pricing/models.yaml: {e}"));
    Arc::new(PriceBook::from_layers(vec![Arc::new(layer)]))
});

impl PriceBook {
    /// The built-in table (`core/pricing/models.yaml`), parsed once.
    pub fn builtin() -> Arc<PriceBook> {
        BUILTIN.clone()
    }

    /// Parses a YAML list of entries (the built-in file, or a project's overrides) and
    /// validates them (see [`PriceBook::with_overrides`]). Errors name the entry id (or
    /// its position when it has none) and the field. An empty document is an empty list.
    pub fn parse_entries(yaml: &str) -> Result<Vec<PriceEntry>, Error> {
        match serde_saphyr::from_str::<Option<Vec<PriceEntry>>>(yaml) {
            Ok(entries) => {
                let entries = entries.unwrap_or_default();
                validate(&entries)?;
                Ok(entries)
            }
            // The typed parse says where, not which entry and field: find those.
            Err(err) => Err(diagnose(yaml).unwrap_or_else(|| {
                invalid(
                    "(document)",
                    format!("expected a yaml list of pricing entries: {err}"),
                )
            })),
        }
    }

    /// A book whose `overrides` (a project's own entries) beat the built-in ones.
    ///
    /// Validates the overrides: every `match` compiles, rates are finite and >= 0, ids
    /// are non-empty and unique among the overrides (an override may reuse a built-in
    /// id).
    pub fn with_overrides(overrides: Vec<PriceEntry>) -> Result<PriceBook, Error> {
        let builtin = PriceBook::builtin();
        let mut layers = Vec::with_capacity(1 + builtin.layers.len());
        if !overrides.is_empty() {
            layers.push(Arc::new(Layer::new(overrides)?));
        }
        layers.extend(builtin.layers.iter().cloned());
        Ok(PriceBook::from_layers(layers))
    }

    fn from_layers(layers: Vec<Arc<Layer>>) -> PriceBook {
        PriceBook {
            layers,
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// All entries, overrides first, each layer in file order.
    pub fn entries(&self) -> impl Iterator<Item = &PriceEntry> {
        self.layers.iter().flat_map(|l| l.entries.iter())
    }

    /// The entry that prices `model` on `date`, if any (`model` in any case).
    pub fn lookup(&self, model: &str, date: NaiveDate) -> Option<&PriceEntry> {
        let model = model.trim();
        if model.is_empty() {
            return None;
        }
        let lowered;
        let model = if model.chars().any(char::is_uppercase) {
            lowered = model.to_lowercase();
            lowered.as_str()
        } else {
            model
        };
        let candidates = self.candidates(model);
        candidates
            .iter()
            .find(|c| c.valid_from <= date)
            .map(|c| &self.layers[c.layer as usize].entries[c.index as usize])
    }

    /// Prices a span in place: sets `cost_input_usd`, `cost_output_usd`,
    /// `cost_total_usd` and `cost_source = Some(entry id)` when computed.
    pub fn apply(&self, span: &mut SpanRecord) -> PriceOutcome {
        if span.cost_total_usd.is_some()
            || span.cost_input_usd.is_some()
            || span.cost_output_usd.is_some()
        {
            if span.cost_total_usd.is_none() {
                span.cost_total_usd =
                    Some(span.cost_input_usd.unwrap_or(0.0) + span.cost_output_usd.unwrap_or(0.0));
            }
            if span.cost_source.is_none() {
                span.cost_source = Some("client".to_string());
            }
            return PriceOutcome::ClientCost;
        }
        let model = [&span.response_model, &span.request_model]
            .into_iter()
            .flatten()
            .map(|m| m.trim())
            .find(|m| !m.is_empty());
        let Some(model) = model else {
            return PriceOutcome::NoUsage;
        };
        if span.input_tokens.is_none() && span.output_tokens.is_none() {
            return PriceOutcome::NoUsage;
        }
        let Some(entry) = self.lookup(model, span_date(span.start_ns)) else {
            return PriceOutcome::Unpriced;
        };
        let (input, output) = cost(entry, span);
        span.cost_input_usd = Some(input);
        span.cost_output_usd = Some(output);
        span.cost_total_usd = Some(input + output);
        span.cost_source = Some(entry.id.clone());
        PriceOutcome::Computed
    }

    /// The matching entries of a lower-cased model id, in precedence order.
    fn candidates(&self, model: &str) -> Arc<[Candidate]> {
        let cached = self
            .cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(model)
            .cloned();
        if let Some(c) = cached {
            return c;
        }
        let found = self.match_all(model);
        if model.len() <= CACHE_MAX_ID_LEN {
            let mut cache = self.cache.write().unwrap_or_else(PoisonError::into_inner);
            if cache.len() >= CACHE_MAX_IDS {
                cache.clear();
            }
            cache.insert(model.into(), found.clone());
        }
        found
    }

    fn match_all(&self, model: &str) -> Arc<[Candidate]> {
        let mut found = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let start = found.len();
            found.extend(layer.set.matches(model).iter().map(|i| Candidate {
                layer: l as u32,
                index: i as u32,
                valid_from: layer.entries[i].valid_from,
            }));
            // Newest first; the stable sort keeps file order among equal dates.
            found[start..].sort_by_key(|c| Reverse(c.valid_from));
        }
        found.into()
    }
}

impl fmt::Debug for PriceBook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PriceBook")
            .field(
                "layers",
                &self
                    .layers
                    .iter()
                    .map(|l| l.entries.len())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// The UTC day of a span start; today for a span without a start time.
fn span_date(start_ns: u64) -> NaiveDate {
    if start_ns == 0 {
        return chrono::Utc::now().date_naive();
    }
    let secs = i64::try_from(start_ns / 1_000_000_000).unwrap_or(i64::MAX);
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.date_naive())
        .unwrap_or(NaiveDate::MAX)
}

/// (input cost, output cost) of a span under an entry, following the module's token
/// convention.
fn cost(entry: &PriceEntry, span: &SpanRecord) -> (f64, f64) {
    let count = |v: Option<i64>| v.unwrap_or(0).max(0);
    let part = |total: i64, special: i64, rate: f64, special_rate: Option<f64>| {
        // `special` (cached / reasoning) is part of `total`, unless it exceeds it: then
        // the client reported `total` exclusive of it.
        let plain = if special > total {
            total
        } else {
            total - special
        };
        (plain as f64 * rate + special as f64 * special_rate.unwrap_or(rate)) / 1_000_000.0
    };
    let input = part(
        count(span.input_tokens),
        count(span.cache_read_tokens),
        entry.input,
        entry.cached_input,
    );
    let output = part(
        count(span.output_tokens),
        count(span.reasoning_tokens),
        entry.output,
        entry.reasoning,
    );
    (input, output)
}

fn invalid(id: &str, reason: impl Into<String>) -> Error {
    Error::InvalidPricing {
        id: id.to_string(),
        reason: reason.into(),
    }
}

const FIELDS: [&str; 9] = [
    "id",
    "match",
    "provider",
    "input",
    "output",
    "cached_input",
    "reasoning",
    "valid_from",
    "note",
];

/// Finds the entry and field that made the typed parse of `yaml` fail, re-reading it
/// without types. `None` when the document itself is not valid yaml (or the problem is
/// not found), in which case the typed parser's error is reported.
fn diagnose(yaml: &str) -> Option<Error> {
    let doc: Option<Vec<serde_json::Value>> = serde_saphyr::from_str(yaml).ok()?;
    doc.unwrap_or_default()
        .into_iter()
        .enumerate()
        .find_map(|(i, v)| diagnose_entry(i, v).err())
}

/// Checks one untyped entry field by field, so that an error names the field.
///
/// Untyped yaml reads `y`, `no`, `on` or `1.10` as booleans and numbers, while the
/// typed parse reads them as text where a string is expected: string fields therefore
/// accept any scalar here.
fn diagnose_entry(position: usize, value: serde_json::Value) -> Result<(), Error> {
    use serde_json::Value;
    let unnamed = format!("#{}", position + 1);
    let mut map = match value {
        Value::Object(map) => map,
        other => {
            return Err(invalid(
                &unnamed,
                format!("expected a mapping of fields, got {}", json_kind(&other)),
            ));
        }
    };
    fn text(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
    let id = match map.remove("id") {
        Some(Value::Null) | None => return Err(invalid(&unnamed, "id: missing field")),
        Some(v) => text(&v).ok_or_else(|| {
            invalid(
                &unnamed,
                format!("id: expected a string, got {}", json_kind(&v)),
            )
        })?,
    };
    if let Some(unknown) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(invalid(
            &id,
            format!(
                "unknown field {unknown:?}, expected one of {}",
                FIELDS.join(", ")
            ),
        ));
    }
    let rate = "a number (usd per 1m tokens)";
    let checks: [(&str, bool, &str); 8] = [
        ("match", true, "a regex string"),
        ("provider", false, "a string"),
        ("input", true, rate),
        ("output", true, rate),
        ("cached_input", false, rate),
        ("reasoning", false, rate),
        ("valid_from", true, "a date (yyyy-mm-dd)"),
        ("note", false, "a string"),
    ];
    for (name, required, expected) in checks {
        let ok = match map.get(name) {
            None | Some(Value::Null) if required => {
                return Err(invalid(&id, format!("{name}: missing field")));
            }
            None | Some(Value::Null) => true,
            Some(v) => match name {
                "input" | "output" | "cached_input" | "reasoning" => v.is_number(),
                "valid_from" => v
                    .as_str()
                    .is_some_and(|s| s.trim().parse::<NaiveDate>().is_ok()),
                _ => text(v).is_some(),
            },
        };
        if !ok {
            let got = map.get(name).map_or_else(String::new, json_kind);
            return Err(invalid(
                &id,
                format!("{name}: expected {expected}, got {got}"),
            ));
        }
    }
    Ok(())
}

fn json_kind(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "null".to_string(),
        serde_json::Value::Bool(b) => format!("boolean {b}"),
        serde_json::Value::Number(n) => format!("number {n}"),
        serde_json::Value::String(s) => format!("string {s:?}"),
        serde_json::Value::Array(_) => "a list".to_string(),
        serde_json::Value::Object(_) => "a mapping".to_string(),
    }
}

/// Checks a layer's entries and compiles their regexes into one set.
fn validate(entries: &[PriceEntry]) -> Result<RegexSet, Error> {
    let mut ids = HashSet::with_capacity(entries.len());
    for e in entries {
        let id = e.id.as_str();
        if id.trim().is_empty() {
            return Err(invalid(id, "id: must not be empty"));
        }
        if !ids.insert(id) {
            return Err(invalid(id, "id: duplicate id in the same pricing table"));
        }
        if e.pattern.trim().is_empty() {
            return Err(invalid(
                id,
                "match: must not be empty (it would match every model)",
            ));
        }
        RegexBuilder::new(&e.pattern)
            .case_insensitive(true)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|err| {
                invalid(
                    id,
                    format!(
                        "match: invalid regex {:?}: {}",
                        e.pattern,
                        regex_reason(&err)
                    ),
                )
            })?;
        let rates = [
            ("input", Some(e.input)),
            ("output", Some(e.output)),
            ("cached_input", e.cached_input),
            ("reasoning", e.reasoning),
        ];
        for (name, rate) in rates {
            if let Some(r) = rate
                && !(r.is_finite() && r >= 0.0)
            {
                return Err(invalid(
                    id,
                    format!("{name}: must be a finite number >= 0, got {r}"),
                ));
            }
        }
    }
    RegexSetBuilder::new(entries.iter().map(|e| &e.pattern))
        .case_insensitive(true)
        .size_limit(REGEX_SIZE_LIMIT.saturating_mul(entries.len().max(1)))
        .build()
        .map_err(|err| {
            invalid(
                "(table)",
                format!("match: regexes too large together: {}", regex_reason(&err)),
            )
        })
}

/// The one-line cause of a regex error (its display spans several lines).
fn regex_reason(err: &regex::Error) -> String {
    match err {
        regex::Error::Syntax(s) => s
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("error: "))
            .unwrap_or_else(|| s.lines().last().unwrap_or("syntax error"))
            .trim()
            .to_string(),
        regex::Error::CompiledTooBig(limit) => {
            format!("compiled regex exceeds the size limit of {limit} bytes")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    /// start_ns at noon UTC of a day.
    fn ns(day: &str) -> u64 {
        let t = date(day).and_hms_opt(12, 0, 0).unwrap().and_utc();
        u64::try_from(t.timestamp_nanos_opt().unwrap()).unwrap()
    }

    fn span(model: &str, day: &str, input: Option<i64>, output: Option<i64>) -> SpanRecord {
        SpanRecord {
            request_model: Some(model.to_string()),
            start_ns: ns(day),
            input_tokens: input,
            output_tokens: output,
            ..Default::default()
        }
    }

    fn entry(id: &str, pattern: &str, input: f64, output: f64, from: &str) -> PriceEntry {
        PriceEntry {
            id: id.to_string(),
            pattern: pattern.to_string(),
            provider: None,
            input,
            output,
            cached_input: None,
            reasoning: None,
            valid_from: date(from),
            note: None,
        }
    }

    fn close(a: Option<f64>, b: f64) {
        let a = a.expect("a cost");
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    const NOW: &str = "2026-11-01";

    /// Realistic model ids and the built-in entry each must resolve to on [`NOW`].
    const EXAMPLES: &[(&str, &str)] = &[
        // OpenAI
        ("gpt-5", "gpt-5"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("openai/gpt-5", "gpt-5"),
        ("gpt-5-chat-latest", "gpt-5"),
        ("gpt-5-mini", "gpt-5-mini"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("gpt-5-nano-2025-08-07", "gpt-5-nano"),
        ("gpt-5-pro", "gpt-5-pro"),
        ("gpt-5.1-2025-11-13", "gpt-5.1"),
        ("gpt-5.2", "gpt-5.2"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("gpt-4.1-mini", "gpt-4.1-mini"),
        ("azure/gpt-4.1-nano", "gpt-4.1-nano"),
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("openai/gpt-4o", "gpt-4o"),
        ("GPT-4o-2024-11-20", "gpt-4o"),
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-35-turbo", "gpt-3.5-turbo"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("o1-2024-12-17", "o1"),
        ("o1-preview", "o1"),
        ("o1-pro", "o1-pro"),
        ("o3", "o3@2025-06-10"),
        ("o3-2025-04-16", "o3@2025-06-10"),
        ("o3-pro", "o3-pro"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("o4-mini-2025-04-16", "o4-mini"),
        ("text-embedding-3-small", "text-embedding-3-small"),
        ("text-embedding-3-large", "text-embedding-3-large"),
        ("text-embedding-ada-002", "text-embedding-ada-002"),
        // Anthropic
        ("claude-opus-4-6", "claude-opus-4-6"),
        ("claude-opus-4-5-20251101", "claude-opus-4-5"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("anthropic/claude-opus-4.1", "claude-opus-4-1"),
        ("claude-opus-4-20250514", "claude-opus-4"),
        ("claude-sonnet-4-6", "claude-sonnet-4-6"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        (
            "global.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "claude-sonnet-4-5",
        ),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-sonnet-4-0", "claude-sonnet-4"),
        ("claude-sonnet-4@20250514", "claude-sonnet-4"),
        ("claude-3-7-sonnet-20250219", "claude-3-7-sonnet"),
        ("anthropic/claude-3.7-sonnet:thinking", "claude-3-7-sonnet"),
        ("claude-3-5-sonnet-v2@20241022", "claude-3-5-sonnet"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        (
            "anthropic.claude-3-5-haiku-20241022-v1:0",
            "claude-3-5-haiku",
        ),
        (
            "us.anthropic.claude-3-5-haiku-20241022-v1:0",
            "claude-3-5-haiku",
        ),
        ("anthropic/claude-3.5-haiku", "claude-3-5-haiku"),
        ("claude-3-haiku-20240307", "claude-3-haiku"),
        ("claude-3-opus-20240229", "claude-3-opus"),
        // Google
        ("gemini-3-pro-preview", "gemini-3-pro"),
        ("gemini-3-flash-preview", "gemini-3-flash"),
        ("gemini-2.5-pro", "gemini-2.5-pro"),
        ("models/gemini-2.5-pro-preview-06-05", "gemini-2.5-pro"),
        ("gemini-2.5-flash", "gemini-2.5-flash@2025-06-17"),
        ("models/gemini-2.5-flash", "gemini-2.5-flash@2025-06-17"),
        (
            "projects/p/locations/us-central1/publishers/google/models/gemini-2.5-flash",
            "gemini-2.5-flash@2025-06-17",
        ),
        (
            "gemini-2.5-flash-preview-09-2025",
            "gemini-2.5-flash@2025-06-17",
        ),
        ("gemini-2.5-flash-lite", "gemini-2.5-flash-lite"),
        ("models/gemini-2.5-flash-lite", "gemini-2.5-flash-lite"),
        (
            "gemini-2.5-flash-lite-preview-06-17",
            "gemini-2.5-flash-lite",
        ),
        ("gemini-2.0-flash-001", "gemini-2.0-flash"),
        ("vertex_ai/gemini-2.0-flash", "gemini-2.0-flash"),
        ("gemini-2.0-flash-lite-001", "gemini-2.0-flash-lite"),
        ("gemini-embedding-001", "gemini-embedding-001"),
        ("models/text-embedding-004", "text-embedding-004"),
        // Mistral
        ("mistral-large-latest", "mistral-large"),
        ("mistral-large-2411", "mistral-large"),
        ("mistral.mistral-large-2407-v1:0", "mistral-large"),
        ("mistral-medium-2505", "mistral-medium"),
        ("mistral-small-latest", "mistral-small"),
        ("mistralai/mistral-small-2503", "mistral-small"),
        ("codestral-2501", "codestral"),
        ("codestral-latest", "codestral"),
        ("mistral-embed", "mistral-embed"),
        // Cohere
        ("command-a-03-2025", "command-a"),
        ("command-r-plus-08-2024", "command-r-plus@2024-08-30"),
        ("cohere.command-r-plus-v1:0", "command-r-plus@2024-08-30"),
        ("cohere-command-r-plus-08-2024", "command-r-plus@2024-08-30"),
        ("command-r-08-2024", "command-r@2024-08-30"),
        ("embed-english-v3.0", "embed-v3"),
        ("cohere.embed-multilingual-v3", "embed-v3"),
        ("embed-v4.0", "embed-v4"),
        // Meta Llama
        (
            "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo",
            "llama-3.1-8b",
        ),
        ("llama-3.1-8b-instant", "llama-3.1-8b"),
        ("meta.llama3-1-8b-instruct-v1:0", "llama-3.1-8b"),
        ("llama-3.3-70b-versatile", "llama-3.3-70b"),
        (
            "accounts/fireworks/models/llama-v3p3-70b-instruct",
            "llama-3.3-70b",
        ),
        ("meta-llama/Llama-4-Scout-17B-16E-Instruct", "llama-4-scout"),
        ("meta.llama4-maverick-17b-instruct-v1:0", "llama-4-maverick"),
        ("meta-llama/llama-4-maverick", "llama-4-maverick"),
        // DeepSeek
        ("deepseek-chat", "deepseek-chat@2025-09-29"),
        ("deepseek/deepseek-chat", "deepseek-chat@2025-09-29"),
        ("deepseek-reasoner", "deepseek-reasoner@2025-09-29"),
    ];

    /// Realistic ids that are *different* models (other prices) and must stay unpriced.
    const NOT_PRICED: &[&str] = &[
        "chatgpt-4o-latest",
        "ft:gpt-4o-mini-2024-07-18:acme::abc123",
        "gpt-4o-audio-preview",
        "gpt-4o-realtime-preview-2024-12-17",
        "gpt-5.1-codex-mini",
        "o1-mini",
        "claude-2.1",
        "gemini-2.0-flash-exp",
        "gemini-2.5-flash-image",
        "gemini-2.5-flash-preview-tts",
        "codestral-embed",
        "command-r7b-12-2024",
        "llama3.1:8b",
        "deepseek-ai/deepseek-v3",
        "my-finetuned-model",
    ];

    #[test]
    fn builtin_file_parses_and_covers_providers() {
        let book = PriceBook::builtin();
        let entries: Vec<_> = book.entries().collect();
        assert!(entries.len() >= 35, "only {} entries", entries.len());
        let providers: HashSet<_> = entries
            .iter()
            .map(|e| {
                e.provider
                    .as_deref()
                    .expect("every built-in entry names its provider")
            })
            .collect();
        for p in [
            "openai",
            "anthropic",
            "google",
            "mistral",
            "cohere",
            "meta",
            "deepseek",
        ] {
            assert!(providers.contains(p), "no {p} entries");
        }
        // Serde derive and the field-by-field reader agree on the built-in file.
        let derived: Vec<PriceEntry> = serde_saphyr::from_str(BUILTIN_YAML).unwrap();
        assert_eq!(derived, PriceBook::parse_entries(BUILTIN_YAML).unwrap());
    }

    #[test]
    fn examples_resolve_to_their_family() {
        let book = PriceBook::builtin();
        for (model, want) in EXAMPLES {
            let got = book.lookup(model, date(NOW)).map(|e| e.id.as_str());
            assert_eq!(got, Some(*want), "model {model}");
        }
        for model in NOT_PRICED {
            let got = book.lookup(model, date(NOW)).map(|e| e.id.as_str());
            assert_eq!(got, None, "model {model} must stay unpriced");
        }
    }

    #[test]
    fn no_example_matches_two_families_and_every_entry_is_used() {
        let book = PriceBook::builtin();
        let entries: Vec<_> = book.entries().collect();
        assert_eq!(book.layers.len(), 1);
        let set = &book.layers[0].set;
        let mut used = vec![false; entries.len()];
        for model in EXAMPLES
            .iter()
            .map(|(m, _)| *m)
            .chain(NOT_PRICED.iter().copied())
        {
            let lower = model.to_lowercase();
            let hits: Vec<usize> = set.matches(&lower).into_iter().collect();
            // Entries sharing one `match` are one family (its prices over time).
            let families: HashSet<&str> =
                hits.iter().map(|&i| entries[i].pattern.as_str()).collect();
            assert!(
                families.len() <= 1,
                "{model} matches several families: {:?}",
                hits.iter().map(|&i| &entries[i].id).collect::<Vec<_>>()
            );
            for i in hits {
                used[i] = true;
            }
        }
        for (e, used) in entries.iter().zip(used) {
            assert!(used, "no example id matches entry {}", e.id);
            assert!(regex::Regex::new(&e.pattern).is_ok());
        }
    }

    #[test]
    fn dated_prefixed_and_mini_ids() {
        let book = PriceBook::builtin();
        let d = date(NOW);
        let id = |m: &str| book.lookup(m, d).map(|e| e.id.clone());
        assert_eq!(id("gpt-4o-2024-08-06").as_deref(), Some("gpt-4o"));
        assert_eq!(id("openai/gpt-4o").as_deref(), Some("gpt-4o"));
        assert_eq!(id("gpt-4o-mini").as_deref(), Some("gpt-4o-mini"));
        assert_eq!(
            id("openai/gpt-4o-mini-2024-07-18").as_deref(),
            Some("gpt-4o-mini")
        );
        assert_eq!(id("gpt-5-mini").as_deref(), Some("gpt-5-mini"));
        assert_eq!(id("gpt-5").as_deref(), Some("gpt-5"));
        assert_eq!(id("o3-mini").as_deref(), Some("o3-mini"));
        let haiku = Some("claude-3-5-haiku");
        assert_eq!(id("claude-3-5-haiku-20241022").as_deref(), haiku);
        assert_eq!(
            id("anthropic.claude-3-5-haiku-20241022-v1:0").as_deref(),
            haiku
        );
        assert_eq!(
            id("us.anthropic.claude-3-5-haiku-20241022-v1:0").as_deref(),
            haiku
        );
        assert_eq!(
            id("models/gemini-2.5-flash").as_deref(),
            Some("gemini-2.5-flash@2025-06-17")
        );
        assert_eq!(
            id("gemini-2.5-flash-lite").as_deref(),
            Some("gemini-2.5-flash-lite")
        );
    }

    #[test]
    fn unknown_model_is_unpriced() {
        let book = PriceBook::builtin();
        let mut s = span("acme-llm-9000", NOW, Some(100), Some(10));
        assert_eq!(book.apply(&mut s), PriceOutcome::Unpriced);
        assert_eq!(s.cost_total_usd, None);
        assert_eq!(s.cost_input_usd, None);
        assert_eq!(s.cost_source, None);
    }

    #[test]
    fn no_tokens_or_no_model_is_no_usage() {
        let book = PriceBook::builtin();
        let mut s = span("gpt-4o", NOW, None, None);
        assert_eq!(book.apply(&mut s), PriceOutcome::NoUsage);
        assert_eq!(s.cost_total_usd, None);
        let mut s = span("", NOW, Some(10), Some(10));
        s.request_model = None;
        assert_eq!(book.apply(&mut s), PriceOutcome::NoUsage);
        s.response_model = Some("  ".to_string());
        assert_eq!(book.apply(&mut s), PriceOutcome::NoUsage);
        assert_eq!(s.cost_total_usd, None);
    }

    #[test]
    fn response_model_wins_over_request_model() {
        let book = PriceBook::builtin();
        let mut s = span("gpt-4o", NOW, Some(1_000_000), Some(0));
        s.response_model = Some("gpt-4o-mini-2024-07-18".to_string());
        assert_eq!(book.apply(&mut s), PriceOutcome::Computed);
        assert_eq!(s.cost_source.as_deref(), Some("gpt-4o-mini"));
        close(s.cost_total_usd, 0.15);
    }

    #[test]
    fn cached_input_arithmetic() {
        let book = PriceBook::builtin();
        let mut s = span("gpt-4o-2024-08-06", NOW, Some(1_000_000), Some(100_000));
        s.cache_read_tokens = Some(400_000);
        assert_eq!(book.apply(&mut s), PriceOutcome::Computed);
        // gpt-4o: $2.50 input, $1.25 cached input, $10 output per 1M tokens.
        // input:  600,000 uncached × 2.50 / 1M = 1.50
        //       + 400,000 cached   × 1.25 / 1M = 0.50  → 2.00
        // output: 100,000 × 10 / 1M                    = 1.00
        // total:                                         3.00
        close(s.cost_input_usd, 2.0);
        close(s.cost_output_usd, 1.0);
        close(s.cost_total_usd, 3.0);
        assert_eq!(s.cost_source.as_deref(), Some("gpt-4o"));
    }

    #[test]
    fn reasoning_arithmetic() {
        let book = PriceBook::builtin();
        // Gemini 2.5 Flash preview: $0.15 input, $0.60 output, $3.50 thinking.
        let mut s = span(
            "gemini-2.5-flash-preview-04-17",
            "2025-05-01",
            Some(200_000),
            Some(50_000),
        );
        s.reasoning_tokens = Some(30_000);
        assert_eq!(book.apply(&mut s), PriceOutcome::Computed);
        assert_eq!(s.cost_source.as_deref(), Some("gemini-2.5-flash"));
        // input:  200,000 × 0.15 / 1M                          = 0.030
        // output: 20,000 plain × 0.60 / 1M = 0.012
        //       + 30,000 reasoning × 3.50 / 1M = 0.105         → 0.117
        close(s.cost_input_usd, 0.03);
        close(s.cost_output_usd, 0.117);
        close(s.cost_total_usd, 0.147);

        // o4-mini has no reasoning rate: reasoning tokens cost the output rate, once.
        let mut s = span("o4-mini", NOW, Some(0), Some(1_000_000));
        s.reasoning_tokens = Some(900_000);
        book.apply(&mut s);
        close(s.cost_output_usd, 4.4);
        close(s.cost_total_usd, 4.4);
    }

    #[test]
    fn anthropic_style_exclusive_counts() {
        let book = PriceBook::builtin();
        // Anthropic reports input_tokens without cache reads: 1,000 fresh + 50,000 cached.
        let mut s = span("claude-sonnet-4-5-20250929", NOW, Some(1_000), Some(2_000));
        s.cache_read_tokens = Some(50_000);
        assert_eq!(book.apply(&mut s), PriceOutcome::Computed);
        // claude-sonnet-4-5: $3 input, $0.30 cache read, $15 output.
        // input:  1,000 × 3 / 1M = 0.003 + 50,000 × 0.30 / 1M = 0.015 → 0.018
        // output: 2,000 × 15 / 1M                                      = 0.030
        close(s.cost_input_usd, 0.018);
        close(s.cost_output_usd, 0.03);
        close(s.cost_total_usd, 0.048);

        // Gemini style: 100 candidate tokens, 400 thinking tokens reported apart.
        let mut s = span("gemini-2.5-flash", "2025-05-01", Some(0), Some(100));
        s.reasoning_tokens = Some(400);
        book.apply(&mut s);
        // 100 × 0.60 / 1M + 400 × 3.50 / 1M = 0.00006 + 0.0014
        close(s.cost_output_usd, 0.00146);
    }

    #[test]
    fn missing_and_negative_counts() {
        let book = PriceBook::builtin();
        // Embedding model: input only.
        let mut s = span("text-embedding-3-small", NOW, Some(500_000), None);
        assert_eq!(book.apply(&mut s), PriceOutcome::Computed);
        // 500,000 × 0.02 / 1M = 0.01
        close(s.cost_input_usd, 0.01);
        close(s.cost_output_usd, 0.0);
        close(s.cost_total_usd, 0.01);
        assert_eq!(s.cost_source.as_deref(), Some("text-embedding-3-small"));

        let mut s = span("gpt-4o", NOW, Some(-5), Some(1_000_000));
        s.cache_read_tokens = Some(-7);
        assert_eq!(book.apply(&mut s), PriceOutcome::Computed);
        close(s.cost_input_usd, 0.0);
        close(s.cost_total_usd, 10.0);
    }

    #[test]
    fn client_cost_is_kept() {
        let book = PriceBook::builtin();
        let mut s = span("gpt-4o", NOW, Some(1_000_000), Some(0));
        s.cost_total_usd = Some(42.0);
        assert_eq!(book.apply(&mut s), PriceOutcome::ClientCost);
        assert_eq!(s.cost_total_usd, Some(42.0));
        assert_eq!(s.cost_input_usd, None);
        assert_eq!(s.cost_source.as_deref(), Some("client"));

        let mut s = span("gpt-4o", NOW, Some(1_000_000), Some(0));
        s.cost_input_usd = Some(1.0);
        s.cost_output_usd = Some(0.5);
        s.cost_source = Some("litellm".to_string());
        assert_eq!(book.apply(&mut s), PriceOutcome::ClientCost);
        assert_eq!(s.cost_total_usd, Some(1.5));
        assert_eq!(s.cost_source.as_deref(), Some("litellm"));
    }

    #[test]
    fn date_rule_uses_real_o3_prices() {
        let book = PriceBook::builtin();
        // Before launch: neither entry is valid yet.
        assert!(book.lookup("o3", date("2025-04-01")).is_none());
        let mut s = span("o3", "2025-04-01", Some(1_000_000), Some(0));
        assert_eq!(book.apply(&mut s), PriceOutcome::Unpriced);
        // Launch price: the June entry is not valid yet and is skipped.
        let mut s = span(
            "o3-2025-04-16",
            "2025-05-20",
            Some(1_000_000),
            Some(1_000_000),
        );
        assert_eq!(book.apply(&mut s), PriceOutcome::Computed);
        assert_eq!(s.cost_source.as_deref(), Some("o3"));
        close(s.cost_total_usd, 50.0); // $10 + $40
        // From 2025-06-10 the newer price wins.
        let mut s = span(
            "o3-2025-04-16",
            "2025-06-10",
            Some(1_000_000),
            Some(1_000_000),
        );
        book.apply(&mut s);
        assert_eq!(s.cost_source.as_deref(), Some("o3@2025-06-10"));
        close(s.cost_total_usd, 10.0); // $2 + $8
    }

    #[test]
    fn newest_valid_from_wins_and_ties_go_to_file_order() {
        let overrides = vec![
            entry("old", "^acme$", 1.0, 1.0, "2024-01-01"),
            entry("new", "^acme$", 2.0, 2.0, "2025-01-01"),
            entry("tie-first", "^tie$", 3.0, 3.0, "2025-01-01"),
            entry("tie-second", "tie", 4.0, 4.0, "2025-01-01"),
        ];
        let book = PriceBook::with_overrides(overrides).unwrap();
        let id = |m: &str, d: &str| book.lookup(m, date(d)).map(|e| e.id.as_str());
        assert_eq!(id("acme", "2025-06-01"), Some("new"));
        assert_eq!(id("ACME", "2024-06-01"), Some("old"));
        assert_eq!(id("acme", "2023-06-01"), None);
        assert_eq!(id("tie", "2025-06-01"), Some("tie-first"));
        assert_eq!(id("tie-2", "2025-06-01"), Some("tie-second"));
    }

    #[test]
    fn override_beats_builtin_even_when_older() {
        let mut e = entry("our-gpt-4o", "gpt-4o$", 1.0, 2.0, "2020-01-01");
        e.cached_input = Some(0.5);
        let book = PriceBook::with_overrides(vec![e]).unwrap();
        let mut s = span("gpt-4o-2024-08-06", NOW, Some(1_000_000), Some(1_000_000));
        s.response_model = Some("gpt-4o".to_string());
        assert_eq!(book.apply(&mut s), PriceOutcome::Computed);
        assert_eq!(s.cost_source.as_deref(), Some("our-gpt-4o"));
        close(s.cost_total_usd, 3.0);
        // Models the override does not match still get built-in prices.
        assert_eq!(
            book.lookup("gpt-4o-mini", date(NOW)).map(|e| e.id.as_str()),
            Some("gpt-4o-mini")
        );
        // An override may reuse a built-in id, and one not yet valid is skipped.
        let later = entry("o3", "^o3$", 0.0, 0.0, "2030-01-01");
        let book = PriceBook::with_overrides(vec![later]).unwrap();
        assert_eq!(
            book.lookup("o3", date(NOW)).map(|e| e.id.as_str()),
            Some("o3@2025-06-10")
        );
        assert_eq!(
            book.entries().count(),
            PriceBook::builtin().entries().count() + 1
        );
        assert_eq!(book.entries().next().map(|e| e.id.as_str()), Some("o3"));
    }

    #[test]
    fn parse_entries_reads_overrides() {
        let yaml = "
- id: internal-llm
  match: '^internal-llm(-v\\d+)?$'
  input: 0.5
  output: 1
  cached_input: 0.05
  valid_from: 2025-01-01
  note: our own deployment
";
        let entries = PriceBook::parse_entries(yaml).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].output, 1.0);
        assert_eq!(entries[0].cached_input, Some(0.05));
        assert_eq!(entries[0].valid_from, date("2025-01-01"));
        // Strings that untyped yaml 1.1 would read as booleans or numbers stay text.
        let yaml = "- {id: on, match: y, input: 1, output: 1, valid_from: 2025-01-01, note: no}\n\
                    - {id: '1.10', match: '1.10', input: 1, output: 1, valid_from: '2025-01-01'}\n";
        let entries = PriceBook::parse_entries(yaml).unwrap();
        assert_eq!(
            (entries[0].id.as_str(), entries[0].pattern.as_str()),
            ("on", "y")
        );
        assert_eq!(entries[0].note.as_deref(), Some("no"));
        assert_eq!(entries[1].id, "1.10");
        assert!(PriceBook::parse_entries("").unwrap().is_empty());
        assert!(PriceBook::parse_entries("# nothing\n").unwrap().is_empty());
        assert!(PriceBook::parse_entries("[]").unwrap().is_empty());
    }

    fn parse_err(yaml: &str) -> String {
        PriceBook::parse_entries(yaml).unwrap_err().to_string()
    }

    #[test]
    fn invalid_entries_are_reported_by_id_and_field() {
        let ok = "  input: 1\n  output: 2\n  valid_from: 2025-01-01\n";
        // Not yaml, or not a list: no entry to name.
        let err = parse_err(&format!("- id: a\n  match: 'a'\n{ok}- id: [\n"));
        assert!(err.contains("(document)") && err.contains("yaml"), "{err}");
        let err = parse_err("id: a\n");
        assert!(err.contains("(document)"), "{err}");

        let cases: Vec<(String, &[&str])> = vec![
            (
                format!("- id: bad-re\n  match: 'gpt-(4o'\n{ok}"),
                &["\"bad-re\"", "match: invalid regex", "unclosed group"],
            ),
            (
                format!("- id: neg\n  match: x\n  cached_input: -0.1\n{ok}"),
                &["\"neg\"", "cached_input: must be a finite number >= 0"],
            ),
            (
                format!("- id: dup\n  match: x\n{ok}- id: dup\n  match: y\n{ok}"),
                &["\"dup\"", "id: duplicate"],
            ),
            (
                "- id: nodate\n  match: x\n  input: 1\n  output: 2\n".to_string(),
                &["\"nodate\"", "valid_from: missing"],
            ),
            (
                "- id: baddate\n  match: x\n  input: 1\n  output: 2\n  valid_from: soon\n"
                    .to_string(),
                &["\"baddate\"", "valid_from: expected a date"],
            ),
            (
                "- id: word\n  match: x\n  input: cheap\n  output: 2\n  valid_from: 2025-01-01\n"
                    .to_string(),
                &["\"word\"", "input: expected a number"],
            ),
            (
                format!("- id: extra\n  match: x\n  inptu: 1\n{ok}"),
                &["\"extra\"", "unknown field \"inptu\""],
            ),
            (format!("- match: x\n{ok}"), &["\"#1\"", "id: missing"]),
            (
                format!("- id: empty\n  match: ''\n{ok}"),
                &["\"empty\"", "match: must not be empty"],
            ),
            ("- 42\n".to_string(), &["\"#1\"", "expected a mapping"]),
        ];
        for (yaml, needles) in cases {
            let err = parse_err(&yaml);
            for needle in needles {
                assert!(err.contains(needle), "{err:?} lacks {needle:?}");
            }
            assert_eq!(err, err.to_lowercase(), "messages are lowercase");
        }
    }

    #[test]
    fn with_overrides_validates() {
        let mut bad = entry("inf", "x", 1.0, 1.0, "2025-01-01");
        bad.output = f64::INFINITY;
        let err = PriceBook::with_overrides(vec![bad])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"inf\"") && err.contains("output:"), "{err}");
        let mut bad = entry("nan", "x", 1.0, 1.0, "2025-01-01");
        bad.reasoning = Some(f64::NAN);
        let err = PriceBook::with_overrides(vec![bad])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"nan\"") && err.contains("reasoning:"),
            "{err}"
        );
        let neg = entry("neg", "x", -1.0, 1.0, "2025-01-01");
        let err = PriceBook::with_overrides(vec![neg])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"neg\"") && err.contains("input:"), "{err}");
        let dup = vec![
            entry("d", "x", 1.0, 1.0, "2025-01-01"),
            entry("d", "y", 1.0, 1.0, "2025-01-01"),
        ];
        let err = PriceBook::with_overrides(dup).unwrap_err().to_string();
        assert!(err.contains("\"d\"") && err.contains("duplicate"), "{err}");
        let re = entry("re", "(", 1.0, 1.0, "2025-01-01");
        let err = PriceBook::with_overrides(vec![re]).unwrap_err().to_string();
        assert!(err.contains("\"re\"") && err.contains("match:"), "{err}");
        assert!(PriceBook::with_overrides(Vec::new()).is_ok());
    }

    #[test]
    fn cache_is_bounded_and_consistent() {
        let book = PriceBook::with_overrides(Vec::new()).unwrap();
        for i in 0..(CACHE_MAX_IDS + 10) {
            assert!(
                book.lookup(&format!("unknown-model-{i}"), date(NOW))
                    .is_none()
            );
        }
        assert!(book.cache.read().unwrap().len() <= CACHE_MAX_IDS);
        for _ in 0..3 {
            assert_eq!(
                book.lookup("gpt-4o", date(NOW)).map(|e| e.id.as_str()),
                Some("gpt-4o")
            );
        }
    }

    #[test]
    fn book_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<PriceBook>();
        check::<Arc<PriceBook>>();
    }

    #[test]
    fn span_date_is_utc_day_of_start() {
        assert_eq!(span_date(ns("2025-06-10")), date("2025-06-10"));
        // 23:59:59 UTC on 2025-06-09.
        let late = ns("2025-06-10") - 12 * 3600 * 1_000_000_000 - 1_000_000_000;
        assert_eq!(span_date(late), date("2025-06-09"));
        // Far-future nanoseconds do not panic.
        assert!(span_date(u64::MAX) > date("2500-01-01"));
    }
}
