//! Sessions (multi-turn conversations) and users: traces grouped by the session or
//! user they belong to, with their totals.
//!
//! A trace belongs to the session and user any of its spans names (instrumentations
//! usually set them on the root span). Totals are over stored traces.

use datafusion::common::ScalarValue;
use loupe_core::TenantId;
use serde::{Deserialize, Serialize};

use crate::engine::{
    QueryEngine, QueryError, check_range, floats, ints, opt_f64, opt_i64, opt_str, run, strings,
};
use crate::model::rfc3339;

/// Spans this far around the range are read to assemble traces that start in it.
const TRACE_SLACK_NS: i64 = 3_600 * 1_000_000_000;

/// Totals of the traces of one session or user.
#[derive(Clone, Debug, PartialEq, Serialize, schemars::JsonSchema, Deserialize)]
pub struct Group {
    /// The session id (sessions) or user id (users).
    pub id: String,
    /// A session's user (the greatest when several), a user's session count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sessions: Option<u64>,
    pub traces: u64,
    pub errors: u64,
    pub first: String,
    pub last: String,
    pub first_ns: i64,
    pub last_ns: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_usd: f64,
}

/// What to group traces by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    Session,
    User,
}

/// How users are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Most recent activity first.
    Recent,
    Cost,
    Traces,
    Tokens,
}

impl Order {
    pub fn parse(s: &str) -> Option<Order> {
        match s.to_ascii_lowercase().as_str() {
            "recent" => Some(Order::Recent),
            "cost" => Some(Order::Cost),
            "traces" | "requests" => Some(Order::Traces),
            "tokens" => Some(Order::Tokens),
            _ => None,
        }
    }

    fn sql(self) -> &'static str {
        match self {
            Order::Recent => "last_ns DESC",
            Order::Cost => "cost_usd DESC NULLS LAST",
            Order::Traces => "traces DESC",
            Order::Tokens => "(coalesce(input_tokens, 0) + coalesce(output_tokens, 0)) DESC",
        }
    }
}

/// A listing of sessions or users with traces starting in `[start_ns, end_ns)`.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupQuery {
    pub by: GroupBy,
    pub start_ns: i64,
    pub end_ns: i64,
    /// Only this user's sessions (sessions), or only this user (users).
    pub user_id: Option<String>,
    pub order: Order,
    pub limit: usize,
}

impl QueryEngine {
    /// Sessions or users with their totals.
    pub async fn groups(
        &self,
        tenant: &TenantId,
        q: &GroupQuery,
    ) -> Result<Vec<Group>, QueryError> {
        check_range(q.start_ns, q.end_ns)?;
        let scan = (
            q.start_ns.saturating_sub(TRACE_SLACK_NS),
            q.end_ns.saturating_add(TRACE_SLACK_NS),
        );
        let ctx = self.span_session(tenant, scan).await?;
        let mut params = vec![
            ScalarValue::Int64(Some(scan.0)),
            ScalarValue::Int64(Some(scan.1)),
            ScalarValue::Int64(Some(q.start_ns)),
            ScalarValue::Int64(Some(q.end_ns)),
            ScalarValue::Int64(Some(q.limit as i64)),
        ];
        let user_cond = match &q.user_id {
            Some(u) => {
                params.push(ScalarValue::Utf8(Some(u.clone())));
                " AND user_id = $6"
            }
            None => "",
        };
        let (key, extra) = match q.by {
            GroupBy::Session => (
                "session_id",
                "max(user_id) AS user_id, CAST(NULL AS BIGINT) AS sessions",
            ),
            GroupBy::User => (
                "user_id",
                "CAST(NULL AS VARCHAR) AS user_id, count(DISTINCT session_id) AS sessions",
            ),
        };
        let cols = "trace_id, start_ns, end_ns, status, input_tokens, output_tokens, \
                    cost_total_usd, user_id, session_id";
        let sql = format!(
            "WITH spans AS (\
               SELECT {cols} FROM blocks WHERE start_ns >= $1 AND start_ns < $2 \
               UNION ALL SELECT {cols} FROM head WHERE start_ns >= $1 AND start_ns < $2), \
             traces AS (SELECT trace_id, min(start_ns) AS start_ns, max(end_ns) AS end_ns, \
               max(session_id) AS session_id, max(user_id) AS user_id, \
               max(CASE WHEN status = 'ERROR' THEN 1 ELSE 0 END) AS err, \
               sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, \
               sum(cost_total_usd) AS cost_usd FROM spans GROUP BY trace_id) \
             SELECT {key} AS id, {extra}, count(*) AS traces, sum(err) AS errors, \
               min(start_ns) AS first_ns, max(end_ns) AS last_ns, \
               sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, \
               sum(cost_usd) AS cost_usd \
             FROM traces WHERE {key} IS NOT NULL AND start_ns >= $3 AND start_ns < $4{user_cond} \
             GROUP BY {key} ORDER BY {}, id LIMIT $5",
            q.order.sql()
        );
        let batches = run(&ctx, &sql, params).await?;
        let mut out = Vec::new();
        for b in &batches {
            let (id, user) = (strings(b, "id")?, strings(b, "user_id")?);
            let sessions = ints(b, "sessions")?;
            let (traces, errors) = (ints(b, "traces")?, ints(b, "errors")?);
            let (first, last) = (ints(b, "first_ns")?, ints(b, "last_ns")?);
            let (tin, tout) = (ints(b, "input_tokens")?, ints(b, "output_tokens")?);
            let cost = floats(b, "cost_usd")?;
            for r in 0..b.num_rows() {
                out.push(Group {
                    id: opt_str(&id, r).unwrap_or_default(),
                    user_id: opt_str(&user, r),
                    sessions: opt_i64(&sessions, r).map(|n| n.max(0) as u64),
                    traces: opt_i64(&traces, r).unwrap_or(0).max(0) as u64,
                    errors: opt_i64(&errors, r).unwrap_or(0).max(0) as u64,
                    first: rfc3339(first.value(r)),
                    last: rfc3339(last.value(r)),
                    first_ns: first.value(r),
                    last_ns: last.value(r),
                    input_tokens: opt_i64(&tin, r).unwrap_or(0),
                    output_tokens: opt_i64(&tout, r).unwrap_or(0),
                    cost_usd: opt_f64(&cost, r).unwrap_or(0.0),
                });
            }
        }
        Ok(out)
    }
}
