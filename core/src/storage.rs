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
//!
//! The compactor merges blocks into one whose metadata lists the blocks it replaces
//! ([`Compaction::replaces`]). Readers hide a replaced block as soon as the replacing
//! block's metadata exists ([`visible`]), and the compactor deletes replaced blocks
//! only after a grace period, so a query never sees a span twice or misses one.

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
    /// Set on blocks the compactor wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compaction: Option<Compaction>,
}

/// What a compacted block stands in for.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Compaction {
    /// Ids of the blocks whose spans this block holds; readers hide them.
    pub replaces: Vec<String>,
    /// 1 + the highest level among the replaced blocks (writer blocks are level 0).
    pub level: u32,
    /// The highest record of each source (`wal`, `p<partition>`) in the replaced
    /// blocks, so a process replaying its log knows what is already stored.
    #[serde(default)]
    pub last_seq: std::collections::BTreeMap<String, u64>,
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

    /// The blocks this one replaces (none for a block a writer wrote).
    pub fn replaces(&self) -> &[String] {
        self.compaction.as_ref().map_or(&[], |c| &c.replaces)
    }

    /// The highest record of `source` this block holds, directly or through the
    /// blocks it replaces.
    pub fn last_seq_of(&self, source: &str) -> Option<u64> {
        let own = (self.source == source).then_some(self.last_seq);
        let merged = self
            .compaction
            .as_ref()
            .and_then(|c| c.last_seq.get(source).copied());
        own.max(merged)
    }
}

/// The blocks a query may read: every block except those another block replaces.
/// A compacted block and the blocks it replaces are never both visible, whatever
/// moment a listing was taken at.
pub fn visible(blocks: Vec<BlockMeta>) -> Vec<BlockMeta> {
    let replaced: std::collections::HashSet<String> = blocks
        .iter()
        .flat_map(|b| b.replaces().iter().cloned())
        .collect();
    if replaced.is_empty() {
        return blocks;
    }
    blocks
        .into_iter()
        .filter(|b| !replaced.contains(&b.block_id))
        .collect()
}

/// A sampling weight rounded to four significant digits: blocks whose weights round
/// alike are read (and merged) as one group.
pub fn rounded_weight(w: f64) -> f64 {
    if !w.is_finite() || w <= 1.0 {
        return 1.0;
    }
    let scale = 10f64.powi(3 - w.log10().floor() as i32);
    (w * scale).round() / scale
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

/// What [`Storage::delete_prefix`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixDeletion {
    /// Block metadata objects (one per block).
    pub blocks: u64,
    /// Every object, metadata included.
    pub objects: u64,
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
    /// Traces deleted on request: queries leave them out (see [`crate::deletion`]).
    pub deleted: std::sync::Arc<std::collections::HashSet<[u8; 16]>>,
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
    /// For a bucket with a prefix: the bucket's store and the prefix (`p/`), for
    /// readers that address objects by full path (DataFusion's listing tables).
    bucket: Option<(std::sync::Arc<dyn object_store::ObjectStore>, String)>,
    url: String,
    /// Set for a local directory, whose files must be fsynced explicitly.
    local_root: Option<std::path::PathBuf>,
}

