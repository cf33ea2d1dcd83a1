//! Deletion on request: `DELETE /api/v1/traces/{id}` and `DELETE /api/v1/traces?user_id=`.
//!
//! A request is recorded in storage ([`loupe_core::deletion`]) before it is answered;
//! from then on every query of this querier leaves the traces out (other querier
//! replicas at their next listing of records). The compactor removes the spans from
//! storage and marks the record completed.

use std::hash::Hasher as _;

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use datafusion::common::ScalarValue;
use loupe_core::TenantId;
use loupe_core::deletion::{self, DeletionRecord, MAX_TRACES_PER_REQUEST};

use crate::engine::{QueryEngine, QueryError, run};

/// What a request deletes.
#[derive(Clone, Debug)]
pub enum DeleteTarget {
    Trace([u8; 16]),
    /// Every trace with a span of this user id.
    User(String),
}

/// The answer to a deletion request, and one entry of the list of requests.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct DeletionView {
    pub id: String,
    /// RFC 3339.
    pub requested_at: String,
    pub requested_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Traces hidden from every query and to be removed from storage.
    pub traces: usize,
    /// `pending` until the compactor has removed every span, then `completed`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
}

/// A tenant's deletion requests, newest first.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct DeletionList {
    pub deletions: Vec<DeletionView>,
}

impl From<&DeletionRecord> for DeletionView {
    fn from(r: &DeletionRecord) -> DeletionView {
        DeletionView {
            id: r.id.clone(),
            requested_at: crate::model::rfc3339(r.requested_ns),
            requested_by: r.requested_by.clone(),
            user_id: r.user_id.clone(),
            traces: r.trace_ids.len(),
            status: if r.completed_ns.is_some() {
                "completed"
            } else {
                "pending"
            }
            .into(),
            completed_at: r.completed_ns.map(crate::model::rfc3339),
        }
    }
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl QueryEngine {
    /// Records a deletion request and hides its traces from every query at once.
    /// A trace id or user id with no stored span is refused as not found.
    pub async fn delete(
        &self,
        tenant: &TenantId,
        target: DeleteTarget,
        requested_by: &str,
    ) -> Result<Option<DeletionRecord>, QueryError> {
        let Some(storage) = self.deletion_storage() else {
            return Err(QueryError::Internal(
                "this querier cannot record deletions (no storage configured)".into(),
            ));
        };
        let traces = self.resolve(tenant, &target).await?;
        if traces.is_empty() {
            return Ok(None);
        }
        if traces.len() > MAX_TRACES_PER_REQUEST {
            return Err(QueryError::BadRequest(format!(
                "the user has more than {MAX_TRACES_PER_REQUEST} traces; delete them in parts by trace id"
            )));
        }
        let requested_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX);
        let mut digest = std::hash::DefaultHasher::new();
        digest.write(tenant.as_str().as_bytes());
        digest.write_i64(requested_ns);
        for (id, _, _) in &traces {
            digest.write(id);
        }
        let record = DeletionRecord {
            id: format!("{:016x}", digest.finish()),
            tenant: tenant.clone(),
            requested_ns,
            requested_by: requested_by.to_owned(),
            user_id: match &target {
                DeleteTarget::User(u) => Some(u.clone()),
                DeleteTarget::Trace(_) => None,
            },
            trace_ids: traces.iter().map(|(id, _, _)| hex(id)).collect(),
            min_start_ns: traces.iter().map(|t| t.1).min(),
            max_start_ns: traces.iter().map(|t| t.2).max(),
            completed_ns: None,
            blocks_rewritten: 0,
        };
        deletion::save(storage, &record)
            .await
            .map_err(|e| QueryError::Internal(format!("recording the deletion: {e}")))?;
        self.deletions().add(std::slice::from_ref(&record));
        tracing::info!(%tenant, id = %record.id, traces = record.trace_ids.len(), by = requested_by, "deletion requested");
        Ok(Some(record))
    }

    /// The tenant's deletion requests, newest first.
    pub async fn deletion_requests(
        &self,
        tenant: &TenantId,
    ) -> Result<Vec<DeletionRecord>, QueryError> {
        let Some(storage) = self.deletion_storage() else {
            return Ok(Vec::new());
        };
        let mut records = deletion::list_tenant(storage, tenant)
            .await
            .map_err(|e| QueryError::Internal(e.to_string()))?;
        records.sort_by_key(|r| std::cmp::Reverse(r.requested_ns));
        Ok(records)
    }

    /// The traces a target names that are stored (not already deleted), with the
    /// start range of their spans. Spans of a user's trace that do not carry the user
    /// id go with their trace: deletion is by trace id.
    async fn resolve(
        &self,
        tenant: &TenantId,
        target: &DeleteTarget,
    ) -> Result<Vec<([u8; 16], i64, i64)>, QueryError> {
        let mut snapshot = self.snapshot(tenant);
        let (filter, param) = match target {
            DeleteTarget::Trace(id) => {
                snapshot.blocks = self
                    .trace_filters
                    .candidates(std::mem::take(&mut snapshot.blocks), id)
                    .await;
                (
                    "trace_id = $1",
                    ScalarValue::FixedSizeBinary(16, Some(id.to_vec())),
                )
            }
            DeleteTarget::User(user) => ("user_id = $1", ScalarValue::Utf8(Some(user.clone()))),
        };
        let ctx = self.session(&snapshot, None).await?;
        let sql = format!(
            "SELECT trace_id, min(start_ns) AS lo, max(start_ns) AS hi FROM \
             (SELECT trace_id, start_ns FROM blocks WHERE {filter} \
              UNION ALL SELECT trace_id, start_ns FROM head WHERE {filter}) \
             GROUP BY trace_id LIMIT {}",
            MAX_TRACES_PER_REQUEST + 1
        );
        let mut out = Vec::new();
        for b in run(&ctx, &sql, vec![param]).await? {
            let ids = b.column(0).as_fixed_size_binary();
            let lo = b.column(1).as_primitive::<Int64Type>();
            let hi = b.column(2).as_primitive::<Int64Type>();
            for i in 0..b.num_rows() {
                if let Ok(id) = <[u8; 16]>::try_from(ids.value(i)) {
                    out.push((id, lo.value(i), hi.value(i)));
                }
            }
        }
        out.sort();
        Ok(out)
    }
}
