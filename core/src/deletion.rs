//! Deletion on request (GDPR-style): a record of which traces a project asked to
//! delete, kept in storage beside its blocks.
//!
//! ```text
//! deletions/<namespace>/<project>/<requested_ns>-<id>.json
//! ```
//!
//! Queriers hide the traces of every record at once (the one that took the request
//! immediately, the others at their next listing); the compactor rewrites the blocks
//! holding them and then marks the record completed. Records are kept: they are the
//! proof that the request was made and carried out.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::TenantId;
use crate::storage::{Storage, StorageError};

/// Most trace ids one request may name (a user id resolving to more is refused).
pub const MAX_TRACES_PER_REQUEST: usize = 100_000;

/// One deletion request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeletionRecord {
    pub id: String,
    pub tenant: TenantId,
    /// When the request was taken, Unix nanoseconds.
    pub requested_ns: i64,
    /// The name of the key that asked (never the key itself); `anonymous` without keys.
    pub requested_by: String,
    /// Set when the request named a user id: every trace of that user at the time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The traces to delete, as 32 hex digits.
    pub trace_ids: Vec<String>,
    /// Start times of the traces' spans known at request time (Unix nanoseconds), so
    /// the compactor looks only at blocks of that range; `None` when nothing was found.
    #[serde(default)]
    pub min_start_ns: Option<i64>,
    #[serde(default)]
    pub max_start_ns: Option<i64>,
    /// Set by the compactor once no block holds any of the traces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_ns: Option<i64>,
    /// Blocks the compactor rewrote to carry the request out.
    #[serde(default)]
    pub blocks_rewritten: u64,
}

impl DeletionRecord {
    pub fn path(&self) -> String {
        format!(
            "{}/{:020}-{}.json",
            tenant_prefix(&self.tenant),
            self.requested_ns,
            self.id
        )
    }

    /// The trace ids as bytes (ids that are not 32 hex digits are skipped; records
    /// are written by Loupe, which only writes valid ones).
    pub fn trace_id_bytes(&self) -> impl Iterator<Item = [u8; 16]> + '_ {
        self.trace_ids.iter().filter_map(|h| parse_trace_id(h))
    }
}

fn parse_trace_id(hex: &str) -> Option<[u8; 16]> {
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Where a tenant's deletion records live.
pub fn tenant_prefix(tenant: &TenantId) -> String {
    format!("deletions/{}/{}", tenant.namespace(), tenant.project())
}

/// What [`purge_tenant`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Purge {
    /// Blocks (counted by their metadata).
    pub blocks: u64,
    /// Objects: block files, metadata, score files, deletion records, leftovers.
    pub objects: u64,
}

/// Deletes everything stored for a tenant: its blocks (metadata first, so readers
/// stop seeing them at once) and its deletion records. Used when a project itself is
/// deleted; a project recreated later under the same name starts empty.
pub async fn purge_tenant(storage: &Storage, tenant: &TenantId) -> Result<Purge, StorageError> {
    let data = storage
        .delete_prefix(&crate::storage::tenant_prefix(tenant))
        .await?;
    let records = storage.delete_prefix(&tenant_prefix(tenant)).await?;
    Ok(Purge {
        blocks: data.blocks,
        objects: data.objects + records.objects,
    })
}

/// Reads every deletion record in storage.
pub async fn list(storage: &Storage) -> Result<Vec<DeletionRecord>, StorageError> {
    list_under(storage, "deletions").await
}

/// Reads the deletion records of one tenant.
pub async fn list_tenant(
    storage: &Storage,
    tenant: &TenantId,
) -> Result<Vec<DeletionRecord>, StorageError> {
    let records = list_under(storage, &tenant_prefix(tenant)).await?;
    Ok(records
        .into_iter()
        .filter(|r| &r.tenant == tenant)
        .collect())
}

