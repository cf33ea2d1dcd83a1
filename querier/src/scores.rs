//! Reading scores: with a trace, as a search filter, listed, and as metrics over time
//! (average per name and bucket, with the change from the bucket before, so that a
//! 10 % week-over-week drop in faithfulness shows).

use std::collections::{BTreeMap, HashMap};

use arrow::array::{Array, AsArray, RecordBatch};
use datafusion::common::ScalarValue;
use datafusion::prelude::SessionContext;
use loupe_core::TenantId;
use serde::{Deserialize, Serialize};

use crate::engine::{
    QueryEngine, QueryError, SCORES, check_range, floats, hex, ints, opt_f64, opt_str, run, strings,
};
use crate::model::rfc3339;
use crate::stats::{Dimension, span_expr};

/// How long before a filtered score range the scored traces may have started: a
/// score comes after its trace (a judge minutes later, a human the next day).
pub const SCORED_TRACE_LOOKBACK: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// One score, as the API returns it.
#[derive(Clone, Debug, PartialEq, Serialize, schemars::JsonSchema, Deserialize)]
pub struct ScoreView {
    pub id: String,
    pub trace_id: String,
    /// Unset for a score of the whole trace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
    pub name: String,
    /// `numeric`, `boolean` or `categorical`.
    pub data_type: String,
    /// The number (1/0 for a boolean); unset for a categorical score.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// The category (`true`/`false` for a boolean).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    pub created: String,
    pub created_ns: i64,
}

/// A comparison in a score filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Op {
    fn sql(self) -> &'static str {
        match self {
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Eq => "=",
            Op::Ne => "<>",
        }
    }
}

/// A search filter on scores: traces with a score `name` (of the trace or any of its
/// spans) whose value compares as asked, e.g. `faithfulness<0.5`, `helpful=false`,
/// `topic=billing`.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreFilter {
    pub name: String,
    pub op: Op,
    pub value: FilterValue,
}

#[derive(Clone, Debug, PartialEq)]
pub enum FilterValue {
    Number(f64),
    /// A categorical label, or `true`/`false`.
    Label(String),
}

/// Parses comma-separated score conditions (`faithfulness<0.5,helpful=true`).
pub fn parse_score_filters(v: &str) -> Result<Vec<ScoreFilter>, String> {
    v.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(parse_score_filter)
        .collect()
}

fn parse_score_filter(c: &str) -> Result<ScoreFilter, String> {
    const OPS: [(&str, Op); 7] = [
        ("<=", Op::Le),
        (">=", Op::Ge),
        ("!=", Op::Ne),
        ("==", Op::Eq),
        ("<", Op::Lt),
        (">", Op::Gt),
        ("=", Op::Eq),
    ];
    let (at, token, op) = OPS
        .iter()
        .filter_map(|(t, op)| c.find(t).map(|i| (i, *t, *op)))
        .min_by_key(|(i, t, _)| (*i, std::cmp::Reverse(t.len())))
        .ok_or_else(|| {
            format!(
                "score filter {c:?} needs a comparison: name<0.5, name>=4, name=true, name=label"
            )
        })?;
    let name = c[..at].trim();
    let raw = c[at + token.len()..].trim();
    if name.is_empty() || raw.is_empty() {
        return Err(format!("score filter {c:?} needs a name and a value"));
    }
    let value = match raw.parse::<f64>() {
        Ok(n) if n.is_finite() => FilterValue::Number(n),
        _ => {
            if !matches!(op, Op::Eq | Op::Ne) {
                return Err(format!(
                    "score filter {c:?}: {} compares numbers only",
                    op.sql()
                ));
            }
            FilterValue::Label(raw.to_owned())
        }
    };
    Ok(ScoreFilter {
        name: name.to_owned(),
        op,
        value,
    })
}

