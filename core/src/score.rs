//! Scores (evaluations) attached to a trace or a span: numeric, boolean or
//! categorical, from a human, a heuristic, an LLM judge or an API client.
//!
//! Scores travel with spans: a [`ScoreRecord`] rides in the same queue payload
//! ([`crate::SpanBatch::scores`]) through the write-ahead log or Kafka, and lands in a
//! Parquet file beside the block it was written with (`<block>.scores.parquet`, in
//! [`score_schema`]).

use std::sync::{Arc, LazyLock};

use arrow::array::StringBuilder;
use arrow::array::{ArrayRef, FixedSizeBinaryBuilder, Float64Builder, Int64Builder, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::ids::parse_hex;

/// Longest score name, in bytes.
pub const MAX_NAME_BYTES: usize = 200;
/// Longest categorical label, in bytes.
pub const MAX_LABEL_BYTES: usize = 200;
/// Longest comment, in bytes.
pub const MAX_COMMENT_BYTES: usize = 4096;
/// Longest client-chosen score id, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Most scores one request may carry.
pub const MAX_SCORES_PER_REQUEST: usize = 1000;

/// What kind of value a score holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, prost::Enumeration, Serialize, Deserialize)]
#[repr(i32)]
#[serde(rename_all = "snake_case")]
pub enum ScoreType {
    Numeric = 0,
    Boolean = 1,
    Categorical = 2,
}

impl ScoreType {
    pub fn as_str(self) -> &'static str {
        match self {
            ScoreType::Numeric => "numeric",
            ScoreType::Boolean => "boolean",
            ScoreType::Categorical => "categorical",
        }
    }

    fn parse(s: &str) -> Option<ScoreType> {
        [
            ScoreType::Numeric,
            ScoreType::Boolean,
            ScoreType::Categorical,
        ]
        .into_iter()
        .find(|t| t.as_str().eq_ignore_ascii_case(s))
    }
}

/// Who produced a score.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, prost::Enumeration, Serialize, Deserialize)]
#[repr(i32)]
#[serde(rename_all = "snake_case")]
pub enum ScoreSource {
    Api = 0,
    Human = 1,
    Heuristic = 2,
    LlmJudge = 3,
}

impl ScoreSource {
    pub const ALL: [ScoreSource; 4] = [
        ScoreSource::Api,
        ScoreSource::Human,
        ScoreSource::Heuristic,
        ScoreSource::LlmJudge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ScoreSource::Api => "api",
            ScoreSource::Human => "human",
            ScoreSource::Heuristic => "heuristic",
            ScoreSource::LlmJudge => "llm_judge",
        }
    }

    pub fn parse(s: &str) -> Option<ScoreSource> {
        ScoreSource::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
    }
}

/// One score, as queued and stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ScoreRecord {
    /// Unique per tenant: chosen by the client (so a retried request is one score),
    /// or generated.
    #[prost(string, tag = "1")]
    pub score_id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub trace_id: Vec<u8>,
    /// Empty for a score of the whole trace.
    #[prost(bytes = "vec", tag = "3")]
    pub span_id: Vec<u8>,
    #[prost(string, tag = "4")]
    pub name: String,
    #[prost(enumeration = "ScoreType", tag = "5")]
    pub data_type: i32,
    /// Numeric value; 1 or 0 for a boolean. Unset for a categorical score.
    #[prost(double, optional, tag = "6")]
    pub value: Option<f64>,
    /// Categorical label; `true`/`false` for a boolean.
    #[prost(string, optional, tag = "7")]
    pub label: Option<String>,
    #[prost(enumeration = "ScoreSource", tag = "8")]
    pub source: i32,
    #[prost(string, optional, tag = "9")]
    pub comment: Option<String>,
    /// When the score was made, Unix nanoseconds.
    #[prost(int64, tag = "10")]
    pub created_ns: i64,
}

impl ScoreRecord {
    pub fn approx_bytes(&self) -> usize {
        96 + self.score_id.len()
            + self.name.len()
            + self.label.as_ref().map_or(0, String::len)
            + self.comment.as_ref().map_or(0, String::len)
    }
}

