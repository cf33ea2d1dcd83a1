//! Storage layout: where a tenant's blocks live, and what a block's metadata says.
//!
//! ```text
//! tenants/<namespace>/<project>/blocks/<block_id>.parquet    span rows, sorted by (trace_id, start_ns)
//! tenants/<namespace>/<project>/blocks/<block_id>.scores.parquet  scores written with the block, if any
//! tenants/<namespace>/<project>/blocks/<block_id>.meta.json  written last: a block is visible once this exists
//! ```
//!
//! A block id derives from the source range it holds (`wal-<first seq>-<last seq>`,
//! later `p<partition>-<first offset>-<last offset>` for Kafka), so a retried flush
//! rewrites the same block rather than adding a copy.

use arrow::array::RecordBatch;
use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

use crate::TenantId;

/// Format version written into every block's metadata.
pub const BLOCK_FORMAT_VERSION: u32 = 1;

/// The storage prefix holding everything of one tenant.
pub fn tenant_prefix(tenant: &TenantId) -> String {
    format!("tenants/{}/{}", tenant.namespace(), tenant.project())
}

/// The prefix holding a tenant's blocks.
pub fn blocks_prefix(tenant: &TenantId) -> String {
    format!("{}/blocks", tenant_prefix(tenant))
}

/// The id of a block holding spans of a source's records `first..=last`, with a
/// digest of its content. Writing the same content again (a retried flush) rewrites
/// the same block; two different blocks of one offset range — a trace kept early and
/// one decided later from the same record, or blocks that only count dropped spans —
/// never overwrite each other.
pub fn block_id(source: &str, first: u64, last: u64, digest: u64) -> String {
    format!("{source}-{first:020}-{last:020}-{digest:016x}")
}

/// Metadata of one Parquet block, stored beside it as JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockMeta {
    pub format_version: u32,
    pub block_id: String,
    pub tenant: TenantId,
    /// Path of the Parquet file inside the object store.
    pub path: String,
    /// Size of the Parquet file in bytes.
    pub size_bytes: u64,
    pub spans: u64,
    pub traces: u64,
    pub min_start_ns: i64,
    pub max_start_ns: i64,
    pub max_end_ns: i64,
    /// The source (`wal`, `p<partition>`) and the range of its records in this block.
    pub source: String,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Spans tail sampling decided on (kept or dropped) for this block: `spans` of
    /// `seen_spans` were kept, so sampled-out volume is `seen_spans / spans` times the
    /// stored one. Equal to `spans` when nothing is sampled.
    #[serde(default)]
    pub seen_spans: u64,
    /// When the block was written, Unix nanoseconds.
    pub created_ns: i64,
    /// Scores written with the block, in [`BlockMeta::scores_path`].
    #[serde(default)]
    pub scores: u64,
}

impl BlockMeta {
    /// How many decided spans each stored span stands for: `seen_spans / spans`, at
    /// least 1 (a block without sampling, or one written before counts were kept).
    pub fn sampling_weight(&self) -> f64 {
        sampling_weight(self.seen_spans, self.spans)
    }

    pub fn meta_path(&self) -> String {
        meta_path(&self.tenant, &self.block_id)
    }

    /// The Parquet file of the block's scores (present when `scores > 0`).
    pub fn scores_path(&self) -> String {
        scores_path(&self.tenant, &self.block_id)
    }

    /// Whether the block may hold spans starting in `[start_ns, end_ns)`.
    pub fn overlaps(&self, start_ns: i64, end_ns: i64) -> bool {
        self.min_start_ns < end_ns && self.max_start_ns >= start_ns
    }
}

/// `seen / kept`, at least 1; 1 when nothing was kept.
pub fn sampling_weight(seen: u64, kept: u64) -> f64 {
    if kept == 0 || seen <= kept {
        1.0
    } else {
        seen as f64 / kept as f64
    }
}

pub fn parquet_path(tenant: &TenantId, block_id: &str) -> String {
    format!("{}/{block_id}.parquet", blocks_prefix(tenant))
}

pub fn scores_path(tenant: &TenantId, block_id: &str) -> String {
    format!("{}/{block_id}.scores.parquet", blocks_prefix(tenant))
}

pub fn meta_path(tenant: &TenantId, block_id: &str) -> String {
    format!("{}/{block_id}.meta.json", blocks_prefix(tenant))
}

/// What a query can see of one tenant at one moment: its durable blocks and the
/// spans accepted but not yet in a block.
#[derive(Clone, Debug, Default)]
pub struct TenantSnapshot {
    pub blocks: Vec<BlockMeta>,
    pub head: Vec<RecordBatch>,
    /// Spans tail sampling decided on (kept or dropped) that the head's kept spans
    /// stand for, like [`BlockMeta::seen_spans`]; 0 when unknown (taken as no sampling).
    pub head_seen_spans: u64,
    /// Scores not yet in a block, in [`crate::score::score_schema`].
    pub head_scores: Vec<RecordBatch>,
}