/// The SQL condition selecting traces that match every filter; values are added to
/// `params` (whose length gives the next placeholder number).
pub(crate) fn score_filter_sql(
    filters: &[ScoreFilter],
    params: &mut crate::engine::Params,
) -> String {
    let mut p = |v: ScalarValue| params.push(v);
    filters
        .iter()
        .map(|f| {
            let name = p(ScalarValue::Utf8(Some(f.name.clone())));
            let cond = match &f.value {
                FilterValue::Number(n) => {
                    format!("value {} {}", f.op.sql(), p(ScalarValue::Float64(Some(*n))))
                }
                FilterValue::Label(l) => format!(
                    "lower(label) {} lower({})",
                    f.op.sql(),
                    p(ScalarValue::Utf8(Some(l.clone())))
                ),
            };
            format!("trace_id IN (SELECT trace_id FROM {SCORES} WHERE name = {name} AND {cond})")
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// A listing of scores.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScoreQuery {
    /// Scores created in `[start_ns, end_ns)`.
    pub start_ns: i64,
    pub end_ns: i64,
    pub trace_id: Option<[u8; 16]>,
    pub name: Option<String>,
    pub source: Option<String>,
    pub limit: usize,
}

/// One bucket of a score's metrics.
#[derive(Clone, Debug, PartialEq, Serialize, schemars::JsonSchema, Deserialize)]
pub struct ScorePoint {
    pub time: String,
    pub time_ns: i64,
    pub count: u64,
    /// Mean of the numeric values (share of `true` for a boolean).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avg: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// `(avg - previous avg) / previous avg`, against the bucket before when it has
    /// scores.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change: Option<f64>,
    /// Counts per label (categorical and boolean scores).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, u64>,
}

/// The metrics of one score name.
#[derive(Clone, Debug, PartialEq, Serialize, schemars::JsonSchema, Deserialize)]
pub struct ScoreSeries {
    pub name: String,
    pub data_type: String,
    pub count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avg: Option<f64>,
    pub points: Vec<ScorePoint>,
}

#[derive(Clone, Debug, PartialEq, Serialize, schemars::JsonSchema, Deserialize)]
pub struct ScoreMetrics {
    pub start: String,
    pub end: String,
    pub step_seconds: f64,
    pub series: Vec<ScoreSeries>,
}

fn views(batches: &[RecordBatch]) -> Result<Vec<ScoreView>, QueryError> {
    let mut out = Vec::new();
    for b in batches {
        let trace_ids = crate::engine::column(b, "trace_id")?.as_fixed_size_binary();
        let span_ids = crate::engine::column(b, "span_id")?.as_fixed_size_binary();
        let s = |n| strings(b, n);
        let (id, name, data_type, label, source, comment) = (
            s("score_id")?,
            s("name")?,
            s("data_type")?,
            s("label")?,
            s("source")?,
            s("comment")?,
        );
        let value = floats(b, "value")?;
        let created = ints(b, "created_ns")?;
        for r in 0..b.num_rows() {
            out.push(ScoreView {
                id: opt_str(&id, r).unwrap_or_default(),
                trace_id: hex(trace_ids.value(r)),
                span_id: (!span_ids.is_null(r)).then(|| hex(span_ids.value(r))),
                name: opt_str(&name, r).unwrap_or_default(),
                data_type: opt_str(&data_type, r).unwrap_or_default(),
                value: opt_f64(&value, r),
                label: opt_str(&label, r),
                source: opt_str(&source, r).unwrap_or_default(),
                comment: opt_str(&comment, r),
                created: rfc3339(created.value(r)),
                created_ns: created.value(r),
            });
        }
    }
    Ok(out)
}

impl QueryEngine {
    /// The scores of one trace (and its spans), oldest first, each id once.
    pub(crate) async fn trace_scores(
        &self,
        ctx: &SessionContext,
        trace_id: [u8; 16],
    ) -> Result<Vec<ScoreView>, QueryError> {
        // Filtering the raw rows lets the bloom filters skip other traces' files.
        let id = ScalarValue::FixedSizeBinary(16, Some(trace_id.to_vec()));
        let batches = run(
            ctx,
            "SELECT * FROM score_blocks WHERE trace_id = $1 \
             UNION ALL SELECT * FROM score_head WHERE trace_id = $1",
            vec![id],
        )
        .await?;
        let mut latest: HashMap<String, ScoreView> = HashMap::new();
        for v in views(&batches)? {
            match latest.get(&v.id) {
                Some(old) if old.created_ns > v.created_ns => {}
                _ => {
                    latest.insert(v.id.clone(), v);
                }
            }
        }
        let mut out: Vec<ScoreView> = latest.into_values().collect();
        out.sort_by(|a, b| (a.created_ns, &a.id).cmp(&(b.created_ns, &b.id)));
        Ok(out)
    }

    /// Scores matching the query, newest first.
    pub async fn scores(
        &self,
        tenant: &TenantId,
        q: &ScoreQuery,
    ) -> Result<Vec<ScoreView>, QueryError> {
        let ctx = self.score_session(tenant)?;
        let mut params = vec![
            ScalarValue::Int64(Some(q.start_ns)),
            ScalarValue::Int64(Some(q.end_ns)),
        ];
        let mut conds = vec![
            "created_ns >= $1".to_string(),
            "created_ns < $2".to_string(),
        ];
        let mut p = |v: ScalarValue| {
            params.push(v);
            format!("${}", params.len())
        };
        if let Some(t) = q.trace_id {
            conds.push(format!(
                "trace_id = {}",
                p(ScalarValue::FixedSizeBinary(16, Some(t.to_vec())))
            ));
        }
        if let Some(n) = &q.name {
            conds.push(format!("name = {}", p(ScalarValue::Utf8(Some(n.clone())))));
        }
        if let Some(s) = &q.source {
            conds.push(format!(
                "source = {}",
                p(ScalarValue::Utf8(Some(s.clone())))
            ));
        }
        let limit = p(ScalarValue::Int64(Some(q.limit as i64)));
        let sql = format!(
            "SELECT * FROM {SCORES} WHERE {} ORDER BY created_ns DESC, score_id LIMIT {limit}",
            conds.join(" AND ")
        );
        let batches = run(&ctx, &sql, params).await?;
        views(&batches)
    }

    /// The traces with a span that matches every filter and starts in `range`.
    async fn traces_matching(
        &self,
        tenant: &TenantId,
        range: (i64, i64),
        filters: &[(Dimension, String)],
    ) -> Result<Vec<[u8; 16]>, QueryError> {
        let ctx = self.span_session(tenant, range).await?;
        let mut params = vec![
            ScalarValue::Int64(Some(range.0)),
            ScalarValue::Int64(Some(range.1)),
        ];
        let mut conds = vec!["start_ns >= $1".to_owned(), "start_ns < $2".to_owned()];
        for (d, v) in filters {
            if *d == Dimension::Feature {
                return Err(QueryError::BadRequest(
                    "feature cannot filter scores; filter by service, name, model, prompt, user, session or environment".into(),
                ));
            }
            params.push(ScalarValue::Utf8(Some(v.clone())));
            conds.push(format!("{} = ${}", span_expr(*d, ""), params.len()));
        }
        let conds = conds.join(" AND ");
        let sql = format!(
            "SELECT DISTINCT trace_id FROM (SELECT trace_id FROM blocks WHERE {conds} \
             UNION ALL SELECT trace_id FROM head WHERE {conds})"
        );
        let batches = run(&ctx, &sql, params).await?;
        let mut out = Vec::new();
        for b in &batches {
            let ids = crate::engine::column(b, "trace_id")?.as_fixed_size_binary();
            for r in 0..ids.len() {
                if let Ok(id) = <[u8; 16]>::try_from(ids.value(r)) {
                    out.push(id);
                }
            }
        }
        Ok(out)
    }

    /// Score metrics per name over time buckets of scores created in the range.
    /// With `filters` (the metrics API's, but `feature`), only scores of traces that
    /// have a span matching them all, which started up to
    /// [`SCORED_TRACE_LOOKBACK`] before the range.
    pub async fn score_metrics(
        &self,
        tenant: &TenantId,
        (start_ns, end_ns, step_ns): (i64, i64, i64),
        name: Option<&str>,
        filters: &[(Dimension, String)],
    ) -> Result<ScoreMetrics, QueryError> {
        check_range(start_ns, end_ns)?;
        let ctx = self.score_session(tenant)?;
        let mut params = vec![
            ScalarValue::Int64(Some(start_ns)),
            ScalarValue::Int64(Some(end_ns)),
            ScalarValue::Int64(Some(step_ns)),
        ];
        let mut name_cond = match name {
            Some(n) => {
                params.push(ScalarValue::Utf8(Some(n.to_owned())));
                " AND name = $4".to_owned()
            }
            None => String::new(),
        };
        if !filters.is_empty() {
            let lookback = SCORED_TRACE_LOOKBACK.as_nanos() as i64;
            let ids = self
                .traces_matching(tenant, (start_ns.saturating_sub(lookback), end_ns), filters)
                .await?;
            let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
                arrow::datatypes::Field::new(
                    "wanted_id",
                    arrow::datatypes::DataType::FixedSizeBinary(16),
                    false,
                ),
            ]));
            let array = arrow::array::FixedSizeBinaryArray::try_from_iter(ids.iter())
                .unwrap_or_else(|_| arrow::array::FixedSizeBinaryArray::new_null(16, 0));
            let batch = RecordBatch::try_new(schema.clone(), vec![std::sync::Arc::new(array)])?;
            ctx.register_table(
                "wanted",
                std::sync::Arc::new(datafusion::datasource::MemTable::try_new(
                    schema,
                    vec![vec![batch]],
                )?),
            )?;
            name_cond.push_str(" AND trace_id IN (SELECT wanted_id FROM wanted)");
        }
        // Labels are counted for categorical and boolean scores only.
        let sql = format!(
            "SELECT bucket, name, data_type, label, count(*) AS n, avg(value) AS avg, \
               min(value) AS min, max(value) AS max \
             FROM (SELECT $1 + ((created_ns - $1) / $3) * $3 AS bucket, name, data_type, value, \
                     CASE WHEN data_type = 'numeric' THEN NULL ELSE label END AS label \
                   FROM {SCORES} WHERE created_ns >= $1 AND created_ns < $2{name_cond}) \
             GROUP BY bucket, name, data_type, label ORDER BY name, bucket"
        );
        let batches = run(&ctx, &sql, params).await?;
        // (name) -> (data_type, bucket -> (count, sum, min, max, labels))
        type Acc = (
            u64,
            f64,
            u64,
            Option<f64>,
            Option<f64>,
            BTreeMap<String, u64>,
        );
        let mut by_name: BTreeMap<String, (String, BTreeMap<i64, Acc>)> = BTreeMap::new();
        for b in &batches {
            let bucket = ints(b, "bucket")?;
            let (names, types, labels) = (
                strings(b, "name")?,
                strings(b, "data_type")?,
                strings(b, "label")?,
            );
            let n = ints(b, "n")?;
            let (avg, min, max) = (floats(b, "avg")?, floats(b, "min")?, floats(b, "max")?);
            for r in 0..b.num_rows() {
                let name = opt_str(&names, r).unwrap_or_default();
                let entry = by_name
                    .entry(name)
                    .or_insert_with(|| (opt_str(&types, r).unwrap_or_default(), BTreeMap::new()));
                let acc = entry.1.entry(bucket.value(r)).or_default();
                let count = n.value(r).max(0) as u64;
                acc.0 += count;
                if !avg.is_null(r) {
                    acc.1 += avg.value(r) * count as f64;
                    acc.2 += count;
                    let (lo, hi) = (min.value(r), max.value(r));
                    acc.3 = Some(acc.3.map_or(lo, |m: f64| m.min(lo)));
                    acc.4 = Some(acc.4.map_or(hi, |m: f64| m.max(hi)));
                }
                if let Some(l) = opt_str(&labels, r) {
                    *acc.5.entry(l).or_default() += count;
                }
            }
        }
        let series = by_name
            .into_iter()
            .map(|(name, (data_type, buckets))| {
                let mut points = Vec::new();
                let (mut count, mut sum, mut valued) = (0u64, 0.0, 0u64);
                let mut previous: Option<(i64, f64)> = None;
                for (t, (n, s, nv, lo, hi, labels)) in buckets {
                    count += n;
                    sum += s;
                    valued += nv;
                    let avg = (nv > 0).then(|| s / nv as f64);
                    let change = match (avg, previous) {
                        (Some(a), Some((pt, pa))) if pt == t - step_ns && pa != 0.0 => {
                            Some((a - pa) / pa.abs())
                        }
                        _ => None,
                    };
                    if let Some(a) = avg {
                        previous = Some((t, a));
                    }
                    points.push(ScorePoint {
                        time: rfc3339(t),
                        time_ns: t,
                        count: n,
                        avg,
                        min: lo,
                        max: hi,
                        change,
                        labels,
                    });
                }
                ScoreSeries {
                    name,
                    data_type,
                    count,
                    avg: (valued > 0).then(|| sum / valued as f64),
                    points,
                }
            })
            .collect();
        Ok(ScoreMetrics {
            start: rfc3339(start_ns),
            end: rfc3339(end_ns),
            step_seconds: step_ns as f64 / 1e9,
            series,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_filters_parse_numbers_and_labels() {
        let f = parse_score_filters("faithfulness<0.5, helpful=false,topic!=billing,x>=4").unwrap();
        assert_eq!(f[0].name, "faithfulness");
        assert_eq!(f[0].op, Op::Lt);
        assert_eq!(f[0].value, FilterValue::Number(0.5));
        assert_eq!(f[1].value, FilterValue::Label("false".into()));
        assert_eq!(
            (f[2].op, &f[2].value),
            (Op::Ne, &FilterValue::Label("billing".into()))
        );
        assert_eq!((f[3].op, &f[3].value), (Op::Ge, &FilterValue::Number(4.0)));
    }

    #[test]
    fn bad_score_filters_are_named() {
        for (v, want) in [
            ("faithfulness", "needs a comparison"),
            ("<0.5", "needs a name"),
            ("topic<billing", "compares numbers only"),
        ] {
            let err = parse_score_filters(v).unwrap_err();
            assert!(err.contains(want), "{v}: {err}");
        }
    }

    #[test]
    fn score_filter_values_are_parameters() {
        let mut params = crate::engine::Params(vec![ScalarValue::Int64(Some(0))]);
        let f = parse_score_filters("x'); DROP TABLE t; --<0.5").unwrap();
        assert_eq!(f[0].name, "x'); DROP TABLE t; --");
        let sql = score_filter_sql(&f, &mut params);
        assert!(!sql.contains("DROP"));
        assert!(sql.contains("name = $2 AND value < $3"), "{sql}");
        assert_eq!(params.0[1], ScalarValue::Utf8(Some(f[0].name.clone())));
        assert_eq!(params.0.len(), 3);
    }
}