/// A score as a client sends it (`POST /api/v1/scores`). The Langfuse field names
/// (`traceId`, `observationId`, `dataType`) are accepted too.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreInput {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(alias = "traceId")]
    pub trace_id: String,
    #[serde(default, alias = "observationId")]
    pub span_id: Option<String>,
    pub name: String,
    pub value: serde_json::Value,
    #[serde(default, alias = "dataType")]
    pub data_type: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub comment: Option<String>,
    /// RFC 3339; now when unset.
    #[serde(default)]
    pub timestamp: Option<String>,
}

impl ScoreInput {
    /// Validates the score; errors name the field. `new_id` makes an id when the
    /// client gave none; `now_ns` is the default time.
    pub fn into_record(
        self,
        new_id: impl FnOnce() -> String,
        now_ns: i64,
    ) -> Result<ScoreRecord, String> {
        let trace_id = parse_hex::<16>(&self.trace_id)
            .filter(|id| id != &[0; 16])
            .ok_or_else(|| {
                format!(
                    "trace_id must be 32 hexadecimal characters (not all zero), got {:?}",
                    truncate(&self.trace_id, 64)
                )
            })?;
        let span_id = match self.span_id.as_deref().map(str::trim) {
            None | Some("") => Vec::new(),
            Some(s) => parse_hex::<8>(s)
                .filter(|id| id != &[0; 8])
                .ok_or_else(|| {
                    format!(
                        "span_id must be 16 hexadecimal characters (not all zero), got {:?}",
                        truncate(s, 64)
                    )
                })?
                .to_vec(),
        };
        let name = self.name.trim().to_owned();
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return Err(format!("name must be 1 to {MAX_NAME_BYTES} bytes"));
        }
        let declared = match self.data_type.as_deref() {
            None => None,
            Some(t) => Some(ScoreType::parse(t).ok_or_else(|| {
                format!("data_type must be numeric, boolean or categorical, got {t:?}")
            })?),
        };
        use serde_json::Value;
        let (data_type, value, label) = match (&self.value, declared) {
            (Value::Number(n), None | Some(ScoreType::Numeric)) => {
                let v = n
                    .as_f64()
                    .filter(|v| v.is_finite())
                    .ok_or("value must be a finite number")?;
                (ScoreType::Numeric, Some(v), None)
            }
            (Value::Bool(b), None | Some(ScoreType::Boolean)) => (
                ScoreType::Boolean,
                Some(f64::from(u8::from(*b))),
                Some(b.to_string()),
            ),
            // Langfuse sends booleans as 0/1 with dataType BOOLEAN.
            (Value::Number(n), Some(ScoreType::Boolean)) => match n.as_f64() {
                Some(v) if v == 0.0 || v == 1.0 => {
                    (ScoreType::Boolean, Some(v), Some((v == 1.0).to_string()))
                }
                _ => return Err("a boolean score's value must be true, false, 0 or 1".into()),
            },
            (Value::String(s), None | Some(ScoreType::Categorical)) => {
                let s = s.trim();
                if s.is_empty() || s.len() > MAX_LABEL_BYTES {
                    return Err(format!(
                        "a categorical value must be 1 to {MAX_LABEL_BYTES} bytes"
                    ));
                }
                (ScoreType::Categorical, None, Some(s.to_owned()))
            }
            (v, Some(t)) => {
                return Err(format!(
                    "value {} does not fit data_type {}",
                    truncate(&v.to_string(), 64),
                    t.as_str()
                ));
            }
            (v, None) => {
                return Err(format!(
                    "value must be a number, a boolean or a string label, got {}",
                    truncate(&v.to_string(), 64)
                ));
            }
        };
        let source = match self.source.as_deref() {
            None => ScoreSource::Api,
            Some(s) => ScoreSource::parse(s).ok_or_else(|| {
                format!(
                    "source must be one of {}, got {:?}",
                    ScoreSource::ALL.map(|s| s.as_str()).join(", "),
                    truncate(s, 64)
                )
            })?,
        };
        if let Some(c) = &self.comment
            && c.len() > MAX_COMMENT_BYTES
        {
            return Err(format!("comment is longer than {MAX_COMMENT_BYTES} bytes"));
        }
        let score_id = match self.id.as_deref().map(str::trim) {
            None | Some("") => new_id(),
            Some(id) if id.len() <= MAX_ID_BYTES => id.to_owned(),
            Some(_) => return Err(format!("id is longer than {MAX_ID_BYTES} bytes")),
        };
        let created_ns = match self.timestamp.as_deref() {
            None => now_ns,
            Some(t) => chrono::DateTime::parse_from_rfc3339(t)
                .ok()
                .and_then(|t| t.timestamp_nanos_opt())
                .ok_or_else(|| format!("timestamp must be RFC 3339, got {:?}", truncate(t, 64)))?,
        };
        Ok(ScoreRecord {
            score_id,
            trace_id: trace_id.to_vec(),
            span_id,
            name,
            data_type: data_type as i32,
            value,
            label,
            source: source as i32,
            comment: self.comment,
            created_ns,
        })
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Parses a request body: one score object, an array of them, or `{"scores": [...]}`.
/// Errors name the score by its index.
pub fn parse_scores(
    body: &[u8],
    mut new_id: impl FnMut() -> String,
    now_ns: i64,
) -> Result<Vec<ScoreRecord>, String> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Body {
        Many(Vec<serde_json::Value>),
        Wrapped { scores: Vec<serde_json::Value> },
        One(serde_json::Value),
    }
    let body: Body =
        serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
    let (items, single) = match body {
        Body::Many(v) | Body::Wrapped { scores: v } => (v, false),
        Body::One(v) => (vec![v], true),
    };
    if items.is_empty() {
        return Err("no scores in the request".into());
    }
    if items.len() > MAX_SCORES_PER_REQUEST {
        return Err(format!(
            "{} scores in one request; at most {MAX_SCORES_PER_REQUEST}",
            items.len()
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let at = |e: String| {
                if single {
                    e
                } else {
                    format!("scores[{i}]: {e}")
                }
            };
            let input: ScoreInput = serde_json::from_value(v).map_err(|e| at(e.to_string()))?;
            input.into_record(&mut new_id, now_ns).map_err(at)
        })
        .collect()
}

/// Column names of the score table.
pub mod col {
    pub const SCORE_ID: &str = "score_id";
    pub const TRACE_ID: &str = "trace_id";
    pub const SPAN_ID: &str = "span_id";
    pub const NAME: &str = "name";
    pub const DATA_TYPE: &str = "data_type";
    pub const VALUE: &str = "value";
    pub const LABEL: &str = "label";
    pub const SOURCE: &str = "source";
    pub const COMMENT: &str = "comment";
    pub const CREATED_NS: &str = "created_ns";
}

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    use DataType::*;
    let f = |name: &str, ty: DataType, nullable: bool| Field::new(name, ty, nullable);
    Arc::new(Schema::new(vec![
        f(col::TRACE_ID, FixedSizeBinary(16), false),
        f(col::SPAN_ID, FixedSizeBinary(8), true),
        f(col::SCORE_ID, Utf8, false),
        f(col::NAME, Utf8, false),
        f(col::DATA_TYPE, Utf8, false),
        f(col::VALUE, Float64, true),
        f(col::LABEL, Utf8, true),
        f(col::SOURCE, Utf8, false),
        f(col::COMMENT, Utf8, true),
        f(col::CREATED_NS, Int64, false),
    ]))
});