/// The source of a tenant's visible data. The standalone process implements it from
/// its in-memory index and head; a distributed querier from object-storage listings.
pub trait SpanSource: Send + Sync + 'static {
    fn snapshot(&self, tenant: &TenantId) -> TenantSnapshot;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_tenant_scoped() {
        let t: TenantId = "team-a/chatbot".parse().unwrap();
        let id = block_id("wal", 1, 42, 0xabc);
        assert_eq!(
            id,
            "wal-00000000000000000001-00000000000000000042-0000000000000abc"
        );
        assert_eq!(
            parquet_path(&t, &id),
            "tenants/team-a/chatbot/blocks/wal-00000000000000000001-00000000000000000042-0000000000000abc.parquet"
        );
        assert!(meta_path(&t, &id).ends_with(".meta.json"));
    }
}

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid storage url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("fsync {path}: {source}")]
    Sync {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("block metadata {path} is unreadable: {reason}")]
    BadMeta { path: String, reason: String },
}

impl StorageError {
    /// Whether retrying the same operation may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StorageError::Store(_) | StorageError::Sync { .. })
    }
}

/// The object store holding blocks, with durability for local directories.
#[derive(Clone, Debug)]
pub struct Storage {
    store: std::sync::Arc<dyn object_store::ObjectStore>,
    url: String,
    /// Set for a local directory, whose files must be fsynced explicitly.
    local_root: Option<std::path::PathBuf>,
}

impl Storage {
    /// Opens storage from a URL: `file:///abs/dir` or a plain directory path.
    /// (S3, GCS and Azure URLs are accepted by the distributed roles; see docs/.)
    pub fn open(location: &str) -> Result<Storage, StorageError> {
        let invalid = |reason: &str| StorageError::InvalidUrl {
            url: location.to_owned(),
            reason: reason.to_owned(),
        };
        let path = match location.strip_prefix("file://") {
            Some(p) => std::path::PathBuf::from(p),
            None if location.contains("://") => {
                return Err(invalid(
                    "only file:// and plain directories are supported by this build",
                ));
            }
            None => std::path::PathBuf::from(location),
        };
        std::fs::create_dir_all(&path).map_err(|e| invalid(&e.to_string()))?;
        let path = std::fs::canonicalize(&path).map_err(|e| invalid(&e.to_string()))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(&path)?;
        Ok(Storage {
            store: std::sync::Arc::new(store),
            url: format!("file://{}", path.display()),
            local_root: Some(path),
        })
    }

    pub fn object_store(&self) -> std::sync::Arc<dyn object_store::ObjectStore> {
        self.store.clone()
    }

    /// Where the storage lives, for logs and for registering with a query engine.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Writes an object and returns once it is durable: for a local directory the file
    /// and its directory are fsynced (object_store's local backend does not).
    pub async fn put_durable(&self, path: &str, bytes: bytes::Bytes) -> Result<(), StorageError> {
        let location = object_store::path::Path::from(path);
        self.store.put(&location, bytes.into()).await?;
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let file = root.join(path);
        tokio::task::spawn_blocking(move || {
            let sync = |p: &std::path::Path| {
                std::fs::File::open(p)
                    .and_then(|f| f.sync_all())
                    .map_err(|source| StorageError::Sync {
                        path: p.to_owned(),
                        source,
                    })
            };
            sync(&file)?;
            match file.parent() {
                Some(dir) => sync(dir),
                None => Ok(()),
            }
        })
        .await
        .expect("fsync task does not panic")
    }

    /// Reads every block's metadata under `tenants/` (all tenants), and the paths of
    /// Parquet files that have no metadata (a flush that crashed half way).
    pub async fn list_blocks(&self) -> Result<(Vec<BlockMeta>, Vec<String>), StorageError> {
        use futures::TryStreamExt;
        let prefix = object_store::path::Path::from("tenants");
        let objects: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        let mut metas = Vec::new();
        let mut parquet = std::collections::HashSet::new();
        for o in &objects {
            let p = o.location.as_ref();
            if let Some(stem) = p.strip_suffix(".meta.json") {
                metas.push((stem.to_owned(), self.read_meta(p).await?));
            } else if p.ends_with(".scores.parquet") || p.ends_with(".parquet") {
                parquet.insert(p.to_owned());
            }
        }
        for (stem, _) in &metas {
            parquet.remove(&format!("{stem}.parquet"));
            parquet.remove(&format!("{stem}.scores.parquet"));
        }
        let orphans = parquet.into_iter().collect();
        let mut metas: Vec<BlockMeta> = metas.into_iter().map(|(_, m)| m).collect();
        metas.sort_by(|a, b| (&a.tenant, &a.block_id).cmp(&(&b.tenant, &b.block_id)));
        Ok((metas, orphans))
    }

    /// Paths of every block metadata object under `tenants/`.
    pub async fn list_meta_paths(&self) -> Result<Vec<String>, StorageError> {
        use futures::TryStreamExt;
        let prefix = object_store::path::Path::from("tenants");
        let objects: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        Ok(objects
            .into_iter()
            .map(|o| o.location.to_string())
            .filter(|p| p.ends_with(".meta.json"))
            .collect())
    }

    /// Reads one block's metadata.
    pub async fn read_meta(&self, path: &str) -> Result<BlockMeta, StorageError> {
        let location = object_store::path::Path::from(path);
        let bytes = self.store.get(&location).await?.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|e| StorageError::BadMeta {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    pub async fn delete(&self, path: &str) -> Result<(), StorageError> {
        self.store
            .delete(&object_store::path::Path::from(path))
            .await?;
        Ok(())
    }
}