impl Storage {
    /// Opens storage from a URL: `file:///abs/dir`, a plain directory path, or
    /// `s3://bucket[/prefix]` for AWS S3 and S3-compatible stores (MinIO, Ceph, GCS's
    /// S3 endpoint), configured the way AWS tools are: `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT` (a non-AWS endpoint),
    /// `AWS_ALLOW_HTTP=true` (a plain-HTTP endpoint), or a pod's web identity.
    pub fn open(location: &str) -> Result<Storage, StorageError> {
        let invalid = |reason: &str| StorageError::InvalidUrl {
            url: location.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let prefix = prefix.trim_matches('/');
            if bucket.is_empty() {
                return Err(invalid("no bucket: expected s3://<bucket>[/<prefix>]"));
            }
            let s3: std::sync::Arc<dyn object_store::ObjectStore> = std::sync::Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| invalid(&e.to_string()))?,
            );
            let (store, bucket_root): (std::sync::Arc<dyn object_store::ObjectStore>, _) = if prefix
                .is_empty()
            {
                (s3, None)
            } else {
                (
                    std::sync::Arc::new(object_store::prefix::PrefixStore::new(s3.clone(), prefix)),
                    Some((s3, format!("{prefix}/"))),
                )
            };
            return Ok(Storage {
                store,
                bucket: bucket_root,
                url: if prefix.is_empty() {
                    format!("s3://{bucket}")
                } else {
                    format!("s3://{bucket}/{prefix}")
                },
                local_root: None,
            });
        }
        let path = match location.strip_prefix("file://") {
            Some(p) => std::path::PathBuf::from(p),
            None if location.contains("://") => {
                return Err(invalid(
                    "expected a directory, file:///<dir> or s3://<bucket>[/<prefix>]",
                ));
            }
            None => std::path::PathBuf::from(location),
        };
        std::fs::create_dir_all(&path).map_err(|e| invalid(&e.to_string()))?;
        let path = std::fs::canonicalize(&path).map_err(|e| invalid(&e.to_string()))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(&path)?;
        Ok(Storage {
            store: std::sync::Arc::new(store),
            bucket: None,
            url: format!("file://{}", path.display()),
            local_root: Some(path),
        })
    }

    pub fn object_store(&self) -> std::sync::Arc<dyn object_store::ObjectStore> {
        self.store.clone()
    }

    /// The store to address objects by full path, and the path prefix to put before
    /// every path of this storage (empty unless the storage is a prefix of a bucket).
    /// DataFusion's listing tables read through this: they find no file through an
    /// `object_store` `PrefixStore`.
    pub fn root_store(&self) -> (std::sync::Arc<dyn object_store::ObjectStore>, &str) {
        match &self.bucket {
            Some((store, prefix)) => (store.clone(), prefix),
            None => (self.store.clone(), ""),
        }
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
        let (metas, orphans) = self.list_blocks_with_orphan_times().await?;
        Ok((metas, orphans.into_iter().map(|(p, _)| p).collect()))
    }

    /// Like [`Storage::list_blocks`], with each orphan's last modification time
    /// (Unix nanoseconds): a file younger than a flush takes may still get its
    /// metadata. A block whose metadata vanished between listing and reading (a
    /// compactor deleting it) is left out.
    pub async fn list_blocks_with_orphan_times(
        &self,
    ) -> Result<(Vec<BlockMeta>, Vec<(String, i64)>), StorageError> {
        use futures::TryStreamExt;
        let prefix = object_store::path::Path::from("tenants");
        let objects: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        let mut metas = Vec::new();
        let mut parquet = std::collections::HashMap::new();
        for o in &objects {
            let p = o.location.as_ref();
            if let Some(stem) = p.strip_suffix(".meta.json") {
                match self.read_meta(p).await {
                    Ok(meta) => metas.push((stem.to_owned(), meta)),
                    Err(StorageError::Store(object_store::Error::NotFound { .. })) => {}
                    Err(e) => return Err(e),
                }
            } else if p.ends_with(".parquet") {
                let modified = o.last_modified.timestamp_nanos_opt().unwrap_or(i64::MAX);
                parquet.insert(p.to_owned(), modified);
            }
        }
        for (stem, _) in &metas {
            parquet.remove(&format!("{stem}.parquet"));
            parquet.remove(&format!("{stem}.scores.parquet"));
        }
        let mut orphans: Vec<(String, i64)> = parquet.into_iter().collect();
        orphans.sort();
        let mut metas: Vec<BlockMeta> = metas.into_iter().map(|(_, m)| m).collect();
        metas.sort_by(|a, b| (&a.tenant, &a.block_id).cmp(&(&b.tenant, &b.block_id)));
        Ok((metas, orphans))
    }

    /// Paths of every block metadata object under `tenants/`.
    pub async fn list_meta_paths(&self) -> Result<Vec<String>, StorageError> {
        let mut paths = self.list_paths("tenants").await?;
        paths.retain(|p| p.ends_with(".meta.json"));
        Ok(paths)
    }

    /// Writes a block's metadata, durably: the last write of a block, which makes it
    /// visible.
    pub async fn put_meta(&self, meta: &BlockMeta) -> Result<(), StorageError> {
        let json = serde_json::to_vec_pretty(meta).expect("block metadata serializes");
        self.put_durable(&meta.meta_path(), bytes::Bytes::from(json))
            .await
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

    /// Deletes an object; deleting one that is already gone succeeds.
    pub async fn delete(&self, path: &str) -> Result<(), StorageError> {
        match self
            .store
            .delete(&object_store::path::Path::from(path))
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes a block: its metadata first (which hides it from every listing), then
    /// its files. Interrupted half way, it leaves files without metadata, which are
    /// removed as orphans.
    pub async fn delete_block(&self, meta: &BlockMeta) -> Result<(), StorageError> {
        self.delete(&meta.meta_path()).await?;
        self.delete(&meta.path).await?;
        if meta.scores > 0 {
            self.delete(&meta.scores_path()).await?;
        }
        Ok(())
    }

    /// Reads a whole object.
    pub async fn get(&self, path: &str) -> Result<bytes::Bytes, StorageError> {
        let location = object_store::path::Path::from(path);
        Ok(self.store.get(&location).await?.bytes().await?)
    }

    /// Deletes every object under `prefix`, block metadata first (which hides those
    /// blocks from every reader at once), then the rest; objects already gone count
    /// as deleted. Returns how many objects were deleted, and how many of them were
    /// block metadata.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<PrefixDeletion, StorageError> {
        use futures::{StreamExt, TryStreamExt};
        let paths = self.list_paths(prefix).await?;
        let (metas, rest): (Vec<String>, Vec<String>) =
            paths.into_iter().partition(|p| p.ends_with(".meta.json"));
        let mut out = PrefixDeletion {
            blocks: metas.len() as u64,
            objects: 0,
        };
        for batch in [metas, rest] {
            let locations = futures::stream::iter(
                batch
                    .into_iter()
                    .map(|p| Ok(object_store::path::Path::from(p))),
            )
            .boxed();
            // Batched where the store can (S3 DeleteObjects), concurrent elsewhere.
            let deleted: Vec<_> = self
                .store
                .delete_stream(locations)
                .map(|r| match r {
                    Err(object_store::Error::NotFound { path, .. }) => {
                        Ok(object_store::path::Path::from(path))
                    }
                    other => other,
                })
                .try_collect()
                .await?;
            out.objects += deleted.len() as u64;
        }
        Ok(out)
    }

    /// Lists the objects under `prefix` (paths only).
    pub async fn list_paths(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        use futures::TryStreamExt;
        let prefix = object_store::path::Path::from(prefix);
        let objects: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        let mut paths: Vec<String> = objects
            .into_iter()
            .map(|o| o.location.to_string())
            .collect();
        paths.sort();
        Ok(paths)
    }
}