/// The Arrow schema of the score table.
pub fn score_schema() -> SchemaRef {
    SCHEMA.clone()
}

/// Builds an Arrow batch in [`score_schema`].
pub fn scores_to_batch(scores: &[ScoreRecord]) -> Result<RecordBatch, crate::Error> {
    let n = scores.len();
    let mut trace_id = FixedSizeBinaryBuilder::with_capacity(n, 16);
    let mut span_id = FixedSizeBinaryBuilder::with_capacity(n, 8);
    let mut strings: [StringBuilder; 6] = std::array::from_fn(|_| StringBuilder::new());
    let mut value = Float64Builder::with_capacity(n);
    let mut created = Int64Builder::with_capacity(n);
    let bad = |what: &str, len: usize| {
        crate::Error::Corrupt(format!("{what} of {len} bytes in a stored score"))
    };
    for s in scores {
        trace_id
            .append_value(&s.trace_id)
            .map_err(|_| bad("trace_id", s.trace_id.len()))?;
        if s.span_id.is_empty() {
            span_id.append_null();
        } else {
            span_id
                .append_value(&s.span_id)
                .map_err(|_| bad("span_id", s.span_id.len()))?;
        }
        let [id, name, data_type, label, source, comment] = &mut strings;
        id.append_value(&s.score_id);
        name.append_value(&s.name);
        data_type.append_value(s.data_type().as_str());
        value.append_option(s.value);
        label.append_option(s.label.as_deref());
        source.append_value(s.source().as_str());
        comment.append_option(s.comment.as_deref());
        created.append_value(s.created_ns);
    }
    let [
        mut id,
        mut name,
        mut data_type,
        mut label,
        mut source,
        mut comment,
    ] = strings;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(trace_id.finish()),
        Arc::new(span_id.finish()),
        Arc::new(id.finish()),
        Arc::new(name.finish()),
        Arc::new(data_type.finish()),
        Arc::new(value.finish()),
        Arc::new(label.finish()),
        Arc::new(source.finish()),
        Arc::new(comment.finish()),
        Arc::new(created.finish()),
    ];
    RecordBatch::try_new(score_schema(), columns).map_err(|e| crate::Error::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "0af7651916cd43dd8448eb211c80319c";

    fn parse(body: &str) -> Result<Vec<ScoreRecord>, String> {
        let mut n = 0;
        parse_scores(
            body.as_bytes(),
            || {
                n += 1;
                format!("gen-{n}")
            },
            42,
        )
    }

    #[test]
    fn the_value_decides_the_type() {
        let s = parse(&format!(
            r#"[{{"trace_id":"{T}","name":"faithfulness","value":0.4,"source":"llm_judge"}},
                {{"trace_id":"{T}","span_id":"b7ad6b7169203331","name":"helpful","value":true,"source":"human","comment":"ok"}},
                {{"traceId":"{T}","name":"topic","value":"billing","id":"mine"}}]"#
        ))
        .unwrap();
        assert_eq!(s[0].data_type(), ScoreType::Numeric);
        assert_eq!(s[0].value, Some(0.4));
        assert_eq!(s[0].source(), ScoreSource::LlmJudge);
        assert_eq!(s[0].score_id, "gen-1");
        assert_eq!(s[0].created_ns, 42);
        assert_eq!(s[1].data_type(), ScoreType::Boolean);
        assert_eq!(
            (s[1].value, s[1].label.as_deref()),
            (Some(1.0), Some("true"))
        );
        assert_eq!(s[1].span_id.len(), 8);
        assert_eq!(s[2].data_type(), ScoreType::Categorical);
        assert_eq!(s[2].label.as_deref(), Some("billing"));
        assert_eq!(s[2].score_id, "mine");
        assert_eq!(s[2].source(), ScoreSource::Api);
        let batch = scores_to_batch(&s).unwrap();
        assert_eq!(batch.num_rows(), 3);
    }

    #[test]
    fn langfuse_booleans_and_wrapped_bodies_are_accepted() {
        let s = parse(&format!(
            r#"{{"scores":[{{"traceId":"{T}","name":"ok","value":0,"dataType":"BOOLEAN"}}]}}"#
        ))
        .unwrap();
        assert_eq!(s[0].data_type(), ScoreType::Boolean);
        assert_eq!(s[0].label.as_deref(), Some("false"));
    }

    #[test]
    fn bad_scores_are_named() {
        let cases = [
            (
                r#"{"trace_id":"xyz","name":"a","value":1}"#.to_string(),
                "trace_id must be",
            ),
            (
                format!(r#"{{"trace_id":"{T}","name":"","value":1}}"#),
                "name must be",
            ),
            (
                format!(r#"{{"trace_id":"{T}","name":"a","value":[1]}}"#),
                "value must be",
            ),
            (
                format!(r#"{{"trace_id":"{T}","name":"a","value":"x","data_type":"numeric"}}"#),
                "does not fit data_type numeric",
            ),
            (
                format!(r#"{{"trace_id":"{T}","name":"a","value":1,"source":"robot"}}"#),
                "source must be one of api, human, heuristic, llm_judge",
            ),
            (
                format!(r#"{{"trace_id":"{T}","name":"a","value":1,"colour":"red"}}"#),
                "unknown field `colour`",
            ),
            (
                format!(
                    r#"[{{"trace_id":"{T}","name":"a","value":1}},{{"trace_id":"{T}","name":"a"}}]"#
                ),
                "scores[1]: missing field `value`",
            ),
            ("[]".to_string(), "no scores"),
            ("nope".to_string(), "not valid JSON"),
        ];
        for (body, want) in cases {
            let err = parse(&body).expect_err(&body);
            assert!(err.contains(want), "{body}: {err}");
        }
    }
}