async fn list_under(storage: &Storage, prefix: &str) -> Result<Vec<DeletionRecord>, StorageError> {
    let paths = record_paths(storage, prefix).await?;
    read_records(storage, paths).await
}

async fn record_paths(storage: &Storage, prefix: &str) -> Result<Vec<String>, StorageError> {
    let mut paths = storage.list_paths(prefix).await?;
    paths.retain(|p| p.ends_with(".json"));
    Ok(paths)
}

/// Reads records (one that vanished since the listing is skipped).
async fn read_records(
    storage: &Storage,
    paths: impl IntoIterator<Item = String>,
) -> Result<Vec<DeletionRecord>, StorageError> {
    let mut out = Vec::new();
    for path in paths {
        let bytes = match storage.get(&path).await {
            Ok(b) => b,
            Err(StorageError::Store(object_store::Error::NotFound { .. })) => continue,
            Err(e) => return Err(e),
        };
        let record: DeletionRecord =
            serde_json::from_slice(&bytes).map_err(|e| StorageError::BadMeta {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        out.push(record);
    }
    Ok(out)
}

/// Writes (or rewrites) a record durably.
pub async fn save(storage: &Storage, record: &DeletionRecord) -> Result<(), StorageError> {
    let json = serde_json::to_vec_pretty(record).expect("deletion record serializes");
    storage
        .put_durable(&record.path(), bytes::Bytes::from(json))
        .await
}

/// The deleted trace ids of every tenant, as queries need them: shared by the
/// handlers that take requests and the loop that reads records from storage.
#[derive(Clone, Default)]
pub struct Deletions {
    inner: Arc<RwLock<DeletionsInner>>,
}

#[derive(Default)]
struct DeletionsInner {
    /// Record ids already folded in.
    seen: HashSet<String>,
    /// Record objects already read (a record's path never changes).
    read: HashSet<String>,
    traces: HashMap<TenantId, Arc<HashSet<[u8; 16]>>>,
}

impl Deletions {
    /// The tenant's deleted traces (empty when none).
    pub fn of(&self, tenant: &TenantId) -> Arc<HashSet<[u8; 16]>> {
        self.inner
            .read()
            .expect("deletions lock")
            .traces
            .get(tenant)
            .cloned()
            .unwrap_or_default()
    }

    /// Folds records in (records already known are skipped).
    pub fn add(&self, records: &[DeletionRecord]) {
        let mut inner = self.inner.write().expect("deletions lock");
        // Each tenant's set is copied once per call (queries hold the old one).
        let mut grown: HashMap<TenantId, HashSet<[u8; 16]>> = HashMap::new();
        for r in records {
            if !inner.seen.insert(r.id.clone()) {
                continue;
            }
            grown
                .entry(r.tenant.clone())
                .or_insert_with(|| {
                    inner
                        .traces
                        .get(&r.tenant)
                        .map(|s| (**s).clone())
                        .unwrap_or_default()
                })
                .extend(r.trace_id_bytes());
        }
        for (tenant, set) in grown {
            inner.traces.insert(tenant, Arc::new(set));
        }
    }

    /// Lists the records in storage and reads and folds in those not read before.
    pub async fn refresh(&self, storage: &Storage) -> Result<(), StorageError> {
        let mut paths = record_paths(storage, "deletions").await?;
        {
            let inner = self.inner.read().expect("deletions lock");
            paths.retain(|p| !inner.read.contains(p));
        }
        if paths.is_empty() {
            return Ok(());
        }
        let records = read_records(storage, paths.clone()).await?;
        self.add(&records);
        self.inner
            .write()
            .expect("deletions lock")
            .read
            .extend(paths);
        Ok(())
    }

    /// Refreshes every `interval`; errors are logged and the known set stays.
    pub async fn refresh_loop(self, storage: Storage, interval: std::time::Duration) {
        loop {
            tokio::time::sleep(interval).await;
            if let Err(e) = self.refresh(&storage).await {
                tracing::warn!(error = %e, "reading deletion records failed; using the known ones");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tenant: &str, id: &str, traces: &[u8]) -> DeletionRecord {
        DeletionRecord {
            id: id.into(),
            tenant: tenant.parse().unwrap(),
            requested_ns: 1_700_000_000_000_000_000,
            requested_by: "ops".into(),
            user_id: None,
            trace_ids: traces
                .iter()
                .map(|t| {
                    [*t; 16]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                })
                .collect(),
            min_start_ns: Some(1),
            max_start_ns: Some(2),
            completed_ns: None,
            blocks_rewritten: 0,
        }
    }

    #[tokio::test]
    async fn a_purge_removes_one_tenant_and_nothing_of_its_neighbours() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap()).unwrap();
        let gone: TenantId = "team-a/chat".parse().unwrap();
        // `chat2` shares the string prefix, not the path segment: it must stay.
        let neighbours: Vec<TenantId> = ["team-a/chat2", "team-b/chat"]
            .iter()
            .map(|t| t.parse().unwrap())
            .collect();
        for t in std::iter::once(&gone).chain(&neighbours) {
            for block in ["b1", "b2"] {
                for path in [
                    crate::storage::meta_path(t, block),
                    crate::storage::parquet_path(t, block),
                ] {
                    storage.put_durable(&path, "x".into()).await.unwrap();
                }
            }
            save(&storage, &record(&t.to_string(), "r1", &[1]))
                .await
                .unwrap();
        }

        let purge = purge_tenant(&storage, &gone).await.unwrap();
        assert_eq!(
            purge,
            Purge {
                blocks: 2,
                objects: 5
            }
        );
        assert!(
            storage
                .list_paths(&crate::storage::tenant_prefix(&gone))
                .await
                .unwrap()
                .is_empty()
        );
        assert!(list_tenant(&storage, &gone).await.unwrap().is_empty());
        for t in &neighbours {
            let left = storage
                .list_paths(&crate::storage::tenant_prefix(t))
                .await
                .unwrap();
            assert_eq!(left.len(), 4, "{t}: {left:?}");
            assert_eq!(list_tenant(&storage, t).await.unwrap().len(), 1, "{t}");
        }
        // Purging again finds nothing and succeeds.
        assert_eq!(
            purge_tenant(&storage, &gone).await.unwrap(),
            Purge::default()
        );
    }

    #[tokio::test]
    async fn records_round_trip_through_storage_per_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_str().unwrap()).unwrap();
        let a = record("team-a/chat", "r1", &[1, 2]);
        let b = record("team-b/chat", "r2", &[3]);
        save(&storage, &a).await.unwrap();
        save(&storage, &b).await.unwrap();
        assert!(a.path().starts_with("deletions/team-a/chat/"));

        let deletions = Deletions::default();
        deletions.refresh(&storage).await.unwrap();
        let ta: TenantId = "team-a/chat".parse().unwrap();
        let tb: TenantId = "team-b/chat".parse().unwrap();
        assert_eq!(*deletions.of(&ta), HashSet::from([[1u8; 16], [2u8; 16]]));
        assert_eq!(*deletions.of(&tb), HashSet::from([[3u8; 16]]));
        let other: TenantId = "team-c/chat".parse().unwrap();
        assert!(deletions.of(&other).is_empty());

        // A completed record rewritten in place stays one record.
        let mut done = a.clone();
        done.completed_ns = Some(5);
        save(&storage, &done).await.unwrap();
        let all = list(&storage).await.unwrap();
        assert_eq!(all.len(), 2);
        assert!(all.iter().any(|r| r.completed_ns == Some(5)));
    }

    #[test]
    fn malformed_trace_ids_are_skipped() {
        let mut r = record("a/b", "x", &[7]);
        r.trace_ids.push("zz".into());
        r.trace_ids.push("g".repeat(32));
        assert_eq!(r.trace_id_bytes().collect::<Vec<_>>(), vec![[7u8; 16]]);
    }
}
